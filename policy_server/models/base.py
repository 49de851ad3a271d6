"""The model-backend interface the runtime serves.

A backend wraps one policy family (the built-in demo VLA; later OpenVLA, MergeVLA-style and LeRobot
policies). It owns preprocessing and the forward pass; the runtime owns weights (it folds
``base + core`` and applies skill residuals to the parameters of ``backend.module``), batching and
clipping. Keeping the split this way is what lets one runtime serve any backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from carve_client.spec import ImageSpec, PolicySpec  # noqa: F401  (re-exported)
from torch import nn

from policy_server.models.features import NO_ROUTING_FEATURES, RoutingFeatures


@dataclass
class ObservationBatch:
    """A batch of B observations. state: (B, state_dim) float32; images: key -> (B, H, W, C) uint8;
    instructions: B strings.

    Per-row context for backends with per-skill processing or per-episode state (LeRobot's
    per-skill normalisation, diffusion's observation queues); None when unknown, which such a
    backend treats as core-only / a one-call episode. skills: B skill names (None = core-only),
    filled by the runtime; episode_ids: B episode ids, filled by the service."""

    state: np.ndarray
    instructions: list[str]
    images: dict[str, np.ndarray] = field(default_factory=dict)
    skills: list[str | None] | None = None
    episode_ids: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.instructions)

    def take(self, rows: list[int]) -> "ObservationBatch":
        """Sub-batch with the given row indices (in that order), per-row context included."""
        pick = (lambda xs: None if xs is None else [xs[i] for i in rows])
        return ObservationBatch(state=self.state[rows],
                                instructions=[self.instructions[i] for i in rows],
                                images={k: v[rows] for k, v in self.images.items()},
                                skills=pick(self.skills), episode_ids=pick(self.episode_ids))

    def with_skills(self, skills: list[str | None]) -> "ObservationBatch":
        """The same batch with ``skills`` as its per-row skills (arrays are shared, not copied)."""
        return replace(self, skills=list(skills))

    @staticmethod
    def concat_context(batches: list["ObservationBatch"], name: str) -> list | None:
        """Per-row context ``name`` ("skills" / "episode_ids") of concatenated batches; None when
        no batch has it (rows of batches without it get None)."""
        if all(getattr(b, name) is None for b in batches):
            return None
        return [x for b in batches for x in (getattr(b, name) or [None] * len(b))]


class PolicyBackend(ABC):
    """A loaded policy. ``module.state_dict()`` keys are exactly the checkpoint's keys, so a merge
    state's tensor names address the module's parameters."""

    spec: PolicySpec
    module: nn.Module
    # True: camera images of another size than ``spec.images`` are accepted and resized to it
    # (the transport does it before batching; see ``service.validation``). False: refused.
    resizes_images: bool = False

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
        places a backend only through this. Returns self.

        Backends that place their inputs keep ``device`` / ``dtype`` attributes: they follow here."""
        self.module.to(device=device, dtype=dtype)
        if device is not None and hasattr(self, "device"):
            self.device = torch.device(device)
        if dtype is not None and hasattr(self, "dtype"):
            self.dtype = dtype
        return self

    def with_module(self, module: nn.Module) -> "PolicyBackend | None":
        """A backend of this kind serving ``module`` instead of ``self.module``: the same
        architecture, already placed and cast by the runtime (nothing may be moved or cast here:
        its tensors may be shared with the served module). It shares this backend's
        non-weight parts that do not depend on the merge state (config, tokenizer, transforms)
        and starts with fresh per-state data (``attach_state`` is called on it next) and fresh
        per-episode data. What a live reload uses to rebuild the weights tensor by tensor
        (``runtime.refold``) instead of loading the whole backend again. Default None: not
        supported (the reload loads a whole new backend)."""
        return None

    def attach_state(self, snapshot) -> None:
        """Called by the composition root with the merge-state snapshot before the runtime is
        built: a backend with per-skill non-weight data (e.g. LeRobot's per-skill processors,
        stored as skill artifacts) loads it here. Default: nothing."""

    def end_episode(self, episode_id: str) -> None:
        """An episode ended (the service calls this once per episode, whatever its outcome): a
        backend with per-episode state (LeRobot's queues, ensemblers, RNG) drops it. Default:
        nothing."""

    @classmethod
    def admission_hooks(cls, base_dir: str | Path, expert_dir: str | Path) -> list:
        """``merge.hooks.AdmissionHook``s this backend needs when ``expert_dir`` is admitted over
        ``base_dir`` (``carve admit`` adds them; e.g. storing per-skill processor files).
        Default: none."""
        return []

    @property
    def routing_features(self) -> RoutingFeatures:
        """Which modules the observation routers can read (none by default); see
        ``policy_server.models.features``."""
        return NO_ROUTING_FEATURES
