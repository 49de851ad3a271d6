"""DARE (Yu et al., 2024, "Language Models are Super Mario"): drop and rescale, then combine.

Per tensor, float32, for every task vector ``tau_i``::

    keep_i ~ Bernoulli(1 - p)  (per coordinate)
    d_i    = tau_i * keep_i / (1 - p)        (rescale=True keeps E[d_i] = tau_i)
    combine="ta":   C = lam * sum_i d_i                            (mergekit dare_linear)
    combine="ties": C = lam * disjoint(elect(trim_density(d_i)))   (mergekit dare_ties)

The random mask is drawn from a generator seeded with sha256(seed, tensor name, task index), so a
merge is reproducible and does not depend on the order in which tensors are streamed.
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
    check_bool,
    check_choice,
    check_float,
    check_taus,
    stable_seed,
)
from policy_server.merge.methods.ties import (
    CONSENSUS,
    MERGE_FUNCS,
    disjoint_merge,
    elect_sign,
    topk_mask,
)

COMBINES = ("ta", "ties")
#: lam used when --lam is not given: task arithmetic's and TIES' own defaults
DEFAULT_LAM = {"ta": 0.3, "ties": 1.0}


@dataclass
class DareOptions:
    p: float = field(default=0.5, metadata={"help": (
        "drop probability per coordinate, in [0, 1) (FusionBench sparsity_ratio, default 0.5; "
        "mergekit density = 1 - p)")})
    rescale: bool = field(default=True, metadata={"help": (
        "rescale kept entries by 1/(1-p) so the expected task vector is unchanged (DARE paper, "
        "FusionBench rescale=true; mergekit's rescale matches each tensor's L1 norm instead)")})
    combine: str = field(default="ta", metadata={"help": (
        "how the dropped task vectors are combined: 'ta' (lam * sum; mergekit dare_linear with "
        "normalize false) or 'ties' (sign election + disjoint merge; mergekit dare_ties sums "
        "the agreeing values by default: add --merge-func sum)")})
    lam: float | None = field(default=None, metadata={"help": (
        "scaling of the combined task vector; default 0.3 with --combine ta, 1.0 with ties")})
    ties_density: float = field(default=1.0, metadata={"help": (
        "combine=ties only: additional TIES top-k trim after the drop (1.0 = none, as mergekit "
        "dare_ties; FusionBench's DareTiesMerging trims again: threshold 20 = 0.2)")})
    consensus: str = field(default="mass", metadata={"help": (
        "combine=ties only: sign election 'mass' or 'count' (see ties)")})
    merge_func: str = field(default="mean", metadata={"help": (
        "combine=ties only: disjoint merge 'mean', 'sum' or 'max' (see ties)")})

    def __post_init__(self):
        self.p = check_float("dare", "p", self.p, 0.0, 1.0, hi_open=True)
        check_choice("dare", "combine", self.combine, COMBINES)
        if self.lam is not None:
            self.lam = check_float("dare", "lam", self.lam)
        self.ties_density = check_float("dare", "ties_density", self.ties_density, 0.0, 1.0,
                                        lo_open=True)
        check_choice("dare", "consensus", self.consensus, CONSENSUS)
        check_choice("dare", "merge_func", self.merge_func, MERGE_FUNCS)
        self.rescale = check_bool("dare", "rescale", self.rescale)

    @property
    def effective_lam(self) -> float:
        return DEFAULT_LAM[self.combine] if self.lam is None else self.lam


def dare_drop(tau: torch.Tensor, p: float, rescale: bool, seed: int) -> torch.Tensor:
    """Drop each coordinate of ``tau`` (float32, any shape) with probability p, deterministically
    from ``seed``; kept entries are multiplied by 1/(1-p) when ``rescale``. Returns float32."""
    if p == 0.0:
        return tau.clone()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(tau.shape, generator=gen, dtype=torch.float32) >= p
    out = tau * keep
    if rescale:
        out = out / (1.0 - p)
    return out


@register_method
class Dare(MergeMethod):
    """DARE drop-and-rescale followed by task arithmetic or TIES. No per-skill entries."""

    name = "dare"
    aliases = ()
    options_cls = DareOptions
    continual = False
    per_skill = False

    def dropped(self, ctx: TensorContext, taus: list[torch.Tensor]) -> list[torch.Tensor]:
        """The N dropped/rescaled task vectors (float32, ctx.shape), seeded per tensor and task."""
        o = self.options
        return [dare_drop(tau, o.p, o.rescale, stable_seed("dare", self.seed, ctx.name, i))
                for i, tau in enumerate(taus)]

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors, shape ctx.shape -> core (float32 ctx.shape), N None entries."""
        taus = check_taus(self.name, ctx, taus)
        o = self.options
        d = torch.stack(self.dropped(ctx, taus))
        if o.combine == "ta":
            merged = d.sum(0)
        else:
            if o.ties_density < 1.0:
                d = torch.stack([x * topk_mask(x, o.ties_density) for x in d])
            merged = disjoint_merge(d, elect_sign(d, o.consensus), o.merge_func)
        kept = float((d != 0).float().mean()) if d.numel() else 0.0
        return MergeResult(core=merged * o.effective_lam, entries=[None] * len(taus),
                           info={"kind": "dare", "combine": o.combine, "kept_fraction": kept})
