"""Admission hooks: look at an expert's tensors while it streams through admission.

Once an expert is admitted it is discarded (CARVE keeps only the core and low-rank residuals), so
anything a router needs from the *expert itself* must be captured during admission. The admission
stream (``merge/stream.py``, through :func:`run_hooks`) calls, for every floating tensor of the
base, in key order::

    hook.wants(key) -> bool                          # cheap filter, default: every key
    hook.on_tensor(key, expert_fp32, tau)            # expert_fp32 = base + tau, float32
    ...
    hook.artifacts() -> dict[str, Tensor]            # after the last tensor

``tau`` is None when the expert leaves the tensor untouched (e.g. a LoRA adapter not targeting it;
``expert_fp32`` is then the base tensor). The artifacts are stored with the skill through
``Transaction.write_artifacts`` and read back with ``StateSnapshot.skill_artifacts(skill)``; an
artifact name may not repeat across the hooks of one admission (:func:`collect_artifacts` refuses
duplicates).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

from policy_server.errors import InputError
from policy_server.tensors.checkpoint import CheckpointReader


class AdmissionHook:
    """Base class; subclasses override :meth:`on_tensor` and :meth:`artifacts`."""

    #: short name, used in error messages and the skill record
    name: str = "hook"

    def wants(self, key: str) -> bool:
        """True when :meth:`on_tensor` should be called for ``key`` (saves reading the base)."""
        return True

    def on_tensor(self, key: str, expert: torch.Tensor, tau: torch.Tensor | None) -> None:
        """expert: float32, the expert's effective tensor; tau: float32 same shape, or None."""

    def artifacts(self) -> dict[str, torch.Tensor]:
        """Tensors to store with the skill ({artifact name: tensor}); called once at the end."""
        return {}


class ArtifactOnlyHook(AdmissionHook):
    """A hook whose artifacts come from the expert's files or metadata, not its tensors: it asks
    for no tensor, so admitting with it reads nothing extra. Subclasses override
    :meth:`artifacts` only."""

    def wants(self, key: str) -> bool:
        return False


class ValueSubspaceHook(AdmissionHook):
    """Keeps the top-``k`` right singular vectors of matching weight matrices (MergeVLA's
    value-subspace router, docs/ROUTING.md).

    For a value projection ``W_v`` (out, in) of the *expert*, the router scores a skill by the norm
    of the hidden states projected onto that skill's leading right singular vectors, so it needs
    ``Vh[:k]`` (k, in) float32 per matched tensor; stored as ``value_subspace::<key>``. The
    singular values (k,) float32 are stored too as ``value_subspace_s::<key>``.
    """

    name = "value_subspace"

    def __init__(self, patterns: Sequence[str] = ("*v_proj.weight",), k: int = 8):
        if k < 1:
            raise InputError(f"value_subspace hook: k must be >= 1, got {k}")
        if not patterns:
            raise InputError("value_subspace hook: needs at least one glob pattern")
        self.patterns = tuple(patterns)
        self.k = int(k)
        self._out: dict[str, torch.Tensor] = {}

    def wants(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.patterns)

    def on_tensor(self, key: str, expert: torch.Tensor, tau: torch.Tensor | None) -> None:
        if expert.ndim != 2:
            raise InputError(f"value_subspace hook: tensor {key!r} has shape {tuple(expert.shape)}; "
                             f"pattern(s) {list(self.patterns)} must select 2-D weight matrices")
        k = min(self.k, *expert.shape)
        # exact SVD of one (out, in) matrix; value projections are small (<= 4096 x 4096)
        _, S, Vh = torch.linalg.svd(expert.float(), full_matrices=False)
        self._out[f"value_subspace::{key}"] = Vh[:k].contiguous()
        self._out[f"value_subspace_s::{key}"] = S[:k].contiguous()

    def artifacts(self) -> dict[str, torch.Tensor]:
        if not self._out:
            raise InputError(f"value_subspace hook: no tensor matched {list(self.patterns)}")
        return dict(self._out)


def run_hooks(hooks: Sequence[AdmissionHook], base: CheckpointReader, key: str,
              tau: torch.Tensor | None) -> None:
    """Show tensor ``key`` of the expert (``base + tau``, float32) to every hook that wants it;
    the base tensor is only read when one does."""
    wanting = [h for h in hooks if h.wants(key)]
    if not wanting:
        return
    expert = base.get(key).float()
    if tau is not None:
        expert = expert + tau
    for h in wanting:
        h.on_tensor(key, expert, tau)


def collect_artifacts(hooks: Sequence[AdmissionHook]) -> dict[str, torch.Tensor]:
    """Every hook's artifacts as contiguous CPU tensors; InputError when a name repeats."""
    out: dict[str, torch.Tensor] = {}
    for h in hooks:
        for name, t in h.artifacts().items():
            if name in out:
                raise InputError(f"admission hooks produce artifact {name!r} twice "
                                 f"(second time from hook {h.name!r})")
            out[name] = t.detach().to("cpu").contiguous()
    return out
