"""CARVE: continual admission into a shared core plus low-rank per-skill residuals.

Per tensor, admitting expert ``t`` (1-based) with task vector ``tau`` into core ``C`` (see
``docs/CARVE.md``)::

    m   = (sign(tau) == sign(C)) | (C == 0)     # concordance ("zero_core" decides C == 0)
    eta = 1/t                                    # or 1/(t+1), or per coordinate 1/(n_j + 1)
    C  <- C + eta * m * (tau - C)
    R   = tau - C                                # or tau * (1 - m)
    R  -> P Q (truncated SVD, rank r or energy)  # Dense for 1-D / ctx.dense / no saving

Skill ``i`` then runs as ``base + C_T + P_i Q_i`` with the *final* core. Optional drift
compensation re-fits every earlier skill's residual to ``P_i Q_i - dC`` after each admission so
old skills stop paying for the core's drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from policy_server.errors import InputError
from policy_server.merge.lowrank import (
    blocked_randomized_svd,
    row_blocks,
    should_store_dense,
    truncated_svd,
)
from policy_server.merge.methods.base import (
    AdmitResult,
    MergeMethod,
    TensorContext,
    TensorState,
    register_method,
)
from policy_server.tensors.entries import Dense, LowRank, Masked, ResidualEntry

RATES = ("1/t", "1/(t+1)", "count")
ZERO_CORE = ("concordant", "discordant")
RESIDUALS = ("tau-minus-core", "discordant-only")
SVD_METHODS = ("auto", "exact", "randomized")
DRIFT_RANKS = ("budget", "keep")
#: aux key holding the per-coordinate count of concordant updates (rate="count"), int32
COUNT_KEY = "count"


@dataclass
class CarveOptions:
    rate: str = field(default="1/t", metadata={"help": (
        "core update rate: '1/t' (t = admission number; the core is the running mean of concordant "
        "updates and the first skill is absorbed whole), '1/(t+1)' (keeps half of the first skill "
        "in its residual), or 'count' (per coordinate 1/(n_j+1), n_j = earlier concordant updates "
        "of that coordinate)")})
    zero_core: str = field(default="concordant", metadata={"help": (
        "how a zero core coordinate counts: 'concordant' (it takes the new value; needed for the "
        "core to ever grow from zero) or 'discordant' (the core never moves from zero: per-skill "
        "SVD only, an ablation)")})
    residual: str = field(default="tau-minus-core", metadata={"help": (
        "residual rule: 'tau-minus-core' (R = tau - C_t, so C_t + R = tau exactly before "
        "truncation) or 'discordant-only' (R = tau * (1 - m), the literal reading of the paper)")})
    rank: int = field(default=64, metadata={"help": "fixed residual rank (ignored when --energy is set)"})
    energy: float | None = field(default=None, metadata={"help": (
        "if set, per tensor the smallest rank keeping this fraction of the residual's squared "
        "Frobenius norm, e.g. 0.9 (overrides --rank)")})
    svd: str = field(default="auto", metadata={"help": (
        "SVD method: 'exact', 'randomized' (torch.svd_lowrank) or 'auto' (exact when "
        "min(m, n) <= 1024)")})
    oversample: int = field(default=8, metadata={"help": "randomized SVD: extra sketch columns"})
    power_iters: int = field(default=2, metadata={"help": "randomized SVD: power iterations"})
    drift_compensation: bool = field(default=False, metadata={"help": (
        "after each admission re-fit every earlier skill's residual to P_i Q_i - dC (dC = the core's "
        "change) so old skills do not pay for the core's drift; rewrites earlier skills' files")})
    drift_rank: str = field(default="budget", metadata={"help": (
        "rank of re-fitted residuals under drift compensation: 'budget' (the --rank / --energy "
        "rule, so a skill absorbed whole into the core can still be compensated) or 'keep' (each "
        "residual keeps its current rank: storage never grows)")})
    dense_max_numel: int = field(default=0, metadata={"help": (
        "store residuals of matrices with at most this many elements dense (low-rank factors of "
        "tiny matrices save nothing and cost an SVD)")})

    def __post_init__(self):
        for name, allowed in (("rate", RATES), ("zero_core", ZERO_CORE), ("residual", RESIDUALS),
                              ("svd", SVD_METHODS), ("drift_rank", DRIFT_RANKS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"carve option {name}={getattr(self, name)!r}: "
                                 f"expected one of {', '.join(allowed)}")
        if int(self.rank) < 0:
            raise InputError(f"carve option rank must be >= 0, got {self.rank}")
        if self.energy is not None and not (0.0 < float(self.energy) <= 1.0):
            raise InputError(f"carve option energy must be in (0, 1], got {self.energy}")
        if self.oversample < 0 or self.power_iters < 0 or self.dense_max_numel < 0:
            raise InputError("carve options oversample, power_iters, dense_max_numel must be >= 0")


def concordance_mask(tau: torch.Tensor, core: torch.Tensor, zero_core: str = "concordant"
                     ) -> torch.Tensor:
    """bool mask, same shape: coordinates where the task vector agrees in sign with the core.

    ``zero_core="concordant"``: C == 0 always counts as concordant; ``"discordant"``: never.
    """
    same = torch.sign(tau) == torch.sign(core)
    if zero_core == "concordant":
        return same | (core == 0)
    return same & (core != 0)


def stored_core(C: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The core as it will be stored: rounded to ``dtype`` (nearest), back in ``C``'s dtype.

    Returned as the new core so the next admission, the drift ``dC`` and the served weights all
    start from what is stored. The residual is fitted against the unrounded core: fitting the
    rounding (at most half a ``dtype`` ulp of the core, below the served bf16 weight's own
    rounding whenever ``|C| <= |W|``) would cost full-rank factors for noise. Coordinates the
    update leaves alone are bitwise unchanged (a stored value round-trips), so the rounding error
    only moves where the core moves; its bound is in docs/CARVE.md, section 4."""
    if dtype is None or dtype == C.dtype:
        return C
    return C.to(dtype).to(C.dtype)


