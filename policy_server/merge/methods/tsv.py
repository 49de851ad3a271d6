"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference").

Per 2-D tensor (m, n), float32, over N task vectors::

    tau_i = U_i S_i V_i^T                          (thin SVD)
    k     = max(1, int(min(m, n) * keep_fraction))  (keep_fraction defaults to 1/N)
    U = [U_1[:, :k] ... U_N[:, :k]]  (m, N k)     S = [S_1[:k] ... S_N[:k]]
    V = [V_1[:, :k] ... V_N[:, :k]]  (n, N k)
    U_o = polar(U) = P Q^T for U = P D Q^T          (nearest matrix with orthonormal columns)
    V_o = polar(V)
    core = lam * U_o diag(S) V_o^T

so the task singular vectors are decorrelated ("whitened") across tasks before they are summed.
Other tensors (1-D, >2-D, keys matching ``mean_patterns``) get the plain mean of the task vectors,
as in the reference code. When ``N k > min(m, n)`` the polar factor can only have orthonormal
rows (not columns); the reconstruction is still well defined. No per-skill entries.
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


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor of a (p, q) float32 matrix: ``P Q^T`` for the thin SVD ``P D Q^T``.

    It is the matrix with orthonormal columns (p >= q) / rows (p < q) closest to ``a`` in
    Frobenius norm, i.e. ``a (a^T a)^{-1/2}`` when ``a`` has full column rank.
    """
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_factors(taus: list[torch.Tensor], keep_fraction: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV factors of N (m, n) float32 task vectors.

    Returns ``(U_o (m, N k), S (N k,), V_o (n, N k))``, all float32, such that the merged delta
    (before ``lam``) is ``U_o @ diag(S) @ V_o.T``.
    """
    m, n = taus[0].shape
    frac = 1.0 / len(taus) if keep_fraction is None else keep_fraction
    k = max(1, min(min(m, n), int(min(m, n) * frac)))
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return polar_factor(u_cat), s_cat, polar_factor(v_cat)


@dataclass
class TsvOptions:
    lam: float = field(default=1.0, metadata={"help": (
        "scaling of the merged delta (the paper's and FusionBench's alpha, default 1.0)")})
    keep_fraction: float | None = field(default=None, metadata={"help": (
        "fraction of each task's spectrum kept (k = int(min(m, n) * fraction), at least 1); "
        "default 1/N for N experts, as in the paper")})
    mean_patterns: list[str] = field(default_factory=list, metadata={"help": (
        "glob patterns of 2-D checkpoint keys merged by the plain mean instead (the reference "
        "code does this for CLIP's text_projection; FusionBench's exclude_keys); default: none")})

    def __post_init__(self):
        self.lam = check_float("tsv", "lam", self.lam)
        if self.keep_fraction is not None:
            self.keep_fraction = check_float("tsv", "keep_fraction", self.keep_fraction, 0.0, 1.0,
                                             lo_open=True)
        self.mean_patterns = check_patterns("tsv", "mean_patterns", self.mean_patterns)


@register_method
class Tsv(MergeMethod):
    """TSV-Merge: per-task low-rank SVD, concatenated, whitened (polar), reconstructed."""

    name = "tsv"
    aliases = ("tsv-merge", "tsv-m")
    options_cls = TsvOptions
    continual = False
    per_skill = False

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors, shape ctx.shape -> core (float32 ctx.shape), N None entries."""
        taus = check_taus(self.name, ctx, taus)
        o = self.options
        if len(ctx.shape) != 2 or matches_any(ctx.name, o.mean_patterns) or 0 in ctx.shape:
            return MergeResult(core=torch.stack(taus).mean(0) * o.lam, entries=[None] * len(taus),
                               info={"kind": "mean"})
        u_o, s, v_o = tsv_factors(taus, o.keep_fraction)
        core = (u_o * s) @ v_o.T
        return MergeResult(core=core * o.lam, entries=[None] * len(taus),
                           info={"kind": "tsv", "rank_per_task": int(s.numel() // len(taus))})
