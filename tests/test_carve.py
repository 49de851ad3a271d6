"""CARVE admission against a plain-loop reference, drift compensation, LoRA == dense, the bank."""

import itertools

import pytest
import torch
from ckpt_utils import write_checkpoint, write_lora_adapter

from policy_server.errors import InputError
from policy_server.tensors.checkpoint import open_checkpoint
from policy_server.tensors.entries import Dense, LowRank, skill_delta
from policy_server.merge.lowrank import truncated_svd
from policy_server.merge.methods import TensorContext, TensorState, build_options, get_method
from policy_server.merge.methods.carve import CarveMethod, CarveOptions
from policy_server.merge.task_vectors import open_expert


def _sgn(v):
    return (v > 0) - (v < 0)


def reference_stream(taus, rate, zero_core, residual):
    """Coordinate-by-coordinate CARVE in plain Python floats: (cores after each step, residuals,
    final counts). Written from the rule in docs/CARVE.md independently of the tensorised implementation."""
    n = len(taus[0])
    C, cnt = [0.0] * n, [0] * n
    cores, residuals = [], []
    for t, tau in enumerate(taus, 1):
        R = [0.0] * n
        for j in range(n):
            c, x = C[j], tau[j]
            if zero_core == "concordant":
                conc = c == 0 or _sgn(x) == _sgn(c)
            else:
                conc = c != 0 and _sgn(x) == _sgn(c)
            eta = {"1/t": 1 / t, "1/(t+1)": 1 / (t + 1), "count": 1 / (cnt[j] + 1)}[rate]
            if conc:
                C[j] = c + eta * (x - c)
                cnt[j] += 1
            R[j] = x - C[j] if residual == "tau-minus-core" else (0.0 if conc else x)
        cores.append(list(C))
        residuals.append(R)
    return cores, residuals, cnt


def _run(method, taus, ctx, names=None):
    """A plain-loop reference of the admission stream: carry core/aux/residuals, apply `updated`."""
    core, aux, entries, results = None, {}, {}, []
    for t, tau in enumerate(taus, 1):
        name = names[t - 1] if names else f"s{t}"
        res = method.admit_tensor(ctx, tau, TensorState(core, aux, dict(entries)), t, name)
        core, aux = res.core, res.aux
        entries[name] = res.entry
        entries.update(res.updated)
        results.append(res)
    return core, aux, entries, results


def _quantised_taus(shape, count, seed):
    # values in {-1, -0.5, 0, 0.5, 1}: exact zeros and sign ties exercise the concordance rule
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-2, 3, shape, generator=g).float() * 0.5 for _ in range(count)]


COMBOS = list(itertools.product(("1/t", "1/(t+1)", "count"), ("concordant", "discordant"),
                                ("tau-minus-core", "discordant-only")))


@pytest.mark.parametrize("rate,zero_core,residual", COMBOS)
def test_dense_admission_matches_reference_loop(rate, zero_core, residual):
    taus = _quantised_taus((4, 5), 4, seed=COMBOS.index((rate, zero_core, residual)))
    method = CarveMethod(CarveOptions(rate=rate, zero_core=zero_core, residual=residual))
    ctx = TensorContext("w", (4, 5), dense=True)
    cores, residuals, counts = reference_stream([t.flatten().tolist() for t in taus], rate,
                                                zero_core, residual)
    core, aux, entries, results = _run(method, taus, ctx)
    for t, res in enumerate(results):
        torch.testing.assert_close(res.core.flatten(), torch.tensor(cores[t]), rtol=0, atol=1e-6)
        assert isinstance(res.entry, Dense)
        torch.testing.assert_close(res.entry.D.flatten(), torch.tensor(residuals[t]), rtol=0,
                                   atol=1e-6)
    if rate == "count":
        assert aux["count"].dtype == torch.int32
        assert aux["count"].flatten().tolist() == counts
    else:
        assert "count" not in aux


