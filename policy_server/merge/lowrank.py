"""Truncated SVD of residual matrices into the two factors CARVE stores per skill and tensor.

Factor convention: ``P = U_r * S_r`` (m, r) and ``Q = V_r^T`` (r, n), i.e. the singular values
live in ``P`` and ``Q`` has orthonormal rows. The runtime's side path computes ``(x Q^T) P^T``,
and keeping ``Q`` orthonormal keeps the intermediate ``x Q^T`` at the scale of ``x`` (no overflow
risk when stored in half precision); drift compensation also relies on ``Q`` being orthonormal
only through re-running this function, never on the split itself.

Achieved error ``rel_error = |R - P Q|_F / |R|_F`` is recorded for every truncation: from the tail
singular values for the exact SVD (Eckart-Young: that is the optimum), from the actual residual for
the randomized one (its spectrum is approximate).
"""

from __future__ import annotations

import math

import torch

from policy_server.errors import InputError
from policy_server.tensors.entries import LowRank

#: above this min(m, n), method="auto" switches from the exact to the randomized SVD
EXACT_MAX_DIM = 1024
#: ... and above this many elements too: an exact SVD of a tall (m >> n) matrix costs O(m n^2),
#: e.g. ~1.2e11 flops for a 151936 x 896 vocabulary embedding, while a rank-64 sketch is ~100x less
EXACT_MAX_NUMEL = 1 << 22


def should_store_dense(m: int, n: int, r: int) -> bool:
    """True when rank-``r`` factors would not be smaller than the dense (m, n) matrix:
    ``r * (m + n) >= m * n``."""
    return r * (m + n) >= m * n


def _rank_for_energy(s: torch.Tensor, total_sq: float, energy: float) -> int:
    """Smallest k with ``sum_{i<=k} s_i^2 / total_sq >= energy`` (len(s) if never reached)."""
    cum = torch.cumsum(s.double() ** 2, 0) / total_sq
    # tolerance: cum of float32 values can land a hair below 1.0 for energy=1.0
    hit = torch.nonzero(cum >= energy - 1e-9)
    return int(hit[0]) + 1 if hit.numel() else int(s.numel())


