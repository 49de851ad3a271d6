"""Iso-C and Iso-CTS (Marczak et al., ICML 2025) against an independent float64 reference written
here from the paper's equations, plus their defining properties, the k-split rule, option checks
and a real ``carve merge`` on tiny checkpoints.

The reference orthogonalises with ``A (A^T A)^{-1/2}`` (an eigendecomposition), not the SVD the
implementation uses, so the two agree only if both compute the same polar factor.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_admit_cli import carve, carve_inproc  # noqa: E402
from test_engine import BUFFER, SHAPES, make_family  # noqa: E402

from policy_server.errors import InputError
from policy_server.merge.methods import TensorContext, build_options, get_method
from policy_server.merge.methods.iso_cts import iso_cts_split


def make(name: str, **options):
    cls = get_method(name)
    return cls(build_options(cls, options))


def rand_taus(shape, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 0.1 for _ in range(n)]


# ---- float64 reference, from the paper's equations ------------------------------------------
def ref_polar(a: torch.Tensor) -> torch.Tensor:
    """a (a^T a)^{-1/2} for a full-column-rank float64 (p, q) matrix, via eigh."""
    w, q = torch.linalg.eigh(a.T @ a)
    return a @ (q * w.rsqrt()) @ q.T


def ref_iso_c(taus: list[torch.Tensor], lam: float) -> torch.Tensor:
    """Paper eq.: Delta = sum tau_t = U S V^T; Iso-C = alpha * mean(S) * U V^T (float64)."""
    taus = [t.double() for t in taus]
    if taus[0].ndim != 2:
        return lam * sum(taus) / len(taus)
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return lam * s.mean() * u @ vh


def ref_split(r: int, n: int, frac: float) -> tuple[int, int]:
    """The reference code's k rule, spelled out: k0 = floor(r f); the task-specific total is
    rounded to a multiple of N; k takes the rest."""
    k0 = int(r * frac)
    total = round((r - k0) / n) * n
    return r - total, total // n


def ref_iso_cts(taus: list[torch.Tensor], lam: float, frac: float = 0.8) -> torch.Tensor:
    """Paper eqs. for Iso-CTS in float64: common top-k of the sum, per-task top-s of the residual
    (I - U_c U_c^T) tau_t, blocks [tasks..., common] as the reference orders them, polar factors,
    mean singular value."""
    taus = [t.double() for t in taus]
    if taus[0].ndim != 2:
        return lam * sum(taus) / len(taus)
    m, n = taus[0].shape
    k, s = ref_split(min(m, n), len(taus), frac)
    u, sv, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc = u[:, :k]
    proj = torch.eye(m, dtype=torch.float64) - uc @ uc.T
    us, ss, vs = [], [], []
    for t in taus:
        ut, st, vth = torch.linalg.svd(proj @ t, full_matrices=False)
        us.append(ut[:, :s]), ss.append(st[:s]), vs.append(vth[:s].T)
    big_u = torch.cat(us + [uc], 1)
    big_v = torch.cat(vs + [vh[:k].T], 1)
    sigma = torch.cat(ss + [sv[:k]]).mean()
    return lam * sigma * ref_polar(big_u) @ ref_polar(big_v).T


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-5):
    """float32 result vs float64 reference, relative to the reference's scale."""
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=rel * scale)


# ---- Iso-C -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (9, 9)])
@pytest.mark.parametrize("n", [1, 3])
def test_iso_c_matches_reference(shape, n):
    taus = rand_taus(shape, n, seed=n)
    res = make("iso_c", lam=0.7).merge_tensor(TensorContext("w", shape), taus)
    assert res.entries == [None] * n and res.info["kind"] == "iso_c"
    close(res.core, ref_iso_c(taus, 0.7))


@pytest.mark.parametrize("shape", [(16,), (2, 3, 4), (4, 3, 2, 2)])
def test_non_2d_tensors_get_the_scaled_mean(shape):
    taus = rand_taus(shape, 3)
    for name in ("iso_c", "iso_cts"):
        res = make(name, lam=1.5).merge_tensor(TensorContext("b", shape), taus)
        assert res.info["kind"] == "mean"
        close(res.core, 1.5 * sum(t.double() for t in taus) / 3, rel=1e-6)


