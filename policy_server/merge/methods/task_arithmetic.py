"""Task arithmetic (Ilharco et al., 2023): ``theta = theta0 + lam * sum_i tau_i``.

Per tensor, float32. One-shot (``merge_tensor``) and continual (``admit_tensor``): the merged delta
is a running sum, so admitting expert ``t`` only needs the current core::

    C_t = C_{t-1} + lam * tau_t        (C_0 = 0)   ==>   C_T = lam * sum_i tau_i

Every skill runs as ``base + core`` (no per-skill entries).

``lam`` defaults to 0.3 (the value the task-arithmetic paper usually selects and FusionBench's
CLIP-ViT example scripts and DARE config use; FusionBench's base config has 0.5); ``--lam 1.0``
reproduces mergekit's ``task_arithmetic`` with ``weight: 1.0`` per model and ``normalize: false``
(its default for this method). See ``docs/METHODS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policy_server.merge.methods.common import check_float, check_tau, check_taus
from policy_server.merge.methods.base import (
    AdmitResult,
    MergeMethod,
    MergeResult,
    TensorContext,
    TensorState,
    register_method,
)

@dataclass
class TaskArithmeticOptions:
    lam: float = field(default=0.3, metadata={"help": (
        "scaling of the summed task vectors: theta0 + lam * sum tau_i. 0.3 = the paper's usual "
        "pick and FusionBench's CLIP scripts (its base config: 0.5); 1.0 = mergekit "
        "task_arithmetic with weight 1.0 per model and normalize false; 1/N = plain averaging")})

    def __post_init__(self):
        self.lam = check_float("task_arithmetic", "lam", self.lam)


@register_method
class TaskArithmetic(MergeMethod):
    """``core = lam * sum_i tau_i``; no per-skill entries. Online: ``C_t = C_{t-1} + lam tau_t``."""

    name = "task_arithmetic"
    aliases = ("ta", "task-arithmetic")
    options_cls = TaskArithmeticOptions
    continual = True
    per_skill = False
    elementwise = True  # huge tensors are merged by row blocks (merge/blocks.py)

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors of shape ctx.shape -> core float32 ctx.shape, N None entries."""
        taus = check_taus(self.name, ctx, taus)
        total = torch.zeros(ctx.shape, dtype=torch.float32)
        for tau in taus:
            total.add_(tau)
        return MergeResult(core=total.mul_(self.options.lam), entries=[None] * len(taus),
                           info={"kind": "task_arithmetic", "n": len(taus)})

    def admit_tensor(self, ctx: TensorContext, tau: torch.Tensor, state: TensorState, t: int,
                     skill: str) -> AdmitResult:
        """Add ``lam * tau`` (float32, ctx.shape) to the carried core; the skill has no entry."""
        tau = check_tau(self.name, ctx, tau)
        core = state.core.float().clone() if state.core is not None else torch.zeros(
            ctx.shape, dtype=torch.float32)
        core.add_(tau, alpha=self.options.lam)
        return AdmitResult(core=core, aux={}, entry=None,
                           info={"kind": "task_arithmetic", "t": int(t)})
