"""ResMerge (Sun et al., 2026, arXiv 2606.02252): residual-based spectral merging.

Semantics follow the authors' release (github.com/sunyd0303-cpu/ResMerge-release,
``resmerge-main.py``), re-implemented per tensor in float32. For a 2-D tensor and N task vectors::

    H_i = top-k SVD part of tau_i  ("head", k = rank_topk)     R_i = tau_i - H_i  ("residual")

    Spherical Residual Consensus Adaptation (SRC-A) -> backbone B:
      q_i = R_i / |R_i|_F ;  q = sum_i q_i / |sum_i q_i|_F        (consensus direction)
      s   = mean_{i<j} <q_i, q_j> ;  c = clamp01(mean_i <q_i, q>)  (agreement, coherence)
      score = clamp01(((s+1)/2 + (c+1)/2) / 2 * f)   f = 1 for attention/FFN keys, else 0
      beta  = beta_max - (beta_max - beta_min) * score
      B = q * c**beta * mean_i |R_i|_F      (B = mean_i R_i when c <= 1/sqrt(N) or sum q_i = 0)

    Lightweight Head Correction (gated by positive head agreement):
      a = clamp01(mean_{i<j} max(0, <H_i/|H_i|, H_j/|H_j|>))       (1 when N = 1)
      G = mean_i H_i ;  corr = G / |G|_F * head_ratio_budget * a * |B|_F

    core = B + corr

1-D tensors and keys matching ``mean_patterns`` (embeddings, LM/action heads, norms) get the plain
mean of the task vectors, as the reference does for embed/lm_head/norm parameters; >2-D tensors
(which the reference rejects) get the mean too. No per-skill entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from policy_server.errors import InputError
from policy_server.merge.methods.base import (
    MergeMethod,
    MergeResult,
    TensorContext,
    register_method,
)
from policy_server.merge.methods.common import (
    check_float,
    check_int,
    check_patterns,
    check_taus,
    matches_any,
)

EPS = 1e-8

#: keys the reference treats as attention / FFN ("family scale" 1); substrings turned into globs
FAMILY_PATTERNS = [f"*{s}*" for s in (
    "self_attn", ".attn.", "attention", "q_proj", "k_proj", "v_proj", "o_proj",
    "mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj")]
#: keys the reference merges by plain averaging (embeddings, LM head, norms)
MEAN_PATTERNS = [f"*{s}*" for s in (
    "embed_tokens", "wte", "lm_head", "word_embeddings", "norm", "ln_")]


def _clamp01(x: float) -> float:
    return max(0.0, min(1.0, float(x)))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.reshape(-1) @ b.reshape(-1)) / (a.norm() * b.norm() + EPS))


def _pairwise_cos(vs: list[torch.Tensor]) -> tuple[float, float]:
    """(mean cosine, mean of positive parts) over all pairs; (1, 1) with fewer than 2 vectors."""
    vals = [_cos(vs[i], vs[j]) for i in range(len(vs)) for j in range(i + 1, len(vs))]
    if not vals:
        return 1.0, 1.0
    return sum(vals) / len(vals), sum(max(0.0, v) for v in vals) / len(vals)


def head_residual(tau: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an (m, n) float32 task vector into its top-``rank`` SVD part and the rest."""
    if float(tau.norm()) <= 0.0:
        return torch.zeros_like(tau), torch.zeros_like(tau)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    r = min(rank, s.numel())
    head = (u[:, :r] * s[:r]) @ vh[:r]
    return head, tau - head


def residual_backbone(residuals: list[torch.Tensor], family: bool, beta_min: float,
                      beta_max: float) -> tuple[torch.Tensor, dict]:
    """SRC-A: reliability-weighted consensus direction on the Frobenius sphere.

    residuals: N float32 tensors of one shape -> (backbone float32 same shape, facts for info).
    """
    n = len(residuals)
    norms = [float(r.norm()) for r in residuals]
    if max(norms) <= EPS:
        return torch.zeros_like(residuals[0]), {"srca": "zero"}
    qs = [r / (nr + EPS) for r, nr in zip(residuals, norms)]
    mean_cos, _ = _pairwise_cos(qs)
    q_sum = torch.stack(qs).sum(0)
    q_sum_norm = float(q_sum.norm())
    mean_r = torch.stack(residuals).mean(0)
    if q_sum_norm <= EPS:
        return mean_r, {"srca": "mean"}
    q = q_sum / (q_sum_norm + EPS)
    coherence = _clamp01(sum(_cos(qi, q) for qi in qs) / n)
    score = _clamp01(0.5 * (_clamp01((mean_cos + 1) / 2) + _clamp01((coherence + 1) / 2))
                     * (1.0 if family else 0.0))
    beta = beta_max - (beta_max - beta_min) * score
    # Below the coherence of N random directions the consensus is noise: fall back to the mean.
    if coherence <= 1.0 / math.sqrt(max(1, n)):
        return mean_r, {"srca": "mean", "coherence": coherence}
    target = sum(norms) / n
    return q * (coherence ** beta * target), {"srca": "consensus", "coherence": coherence,
                                              "beta": beta}