@pytest.mark.parametrize("rate,zero_core,residual", COMBOS[::3])
def test_lowrank_residual_is_truncated_reference(rate, zero_core, residual):
    g = torch.Generator().manual_seed(7)
    taus = [torch.randn(12, 10, generator=g) for _ in range(3)]
    method = CarveMethod(CarveOptions(rate=rate, zero_core=zero_core, residual=residual, rank=3,
                                      svd="exact"))
    _, residuals, _ = reference_stream([t.flatten().tolist() for t in taus], rate, zero_core,
                                       residual)
    _, _, _, results = _run(method, taus, TensorContext("w", (12, 10)))
    for t, res in enumerate(results):
        R = torch.tensor(residuals[t]).reshape(12, 10)
        want = truncated_svd(R, rank=3, method="exact")
        assert isinstance(res.entry, LowRank) and res.entry.rank == (0 if want.rank == 0 else 3)
        torch.testing.assert_close(res.entry.materialize(), want.materialize(), rtol=1e-4, atol=1e-4)
        assert res.entry.rel_error == pytest.approx(want.rel_error, abs=1e-5)
        assert res.info["rank"] == res.entry.rank and res.info["kind"] == "lowrank"


def test_first_skill_absorbed_whole_with_eta_1_over_t():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(20, 16, generator=g)
    res = CarveMethod(CarveOptions(rank=4)).admit_tensor(
        TensorContext("w", (20, 16)), tau, TensorState(), 1, "first")
    torch.testing.assert_close(res.core, tau, rtol=0, atol=0)
    assert isinstance(res.entry, LowRank) and res.entry.rank == 0 and res.entry.rel_error == 0.0
    assert res.info["concordant_fraction"] == 1.0
    # with 1/(t+1) half of the first skill stays in its residual
    res2 = CarveMethod(CarveOptions(rate="1/(t+1)", rank=4)).admit_tensor(
        TensorContext("w", (20, 16)), tau, TensorState(), 1, "first")
    torch.testing.assert_close(res2.core, tau / 2)
    assert res2.entry.rank == 4


def test_one_d_and_tiny_tensors_stay_dense():
    m = CarveMethod(CarveOptions(rank=2, dense_max_numel=50))
    tau = torch.randn(6)
    assert isinstance(m.admit_tensor(TensorContext("b", (6,)), tau, TensorState(), 2, "s").entry,
                      Dense)
    small = torch.randn(5, 6)  # 30 <= dense_max_numel
    assert isinstance(m.admit_tensor(TensorContext("w", (5, 6)), small, TensorState(), 2, "s").entry,
                      Dense)
    # rank 64 on a 20x16 matrix saves nothing: stored dense, exact
    res = CarveMethod(CarveOptions()).admit_tensor(
        TensorContext("w", (20, 16)), torch.randn(20, 16), TensorState(core=torch.randn(20, 16)),
        2, "s")
    assert isinstance(res.entry, Dense)


