"""Merge engine: continual admission into a real on-disk state, one-shot merges, validation.

Tiny models (a few thousand parameters) written as real safetensors checkpoints; the helpers
``make_family`` / ``tree_digest`` are imported by the other engine test files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_utils import write_checkpoint, write_lora_adapter
from policy_server.errors import InputError, StateError
from policy_server.tensors.entries import Dense, LowRank, skill_delta

SHAPES = {
    "model.embed_tokens.weight": (40, 24),
    "model.layers.0.self_attn.q_proj.weight": (32, 24),
    "model.layers.0.self_attn.q_proj.bias": (32,),
    "model.layers.0.self_attn.v_proj.weight": (24, 24),
    "model.layers.0.input_layernorm.weight": (24,),
    "model.layers.0.mlp.up_proj.weight": (48, 24),
    "model.norm.weight": (24,),
}
BUFFER = "model.rotary.step"  # an integer buffer: never merged


def make_base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in SHAPES.items()}
    sd[BUFFER] = torch.arange(6, dtype=torch.int64)
    return sd


def make_expert(base: dict, seed: int, rank: int = 3, skip: tuple[str, ...] = ()) -> dict:
    """base + structured low-rank (+ shared direction) + sparse update per matrix, small
    perturbations of 1-D tensors; ``skip`` keys stay equal to the base (unchanged tensors)."""
    g = torch.Generator().manual_seed(1000 + seed)
    shared = torch.Generator().manual_seed(7)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point() or k in skip:
            out[k] = v.clone()
            continue
        if v.ndim == 2:
            m, n = v.shape
            d = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) * 0.02
            d += torch.randn(m, 2, generator=shared) @ torch.randn(2, n, generator=shared) * 0.02
            d += (torch.rand(m, n, generator=g) < 0.05) * torch.randn(m, n, generator=g) * 0.05
        else:
            d = torch.randn(v.shape, generator=g) * 0.01
        out[k] = v + d
    return out


def cast_like_a_bf16_model(sd: dict, dtype: torch.dtype | None) -> dict:
    """``sd`` with its floating tensors in ``dtype``, except norm weights kept float32 (as mixed
    bf16 checkpoints do); None: unchanged."""
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() and "norm" not in k else v
            for k, v in sd.items()}


def make_family(tmp: Path, n: int = 3, dtype: torch.dtype | None = None, **kw
                ) -> tuple[Path, list[Path], dict, list[dict]]:
    base = cast_like_a_bf16_model(make_base(), dtype)
    bdir = write_checkpoint(tmp / "base", base, extra_files={"tokenizer.json": "{}"})
    experts, edirs = [], []
    for i in range(n):
        e = cast_like_a_bf16_model(make_expert(base, i, **kw), dtype)
        experts.append(e)
        edirs.append(write_checkpoint(tmp / f"expert{i}", e))
    return bdir, edirs, base, experts


def tree_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file (and '<dir>/' for directories) under ``path``."""
    out = {}
    if not path.exists():
        return out
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path) + "/"] = ""
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


from policy_server.state.admission import admit  # noqa: E402
from policy_server.state.oneshot import merge  # noqa: E402

from policy_server.state.store import StateStore  # noqa: E402

CARVE4 = {"rank": 4}


def admit3(tmp, **kw):
    bdir, edirs, base, experts = make_family(tmp)
    state = tmp / "state"
    reports = [admit(state, bdir, e, f"skill{i}", instructions=[f"do task {i}"],
                            options=CARVE4, progress=False, **kw) for i, e in enumerate(edirs)]
    return state, bdir, edirs, base, experts, reports


