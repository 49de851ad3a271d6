"""Small helpers shared by the baseline merge methods: option and input checks, glob matching,
deterministic per-tensor seeds, and folding continual admissions into a one-shot merge."""

from __future__ import annotations

import fnmatch
import hashlib
import math
from typing import Sequence

import torch

from policy_server.errors import InputError
from policy_server.merge.methods.base import (
    MergeMethod,
    MergeResult,
    TensorContext,
    TensorState,
    fold_step,
)


def check_taus(method: str, ctx: TensorContext, taus: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Validate N task vectors of one tensor and return them as float32 (no copy when already so).

    Raises InputError naming the method and tensor when the list is empty, a task vector is not a
    floating tensor, or its shape differs from ``ctx.shape``.
    """
    if len(taus) == 0:
        raise InputError(f"{method}: no task vectors given for tensor {ctx.name!r}")
    out = []
    for i, tau in enumerate(taus):
        out.append(check_tau(method, ctx, tau, index=i))
    return out


def check_tau(method: str, ctx: TensorContext, tau: torch.Tensor, index: int | None = None
              ) -> torch.Tensor:
    """Validate one task vector (shape ``ctx.shape``, floating dtype); return it as float32."""
    which = f"task vector {index}" if index is not None else "task vector"
    if not isinstance(tau, torch.Tensor) or not tau.is_floating_point():
        raise InputError(f"{method}: {which} of tensor {ctx.name!r} is not a floating tensor "
                         f"(got {type(tau).__name__} {getattr(tau, 'dtype', '')})")
    if tuple(tau.shape) != tuple(ctx.shape):
        raise InputError(f"{method}: {which} of tensor {ctx.name!r} has shape {tuple(tau.shape)}, "
                         f"expected {tuple(ctx.shape)}")
    return tau.to(torch.float32)


def check_float(method: str, name: str, value, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """Validate a finite float option in [lo, hi] (open ends when asked); InputError otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{method}: option {name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"{method}: option {name} must be finite, got {value!r}")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise InputError(f"{method}: option {name} must be in {rng}, got {value!r}")
    return v


def check_bool(method: str, name: str, value) -> bool:
    """A bool option; also accepts the strings a CLI or a JSON/YAML file may carry ('true', '0'...).

    ``bool("false")`` is True, so strings must never be passed through ``bool``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise InputError(f"{method}: option {name} must be true or false, got {value!r}")


def check_int(method: str, name: str, value, lo: int | None = None) -> int:
    """An integer option (ints or integral strings, not bools or floats) >= lo."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{method}: option {name} must be an integer, got {value!r}")
    try:
        v = int(value)
    except ValueError:
        raise InputError(f"{method}: option {name} must be an integer, got {value!r}") from None
    if lo is not None and v < lo:
        raise InputError(f"{method}: option {name} must be an integer >= {lo}, got {value!r}")
    return v


def check_choice(method: str, name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InputError(f"{method}: option {name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_patterns(method: str, name: str, value) -> list[str]:
    """Normalise a glob-pattern option: a list of strings, or one comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise InputError(f"{method}: option {name} must be a list of non-empty glob patterns, "
                         f"got {value!r}")
    return list(value)


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """True when the checkpoint key matches a shell-style glob patterns (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def stable_seed(*parts) -> int:
    """A 63-bit seed derived from ``parts`` with sha256.

    Python's ``hash()`` is salted per process, so it cannot make results reproducible across runs;
    hashing (seed, tensor name, task index) makes every tensor's randomness independent of the
    order in which the stream reads tensors.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def fold_admissions(method: MergeMethod, ctx: TensorContext, taus: Sequence[torch.Tensor]
                    ) -> MergeResult:
    """One-shot merge of a continual method: admit ``taus`` in order and keep the final core.

    Per-skill entries are returned as the admissions produced them, with any later re-fits
    (``AdmitResult.updated``) applied, keyed by the synthetic skill names ``"0", "1", ...``.
    """
    state = TensorState()
    info: dict = {}
    for t, tau in enumerate(taus, start=1):
        res, state = fold_step(method, ctx, tau, state, t, str(t - 1))
        info = res.info
    return MergeResult(core=state.core,
                       entries=[state.residuals.get(str(i)) for i in range(len(taus))], info=info)


# ------------------------------------------------------------------------------------------------
# task arithmetic