@register_method
class CarveMethod(MergeMethod):
    """CARVE admission (docs/CARVE.md); every unstated choice is a :class:`CarveOptions` knob."""

    name: ClassVar[str] = "carve"
    options_cls: ClassVar[type] = CarveOptions
    continual: ClassVar[bool] = True
    per_skill: ClassVar[bool] = True

    @property
    def needs_residuals(self) -> bool:
        """Drift compensation re-fits earlier skills' residuals, so it needs them."""
        return bool(self.options.drift_compensation)

    # ------------------------------------------------------------------ helpers
    def _eta(self, t: int, m: torch.Tensor, aux: dict[str, torch.Tensor]):
        """Update rate (scalar or per-coordinate float32) and the new aux dict."""
        o = self.options
        if o.rate == "1/t":
            return 1.0 / t, dict(aux)
        if o.rate == "1/(t+1)":
            return 1.0 / (t + 1), dict(aux)
        count = aux.get(COUNT_KEY)
        if count is None:
            count = torch.zeros(m.shape, dtype=torch.int32)
        elif tuple(count.shape) != tuple(m.shape):
            raise InputError(f"carve state: aux {COUNT_KEY!r} has shape {tuple(count.shape)}, "
                             f"tensor has {tuple(m.shape)}")
        eta = 1.0 / (count.to(torch.float32) + 1.0)
        new_aux = dict(aux)
        new_aux[COUNT_KEY] = (count.to(torch.int32) + m.to(torch.int32))
        return eta, new_aux

    def _compress(self, ctx: TensorContext, R: torch.Tensor, seed: int,
                  rank: int | None = None) -> ResidualEntry:
        """Residual -> LowRank (2-D) or Dense (1-D, ctx.dense, tiny, or no storage saving)."""
        o = self.options
        if ctx.dense or R.ndim != 2 or R.numel() <= o.dense_max_numel:
            return Dense(R.contiguous())
        m, n = R.shape
        if rank is None and o.energy is None and should_store_dense(m, n, o.rank):
            return Dense(R.contiguous())
        if rank is not None:
            lr = truncated_svd(R, rank=rank, method=o.svd, oversample=o.oversample,
                               power_iters=o.power_iters, seed=seed)
        elif o.energy is not None:
            lr = truncated_svd(R, energy=float(o.energy), method=o.svd, oversample=o.oversample,
                               power_iters=o.power_iters, seed=seed)
        else:
            lr = truncated_svd(R, rank=int(o.rank), method=o.svd, oversample=o.oversample,
                               power_iters=o.power_iters, seed=seed)
        if lr.rank > 0 and should_store_dense(m, n, lr.rank):
            return Dense(R.contiguous())
        return lr

    def _step(self, tau: torch.Tensor, C_prev: torch.Tensor, t: int,
              aux: dict[str, torch.Tensor]):
        """The admission rule on a whole tensor or a row block of it (same shapes, work dtype):
        (new core, unrounded; concordance mask; residual; new aux)."""
        o = self.options
        m = concordance_mask(tau, C_prev, o.zero_core)
        eta, aux = self._eta(t, m, aux)
        C = C_prev + eta * m.to(tau.dtype) * (tau - C_prev)
        # against the unrounded core: skill 1 under 1/t stays exactly absorbed (R = 0) instead of
        # storing bf16 rounding noise at full rank (see stored_core)
        R = tau - C if o.residual == "tau-minus-core" else tau * (~m).to(tau.dtype)
        return C, m, R, aux

    # ------------------------------------------------------------------ admission
    def admit_tensor(self, ctx: TensorContext, tau: torch.Tensor, state: TensorState, t: int,
                     skill: str) -> AdmitResult:
        """Admit expert ``t`` (1-based). tau: float32 ``ctx.shape``. Returns the new core (float32,
        ``ctx.shape``), aux (``count``: int32 ``ctx.shape`` for rate='count'), the skill's entry
        (``LowRank`` (m, r)/(r, n) or ``Dense``) and, with drift compensation, earlier skills'
        re-fitted entries."""
        o = self.options
        if t < 1:
            raise InputError(f"carve: admission index t must be >= 1, got {t}")
        # float32 work dtype; a float64 task vector keeps float64 (the reference of the core
        # dtype error measurement, bench/bench_core_dtype.py)
        tau = tau if tau.dtype == torch.float64 else tau.float()
        if tuple(tau.shape) != tuple(ctx.shape):
            raise InputError(f"carve: task vector for {ctx.name!r} has shape {tuple(tau.shape)}, "
                             f"expected {tuple(ctx.shape)}")
        if not bool(torch.isfinite(tau).all()):
            raise InputError(f"carve: task vector of {ctx.name!r} (skill {skill!r}) has non-finite "
                             f"values; refusing to fold them into the shared core")
        C_prev = state.core.to(tau.dtype) if state.core is not None else torch.zeros_like(tau)
        if tuple(C_prev.shape) != tuple(tau.shape):
            raise InputError(f"carve state: core of {ctx.name!r} has shape {tuple(C_prev.shape)}, "
                             f"task vector has {tuple(tau.shape)}")
        C, m, R, aux = self._step(tau, C_prev, t, state.aux)
        C = stored_core(C, ctx.core_dtype)
        seed = self.seed * 1_000_003 + t
        entry = self._compress(ctx, R, seed)

        updated: dict[str, ResidualEntry] = {}
        dC = C - C_prev
        if o.drift_compensation and bool(torch.any(dC != 0)):
            for name, old in state.residuals.items():
                if name == skill or isinstance(old, Masked):
                    continue
                target = old.materialize() - dC
                if isinstance(old, Dense):
                    updated[name] = Dense(target.contiguous())
                else:
                    keep = old.rank if o.drift_rank == "keep" else None
                    updated[name] = self._compress(ctx, target, seed + 7919, rank=keep)

        r_norm = float(torch.linalg.vector_norm(R))
        info = {
            "kind": "lowrank" if isinstance(entry, LowRank) else "dense",
            "rank": entry.rank if isinstance(entry, LowRank) else None,
            "rel_error": float(entry.rel_error) if isinstance(entry, LowRank) else 0.0,
            "concordant_fraction": float(m.float().mean()) if m.numel() else 1.0,
            "residual_norm": r_norm,
            "tau_norm": float(torch.linalg.vector_norm(tau)),
            "core_change_norm": float(torch.linalg.vector_norm(dC)),
        }
        if updated:
            info["drift_refit"] = sorted(updated)
        return AdmitResult(core=C, aux=aux, entry=entry, updated=updated, info=info)

    # ------------------------------------------------------------------ row-block admission
    def supports_blocks(self, ctx: TensorContext) -> bool:
        """True when :meth:`admit_blocked` can admit this tensor from row blocks: a fixed-rank
        residual from the randomized SVD, a rate that needs no per-coordinate aux and no
        earlier residuals (the other options go through :meth:`admit_tensor`)."""
        o = self.options
        if len(ctx.shape) != 2 or ctx.dense or int(o.rank) <= 0:
            return False
        m, n = ctx.shape
        return (o.rate != "count" and o.energy is None and o.svd != "exact"
                and not o.drift_compensation and m * n > o.dense_max_numel
                and not should_store_dense(m, n, int(o.rank)))

    def admit_blocked(self, ctx: TensorContext, tau_rows, core_prev: torch.Tensor | None,
                      t: int, skill: str) -> AdmitResult | None:
        """:meth:`admit_tensor` for a tensor only read in row blocks (a vocabulary embedding, an
        LM head), when :meth:`supports_blocks`.

        tau_rows(a, b): float32 rows ``[a, b)`` of the task vector; core_prev: the stored core
        (any float dtype, ``ctx.shape``) or None. The new core is assembled directly in
        ``ctx.core_dtype`` (float32 when None) and the residual ``R`` is recomputed from
        ``tau_rows`` and ``core_prev`` block by block for each pass of
        :func:`blocked_randomized_svd`, so no float32 copy of the whole tensor ever exists.
        Returns None when the task vector is all zero (the stream then keeps the prior core)."""
        o = self.options
        work = ctx.core_dtype or torch.float32
        new_core = torch.empty(ctx.shape, dtype=work)
        sums = torch.zeros(4, dtype=torch.float64)  # |tau|^2, |R|^2, |dC|^2, concordant count

        def block(a: int, b: int):
            tau = tau_rows(a, b)
            prev = (core_prev[a:b].float() if core_prev is not None
                    else torch.zeros_like(tau))
            C, m, R, _ = self._step(tau, prev, t, {})
            return tau, prev, C, m, R

        for a, b in row_blocks(*ctx.shape):
            tau, prev, C, m, R = block(a, b)
            if not bool(torch.isfinite(tau).all()):
                raise InputError(f"carve: task vector of {ctx.name!r} (skill {skill!r}) has "
                                 f"non-finite values; refusing to fold them into the shared core")
            new_core[a:b] = C
            dC = new_core[a:b].float() - prev
            sums += torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64) ** 2
                                 for x in (tau, R, dC)] + [m.sum(dtype=torch.float64)])
        if float(sums[0]) == 0.0:
            return None
        entry = blocked_randomized_svd(lambda a, b: block(a, b)[4], *ctx.shape, int(o.rank),
                                       o.oversample, o.power_iters, self.seed * 1_000_003 + t)
        info = {"kind": "lowrank", "rank": entry.rank, "rel_error": float(entry.rel_error),
                "concordant_fraction": float(sums[3]) / math.prod(ctx.shape),
                "residual_norm": math.sqrt(float(sums[1])),
                "tau_norm": math.sqrt(float(sums[0])),
                "core_change_norm": math.sqrt(float(sums[2])), "row_blocks": True}
        return AdmitResult(core=new_core, aux={}, entry=entry, info=info)