def _synthetic_stream(T=4, m=64, n=48, shared=6, own=4, sparse=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(m, shared, generator=g) @ torch.randn(shared, n, generator=g) / shared ** 0.5
    taus = []
    for _ in range(T):
        L = torch.randn(m, own, generator=g) @ torch.randn(own, n, generator=g) / own ** 0.5
        mask = torch.rand(m, n, generator=g) < sparse
        taus.append(S + L + mask * torch.randn(m, n, generator=g) * 2.0)
    return taus


def _final_errors(opts, taus):
    method = CarveMethod(opts)
    ctx = TensorContext("w", tuple(taus[0].shape))
    core, _, entries, _ = _run(method, taus, ctx)
    return [float(torch.linalg.norm(skill_delta(core, entries[f"s{i}"], ctx.shape) - tau)
                  / torch.linalg.norm(tau)) for i, tau in enumerate(taus, 1)], entries


@pytest.mark.parametrize("rate", ["1/t", "1/(t+1)"])
def test_drift_compensation_reduces_final_error(rate):
    taus = _synthetic_stream()
    plain, _ = _final_errors(CarveOptions(rate=rate, rank=8, svd="exact"), taus)
    comp, entries = _final_errors(CarveOptions(rate=rate, rank=8, svd="exact",
                                               drift_compensation=True), taus)
    assert sum(comp) / len(comp) < sum(plain) / len(plain) - 0.01
    assert comp[0] < plain[0]                 # the oldest skill gains the most
    assert comp[-1] == pytest.approx(plain[-1], abs=1e-6)  # the newest is never re-fitted
    assert all(e.rank <= 8 for e in entries.values())
    # 'keep' never grows storage: a skill absorbed at rank 0 stays at rank 0
    _, kept = _final_errors(CarveOptions(rate="1/t", rank=8, svd="exact", drift_compensation=True,
                                         drift_rank="keep"), taus)
    assert kept["s1"].rank == 0


def test_drift_compensation_is_exact_for_dense_residuals():
    taus = _synthetic_stream(T=3, m=6, n=5, shared=2, own=1)
    method = CarveMethod(CarveOptions(drift_compensation=True))
    ctx = TensorContext("w", (6, 5), dense=True)
    core, _, entries, results = _run(method, taus, ctx)
    assert sorted(results[2].updated) == ["s1", "s2"]
    for i, tau in enumerate(taus, 1):
        torch.testing.assert_close(skill_delta(core, entries[f"s{i}"], ctx.shape), tau,
                                   rtol=1e-5, atol=1e-5)


def test_lora_adapter_admits_like_equivalent_dense_expert(tmp_path):
    g = torch.Generator().manual_seed(3)
    base_t = {"q.weight": torch.randn(24, 20, generator=g), "v.weight": torch.randn(24, 20, generator=g),
              "norm.weight": torch.randn(20, generator=g)}
    base = open_checkpoint(write_checkpoint(tmp_path / "base", base_t))
    first = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base_t.items()}
    e1 = open_expert(write_checkpoint(tmp_path / "e1", first), base)
    A, B = torch.randn(4, 20, generator=g), torch.randn(24, 4, generator=g) * 0.05
    lora = open_expert(write_lora_adapter(tmp_path / "lora", {"q": (A, B)}, r=4, lora_alpha=8), base)
    dense_t = dict(base_t)
    dense_t["q.weight"] = base_t["q.weight"] + 2.0 * B @ A
    dense = open_expert(write_checkpoint(tmp_path / "dense", dense_t), base)

    opts = CarveOptions(rank=6, svd="exact", drift_compensation=True)
    for key in base.keys():
        ctx = TensorContext(key, base.shape(key), dense=len(base.shape(key)) == 1)

        def tv(ex, k=key):  # the stream's rule: an untouched tensor has a zero task vector
            tau = ex.task_vector(k)
            return torch.zeros(base.shape(k)) if tau is None else tau

        c_l, _, ent_l, _ = _run(CarveMethod(opts), [tv(e1), tv(lora)], ctx)
        c_d, _, ent_d, _ = _run(CarveMethod(opts), [tv(e1), tv(dense)], ctx)
        torch.testing.assert_close(c_l, c_d, rtol=1e-4, atol=1e-5)
        for s in ("s1", "s2"):
            assert type(ent_l[s]) is type(ent_d[s])
            torch.testing.assert_close(ent_l[s].materialize(), ent_d[s].materialize(),
                                       rtol=1e-4, atol=1e-5)


def test_bank_stores_task_vectors_exactly():
    cls = get_method("expert-bank")
    assert cls is get_method("bank") and cls.continual and cls.per_skill
    taus = _synthetic_stream(T=2, m=6, n=5, shared=1, own=1)
    core, _, entries, results = _run(cls(), taus, TensorContext("w", (6, 5)))
    assert core is None
    for i, tau in enumerate(taus, 1):
        assert isinstance(entries[f"s{i}"], Dense)
        assert torch.equal(skill_delta(None, entries[f"s{i}"], (6, 5)), tau)


