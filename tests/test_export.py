"""Skill export: full checkpoints (exact base + core + residual; loadable by transformers) and PEFT
LoRA adapters (checked by reading them back with the project's own LoRA reader)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ckpt_utils import write_checkpoint  # noqa: E402
from test_engine import BUFFER, SHAPES, make_family, tree_digest  # noqa: E402

from policy_server.errors import InputError, StateError  # noqa: E402
from policy_server.state.admission import admit  # noqa: E402
from policy_server.state.oneshot import merge  # noqa: E402
from policy_server.tensors.checkpoint import open_checkpoint  # noqa: E402
from policy_server.tensors.entries import Dense, LowRank, skill_delta  # noqa: E402
from policy_server.merge.task_vectors import open_expert  # noqa: E402
from policy_server.state.export import export_skill  # noqa: E402
from policy_server.state.store import StateStore  # noqa: E402


@pytest.fixture
def three(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path)
    state = tmp_path / "state"
    for i, e in enumerate(edirs):
        admit(state, bdir, e, f"skill{i}", options={"rank": 4}, progress=False)
    return tmp_path, state, bdir, base, experts


def test_full_export_is_exactly_base_core_residual(three):
    tmp, state, bdir, base, experts = three
    snap = StateStore(state).open()
    core = snap.core()
    for i in range(3):
        out = tmp / f"full{i}"
        rep = export_skill(state, f"skill{i}", bdir, out, format="full", progress=False)
        assert rep["version"] == snap.version
        got = load_file(str(out / "model.safetensors"))
        res = snap.residuals(f"skill{i}")
        assert set(got) == set(base)
        assert torch.equal(got[BUFFER], base[BUFFER])
        for k in SHAPES:
            e = res.get(k)
            if isinstance(e, LowRank):  # spell the rule out once: base + (core + P @ Q)
                want = base[k] + (core[k] + e.P @ e.Q)
            else:
                want = base[k] + skill_delta(core.get(k), e, SHAPES[k])
            assert torch.equal(got[k], want), (i, k)
        assert json.loads((out / "config.json").read_text()) == json.loads(
            (bdir / "config.json").read_text())
        assert (out / "tokenizer.json").is_file()
    # skill 2 (not absorbed into the core) is a real approximation of its expert, not the base
    k = "model.layers.0.mlp.up_proj.weight"
    got = load_file(str(tmp / "full2" / "model.safetensors"))[k]
    tau = experts[2][k] - base[k]
    assert float((got - experts[2][k]).norm() / tau.norm()) < 0.6
    assert not torch.equal(got, base[k])


def test_export_refusals_write_nothing(three, tmp_path):
    tmp, state, bdir, base, experts = three
    before = tree_digest(state)
    other = write_checkpoint(tmp / "otherbase", {k: v + 1 if v.is_floating_point() else v
                                                 for k, v in base.items()})
    cases = [
        (dict(skill="nope"), StateError, "nope"),
        (dict(skill="skill1", base_dir=other), StateError, "fingerprint"),
        (dict(skill="skill1", format="onnx"), InputError, "format"),
        (dict(skill="skill1", format="peft", dense="error"), InputError, "dense residual"),
    ]
    for kw, exc, needle in cases:
        out = tmp / "out"
        kw.setdefault("base_dir", bdir)
        with pytest.raises(exc, match=needle):
            export_skill(state, out_dir=out, progress=False, **kw)
        assert not out.exists()
        assert not list(tmp.glob(".out.tmp-*"))
    (tmp / "exists").mkdir()
    with pytest.raises(InputError, match="exists"):
        export_skill(state, "skill1", bdir, tmp / "exists", progress=False)
    assert tree_digest(state) == before
    # the explicit opt-in exports against another base (with a warning)
    rep = export_skill(state, "skill1", other, tmp / "anyway", progress=False,
                       allow_base_mismatch=True)
    assert rep["format"] == "full" and (tmp / "anyway" / "model.safetensors").is_file()


def test_peft_export_roundtrip(three):
    tmp, state, bdir, base, experts = three
    snap = StateStore(state).open()
    core, res = snap.core(), snap.residuals("skill2")
    out = tmp / "peft"
    rep = export_skill(state, "skill2", bdir, out, format="peft", progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == {}
    assert cfg["base_model_name_or_path"] == str((out / "base_with_core").resolve())
    assert "model.layers.0.mlp.up_proj" in cfg["target_modules"]
    assert cfg["lora_bias"] is True  # q_proj's dense bias rides on its LoRA module
    assert cfg["modules_to_save"] == ["model.layers.0.input_layernorm", "model.norm"]
    sd = load_file(str(out / "adapter_model.safetensors"))
    up = res["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"], up.Q)
    assert torch.equal(sd["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"], up.P)
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in sd
    assert rep["lora_modules"] == 4

    # base_with_core is exactly base + core
    bwc = load_file(str(out / "base_with_core" / "model.safetensors"))
    for k in SHAPES:
        assert torch.equal(bwc[k], base[k] + core[k]), k
    # the project's LoRA reader recovers every residual as a task vector against base_with_core
    bwc_reader = open_checkpoint(out / "base_with_core")
    ad = open_expert(out, bwc_reader)
    assert ad.kind == "lora"
    for k in SHAPES:
        tau = ad.task_vector(k)
        want = res[k].materialize()
        assert tau is not None, k
        torch.testing.assert_close(tau, want, atol=2e-7, rtol=0, msg=k)
    # and re-admitting the adapter with the bank method stores the same residuals
    st2 = tmp / "readmit"
    admit(st2, out / "base_with_core", out, "again", method="bank", progress=False)
    back = StateStore(st2).open().residuals("again")
    for k in SHAPES:
        assert isinstance(back[k], Dense)
        torch.testing.assert_close(back[k].D, res[k].materialize(), atol=2e-7, rtol=0)


def test_peft_fold_and_masked_refusal(three):
    tmp, state, bdir, base, experts = three
    snap = StateStore(state).open()
    core, res = snap.core(), snap.residuals("skill1")
    out = tmp / "fold"
    export_skill(state, "skill1", bdir, out, format="peft", dense="fold", progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and cfg["lora_bias"] is False
    bwc = load_file(str(out / "base_with_core" / "model.safetensors"))
    k = "model.norm.weight"
    assert torch.equal(bwc[k], base[k] + (core[k] + res[k].D))
    assert json.loads((out / "carve_export.json").read_text())["base_with_core_is_shared"] is False
    # TALL-mask state: masks are not LoRA
    tall = tmp / "tall"
    merge("tall_mask", bdir, [tmp / "expert0", tmp / "expert1"], tall, progress=False)
    with pytest.raises(InputError, match="mask"):
        export_skill(tall, "expert0", bdir, tmp / "tallpeft", format="peft", progress=False)
    assert not (tmp / "tallpeft").exists()
    rep = export_skill(tall, "expert0", bdir, tmp / "tallfull", format="full", progress=False)
    got = load_file(str(tmp / "tallfull" / "model.safetensors"))
    m = StateStore(tall).open()
    kk = "model.layers.0.mlp.up_proj.weight"
    want = base[kk] + m.core()[kk] * m.residuals("expert0")[kk].mask.float()
    assert torch.equal(got[kk], want) and rep["entries"]["Masked"] == len(SHAPES)


def test_qwen2_export_loads_with_transformers(tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    bdir = tmp_path / "qwen_base"
    model.save_pretrained(bdir, safe_serialization=True)
    base = load_file(str(bdir / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    state = tmp_path / "state"
    for i in range(2):
        e = {}
        for k, v in base.items():
            if v.ndim == 2:
                d = torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g)
                e[k] = v + 0.05 * d
            else:
                e[k] = v + 0.02 * torch.randn(v.shape, generator=g)
        edir = write_checkpoint(tmp_path / f"qe{i}", e, config=cfg.to_dict())
        admit(state, bdir, edir, f"s{i}", options={"rank": 4}, progress=False)
    out = tmp_path / "s1_full"
    export_skill(state, "s1", bdir, out, format="full", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()

    snap = StateStore(state).open()
    core, res = snap.core(), snap.residuals("s1")
    ref_sd = {k: base[k] + skill_delta(core.get(k), res.get(k), tuple(v.shape))
              for k, v in base.items()}
    ref = Qwen2ForCausalLM(cfg).eval()
    ref.load_state_dict(ref_sd, strict=True)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    with torch.no_grad():
        got, want, plain = loaded(ids).logits, ref(ids).logits, model(ids).logits
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert float((got - plain).abs().max()) > 1e-3  # the skill really changes the model
