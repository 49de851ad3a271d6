"""The observation/action contract a server announces at episode start (shared with the server's
backends, so there is one definition of it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ImageSpec:
    """One camera: HWC uint8 of this size is what the model consumes (the service resizes nothing:
    a wrong size is an INVALID_ARGUMENT)."""

    height: int
    width: int
    channels: int = 3


@dataclass
class PolicySpec:
    """Observation/action contract of a backend, sent to clients at episode start.

    images: camera key -> ImageSpec (may be empty for state-only policies);
    state_dim: proprioceptive/object state length (float32); action_dim, chunk_length: the
    predicted chunk is (chunk_length, action_dim) float32; action_low/high: per-dimension bounds the
    runtime clips to; normalization: named statistics (e.g. {"state_mean": [...]}) for clients.
    """

    state_dim: int
    action_dim: int
    chunk_length: int
    action_low: list[float]
    action_high: list[float]
    images: dict[str, ImageSpec] = field(default_factory=dict)
    normalization: dict[str, list[float]] = field(default_factory=dict)
    name: str = ""
