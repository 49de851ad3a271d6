"""Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces"): isotropic merging in the common subspace.

Per 2-D tensor (m, n), float32, over N task vectors::

    Delta = tau_1 + ... + tau_N                    (task arithmetic sum, added left to right)
    Delta = U S V^T                                (thin SVD, r = min(m, n) singular values)
    sigma = mean(S)                                (mean over all r values, as the reference code)
    core  = lam * sigma * U V^T

so every direction of the summed update gets the same weight (a flat, "isotropic" spectrum).
Other tensors (1-D, >2-D, keys matching ``mean_patterns``) get ``lam * (sum tau_i) / N``, as in
the reference code. No per-skill entries.

``rank_only`` (off by default, not in the paper's code) restricts the merge to the numerical rank
of Delta: when Delta is rank-deficient (e.g. the sum of a few LoRA updates) the singular vectors of
its zero singular values are an arbitrary completion chosen by the SVD backend, so the reference
rule adds ``sigma`` along backend-dependent directions; ``rank_only`` drops them and averages over
the non-zero singular values only.
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
    check_float,
    check_patterns,
    check_taus,
    matches_any,
)


def sequential_sum(taus: list[torch.Tensor]) -> torch.Tensor:
    """``tau_1 + ... + tau_N`` added left to right (float32, shape of each tau).

    The reference code uses Python's ``sum`` (``0 + tau_1 + tau_2 ...``); the same addition order
    gives bit-identical float32 sums, which ``torch.stack(...).sum(0)`` does not promise.
    """
    out = taus[0].clone()
    for tau in taus[1:]:
        out += tau
    return out


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values (descending float32 ``s``) above numpy's ``matrix_rank`` default
    tolerance ``max(m, n) * eps(float32) * s[0]``."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = max(shape) * torch.finfo(s.dtype).eps * float(s[0])
    return int((s > tol).sum())


def iso_c_delta(taus: list[torch.Tensor], rank_only: bool = False) -> torch.Tensor:
    """Iso-C merged delta (before ``lam``) of N (m, n) float32 task vectors: ``mean(S) U V^T`` of
    the SVD of their sum; float32 (m, n). ``rank_only``: only the numerical rank of the sum."""
    delta = sequential_sum(taus)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if rank_only:
        r = numerical_rank(s, tuple(delta.shape))
        u, s, vh = u[:, :r], s[:r], vh[:r]
        if r == 0:  # an all-zero sum merges to zero (mean of no values is undefined)
            return torch.zeros_like(delta)
    return (u * s.mean()) @ vh


@dataclass
class IsoCOptions:
    lam: float = field(default=1.0, metadata={"help": (
        "scaling of the merged delta (the paper's alpha, tuned on validation data there; "
        "FusionBench's scaling_factor, default 1.0)")})
    mean_patterns: list[str] = field(default_factory=list, metadata={"help": (
        "glob patterns of 2-D checkpoint keys merged by the plain mean instead (the authors' "
        "code does this for CLIP's text_projection; FusionBench's exclude_keys); default: none")})
    rank_only: bool = field(default=False, metadata={"help": (
        "keep only the numerical rank of the summed task vector (no arbitrary null-space "
        "directions when it is rank-deficient, e.g. LoRA experts); default false = reference")})

    def __post_init__(self):
        self.lam = check_float("iso_c", "lam", self.lam)
        self.mean_patterns = check_patterns("iso_c", "mean_patterns", self.mean_patterns)
        self.rank_only = check_bool("iso_c", "rank_only", self.rank_only)


def is_iso_matrix(ctx: TensorContext, mean_patterns: list[str]) -> bool:
    """True when the tensor gets the spectral rule: 2-D, non-empty and not a ``mean_patterns``
    key (everything else is averaged, as in the reference code)."""
    return (len(ctx.shape) == 2 and 0 not in ctx.shape
            and not matches_any(ctx.name, mean_patterns))


@register_method
class IsoC(MergeMethod):
    """Iso-C: flatten the spectrum of the summed task vector to its mean singular value.

    Needs each tensor's task vectors whole (one SVD of their sum), which is what a one-shot
    ``merge_tensor`` receives, like TSV.
    """

    name = "iso_c"
    aliases = ("iso-c", "isoc")
    options_cls = IsoCOptions
    continual = False
    per_skill = False

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors, shape ctx.shape -> core (float32 ctx.shape), N None entries."""
        taus = check_taus(self.name, ctx, taus)
        o = self.options
        if not is_iso_matrix(ctx, o.mean_patterns):
            # FusionBench iso_c: sum(tvs) / N, then times scaling_factor
            core = sequential_sum(taus) / len(taus)
            return MergeResult(core=core * o.lam, entries=[None] * len(taus),
                               info={"kind": "mean"})
        core = iso_c_delta(taus, o.rank_only)
        return MergeResult(core=core * o.lam, entries=[None] * len(taus), info={"kind": "iso_c"})

    def supports_merge_blocks(self, ctx: TensorContext) -> bool:
        """Never: the SVDs need each tensor's task vectors whole, so the stream hands them whole
        (said explicitly, so a change of the base default cannot turn row blocks on here)."""
        return False
