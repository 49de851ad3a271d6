"""The model-backend interface the runtime serves.

A backend wraps one policy family (the built-in demo VLA; later OpenVLA, MergeVLA-style and LeRobot
policies). It owns preprocessing and the forward pass; the runtime owns weights (it folds
``base + core`` and applies skill residuals to the parameters of ``backend.module``), batching and
clipping. Keeping the split this way is what lets one runtime serve any backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn


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


@dataclass
class ObservationBatch:
    """A batch of B observations. state: (B, state_dim) float32; images: key -> (B, H, W, C) uint8;
    instructions: B strings."""

    state: np.ndarray
    instructions: list[str]
    images: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.instructions)


class PolicyBackend(ABC):
    """A loaded policy. ``module.state_dict()`` keys are exactly the checkpoint's keys, so a merge
    state's tensor names address the module's parameters."""

    spec: PolicySpec
    module: nn.Module

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
             ) -> "PolicyBackend":
        """Load from a Hugging Face-layout directory (config.json + safetensors)."""

    @abstractmethod
    def predict(self, batch: ObservationBatch) -> torch.Tensor:
        """(B, chunk_length, action_dim) float32 actions in the environment's units, unclipped.
        Must be safe to call under ``torch.inference_mode()``."""

    def value_projection_names(self) -> list[str]:
        """Weight keys of action-expert value projections (for the value-subspace router); empty
        when the architecture has none."""
        return []
