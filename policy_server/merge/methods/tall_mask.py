"""TALL masks (Wang et al., 2024, "Localizing Task Information...") as used by MergeVLA.

Per tensor, float32, over N task vectors ``tau_i`` (one per skill)::

    tau_MTL = mtl_scale * sum_i tau_i               (a task-arithmetic merge; core = tau_MTL)
    m_i     = |tau_i| > lam * |tau_MTL - tau_i|      (bool, strict, per coordinate)
    skill i runs as theta0 + m_i * tau_MTL           (entry Masked(m_i))

MergeVLA additions, chosen by glob patterns on the checkpoint key:

* ``average_patterns`` (its averaged shallow action-expert blocks): core = mean_i tau_i and no
  mask, every skill runs with the average;
* ``head_patterns`` (its per-skill "expert head", the last action-expert block): core = mean_i
  tau_i (what a request without a skill gets) and each skill stores ``Dense(tau_i - core)``, i.e.
  runs exactly its own head. A key matching both lists is a head.

The state store bit-packs the masks; this module only produces bool tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policy_server.merge.methods.base import (
    MergeMethod,
    MergeResult,
    TensorContext,
    register_method,
)
from policy_server.merge.methods.common import (
    check_float,
    check_patterns,
    check_taus,
    matches_any,
)
from policy_server.tensors.entries import Dense, Masked


def tall_masks(taus: torch.Tensor, tau_mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """taus: (N, ...) float32, tau_mtl: (...) float32 -> (N, ...) bool masks
    ``|tau_i| > lam * |tau_MTL - tau_i|``."""
    return taus.abs() > lam * (tau_mtl.unsqueeze(0) - taus).abs()


@dataclass
class TallMaskOptions:
    lam: float = field(default=0.6, metadata={"help": (
        "mask threshold lambda in |tau_i| > lambda * |tau_MTL - tau_i| (MergeVLA uses 0.6; "
        "TALL masks tunes it per task in [0.2, 0.6])")})
    mtl_scale: float = field(default=1.0, metadata={"help": (
        "tau_MTL = mtl_scale * sum_i tau_i. 1.0 = the plain sum (TALL masks' default when no "
        "merged vector is given); set it to the task-arithmetic lam to mask a scaled TA merge")})
    head_patterns: list[str] = field(default_factory=list, metadata={"help": (
        "glob patterns of checkpoint keys forming each skill's expert head: core = mean tau, "
        "each skill stores Dense(tau_i - core) there (runs its own head)")})
    average_patterns: list[str] = field(default_factory=list, metadata={"help": (
        "glob patterns of checkpoint keys that are averaged (core = mean tau) and not masked, "
        "e.g. MergeVLA's shallow action-expert blocks")})

    def __post_init__(self):
        self.lam = check_float("tall_mask", "lam", self.lam, 0.0)
        self.mtl_scale = check_float("tall_mask", "mtl_scale", self.mtl_scale)
        self.head_patterns = check_patterns("tall_mask", "head_patterns", self.head_patterns)
        self.average_patterns = check_patterns("tall_mask", "average_patterns",
                                               self.average_patterns)


@register_method
class TallMask(MergeMethod):
    """TALL / MergeVLA task masks: core = tau_MTL, skill i = Masked(m_i) (or Dense head)."""

    name = "tall_mask"
    aliases = ("tall", "tall-mask", "mergevla-mask")
    options_cls = TallMaskOptions
    continual = False
    per_skill = True

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors of shape ctx.shape -> core float32 ctx.shape and one entry per
        skill: Masked(bool ctx.shape), Dense(float32 ctx.shape) for heads, None when averaged."""
        taus = check_taus(self.name, ctx, taus)
        o = self.options
        stacked = torch.stack(taus)
        if matches_any(ctx.name, o.head_patterns):
            core = stacked.mean(0)
            return MergeResult(core=core, entries=[Dense(t - core) for t in taus],
                               info={"kind": "expert_head"})
        if matches_any(ctx.name, o.average_patterns):
            return MergeResult(core=stacked.mean(0), entries=[None] * len(taus),
                               info={"kind": "average"})
        tau_mtl = stacked.sum(0) * o.mtl_scale
        masks = tall_masks(stacked, tau_mtl, o.lam)
        density = [float(m.float().mean()) if m.numel() else 0.0 for m in masks]
        return MergeResult(core=tau_mtl, entries=[Masked(m) for m in masks],
                           info={"kind": "tall_mask", "mask_density": density})