def _check_args(R: torch.Tensor, rank, energy, method: str) -> None:
    if R.ndim != 2:
        raise InputError(f"truncated_svd needs a 2-D matrix, got shape {tuple(R.shape)}")
    if rank is None and energy is None:
        raise InputError("truncated_svd needs rank or energy")
    if rank is not None and rank < 0:
        raise InputError(f"rank must be >= 0, got {rank}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise InputError(f"energy must be in (0, 1], got {energy}")
    if method not in ("auto", "exact", "randomized"):
        raise InputError(f"svd method must be auto|exact|randomized, got {method!r}")


def truncated_svd(R: torch.Tensor, rank: int | None = None, energy: float | None = None,
                  method: str = "auto", oversample: int = 8, power_iters: int = 2,
                  seed: int = 0) -> LowRank:
    """Best rank-``r`` factors ``P (m, r)``, ``Q (r, n)`` (float32; float64 for a float64 ``R``)
    of ``R (m, n)``.

    rank: fixed rank (clamped to min(m, n)); with ``energy`` as well it is an upper bound.
    energy: pick the smallest k with ``sum_{i<=k} s_i^2 / |R|_F^2 >= energy``. The denominator is
    the exact ``|R|_F^2`` in both methods; for the randomized SVD the numerator uses the computed
    (slightly underestimated) leading singular values, so the chosen k can be a little larger than
    the exact one, never smaller than needed. If the computed spectrum does not reach ``energy``,
    the sketch size is doubled until it does (falling back to the exact SVD at full size).
    method: "exact" (``torch.linalg.svd``), "randomized" (``torch.svd_lowrank`` with
    ``rank + oversample`` columns and ``power_iters`` power iterations, seeded by ``seed`` without
    touching the global RNG), or "auto" (exact when min(m, n) <= 1024 and m * n <= 4M elements,
    or when the sketch would cover most of the spectrum). A zero matrix gives rank 0 and rel_error 0.
    """
    _check_args(R, rank, energy, method)
    # float64 stays float64: the rounding-free reference of bench/bench_core_dtype.py
    R = R if R.dtype == torch.float64 else R.float()
    m, n = R.shape
    full = min(m, n)
    total_sq = float(torch.linalg.vector_norm(R, dtype=torch.float64) ** 2)
    if total_sq == 0.0 or full == 0 or rank == 0:
        rel = 0.0 if total_sq == 0.0 else 1.0
        return LowRank(R.new_zeros((m, 0)), R.new_zeros((0, n)), rel)
    cap = full if rank is None else min(int(rank), full)
    want = cap if energy is None else min(cap, 64)
    use_exact = method == "exact" or (method == "auto" and (
        (full <= EXACT_MAX_DIM and m * n <= EXACT_MAX_NUMEL) or want + oversample >= full // 2))
    if use_exact:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        k = cap if energy is None else min(cap, _rank_for_energy(S, total_sq, energy))
        tail = float(torch.sum(S[k:].double() ** 2))
        # Tail of a float32 SVD vs a float64 norm can differ by rounding; clamp into [0, 1].
        rel = math.sqrt(min(max(tail / total_sq, 0.0), 1.0))
        return LowRank((U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous(), rel)

    q = min(want + oversample, full)
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(R, q=q, niter=power_iters)
        if energy is None:
            k = min(cap, S.numel())
            break
        k = _rank_for_energy(S, total_sq, energy)
        reached = float(torch.sum(S[:k].double() ** 2)) / total_sq >= energy - 1e-9
        if reached or k >= cap:
            k = min(k, cap)
            break
        if q >= full:  # sketch already spans everything: the spectrum itself falls short
            return truncated_svd(R, rank=cap, energy=energy, method="exact")
        q = min(2 * q, full)
    P = (U[:, :k] * S[:k]).contiguous()
    Q = V[:, :k].T.contiguous()
    resid = float(torch.linalg.vector_norm(R - P @ Q, dtype=torch.float64) ** 2)
    return LowRank(P, Q, math.sqrt(min(resid / total_sq, 1.0)))


#: a row-block of a blocked matrix holds about this many elements (16 MiB in float32: the
#: working set of a block, a handful of such temporaries, stays near 100 MiB)
BLOCK_NUMEL = 1 << 22


def row_blocks(m: int, n: int, block_numel: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` row ranges covering ``m`` rows of width ``n``, each about
    ``block_numel`` elements (default :data:`BLOCK_NUMEL`; at least one row)."""
    step = max(1, (BLOCK_NUMEL if block_numel is None else block_numel) // max(n, 1))
    return [(i, min(i + step, m)) for i in range(0, m, step)]


def blocked_randomized_svd(rows, m: int, n: int, rank: int, oversample: int = 8,
                           power_iters: int = 2, seed: int = 0,
                           block_numel: int | None = None) -> LowRank:
    """Rank-``rank`` factors of an (m, n) matrix only ever seen in row blocks.

    ``rows(start, stop)`` returns rows ``[start, stop)`` as float32 ``(stop - start, n)``; it is
    called once per pass (``3 + 2 * power_iters`` passes), so no (m, n) float32 copy ever exists:
    the working set is one block plus the (m, q) and (n, q) sketches, ``q = rank + oversample``.
    Same Halko-Martinsson-Tropp range finder as :func:`truncated_svd`'s randomized path (Gaussian
    test matrix seeded by ``seed`` without touching the global RNG, QR re-orthonormalised power
    iterations); ``P = Q_Y U_B S`` (m, r) and ``Q = V_B^T`` (r, n) as everywhere. ``rel_error`` is
    exact for these factors: ``P Q`` is the projection of ``R`` onto ``span(P)``, so
    ``|R - P Q|^2 = |R|^2 - sum_{i<=r} s_i^2`` with ``|R|^2`` accumulated in float64.
    """
    if rank < 0:
        raise InputError(f"rank must be >= 0, got {rank}")
    blocks = row_blocks(m, n, block_numel)
    q = min(rank + oversample, m, n)
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(n, q, generator=gen)
    total_sq, Y = 0.0, torch.empty(m, q)
    for a, b in blocks:  # pass 1: the sketch Y = R omega, and |R|_F^2
        R = rows(a, b)
        total_sq += float(torch.linalg.vector_norm(R, dtype=torch.float64) ** 2)
        Y[a:b] = R @ omega
    if total_sq == 0.0 or rank == 0 or q == 0:
        return LowRank(torch.zeros(m, 0), torch.zeros(0, n), 0.0 if total_sq == 0.0 else 1.0)
    for _ in range(power_iters):  # two passes each: Z = R^T Q_Y, then Y = R Q_Z
        Qy = torch.linalg.qr(Y).Q
        Z = torch.zeros(n, q)
        for a, b in blocks:
            Z += rows(a, b).T @ Qy[a:b]
        Qz = torch.linalg.qr(Z).Q
        for a, b in blocks:
            Y[a:b] = rows(a, b) @ Qz
    Qy = torch.linalg.qr(Y).Q
    B = torch.zeros(q, n)
    for a, b in blocks:  # last pass: B = Q_Y^T R (q, n), small enough for an exact SVD
        B += Qy[a:b].T @ rows(a, b)
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    k = min(rank, S.numel())
    kept = float(torch.sum(S[:k].double() ** 2))
    P = (Qy @ (Ub[:, :k] * S[:k])).contiguous()
    return LowRank(P, Vh[:k].contiguous(), math.sqrt(min(max(1.0 - kept / total_sq, 0.0), 1.0)))
