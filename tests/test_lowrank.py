"""Truncated SVD: Eckart-Young optimality, energy selection, randomized accuracy, edge cases."""

import math

import pytest
import torch

from policy_server.errors import InputError
from policy_server.merge.lowrank import should_store_dense, truncated_svd


def _lowrank_plus_noise(m, n, k, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)
            + noise * torch.randn(m, n, generator=g))


def test_eckart_young_error_equals_tail_energy():
    R = _lowrank_plus_noise(40, 30, 6, 0.3)
    s = torch.linalg.svdvals(R.double())
    for r in (0, 1, 5, 12, 30):
        lr = truncated_svd(R, rank=r, method="exact")
        assert lr.P.shape == (40, r) and lr.Q.shape == (r, 30) and lr.rank == r
        tail = math.sqrt(float((s[r:] ** 2).sum())) / float(torch.linalg.norm(R.double()))
        actual = float(torch.linalg.norm(R - lr.P @ lr.Q) / torch.linalg.norm(R))
        assert lr.rel_error == pytest.approx(tail, abs=1e-5)
        assert actual == pytest.approx(tail, abs=1e-5)
        if r:  # convention: Q = V_r^T has orthonormal rows, P = U_r S_r
            torch.testing.assert_close(lr.Q @ lr.Q.T, torch.eye(r), atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.linalg.norm(lr.P, dim=0), s[:r].float(), rtol=1e-4,
                                       atol=1e-5)
    # no rank-r matrix does better than the truncation (spot check against random rank-5 fits)
    best = truncated_svd(R, rank=5, method="exact").rel_error
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        X = torch.randn(40, 5, generator=g)
        fit = X @ torch.linalg.lstsq(X, R).solution  # best fit within a random column space
        assert float(torch.linalg.norm(R - fit) / torch.linalg.norm(R)) >= best - 1e-6


def test_energy_selects_smallest_rank():
    R = _lowrank_plus_noise(50, 35, 8, 0.2, seed=2)
    s2 = torch.linalg.svdvals(R.double()) ** 2
    frac = torch.cumsum(s2, 0) / s2.sum()
    for energy in (0.5, 0.9, 0.99, 0.999):
        k = int(torch.nonzero(frac >= energy)[0]) + 1
        lr = truncated_svd(R, energy=energy, method="exact")
        assert lr.rank == k
        assert 1 - lr.rel_error ** 2 >= energy - 1e-6  # kept energy reaches the threshold
        if k > 1:
            assert float(frac[k - 2]) < energy  # and one fewer would not
    assert truncated_svd(R, energy=1.0, method="exact").rank == 35
    # rank acts as a cap when both are given
    assert truncated_svd(R, rank=3, energy=0.999, method="exact").rank == 3


