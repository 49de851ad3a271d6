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
from carve_client.spec import ImageSpec, PolicySpec  # noqa: F401  (re-exported)
from torch import nn

from policy_server.models.features import NO_ROUTING_FEATURES, RoutingFeatures


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

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
           ) -> "PolicyBackend":
        """Move ``module`` to ``device`` and/or cast it to ``dtype`` (None keeps either) and update
        whatever the backend caches about its placement (e.g. where it puts inputs). The runtime
        places a backend only through this. Returns self."""
        self.module.to(device=device, dtype=dtype)
        return self

    @property
    def routing_features(self) -> RoutingFeatures:
        """Which modules the observation routers can read (none by default); see
        ``policy_server.models.features``."""
        return NO_ROUTING_FEATURES