def test_admit_three_experts_builds_state(tmp_path):
    state, bdir, edirs, base, experts, reports = admit3(tmp_path)
    assert [r["t"] for r in reports] == [1, 2, 3]
    snap = StateStore(state).open()
    assert snap.version == reports[-1]["version"]
    assert sorted(snap.skill_names()) == ["skill0", "skill1", "skill2"]
    m = snap.manifest
    assert m["method"]["name"] == "carve" and m["method"]["options"]["rank"] == 4
    assert m["base"]["num_params"] == sum(torch.Size(s).numel() for s in SHAPES.values()) + 6
    # new states store each tensor in its base parameter's dtype (float32 here)
    assert m["store_dtype"] == "param" and m["core_dtype"] == "param"
    assert {t.dtype for t in snap.core().values()} == {torch.float32}
    rec = snap.skill("skill1")
    assert rec["order"] == 2 and rec["instructions"] == ["do task 1"]
    assert rec["source"]["kind"] == "full"
    # rate 1/t absorbs the first skill whole: its residual is exactly zero -> rank 0 everywhere
    r0 = snap.residuals("skill0")
    for key, e in r0.items():
        assert float(e.materialize().abs().max()) == 0.0, key
    # later skills: 2-D -> LowRank of rank <= 4, 1-D -> Dense; the buffer has no entry
    r2 = snap.residuals("skill2")
    assert BUFFER not in r2 and BUFFER not in snap.core()
    assert isinstance(r2["model.layers.0.mlp.up_proj.weight"], LowRank)
    assert r2["model.layers.0.mlp.up_proj.weight"].rank == 4
    assert isinstance(r2["model.norm.weight"], Dense)
    tr = rec["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert tr["kind"] == "lowrank" and tr["rank"] == 4 and tr["shape"] == [48, 24]
    assert 0.0 < tr["rel_error"] < 1.0
    # the core is the 1/t running mean of concordant updates: rebuild it independently
    key = "model.layers.0.self_attn.v_proj.weight"
    C = torch.zeros(SHAPES[key])
    for t, e in enumerate(experts, 1):
        tau = e[key] - base[key]
        mask = (torch.sign(tau) == torch.sign(C)) | (C == 0)
        C = C + (1.0 / t) * mask.float() * (tau - C)
    torch.testing.assert_close(snap.core()[key], C, rtol=0, atol=1e-6)
    # each skill's effective delta approximates its own task vector
    for i, e in enumerate(experts):
        res = snap.residuals(f"skill{i}")
        d = skill_delta(snap.core()[key], res.get(key), SHAPES[key])
        tau = e[key] - base[key]
        assert float((d - tau).norm() / tau.norm()) < 0.6
    s = reports[-1]["tensors"]
    assert s["kinds"]["lowrank"] == 4 and s["kinds"]["dense"] == 3 and s["rank_max"] == 4


def test_unchanged_tensors_make_no_entry_and_keep_core(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, n=1)
    skip = ("model.layers.0.mlp.up_proj.weight", "model.norm.weight")
    e2 = write_checkpoint(tmp_path / "partial", make_expert(base, 5, skip=skip))
    state = tmp_path / "state"
    admit(state, bdir, edirs[0], "a", options=CARVE4, progress=False)
    core_before = StateStore(state).open().core()
    rep = admit(state, bdir, e2, "b", progress=False)
    snap = StateStore(state).open()
    res = snap.residuals("b")
    for k in skip:
        assert k not in res
        assert torch.equal(snap.core()[k], core_before[k])
    assert rep["tensors"]["unchanged"] == 2


def test_lora_expert_admission(tmp_path):
    bdir, edirs, base, _ = make_family(tmp_path, n=1)
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(2, 24, generator=g), torch.randn(32, 2, generator=g)
    ad = write_lora_adapter(tmp_path / "adapter", {"model.layers.0.self_attn.q_proj": (A, B)},
                            r=2, lora_alpha=4)
    state = tmp_path / "state"
    admit(state, bdir, edirs[0], "full", options=CARVE4, progress=False)
    rep = admit(state, bdir, ad, "lora", progress=False)
    snap = StateStore(state).open()
    assert snap.skill("lora")["source"]["kind"] == "lora"
    key = "model.layers.0.self_attn.q_proj.weight"
    assert set(snap.residuals("lora")) == {key}  # untargeted tensors: no entry
    assert rep["tensors"]["unchanged"] == len(SHAPES) - 1
    d = skill_delta(snap.core()[key], snap.residuals("lora")[key], SHAPES[key])
    # rank-2 task vector, rank-4 budget; the residual tau - C has rank <= 2 + rank(C) so
    # the error is the truncation of the core's part only
    tau = 2.0 * B @ A
    assert float((d - tau).norm() / tau.norm()) < 0.5


def test_bad_input_writes_nothing(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, n=2)
    state = tmp_path / "state"
    admit(state, bdir, edirs[0], "s0", options=CARVE4, progress=False)
    before = tree_digest(state)

    missing = dict(experts[1])
    del missing["model.norm.weight"]
    d_missing = write_checkpoint(tmp_path / "missing", missing)
    badshape = dict(experts[1])
    badshape["model.layers.0.mlp.up_proj.weight"] = torch.zeros(47, 24)
    d_shape = write_checkpoint(tmp_path / "shape", badshape)
    other_base = write_checkpoint(tmp_path / "base2", make_base(seed=9))
    pick = tmp_path / "pickled"
    pick.mkdir()
    torch.save(experts[1], pick / "pytorch_model.bin")

    cases = [
        (dict(expert_dir=d_missing, skill="x"), InputError, "model.norm.weight"),
        (dict(expert_dir=d_shape, skill="x"), InputError, "model.layers.0.mlp.up_proj.weight"),
        (dict(expert_dir=edirs[1], skill="s0"), StateError, "already"),
        (dict(expert_dir=edirs[1], skill="x", base_dir=other_base), StateError, "fingerprint"),
        (dict(expert_dir=pick, skill="x"), InputError, "pickle"),
        (dict(expert_dir=edirs[1], skill="x", method="bank"), StateError, "carve"),
        (dict(expert_dir=edirs[1], skill="x", options={"rank": 8}), StateError, "rank"),
        (dict(expert_dir=edirs[1], skill="x", options={"bogus": 1}), InputError, "bogus"),
        (dict(expert_dir=edirs[1], skill="x", method="ties"), StateError, "carve"),
        (dict(expert_dir=edirs[1], skill="bad/name"), InputError, "skill name"),
        (dict(expert_dir=edirs[1], skill="x", store_dtype="bfloat16"), StateError, "param"),
        (dict(expert_dir=edirs[1], skill="x", core_dtype="float32"), StateError, "core dtype"),
        (dict(expert_dir=edirs[1], skill="x", core_dtype="float8"), InputError, "core dtype"),
        (dict(expert_dir=edirs[1], skill="x", keep=1), InputError, "--keep"),
        (dict(expert_dir=tmp_path / "nope", skill="x"), InputError, "nope"),
    ]
    for kw, exc, needle in cases:
        kw.setdefault("base_dir", bdir)
        with pytest.raises(exc) as ei:
            admit(state, progress=False, **kw)
        assert needle in str(ei.value), (kw, str(ei.value))
        assert tree_digest(state) == before, kw
    # a one-shot method on a fresh state: InputError pointing to `carve merge`, nothing created
    with pytest.raises(InputError, match="carve merge"):
        admit(tmp_path / "fresh", bdir, edirs[0], "a", method="ties", progress=False)
    assert not (tmp_path / "fresh").exists() or tree_digest(tmp_path / "fresh") == {}
    # non-finite task vector: caught mid-stream, the transaction is discarded
    nan = dict(experts[1])
    nan["model.layers.0.mlp.up_proj.weight"] = nan["model.layers.0.mlp.up_proj.weight"].clone()
    nan["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        admit(state, bdir, write_checkpoint(tmp_path / "nan", nan), "x", progress=False)
    snap = StateStore(state).open(verify=True)
    assert snap.skill_names() == ["s0"]
    # pickle with the opt-in works
    admit(state, bdir, pick, "pickled", allow_pickle=True, progress=False)
    assert "pickled" in StateStore(state).open().skill_names()


def test_replace_readmits_and_keeps_core(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, n=3)
    state = tmp_path / "state"
    admit(state, bdir, edirs[0], "a", options=CARVE4, progress=False)
    admit(state, bdir, edirs[1], "b", progress=False)
    core_before = StateStore(state).open().core()
    rep = admit(state, bdir, edirs[2], "b", replace=True, progress=False)
    assert rep["replaced"] and rep["t"] == 3
    snap = StateStore(state).open()
    assert sorted(snap.skill_names()) == ["a", "b"] and snap.skill("b")["order"] == 3
    key = "model.layers.0.self_attn.v_proj.weight"
    # the step-3 core update starts from the step-2 core (old contribution kept), not from a
    # core without expert 1
    tau = experts[2][key] - base[key]
    C = core_before[key]
    mask = (torch.sign(tau) == torch.sign(C)) | (C == 0)
    torch.testing.assert_close(snap.core()[key], C + mask.float() * (tau - C) / 3,
                               rtol=0, atol=1e-6)
    assert snap.skill("b")["source"]["path"] == str(edirs[2].resolve())


def test_value_subspace_hook_artifacts(tmp_path):
    from policy_server.merge.hooks import ValueSubspaceHook

    bdir, edirs, base, experts = make_family(tmp_path, n=1)
    state = tmp_path / "state"
    admit(state, bdir, edirs[0], "a", options=CARVE4, progress=False,
                 hooks=[ValueSubspaceHook(["*.v_proj.weight"], k=3)])
    art = StateStore(state).open().skill_artifacts("a")
    name = next(k for k in art if k.endswith("value_subspace::model.layers.0.self_attn.v_proj.weight"))
    Vh = art[name]
    W = experts[0]["model.layers.0.self_attn.v_proj.weight"]
    _, S, ref = torch.linalg.svd(W, full_matrices=False)
    assert Vh.shape == (3, 24)
    # singular vectors are defined up to sign
    torch.testing.assert_close((Vh * ref[:3]).sum(1).abs(), torch.ones(3), atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="no tensor matched"):
        admit(state, bdir, edirs[0], "b", progress=False,
                     hooks=[ValueSubspaceHook(["*.nothing"])])


def test_drift_compensation_refits_earlier_skills(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, n=2)
    state = tmp_path / "state"
    opts = {"rank": 4, "drift_compensation": True, "rate": "1/(t+1)"}
    admit(state, bdir, edirs[0], "a", options=opts, progress=False)
    r_before = StateStore(state).open().residuals("a")
    rep = admit(state, bdir, edirs[1], "b", progress=False)
    assert rep["refit_skills"] == ["a"]
    snap = StateStore(state).open()
    key = "model.norm.weight"  # dense: compensation is exact there
    tau_a = experts[0][key] - base[key]
    torch.testing.assert_close(snap.core()[key] + snap.residuals("a")[key].materialize(), tau_a,
                               atol=1e-6, rtol=0)
    assert not torch.equal(snap.residuals("a")[key].materialize(), r_before[key].materialize())
    assert snap.skill("a")["refit"]["by"] == "b"


# ---------------------------------------------------------------------------- one-shot merges
def test_merge_task_arithmetic_checkpoint(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, n=3)
    out = tmp_path / "ta"
    rep = merge("task_arithmetic", bdir, edirs, out, options={"lam": 0.5}, progress=False)
    assert rep["kind"] == "checkpoint"
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got[BUFFER], base[BUFFER])
    for k in SHAPES:
        want = base[k] + 0.5 * sum(e[k] - base[k] for e in experts)
        torch.testing.assert_close(got[k], want, atol=1e-6, rtol=0)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(InputError, match="exists"):
        merge("ta", bdir, edirs, out, progress=False)


def test_merge_ties_global_observe_pass(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, n=3)
    out = tmp_path / "ties"
    rep = merge("ties", bdir, edirs, out, options={"trim_scope": "global", "density": 0.2},
                       progress=False)
    assert rep["kind"] == "checkpoint"
    got = load_file(str(out / "model.safetensors"))
    changed = sum(int((got[k] != base[k]).sum()) for k in SHAPES)
    total = sum(base[k].numel() for k in SHAPES)
    assert 0 < changed < total  # trimmed: not every coordinate moves


def test_merge_per_skill_methods_write_state(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, n=2)
    out = tmp_path / "tall"
    rep = merge("tall_mask", bdir, edirs, out, skills=["x", "y"],
                       instructions={"x": ["pick"]}, progress=False)
    assert rep["kind"] == "state"
    snap = StateStore(out).open(verify=True)
    assert snap.skill_names() == ["x", "y"] and snap.skill("x")["instructions"] == ["pick"]
    key = "model.layers.0.mlp.up_proj.weight"
    mtl = sum(e[key] - base[key] for e in experts)
    torch.testing.assert_close(snap.core()[key], mtl, atol=1e-6, rtol=0)
    tau0 = experts[0][key] - base[key]
    assert torch.equal(snap.residuals("x")[key].mask, tau0.abs() > 0.6 * (mtl - tau0).abs())
    # continual-only method through merge: admissions folded per tensor == admitting one by one
    out2 = tmp_path / "carve_merge"
    merge("carve", bdir, edirs, out2, options=CARVE4, skills=["a", "b"], progress=False)
    st = tmp_path / "carve_admit"
    admit(st, bdir, edirs[0], "a", options=CARVE4, progress=False)
    admit(st, bdir, edirs[1], "b", progress=False)
    s1, s2 = StateStore(out2).open(), StateStore(st).open()
    for k in SHAPES:
        assert torch.equal(s1.core()[k], s2.core()[k]), k
        assert torch.equal(s1.residuals("b")[k].materialize(), s2.residuals("b")[k].materialize())
    # a state is never overwritten by merge
    with pytest.raises(InputError, match="exists"):
        merge("tall_mask", bdir, edirs, out, overwrite=True, progress=False)


def test_merge_checkpoint_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base", safe_serialization=True)
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    edirs, taus = [], []
    for i in range(2):
        tau = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
        taus.append(tau)
        edirs.append(write_checkpoint(tmp_path / f"e{i}", {k: base[k] + tau[k] for k in base},
                                      config=cfg.to_dict()))
    out = tmp_path / "merged"
    merge("task_arithmetic", tmp_path / "base", edirs, out, options={"lam": 0.5},
                 progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    sd = model.state_dict()
    for k, v in base.items():
        torch.testing.assert_close(sd[k], v + 0.5 * (taus[0][k] + taus[1][k]), atol=1e-6, rtol=0)
    assert (out / "generation_config.json").is_file()  # non-weight files come from the base


# ---------------------------------------------------------------------------- method protocol
def test_methods_declare_their_protocol():
    from policy_server.merge.methods import METHODS, get_method
    from policy_server.merge.methods.carve import CarveOptions

    get_method("carve")  # imports every method module
    one_shot = {n for n, c in METHODS.items() if c.one_shot}
    assert one_shot == {"task_arithmetic", "ties", "dare", "tall_mask", "tsv", "resmerge",
                        "magmax", "opcm", "iso_c", "iso_cts"}
    assert {n for n, c in METHODS.items() if c.continual} == {
        "carve", "bank", "task_arithmetic", "magmax", "opcm"}
    assert {n for n, c in METHODS.items() if c.per_skill} == {"carve", "bank", "tall_mask"}
    # only CARVE with drift compensation re-fits earlier skills
    for name, cls in METHODS.items():
        assert cls(cls.options_cls()).needs_residuals is False, name
    carve = METHODS["carve"]
    assert carve(CarveOptions(drift_compensation=True)).needs_residuals is True


def test_admission_loads_earlier_residuals_only_when_the_method_needs_them(tmp_path,
                                                                           monkeypatch):
    from policy_server.state.store import StateSnapshot

    bdir, edirs, base, experts = make_family(tmp_path, n=3)
    loaded: list[str] = []
    real = StateSnapshot.residuals

    def counting(self, name):
        loaded.append(name)
        return real(self, name)

    monkeypatch.setattr(StateSnapshot, "residuals", counting)
    for opts, want in (({"rank": 4}, []), ({"rank": 4, "drift_compensation": True},
                                            ["s0", "s1"])):
        state = tmp_path / f"state{len(want)}"
        admit(state, bdir, edirs[0], "s0", options=opts, progress=False)
        admit(state, bdir, edirs[1], "s1", progress=False)
        loaded.clear()
        admit(state, bdir, edirs[2], "s2", progress=False)
        assert sorted(set(loaded)) == want, opts


def test_fold_step_applies_refits_and_rejects_unknown_skills():
    from policy_server.merge.methods.base import (AdmitResult, MergeMethod, TensorContext,
                                                  TensorState, fold_step)

    class Probe(MergeMethod):  # not registered: a stand-in with a scripted result
        name = "probe"
        options_cls = dict
        continual = True

        def __init__(self, result):
            super().__init__({})
            self.result = result

        def admit_tensor(self, ctx, tau, state, t, skill):
            return self.result

    ctx = TensorContext("w", (2,), dense=True)
    tau = torch.ones(2)
    old = Dense(torch.zeros(2))
    state = TensorState(core=None, residuals={"a": old, "b": Dense(torch.ones(2))})
    new_a, new_b = Dense(torch.full((2,), 3.0)), Dense(torch.full((2,), 5.0))
    res, nxt = fold_step(Probe(AdmitResult(core=tau, entry=new_b, updated={"a": new_a})),
                         ctx, tau, state, 2, "b")
    assert nxt.residuals == {"a": new_a, "b": new_b} and torch.equal(nxt.core, tau)
    assert state.residuals["a"] is old  # the input state is never modified
    _, nxt = fold_step(Probe(AdmitResult(core=tau, entry=None)), ctx, tau, state, 2, "b")
    assert set(nxt.residuals) == {"a"}  # no new entry: the skill runs as base + core
    with pytest.raises(StateError, match="re-fitted unknown skill 'zz'"):
        fold_step(Probe(AdmitResult(core=tau, updated={"zz": new_a})), ctx, tau, state, 2, "b")


def test_admit_allow_base_mismatch(tmp_path, caplog):
    bdir, edirs, base, experts = make_family(tmp_path, n=2)
    other = write_checkpoint(tmp_path / "base2", make_base(seed=9))
    state = tmp_path / "state"
    admit(state, bdir, edirs[0], "a", options=CARVE4, progress=False)
    with pytest.raises(StateError, match="allow-base-mismatch"):
        admit(state, other, edirs[1], "b", progress=False)
    with caplog.at_level("WARNING", logger="carve.base_check"):
        admit(state, other, edirs[1], "b", progress=False, allow_base_mismatch=True)
    assert "fingerprint" in caplog.text
    assert StateStore(state).open().skill_names() == ["a", "b"]


def test_metadata_hooks_read_no_tensor():
    """The hooks whose artifacts come from files or metadata share ArtifactOnlyHook: admitting
    with any of them asks for no tensor of the expert or the base."""
    from policy_server.merge.hooks import ArtifactOnlyHook
    from policy_server.models.lerobot.processors import ProcessorArtifactsHook
    from policy_server.models.openvla.skills import OpenVLAStatsHook
    from router.descriptor import ObservationDescriptorHook
    from router.text import TextEmbeddingHook

    for cls in (ProcessorArtifactsHook, OpenVLAStatsHook, ObservationDescriptorHook,
                TextEmbeddingHook):
        assert issubclass(cls, ArtifactOnlyHook), cls
        assert cls.wants is ArtifactOnlyHook.wants, cls   # none re-opens tensor reading
    assert not ArtifactOnlyHook().wants("action_expert.head.fc1.weight")