def test_randomized_close_to_exact_and_seeded():
    R = _lowrank_plus_noise(300, 200, 10, 0.05, seed=3)
    ex = truncated_svd(R, rank=10, method="exact")
    state = torch.random.get_rng_state()
    rs = truncated_svd(R, rank=10, method="randomized", oversample=8, power_iters=2, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    actual = float(torch.linalg.norm(R - rs.P @ rs.Q) / torch.linalg.norm(R))
    assert rs.rel_error == pytest.approx(actual, rel=1e-4)
    assert rs.rel_error <= ex.rel_error * 1.02
    rs2 = truncated_svd(R, rank=10, method="randomized", seed=5)
    assert torch.equal(rs.P, rs2.P) and torch.equal(rs.Q, rs2.Q)
    # energy through the randomized path: reaches the threshold, rank near the exact choice
    e_ex = truncated_svd(R, energy=0.99, method="exact")
    e_rs = truncated_svd(R, energy=0.99, method="randomized")
    assert e_ex.rank <= e_rs.rank <= e_ex.rank + 2
    assert 1 - e_rs.rel_error ** 2 >= 0.99 - 1e-4
    # a slowly decaying spectrum: the first sketch (64 + 8 columns) cannot reach 90% energy, so
    # the sketch has to grow
    g = torch.Generator().manual_seed(6)
    U = torch.linalg.qr(torch.randn(300, 200, generator=g)).Q
    V = torch.linalg.qr(torch.randn(200, 200, generator=g)).Q
    S = torch.arange(1, 201, dtype=torch.float32) ** -0.5
    slow = (U * S) @ V.T
    want = truncated_svd(slow, energy=0.9, method="exact").rank
    big = truncated_svd(slow, energy=0.9, method="randomized")
    assert want > 72 and want <= big.rank <= want + 3
    assert 1 - big.rel_error ** 2 >= 0.9 - 1e-4


def test_auto_uses_exact_on_small_matrices():
    R = _lowrank_plus_noise(30, 20, 4, 0.1, seed=4)
    a = truncated_svd(R, rank=4, method="auto")
    e = truncated_svd(R, rank=4, method="exact")
    assert torch.equal(a.P, e.P) and a.rel_error == e.rel_error


def test_zero_matrix_and_degenerate_inputs():
    z = truncated_svd(torch.zeros(7, 5), rank=3)
    assert z.rank == 0 and z.rel_error == 0.0 and z.P.shape == (7, 0) and z.Q.shape == (0, 5)
    assert torch.equal(z.materialize(), torch.zeros(7, 5))
    assert truncated_svd(torch.zeros(7, 5), energy=0.9).rank == 0
    assert truncated_svd(torch.randn(4, 3), rank=10).rank == 3  # clamped to min(m, n)
    with pytest.raises(InputError, match="2-D"):
        truncated_svd(torch.zeros(3), rank=1)
    with pytest.raises(InputError, match="energy must be in"):
        truncated_svd(torch.ones(3, 3), energy=1.5)
    with pytest.raises(InputError, match="rank or energy"):
        truncated_svd(torch.ones(3, 3))
    with pytest.raises(InputError, match="auto|exact|randomized"):
        truncated_svd(torch.ones(3, 3), rank=1, method="qr")


def test_should_store_dense():
    assert should_store_dense(4, 4, 2)          # 2*8 = 16 >= 16
    assert not should_store_dense(4, 4, 1)      # 8 < 16
    assert should_store_dense(100, 100, 50)
    assert not should_store_dense(4096, 4096, 64)
    assert should_store_dense(64, 1, 1)         # a column: factors never save


def test_auto_uses_randomized_on_huge_tall_matrices(monkeypatch):
    """A tall matrix with a small min dimension but many elements (a vocabulary embedding) must not
    take the O(m n^2) exact SVD under "auto" (regression: bench_merge spent most of its time there)."""
    import policy_server.merge.lowrank as lr

    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd",
                        lambda A, *a, **k: calls.append(tuple(A.shape)) or real(A, *a, **k))
    g = torch.Generator().manual_seed(0)
    R = torch.randn(lr.EXACT_MAX_NUMEL // 64 + 1, 64, generator=g) @ torch.randn(64, 96, generator=g)
    out = truncated_svd(R, rank=8, method="auto")
    assert out.rank == 8 and tuple(R.shape) not in calls  # only the sketch's small SVDs ran
    truncated_svd(R[:200], rank=8, method="auto")
    assert (200, 96) in calls  # small matrices still take the exact path


def test_blocked_randomized_svd_matches_the_optimum_and_reports_its_true_error():
    from policy_server.merge.lowrank import blocked_randomized_svd, row_blocks

    g = torch.Generator().manual_seed(3)
    R = (torch.randn(300, 8, generator=g) @ torch.randn(8, 40, generator=g)
         + 0.05 * torch.randn(300, 40, generator=g))
    seen = []

    def rows(a, b):
        seen.append((a, b))
        return R[a:b].clone()

    lr = blocked_randomized_svd(rows, 300, 40, rank=8, block_numel=40 * 64)
    assert len(row_blocks(300, 40, 40 * 64)) == 5 and max(b - a for a, b in seen) == 64
    actual = float(torch.linalg.vector_norm(R - lr.P @ lr.Q) / torch.linalg.vector_norm(R))
    assert lr.rel_error == pytest.approx(actual, rel=2e-3)  # |R|^2 - sum s^2 in float32 SVD
    S = torch.linalg.svdvals(R)
    best = float(torch.sqrt((S[8:] ** 2).sum() / (S ** 2).sum()))
    assert actual < best * 1.01
    # Q has orthonormal rows, as every CARVE factor
    torch.testing.assert_close(lr.Q @ lr.Q.T, torch.eye(8), atol=1e-5, rtol=0)
    zero = blocked_randomized_svd(lambda a, b: torch.zeros(b - a, 40), 300, 40, rank=8)
    assert zero.rank == 0 and zero.rel_error == 0.0