def head_correction(heads: list[torch.Tensor], backbone: torch.Tensor, budget: float
                    ) -> tuple[torch.Tensor, float]:
    """Mean head rescaled to ``budget * agreement * |backbone|_F``; (correction, agreement)."""
    unit = [h / float(h.norm()) for h in heads if float(h.norm()) > EPS]
    agreement = _clamp01(_pairwise_cos(unit)[1]) if unit else 0.0
    scale = budget * agreement
    anchor = float(backbone.norm())
    mean_h = torch.stack(heads).mean(0)
    mean_h_norm = float(mean_h.norm())
    if scale <= 0.0 or anchor <= EPS or mean_h_norm <= EPS:
        return torch.zeros_like(backbone), agreement
    return mean_h * (scale * anchor / mean_h_norm), agreement


@dataclass
class ResMergeOptions:
    rank_topk: int = field(default=1, metadata={"help": (
        "rank of each task vector's spectral head (reference --rank_topk, default 1)")})
    beta_min: float = field(default=0.7, metadata={"help": (
        "SRC-A norm exponent for fully reliable residuals (reference --src_beta_min 0.7)")})
    beta_max: float = field(default=1.0, metadata={"help": (
        "SRC-A norm exponent for unreliable residuals (reference --src_beta_max 1.0)")})
    head_ratio_budget: float = field(default=0.2, metadata={"help": (
        "head correction norm as a fraction of the backbone norm at full head agreement "
        "(reference --head_ratio_budget 0.2; 0 disables the correction)")})
    family_patterns: list[str] = field(default_factory=lambda: list(FAMILY_PATTERNS),
                                       metadata={"help": (
        "glob patterns of attention/FFN keys whose reliability score is used (others get score 0, "
        "i.e. beta = beta_max); default: the reference's keyword list")})
    mean_patterns: list[str] = field(default_factory=lambda: list(MEAN_PATTERNS),
                                     metadata={"help": (
        "glob patterns of keys merged by the plain mean (embeddings, heads, norms); default: the "
        "reference's keyword list")})

    def __post_init__(self):
        self.rank_topk = check_int("resmerge", "rank_topk", self.rank_topk, 1)
        self.beta_min = check_float("resmerge", "beta_min", self.beta_min, 0.0)
        self.beta_max = check_float("resmerge", "beta_max", self.beta_max, 0.0)
        if self.beta_min > self.beta_max:
            raise InputError(f"resmerge: beta_min ({self.beta_min}) must be <= beta_max "
                             f"({self.beta_max})")
        self.head_ratio_budget = check_float("resmerge", "head_ratio_budget",
                                             self.head_ratio_budget, 0.0)
        self.family_patterns = check_patterns("resmerge", "family_patterns", self.family_patterns)
        self.mean_patterns = check_patterns("resmerge", "mean_patterns", self.mean_patterns)


@register_method
class ResMerge(MergeMethod):
    """ResMerge: SRC-A residual backbone + agreement-gated head correction. No per-skill entries."""

    name = "resmerge"
    aliases = ("res-merge",)
    options_cls = ResMergeOptions
    continual = False
    per_skill = False

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors, shape ctx.shape -> core (float32 ctx.shape), N None entries."""
        taus = check_taus(self.name, ctx, taus)
        o = self.options
        if len(ctx.shape) != 2 or matches_any(ctx.name, o.mean_patterns) or 0 in ctx.shape:
            return MergeResult(core=torch.stack(taus).mean(0), entries=[None] * len(taus),
                               info={"kind": "mean"})
        heads, residuals = zip(*(head_residual(t, o.rank_topk) for t in taus))
        backbone, facts = residual_backbone(list(residuals),
                                            matches_any(ctx.name, o.family_patterns),
                                            o.beta_min, o.beta_max)
        corr, agreement = head_correction(list(heads), backbone, o.head_ratio_budget)
        return MergeResult(core=backbone + corr, entries=[None] * len(taus),
                           info={"kind": "resmerge", "head_agreement": agreement, **facts})
