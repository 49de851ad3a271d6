"""Core and residual dtypes of a merge state: the checkpoint's own dtype by default (bf16 for a
bf16 base, float32 for its float32 norms), float32 on request, and what that costs in accuracy:
export = base + core + P Q exactly in the stored tensors, and within the bf16 bound of a
float32-core state (docs/CARVE.md, section 4)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_engine import SHAPES, make_family  # noqa: E402

from policy_server.errors import StateError  # noqa: E402
from policy_server.merge.methods.base import TensorContext  # noqa: E402
from policy_server.merge.methods.carve import CarveMethod, CarveOptions  # noqa: E402
from policy_server.merge.methods.base import TensorState  # noqa: E402
from policy_server.state.admission import admit  # noqa: E402
from policy_server.state.export import export_skill  # noqa: E402
from policy_server.state.store import StateStore  # noqa: E402
from policy_server.tensors.entries import LowRank, skill_delta  # noqa: E402

BF16 = torch.bfloat16


def _admit_all(tmp, edirs, bdir, name, **kw):
    state = tmp / name
    for i, e in enumerate(edirs):
        admit(state, bdir, e, f"skill{i}", options={"rank": 4}, progress=False, **kw)
    return state


@pytest.fixture
def bf16_family(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, dtype=BF16)
    return tmp_path, bdir, edirs, base, experts


def _dtypes(path) -> dict[str, torch.dtype]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_default_stores_core_and_factors_in_each_parameters_dtype(bf16_family):
    tmp, bdir, edirs, base, _ = bf16_family
    state = _admit_all(tmp, edirs, bdir, "s")
    store = StateStore(state)
    snap = store.open()
    assert (snap.manifest["store_dtype"], snap.manifest["core_dtype"]) == ("param", "param")
    for v in ("v000001", "v000003"):  # the first version (a new state's header) too
        core = store.open(v).core()
        assert set(core) == set(SHAPES)
        for k, c in core.items():  # bf16 matrices and biases, float32 norms: as the base has
            assert c.dtype == base[k].dtype, (v, k)
    names = _dtypes(snap.path / "skills/skill2.safetensors")
    for flat, dt in names.items():
        key = flat.rpartition("::")[0]
        assert str(dt).removeprefix("torch.").lower() in ("bf16", "bfloat16") or \
            base[key].dtype == torch.float32, (flat, dt)
    assert any(isinstance(e, LowRank) and e.P.dtype == BF16
               for e in snap.residuals("skill2").values())


def test_float32_core_is_an_explicit_option_and_fixed_per_state(bf16_family):
    tmp, bdir, edirs, _, _ = bf16_family
    s32 = _admit_all(tmp, edirs, bdir, "s32", core_dtype="float32")
    s16 = _admit_all(tmp, edirs, bdir, "s16")
    c32 = StateStore(s32).open()
    assert c32.manifest["core_dtype"] == "float32"
    assert {t.dtype for t in c32.core().values()} == {torch.float32}
    # the bf16 core file holds half the bytes of the float32 one (norms aside: float32 in both)
    b16 = (s16 / "versions" / StateStore(s16).current_version() / "core.safetensors").stat()
    b32 = (s32 / "versions" / c32.version / "core.safetensors").stat()
    assert b16.st_size < 0.62 * b32.st_size
    with pytest.raises(StateError, match="core dtype float32"):
        admit(s32, bdir, edirs[0], "again", core_dtype="param", progress=False)


def test_bf16_export_is_base_core_residual_and_tracks_the_float32_core(bf16_family):
    tmp, bdir, edirs, base, experts = bf16_family
    s16 = _admit_all(tmp, edirs, bdir, "s16")
    s32 = _admit_all(tmp, edirs, bdir, "s32", core_dtype="float32")
    snap = StateStore(s16).open()
    core = snap.core()
    for i in range(3):
        got = {}
        for name, state in (("bf16", s16), ("f32", s32)):
            out = tmp / f"{name}-{i}"
            export_skill(state, f"skill{i}", bdir, out, format="full", progress=False)
            got[name] = load_file(str(out / "model.safetensors"))
        res = snap.residuals(f"skill{i}")
        for k in SHAPES:
            # export is exactly the stored tensors' sum, rounded once to the base dtype
            delta = skill_delta(core.get(k).float(), res.get(k), SHAPES[k])
            want = (base[k].float() + delta).to(base[k].dtype)
            assert torch.equal(got["bf16"][k], want), (i, k)
            # a bf16 core changes a skill's weights by rounding, far below what the skill
            # changes: the two states reconstruct the expert equally well (docs/CARVE.md, 4)
            tau = experts[i][k].float() - base[k].float()
            err = {n: float((g[k].float() - experts[i][k].float()).norm() / tau.norm())
                   for n, g in got.items()}
            gap = float((got["bf16"][k].float() - got["f32"][k].float()).norm() / tau.norm())
            assert gap < 0.02 and err["bf16"] < err["f32"] + 0.01, (i, k, err, gap)


def test_stored_core_rounding_keeps_absorbed_skill_exact_and_untouched_coordinates_bitwise():
    meth = CarveMethod(CarveOptions(rank=4))
    ctx = TensorContext("w", (16, 12), core_dtype=BF16)
    g = torch.Generator().manual_seed(0)
    tau1 = torch.randn(16, 12, generator=g) * 0.01
    r1 = meth.admit_tensor(ctx, tau1, TensorState(), 1, "a")
    # 1/t absorbs skill 1 whole: its residual stays exactly zero (rounding is not fitted)
    assert r1.core.dtype == torch.float32 and torch.equal(r1.core, tau1.to(BF16).float())
    assert r1.entry.materialize().abs().max() == 0
    tau2 = -tau1  # every coordinate discordant: the core must not move, not even by rounding
    r2 = meth.admit_tensor(ctx, tau2, TensorState(core=r1.core.to(BF16)), 2, "b")
    assert torch.equal(r2.core, r1.core)