def test_registry_and_option_validation():
    cls = get_method("carve")
    assert cls is CarveMethod and cls.continual and cls.per_skill
    opts = build_options(cls, {"rate": "count", "energy": 0.9})
    assert opts.rate == "count" and opts.energy == 0.9
    with pytest.raises(InputError, match="rate='1/t\\^2'"):
        build_options(cls, {"rate": "1/t^2"})
    with pytest.raises(InputError, match="energy must be in"):
        CarveOptions(energy=0.0)
    with pytest.raises(InputError, match="no option"):
        build_options(cls, {"rnak": 3})
    with pytest.raises(InputError, match="shape"):
        CarveMethod().admit_tensor(TensorContext("w", (3, 3)), torch.zeros(3, 4), TensorState(), 1, "s")
    bad = torch.zeros(3, 3)
    bad[0, 0] = float("inf")
    with pytest.raises(InputError, match="'w' \\(skill 's'\\) has non-finite"):
        CarveMethod().admit_tensor(TensorContext("w", (3, 3)), bad, TensorState(), 1, "s")
    # energy mode picks the rank per tensor
    R = torch.randn(40, 30)
    res = CarveMethod(CarveOptions(rate="1/(t+1)", energy=0.5, svd="exact")).admit_tensor(
        TensorContext("w", (40, 30)), R, TensorState(), 1, "s")
    assert 0 < res.entry.rank < 30 and 1 - res.entry.rel_error ** 2 >= 0.5 - 1e-6


def test_row_block_admission_equals_whole_tensor_admission(tmp_path, monkeypatch):
    """Huge tensors are admitted from row blocks (no float32 copy of them): the same core bit for
    bit, residuals as good as the whole-tensor SVD's; here every matrix counts as huge."""
    from test_engine import make_family

    from policy_server.merge import lowrank, stream
    from policy_server.state.admission import admit
    from policy_server.state.store import StateStore

    bdir, edirs, base, experts = make_family(tmp_path, dtype=torch.bfloat16)
    whole, rows = tmp_path / "whole", tmp_path / "rows"
    opts = {"rank": 4, "svd": "randomized"}
    for i, e in enumerate(edirs):
        admit(whole, bdir, e, f"s{i}", options=opts, progress=False)
    monkeypatch.setattr(stream, "BLOCKED_MIN_NUMEL", 500)  # every 2-D tensor here (>= 576)
    monkeypatch.setattr(lowrank, "BLOCK_NUMEL", 24 * 7)    # blocks of 7 rows
    for i, e in enumerate(edirs):
        admit(rows, bdir, e, f"s{i}", options=opts, progress=False)
    a, b = StateStore(whole).open(), StateStore(rows).open()
    assert set(a.core()) == set(b.core())
    for k, c in a.core().items():
        assert c.dtype == b.core()[k].dtype and torch.equal(c, b.core()[k]), k
    blocked = [k for k, r in b.skill("s2")["tensors"].items() if r.get("row_blocks")]
    assert len(blocked) == 4  # the four matrices; 1-D tensors stay whole
    for k in blocked:
        ra, rb = a.skill("s2")["tensors"][k], b.skill("s2")["tensors"][k]
        assert rb["rank"] == ra["rank"] == 4
        assert rb["rel_error"] <= ra["rel_error"] + 0.02, k
        for f in ("tau_norm", "residual_norm", "core_change_norm", "concordant_fraction"):
            assert rb[f] == pytest.approx(ra[f], rel=1e-4), (k, f)
        # the recorded error is the factors' real error against the residual
        R = (experts[2][k].float() - base[k].float()) - (b.core()[k].float())
        e = b.residuals("s2")[k]
        real = float(torch.linalg.vector_norm(R - e.materialize()) / torch.linalg.vector_norm(R))
        assert real == pytest.approx(rb["rel_error"], abs=0.02), k
    # a NaN in a row block is refused like a NaN anywhere (the block reader does not check)
    from ckpt_utils import write_checkpoint

    bad = dict(experts[1])
    bad["model.embed_tokens.weight"] = bad["model.embed_tokens.weight"].clone()
    bad["model.embed_tokens.weight"][30, 3] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        admit(rows, bdir, write_checkpoint(tmp_path / "nan", bad), "nan", options=opts,
              progress=False)
    assert StateStore(rows).open().version == b.version
