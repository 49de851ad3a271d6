"""MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual
Learning"): per coordinate, keep the task-vector value of maximum magnitude.

Offline: ``core = lam * tau_{argmax_i |tau_i|}`` per coordinate (the first expert wins a tie;
FusionBench and the reference code select with ``>=``, so there the later expert wins).
Online (continual), only the current core is carried: with ``M_{t-1} = C_{t-1} / lam``::

    C_t = where(|tau_t| > |M_{t-1}|, lam * tau_t, C_{t-1})

which equals the offline result after any number of admissions (strict ``>``: earlier experts win
ties, like ``argmax``; bit-exact when lam is a power of two, otherwise values within one rounding
of a tie may pick the other expert). Untouched coordinates keep their exact stored value (no
divide/multiply round trip). The paper fine-tunes the experts *sequentially* (each from the
previous expert); that is a training-side choice: here ``tau_t = theta_t - theta0`` whatever
produced ``theta_t``. No per-skill entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policy_server.merge.methods.base import (
    AdmitResult,
    MergeMethod,
    MergeResult,
    TensorContext,
    TensorState,
    register_method,
)
from policy_server.merge.methods.common import check_float, check_tau, check_taus


@dataclass
class MagMaxOptions:
    lam: float = field(default=0.5, metadata={"help": (
        "scaling of the max-magnitude task vector (the paper's coefficient; FusionBench-style "
        "MagMax scaling_factor default 0.5; 1.0 = unscaled); must be > 0 so the carried core "
        "keeps its magnitudes")})

    def __post_init__(self):
        self.lam = check_float("magmax", "lam", self.lam, 0.0, lo_open=True)


@register_method
class MagMax(MergeMethod):
    """Per-coordinate max-magnitude selection; continual (compares with the current core)."""

    name = "magmax"
    aliases = ("mag-max",)
    options_cls = MagMaxOptions
    continual = True
    per_skill = False
    elementwise = True  # huge tensors are merged by row blocks (merge/blocks.py)

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors, shape ctx.shape -> core (float32 ctx.shape), N None entries."""
        taus = check_taus(self.name, ctx, taus)
        stacked = torch.stack(taus)
        # argmax returns the first maximal index: the earliest expert wins ties
        idx = stacked.abs().argmax(0, keepdim=True)
        picked = stacked.gather(0, idx).squeeze(0)
        return MergeResult(core=picked * self.options.lam, entries=[None] * len(taus),
                           info={"kind": "magmax"})

    def admit_tensor(self, ctx: TensorContext, tau: torch.Tensor, state: TensorState, t: int,
                     skill: str) -> AdmitResult:
        """tau: float32 ctx.shape. Replace the core where |tau| beats the unscaled core."""
        tau = check_tau(self.name, ctx, tau)
        lam = self.options.lam
        if state.core is None:
            core = tau * lam
            won = tau != 0
        else:
            prev = state.core.float()
            won = tau.abs() > prev.abs() / lam
            core = torch.where(won, tau * lam, prev)
        return AdmitResult(core=core, aux={}, entry=None,
                           info={"kind": "magmax", "t": int(t),
                                 "replaced_fraction": float(won.float().mean()) if won.numel()
                                 else 0.0})