def test_mean_patterns_average_a_matrix():
    taus = rand_taus((8, 6), 2)
    for name in ("iso_c", "iso_cts"):
        m = make(name, mean_patterns="*.text_projection,head.*")
        res = m.merge_tensor(TensorContext("enc.text_projection", (8, 6)), taus)
        assert res.info["kind"] == "mean"
        close(res.core, (taus[0].double() + taus[1].double()) / 2, rel=1e-6)
        assert m.merge_tensor(TensorContext("enc.q", (8, 6)), taus).info["kind"] == name


def test_iso_c_spectrum_is_flat_at_the_mean_singular_value():
    taus = rand_taus((20, 12), 4, seed=3)
    core = make("iso_c", lam=2.0).merge_tensor(TensorContext("w", (20, 12)), taus).core
    s = torch.linalg.svdvals(core.double())
    want = 2.0 * torch.linalg.svdvals(sum(t.double() for t in taus)).mean()
    torch.testing.assert_close(s, want.expand_as(s), rtol=1e-5, atol=0)


def test_iso_c_rank_only_on_a_rank_deficient_sum():
    """Two rank-2 task vectors: the sum has rank 4 of 12. The reference rule spreads the mean of
    all 12 singular values over all 12 directions (8 of them an arbitrary completion);
    rank_only keeps the 4 real ones at the mean of the 4 non-zero values."""
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(20, 2, generator=g) @ torch.randn(2, 12, generator=g) for _ in range(2)]
    ctx = TensorContext("w", (20, 12))
    s_delta = torch.linalg.svdvals(sum(t.double() for t in taus))
    full = make("iso_c").merge_tensor(ctx, taus).core.double()
    torch.testing.assert_close(torch.linalg.svdvals(full), s_delta.mean().expand(12),
                               rtol=1e-4, atol=0)
    low = make("iso_c", rank_only=True).merge_tensor(ctx, taus).core.double()
    s_low = torch.linalg.svdvals(low)
    torch.testing.assert_close(s_low[:4], s_delta[:4].mean().expand(4), rtol=1e-5, atol=0)
    assert float(s_low[4]) < 1e-5 * float(s_low[0])
    u4 = torch.linalg.svd(sum(t.double() for t in taus))[0][:, :4]
    close(u4 @ (u4.T @ low), low, rel=1e-5)  # column space = that of the sum
    zero = make("iso_c", rank_only=True).merge_tensor(ctx, [torch.zeros(20, 12)] * 2).core
    assert not zero.any()


# ---- Iso-CTS ---------------------------------------------------------------------------------
def test_iso_cts_split_rule():
    # r=16, N=3, f=0.8: k0=12, round(4/3)=1 per task, k=13
    assert iso_cts_split(16, 3, 0.8) == (13, 1)
    # ViT-B attention (768) with 8 tasks: k0=614, round(154/8)=19, k=768-152=616
    assert iso_cts_split(768, 8, 0.8) == (616, 19)
    # half-to-even: round(2/4 = 0.5) = 0, so everything is common
    assert iso_cts_split(10, 4, 0.8) == (10, 0)
    assert iso_cts_split(14, 4, 0.5) == (6, 2)  # round(7/4 = 1.75) = 2
    # the reference would give k = 5 - 6 < 0 here; we lower s to 1
    assert iso_cts_split(5, 3, 0.0) == (2, 1)
    for r, n, f in [(16, 3, 0.8), (768, 8, 0.8), (10, 4, 0.8), (14, 4, 0.5), (48, 5, 0.3)]:
        assert iso_cts_split(r, n, f) == ref_split(r, n, f)


@pytest.mark.parametrize("shape,n,frac", [((24, 16), 3, 0.8), ((16, 30), 3, 0.5),
                                          ((30, 20), 4, 0.2), ((12, 12), 1, 0.8)])
def test_iso_cts_matches_reference(shape, n, frac):
    taus = rand_taus(shape, n, seed=11 + n)
    res = make("iso_cts", lam=0.9, common_space_fraction=frac).merge_tensor(
        TensorContext("w", shape), taus)
    k, s = ref_split(min(shape), n, frac)
    assert res.info == {"kind": "iso_cts", "common_rank": k, "rank_per_task": s}
    close(res.core, ref_iso_cts(taus, 0.9, frac), rel=5e-5)


