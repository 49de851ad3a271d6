"""Iso-CTS (Marczak et al., ICML 2025): isotropic merging in common and task-specific subspaces.

Per 2-D tensor (m, n), float32, over N task vectors, with ``r = min(m, n)``::

    k0 = int(r * common_space_fraction)             (default 0.8)
    s  = round((r - k0) / N)                        (directions per task; Python round, half-even)
    k  = r - N s                                    (common directions: the N task blocks fill r)
    Delta = tau_1 + ... + tau_N = U S V^T          (thin SVD)
    U_c, S_c, V_c = top-k triplets of Delta         (common subspace)
    R_i  = tau_i - U_c U_c^T tau_i                  (task i with the common left subspace removed)
    U_i, S_i, V_i = top-s triplets of R_i           (task-specific subspace of task i)
    U' = [U_c U_1 ... U_N]  (m, r)     V' = [V_c V_1 ... V_N]  (n, r)
    S' = [S_c S_1 ... S_N]  (r,)
    core = lam * mean(S') * polar(U') polar(V')^T   (polar(A) = P Q^T for A = P D Q^T)

so the common directions of the sum keep ``k`` slots and every task gets ``s`` slots of its own,
then the slots are decorrelated (polar factor: the closest matrix with orthonormal columns) and
given one isotropic singular value. Other tensors (1-D, >2-D, ``mean_patterns`` keys) get
``lam *`` the running mean of the task vectors, as in the reference code. No per-skill entries.

When ``N s > r`` (tiny matrices, small fractions) the reference would slice with a negative ``k``;
here ``s`` is lowered by one so that ``k >= 0`` (docs/METHODS.md).
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
from policy_server.merge.methods.common import check_float, check_patterns, check_taus
from policy_server.merge.methods.iso_c import is_iso_matrix, sequential_sum
from policy_server.merge.methods.tsv import polar_factor


def iso_cts_split(r: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k, s)``: common directions and directions per task for rank ``r`` and N tasks, with
    ``k + N s == r`` and ``k >= 0`` (the reference rule; see the module docstring)."""
    k0 = int(r * common_space_fraction)
    s = round((r - k0) / n_tasks)  # Python's round (half to even), as the reference
    if n_tasks * s > r:  # only when the rounding overshoots r: keep k >= 0
        s = r // n_tasks
    return r - n_tasks * s, s


def running_mean(taus: list[torch.Tensor]) -> torch.Tensor:
    """Mean of N float32 tensors as the reference's Iso-CTS computes it,
    ``m_i = m_{i-1} + (tau_i - m_{i-1}) / i`` (differs from ``sum / N`` in the last bits)."""
    out = taus[0].clone()
    for i, tau in enumerate(taus[1:], start=2):
        out += (tau - out) / i
    return out


def iso_cts_factors(taus: list[torch.Tensor], common_space_fraction: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Iso-CTS factors of N (m, n) float32 task vectors.

    Returns ``(U' (m, r), S' (r,), V' (n, r), k, s)``, float32, before orthogonalisation: common
    triplets first, then task 1's ``s`` triplets, ... (the reference puts the task blocks first;
    the order cannot change the result, since a column permutation applied to both U' and V'
    commutes with the polar factor and cancels in ``U_o V_o^T``).
    """
    m, n = taus[0].shape
    k, s = iso_cts_split(min(m, n), len(taus), common_space_fraction)
    u, sv, vh = torch.linalg.svd(sequential_sum(taus), full_matrices=False)
    u_c = u[:, :k]
    us, ss, vs = [u_c], [sv[:k]], [vh[:k].T]
    for tau in taus:
        resid = tau - u_c @ (u_c.T @ tau)  # remove the common left subspace
        u_i, s_i, vh_i = torch.linalg.svd(resid, full_matrices=False)
        us.append(u_i[:, :s])
        ss.append(s_i[:s])
        vs.append(vh_i[:s].T)
    return torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1), k, s


def iso_cts_delta(taus: list[torch.Tensor], common_space_fraction: float
                  ) -> tuple[torch.Tensor, int, int]:
    """Iso-CTS merged delta (before ``lam``), float32 (m, n), with its ``(k, s)`` split."""
    u_cat, s_cat, v_cat, k, s = iso_cts_factors(taus, common_space_fraction)
    u_o, v_o = polar_factor(u_cat), polar_factor(v_cat)
    return (u_o * s_cat.mean()) @ v_o.T, k, s


@dataclass
class IsoCtsOptions:
    lam: float = field(default=1.0, metadata={"help": (
        "scaling of the merged delta (the paper's alpha, tuned on validation data there; "
        "FusionBench's scaling_factor, default 1.0)")})
    common_space_fraction: float = field(default=0.8, metadata={"help": (
        "fraction of min(m, n) given to the common subspace before the per-task split is "
        "rounded (k0 = int(min(m, n) * fraction)); default 0.8 as the paper and FusionBench")})
    mean_patterns: list[str] = field(default_factory=list, metadata={"help": (
        "glob patterns of 2-D checkpoint keys merged by the plain mean instead (the authors' "
        "code does this for CLIP's text_projection; FusionBench's exclude_keys); default: none")})

    def __post_init__(self):
        self.lam = check_float("iso_cts", "lam", self.lam)
        self.common_space_fraction = check_float("iso_cts", "common_space_fraction",
                                                 self.common_space_fraction, 0.0, 1.0)
        self.mean_patterns = check_patterns("iso_cts", "mean_patterns", self.mean_patterns)


@register_method
class IsoCts(MergeMethod):
    """Iso-CTS: common top-k subspace of the sum plus per-task residual subspaces, orthogonalised
    and given one isotropic singular value. Needs each tensor's task vectors whole (SVDs), which
    is what a one-shot ``merge_tensor`` receives, like TSV."""

    name = "iso_cts"
    aliases = ("iso-cts", "isocts")
    options_cls = IsoCtsOptions
    continual = False
    per_skill = False

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors, shape ctx.shape -> core (float32 ctx.shape), N None entries."""
        taus = check_taus(self.name, ctx, taus)
        o = self.options
        if not is_iso_matrix(ctx, o.mean_patterns):
            return MergeResult(core=running_mean(taus) * o.lam, entries=[None] * len(taus),
                               info={"kind": "mean"})
        core, k, s = iso_cts_delta(taus, o.common_space_fraction)
        return MergeResult(core=core * o.lam, entries=[None] * len(taus),
                           info={"kind": "iso_cts", "common_rank": k, "rank_per_task": s})

    def supports_merge_blocks(self, ctx: TensorContext) -> bool:
        """Never: the SVDs need each tensor's task vectors whole, so the stream hands them whole
        (said explicitly, so a change of the base default cannot turn row blocks on here)."""
        return False
