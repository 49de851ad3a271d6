"""OPCM (Tang et al., 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging"): orthogonal projection + adaptive scaling, continual.

Reading (FusionBench ``fusion_bench/method/opcm/opcm.py``, re-implemented per tensor). Carried per
tensor: the merged delta ``M_{t-1}`` (= the core), its scale ``lam_{t-1}`` and the sum of the task
vectors' norms. Admitting ``tau_t``:

* t = 1: ``M_1 = tau_1``, ``lam_1 = 1``.
* 2-D tensors: ``M_{t-1} = U S V^T`` (thin SVD); ``r`` = number of leading singular values whose
  cumulative share ``cumsum(S) / sum(S)`` is still <= ``alpha`` (the subspace of previous tasks);
  the new task vector loses its components in that subspace::

      tau' = tau_t - U_r (U_r^T tau_t V_r) V_r^T
      tau' = tau'  - sum_{i >= r} (u_i^T tau_t v_i) u_i v_i^T        (zero_diagonal, as FusionBench)

  so ``U_r^T tau' V_r = 0`` (and ``u_i^T tau' v_i = 0`` for every i with zero_diagonal).
* other tensors (1-D, >2-D, ``skip_patterns``): ``tau' = tau_t``.
* adaptive scaling: ``S_t = lam_{t-1} M_{t-1} + tau'`` (= the running sum of projected task
  vectors) and ``M_t = S_t * mean_i |tau_i| / |S_t|``, ``lam_t = |S_t| / mean_i |tau_i|``: the
  merged delta keeps the average task-vector norm.

Difference to FusionBench: it measures the norms over the whole model (one scale for all
tensors); the per-tensor stream measures them per tensor. No per-skill entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policy_server.errors import StateError
from policy_server.merge.methods.base import (
    AdmitResult,
    MergeMethod,
    MergeResult,
    TensorContext,
    TensorState,
    register_method,
)
from policy_server.merge.methods.common import (
    check_bool,
    check_float,
    check_patterns,
    check_tau,
    check_taus,
    fold_admissions,
    matches_any,
)

#: aux keys: scale lam_t of the carried merged delta, and sum_i |tau_i|_F (both shape (1,) float32)
LAM_KEY = "opcm_lambda"
NORM_SUM_KEY = "opcm_norm_sum"


def projection_rank(s: torch.Tensor, alpha: float) -> int:
    """Number of leading singular values (descending ``s``) with cumsum(s)/sum(s) <= alpha."""
    total = float(s.sum())
    if total <= 0.0:
        return 0
    return int(((s.cumsum(0) / total) <= alpha).sum())


def opcm_project(tau: torch.Tensor, merged: torch.Tensor, alpha: float, zero_diagonal: bool
                 ) -> tuple[torch.Tensor, int]:
    """Remove from ``tau`` (m, n) float32 its part in the top singular subspace of ``merged``.

    Returns ``(tau' (m, n) float32, r)`` with ``U_r^T tau' V_r = 0``; with ``zero_diagonal`` also
    ``u_i^T tau' v_i = 0`` for all ``i < min(m, n)``.
    """
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    r = projection_rank(s, alpha)
    if r == 0 and (not zero_diagonal or float(s.sum()) <= 0.0):
        return tau.clone(), r
    ur, vr = u[:, :r], vh[:r].T
    out = tau - ur @ (ur.T @ tau @ vr) @ vr.T
    if zero_diagonal and r < s.numel():
        ut, vht = u[:, r:], vh[r:]
        diag = ((ut.T @ tau) * vht).sum(1)      # u_i^T tau v_i for i >= r
        out = out - (ut * diag) @ vht
    return out, r


@dataclass
class OpcmOptions:
    alpha: float = field(default=0.5, metadata={"help": (
        "share of the merged delta's singular-value mass (cumsum(S)/sum(S) <= alpha) whose "
        "directions are protected from new tasks (FusionBench OPCM alpha, default 0.5)")})
    zero_diagonal: bool = field(default=True, metadata={"help": (
        "also drop u_i^T tau v_i u_i v_i^T for every singular pair i of the merged delta, as "
        "FusionBench's implementation does; false = pure block projection")})
    skip_patterns: list[str] = field(default_factory=list, metadata={"help": (
        "glob patterns of 2-D keys added without projection (FusionBench only projects nn.Linear "
        "weights, e.g. add '*embed*' for embeddings)")})

    def __post_init__(self):
        self.alpha = check_float("opcm", "alpha", self.alpha, 0.0, 1.0, hi_open=True)
        self.zero_diagonal = check_bool("opcm", "zero_diagonal", self.zero_diagonal)
        self.skip_patterns = check_patterns("opcm", "skip_patterns", self.skip_patterns)


@register_method
class Opcm(MergeMethod):
    """OPCM continual merging: projected task vectors summed, rescaled to the mean task norm."""

    name = "opcm"
    aliases = ()
    options_cls = OpcmOptions
    continual = True
    per_skill = False

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """One-shot = admitting taus in order (OPCM is order dependent)."""
        return fold_admissions(self, ctx, check_taus(self.name, ctx, taus))

    def admit_tensor(self, ctx: TensorContext, tau: torch.Tensor, state: TensorState, t: int,
                     skill: str) -> AdmitResult:
        """tau: float32 ctx.shape -> new core (float32 ctx.shape) and aux {lambda, norm_sum}."""
        tau = check_tau(self.name, ctx, tau)
        o = self.options
        if t < 1:
            raise StateError(f"opcm: admission number must be >= 1, got {t}")
        r = 0
        if state.core is None:
            # Nothing merged into this tensor yet: earlier experts left it untouched (zero task
            # vectors, zero norms), so the running sum starts here but the mean norm still
            # divides by t, exactly as if zeros had been admitted.
            merged, prev_lam, prev_norm_sum = torch.zeros(ctx.shape), 1.0, 0.0
            cleaned = tau
        else:
            if LAM_KEY not in state.aux or NORM_SUM_KEY not in state.aux:
                raise StateError(f"opcm: carried state of tensor {ctx.name!r} lacks "
                                 f"{LAM_KEY!r}/{NORM_SUM_KEY!r} (written by another method?)")
            merged = state.core.float()
            prev_lam = float(state.aux[LAM_KEY][0])
            prev_norm_sum = float(state.aux[NORM_SUM_KEY][0])
            if len(ctx.shape) == 2 and 0 not in ctx.shape \
                    and not matches_any(ctx.name, o.skip_patterns):
                cleaned, r = opcm_project(tau, merged, o.alpha, o.zero_diagonal)
            else:
                cleaned = tau
        norm_sum = prev_norm_sum + float(tau.norm())
        total = merged * prev_lam + cleaned
        avg = norm_sum / t
        total_norm = float(total.norm())
        if total_norm > 0.0 and avg > 0.0:
            core, lam = total * (avg / total_norm), total_norm / avg
        else:
            core, lam = total, 1.0
        return AdmitResult(core=core,
                           aux={LAM_KEY: torch.tensor([lam]),
                                NORM_SUM_KEY: torch.tensor([norm_sum])},
                           info={"kind": "opcm", "t": int(t), "rank": int(r), "lambda": lam})