def test_iso_cts_contains_common_directions_and_is_flat():
    shape, n = (30, 20), 3
    taus = rand_taus(shape, n, seed=2)
    core = make("iso_cts", common_space_fraction=0.5).merge_tensor(
        TensorContext("w", shape), taus).core.double()
    k, _ = ref_split(20, n, 0.5)
    u, _, vh = torch.linalg.svd(sum(t.double() for t in taus), full_matrices=False)
    uc, vc = u[:, :k], vh[:k].T
    cu, cs, cvh = torch.linalg.svd(core, full_matrices=False)
    # every common direction lies in the merged column / row space
    close(cu @ (cu.T @ uc), uc, rel=1e-4)
    close(cvh.T @ (cvh @ vc), vc, rel=1e-4)
    torch.testing.assert_close(cs, cs.mean().expand_as(cs), rtol=1e-5, atol=0)


def test_iso_cts_all_common_equals_iso_c():
    taus = rand_taus((18, 14), 3, seed=9)
    ctx = TensorContext("w", (18, 14))
    cts = make("iso_cts", common_space_fraction=1.0).merge_tensor(ctx, taus)
    assert cts.info["rank_per_task"] == 0
    close(cts.core, make("iso_c").merge_tensor(ctx, taus).core.double(), rel=1e-5)


# ---- options and CLI -------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts,msg", [
    ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction must be in"),
    ("iso_cts", {"common_space_fraction": "x"}, "common_space_fraction must be a number"),
    ("iso_c", {"lam": float("nan")}, "lam must be finite"),
    ("iso_c", {"rank_only": "maybe"}, "rank_only must be true or false"),
    ("iso_c", {"common_space_fraction": 0.5}, "has no option"),
])
def test_bad_options(name, opts, msg):
    with pytest.raises(InputError, match=msg):
        make(name, **opts)


def test_registry_defaults_and_aliases():
    assert get_method("iso-c").name == "iso_c" and get_method("iso-cts").name == "iso_cts"
    c, cts = make("iso_c"), make("iso_cts")
    assert c.one_shot and not c.continual and not c.per_skill
    assert cts.one_shot and not cts.continual and not cts.per_skill
    assert c.options_dict() == {"lam": 1.0, "mean_patterns": [], "rank_only": False}
    assert cts.options_dict() == {"lam": 1.0, "common_space_fraction": 0.8, "mean_patterns": []}


def test_bench_registry_lists_both():
    from bench.closed_loop.methods import parse_label

    assert parse_label("iso_c").method == "iso_c" and parse_label("iso_c").build == "oneshot"
    assert parse_label("iso_cts").method == "iso_cts"


@pytest.mark.parametrize("method", ["iso-c", "iso-cts"])
def test_merge_cli_writes_a_loadable_checkpoint(tmp_path, method):
    bdir, edirs, base, experts = make_family(tmp_path, n=3)
    out = tmp_path / "merged"
    r = carve("merge", "--method", method, "--base", bdir, *sum((["--expert", e] for e in edirs),
              []), "--out", out, "--lam", "0.5", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "into checkpoint" in r.stdout
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(base)
    ref = ref_iso_c if method == "iso-c" else ref_iso_cts
    for k in SHAPES:
        assert got[k].dtype == base[k].dtype and got[k].shape == base[k].shape
        taus = [e[k] - base[k] for e in experts]
        close(got[k] - base[k], ref(taus, 0.5), rel=1e-4)
    assert torch.equal(got[BUFFER], base[BUFFER])


def test_merge_cli_bad_option_is_one_line_exit_2(tmp_path, capsys):
    bdir, edirs, _, _ = make_family(tmp_path, n=2)
    common = ("--base", bdir, "--expert", edirs[0], "--expert", edirs[1], "--no-progress")
    for method, flag, value, msg in [
            ("iso-cts", "--common-space-fraction", "2", "common_space_fraction must be in"),
            ("iso-c", "--lam", "abc", "--lam 'abc'"),
            ("iso-c", "--common-space-fraction", "0.5", "is not an option of method 'iso_c'")]:
        out = tmp_path / f"bad-{method}-{flag[2:]}"
        rc, _, err = carve_inproc(capsys, "merge", "--method", method, *common, "--out", out,
                                  flag, value)
        assert rc == 2 and msg in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()
