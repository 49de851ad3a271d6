"""OpenVLA-OFT: pickle-free conversion, parallel decoding through the L1 head with proprio and two
images, checked against an independent reference (eager bidirectional Llama + hand-written head);
OFT experts admitted and served (the action head merges like any other tensor).

Every test runs twice: a plain OFT checkpoint and an OFT+ one with FiLM (``--use_film True``: the
published ``vision_backbone--*_checkpoint.pt`` with PEFT-wrapped linears and per-block
``scale``/``shift`` projectors), whose reference modulates the timm blocks by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm", reason="timm is the OpenVLA backend's optional dependency")

import openvla_utils as U  # noqa: E402
from policy_server.errors import InputError  # noqa: E402
from policy_server.models.base import ObservationBatch  # noqa: E402

torch.set_num_threads(1)
SPATIAL = "libero_spatial_no_noops"


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "film"])
def oft(request, tmp_path_factory):
    from policy_server.cli import main

    film = request.param
    root = tmp_path_factory.mktemp("oft-film" if film else "oft")
    pub = U.make_oft_published(root / "published", seed=3, unnorm_key=SPATIAL, film=film)
    conv = root / "converted"
    # through the CLI, as an operator runs it
    assert main(["convert", str(pub), "--out", str(conv), "--allow-pickle", "--chunk", str(U.CHUNK)]) == 0
    return {"published": pub, "converted": conv, "root": root, "film": film}


@pytest.fixture(scope="module")
def backend(oft):
    from policy_server.models.registry import load_backend

    return load_backend(oft["converted"])


def obs(instr, seed, state=None):
    rng = np.random.default_rng(seed)
    b = len(instr)
    imgs = {k: rng.integers(0, 256, (b, 224, 224, 3), dtype=np.uint8) for k in ("image", "wrist_image")}
    st = rng.normal(size=(b, U.PROPRIO_DIM)).astype(np.float32) if state is None else state
    return ObservationBatch(st, list(instr), imgs)


def test_convert_needs_opt_in_and_keeps_source(oft, tmp_path, capsys):
    from policy_server.cli import main
    from policy_server.models.openvla.convert import convert_oft

    with pytest.raises(InputError, match="allow-pickle"):
        convert_oft(oft["published"], tmp_path / "x")
    assert main(["convert", str(oft["published"]), "--out", str(tmp_path / "y")]) == 2
    assert "allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    pickles = ["action_head--150000_checkpoint.pt", "proprio_projector--150000_checkpoint.pt"]
    if oft["film"]:
        pickles.append("vision_backbone--150000_checkpoint.pt")
    assert sorted(p.name for p in oft["published"].glob("*.pt")) == pickles
    assert not list(oft["converted"].glob("*.pt"))
    cfg = json.loads((oft["converted"] / "config.json").read_text())
    assert cfg["carve_oft"] == dict(U.OFT, use_film=oft["film"])


@pytest.mark.parametrize("oft", [True], indirect=True, ids=["film"])  # FiLM only
def test_film_backbone_pickle_is_authoritative(oft):
    """The converted vision tensors are the pickle's, LoRA folded with alpha / r = min(r, 16) / r:
    equal to the true FiLM module, not to the published shards' pre-LoRA vision weights."""
    from policy_server.tensors.checkpoint import open_checkpoint

    cfg = json.loads((oft["converted"] / "config.json").read_text())
    truth = U.build_module(cfg, seed=3).state_dict()
    with open_checkpoint(oft["converted"]) as r, open_checkpoint(oft["published"]) as pub:
        keys = set(r.keys())
        assert keys == set(truth)
        assert not [k for k in keys if ".block." in k or "lora_" in k or "base_layer" in k]
        film = sorted(k for k in keys if k.startswith("vision_backbone.") and (".scale." in k or ".shift." in k))
        # 3 blocks x 2 featurizers x (scale, shift) x (weight, bias), named as the pickle names them
        assert len(film) == 24 and "vision_backbone.fused_featurizer.blocks.2.shift.weight" in film
        assert not set(film) & set(pub.keys())
        qkv = "vision_backbone.featurizer.blocks.1.attn.qkv.weight"
        torch.testing.assert_close(r.get(qkv), truth[qkv], rtol=0, atol=1e-6)
        assert not torch.allclose(pub.get(qkv), truth[qkv], atol=1e-3)
        for k in film:
            torch.testing.assert_close(r.get(k), truth[k], rtol=0, atol=0)


def test_keys_and_spec(oft, backend):
    from policy_server.tensors.checkpoint import open_checkpoint

    with open_checkpoint(oft["converted"]) as r:
        assert set(r.keys()) == set(backend.module.state_dict())
    keys = set(backend.module.state_dict())
    assert "action_head.model.mlp_resnet_blocks.1.ffn.1.weight" in keys
    assert "proprio_projector.fc2.bias" in keys
    s = backend.spec
    assert (s.chunk_length, s.action_dim, s.state_dim) == (U.CHUNK, U.ACTION_DIM, U.PROPRIO_DIM)
    assert list(s.images) == ["image", "wrist_image"]


def _reference(be, ckpt, instr, o, causal=False, film_stop=True):
    """Eager-attention Llama from the files, explicit 4-D mask, hand-written head; a FiLM model's
    blocks modulated by the mean prompt embedding (with the trailing </s> unless ``film_stop``
    is False: only to show the test tells the published convention apart)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from policy_server.tensors.checkpoint import open_checkpoint

    with open_checkpoint(ckpt) as r:
        sd = {k: r.get(k) for k in r.keys()}
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    lcfg = LlamaConfig(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"})
    lcfg._attn_implementation = "eager"
    lm = LlamaForCausalLM(lcfg).eval()
    lm.load_state_dict({k[len("language_model."):]: v for k, v in sd.items()
                        if k.startswith("language_model.")})
    stats = cfg["norm_stats"][SPATIAL]
    vb = be.module.vision_backbone
    g = torch.nn.functional.gelu
    lin = (lambda x, n: x @ sd[n + ".weight"].T + sd[n + ".bias"])
    ids = be.tokenizer(f"In: What action should the robot take to {instr.lower()}?\nOut:")["input_ids"]
    ids = ids + [be.tokenizer.convert_tokens_to_ids("\u2581")]
    emb = sd["language_model.model.embed_tokens.weight"]
    # FiLM conditioning: the mean embedding of every non-placeholder token (prompt + </s>)
    lang = emb[ids + [2] * film_stop].mean(dim=0, keepdim=True) if cfg["carve_oft"]["use_film"] else None
    film = None if lang is None else (lambda name, i, which: lin(lang, f"{name}.blocks.{i}.{which}"))
    f = _ref_vision(vb, o, film)
    proj = lin(g(lin(g(lin(f, "projector.fc1")), "projector.fc2")), "projector.fc3")
    lo, hi = np.array(stats["proprio"]["q01"]), np.array(stats["proprio"]["q99"])
    p = np.clip(2 * (o.state[0].astype(np.float64) - lo) / (hi - lo + 1e-8) - 1, -1, 1)
    ptok = lin(g(lin(torch.tensor(p, dtype=torch.float32)[None], "proprio_projector.fc1")),
               "proprio_projector.fc2")
    n_act = U.CHUNK * U.ACTION_DIM
    seq = torch.cat([emb[ids[:1]], proj[0], ptok, emb[ids[1:]], torch.zeros(n_act, emb.shape[1]),
                     emb[[2]]])[None]
    t = seq.shape[1]
    mask = torch.zeros(1, 1, t, t)
    if causal:
        mask = torch.triu(torch.full((t, t), float("-inf")), 1)[None, None]
    h = lm.model(inputs_embeds=seq, attention_mask=mask).last_hidden_state[0]
    start = proj.shape[1] + 1 + len(ids) - 1  # NUM_PATCHES (+ proprio) + NUM_PROMPT_TOKENS
    x = h[start:start + n_act].reshape(U.CHUNK, -1)
    ln = (lambda x, n: torch.nn.functional.layer_norm(x, x.shape[-1:], sd[n + ".weight"], sd[n + ".bias"]))
    m = "action_head.model."
    x = torch.relu(lin(ln(x, m + "layer_norm1"), m + "fc1"))
    for i in range(2):
        x = x + torch.relu(lin(ln(x, f"{m}mlp_resnet_blocks.{i}.ffn.0"), f"{m}mlp_resnet_blocks.{i}.ffn.1"))
    x = lin(ln(x, m + "layer_norm2"), m + "fc2").double().numpy()
    a = stats["action"]
    alo, ahi, am = np.array(a["q01"]), np.array(a["q99"]), np.array(a["mask"])
    return np.where(am, 0.5 * (x + 1) * (ahi - alo + 1e-8) + alo, x)


def _ref_vision(vb, o, film=None):
    """Patch features of both cameras (1, 2 * N, 80) from the processor's normalisation by hand;
    film(featurizer name, block, "scale" | "shift") -> (1, D) gamma / beta, or None."""
    feats = []
    for key in ("image", "wrist_image"):
        x = torch.from_numpy(o.images[key]).permute(0, 3, 1, 2).float() / 255.0
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        dino = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        sig = (x - 0.5) / 0.5
        feats.append(torch.cat([_ref_patches(vb.featurizer, dino, film, "vision_backbone.featurizer"),
                                _ref_patches(vb.fused_featurizer, sig, film,
                                             "vision_backbone.fused_featurizer")], 2))
    return torch.cat(feats, dim=1)


def _ref_patches(vit, pixels, film=None, name=""):
    """Second-to-last block output; with FiLM each timm block is run by its parts with
    x * (1 + gamma) + beta between the attention and the MLP residuals."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(pixels)))
    for i, blk in enumerate(vit.blocks[:-1]):
        if film is None:
            x = blk(x)
            continue
        x = x + blk.ls1(blk.attn(blk.norm1(x)))
        x = x * (1 + film(name, i, "scale")[:, None]) + film(name, i, "shift")[:, None]
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return x[:, vit.num_prefix_tokens:]


def _projector_input(be, o):
    """The patch features the served forward feeds the projector (B, n_images * N, 80)."""
    seen = []
    hook = be.module.projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        be.predict(o)
    finally:
        hook.remove()
    return seen[0]


def test_instruction_conditions_vision_only_with_film(oft, backend):
    """FiLM makes the vision features depend on the instruction; without it they must not. A FiLM
    model whose projectors are zero is the plain backbone (the ``1 + gamma`` identity)."""
    with torch.no_grad():
        a, b = obs(["put the bowl on the plate"], seed=5), obs(["open the top drawer"], seed=5)
        fa, fb = _projector_input(backend, a), _projector_input(backend, b)
        assert fa.shape == (1, 2 * 256, 80)
        assert (not torch.allclose(fa, fb, atol=1e-4)) == oft["film"]
        if oft["film"]:
            from policy_server.models.openvla.backend import OpenVLABackend

            zeroed = OpenVLABackend.load(oft["converted"])
            for n, p in zeroed.module.vision_backbone.named_parameters():
                if ".scale." in n or ".shift." in n:
                    p.data.zero_()
            plain = _ref_vision(zeroed.module.vision_backbone, a)
            torch.testing.assert_close(_projector_input(zeroed, a), plain, rtol=1e-4, atol=1e-5)


def test_matches_independent_reference(oft, backend):
    with torch.no_grad():
        o = obs(["Put the bowl on the plate"], seed=1)
        got = backend.predict(o)
        assert got.shape == (1, U.CHUNK, U.ACTION_DIM) and got.dtype == torch.float32
        ref = _reference(backend, oft["converted"], o.instructions[0], o)
        np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-4, atol=1e-5)
        causal = _reference(backend, oft["converted"], o.instructions[0], o, causal=True)
        assert not np.allclose(causal, ref, atol=1e-4), "OFT attention must be bidirectional"
        if oft["film"]:
            no_stop = _reference(backend, oft["converted"], o.instructions[0], o, film_stop=False)
            assert not np.allclose(no_stop, ref, atol=1e-4), "FiLM averages the </s> embedding too"


def test_inputs_matter_and_batching(backend):
    with torch.no_grad():
        o = obs(["put the bowl on the plate", "open the top drawer and put the bowl inside"], seed=2)
        both = backend.predict(o)
        for i in range(2):
            one = ObservationBatch(o.state[i:i + 1], o.instructions[i:i + 1],
                                   {k: v[i:i + 1] for k, v in o.images.items()})
            np.testing.assert_allclose(both[i].numpy(), backend.predict(one)[0].numpy(), rtol=1e-4, atol=1e-5)
        base = obs(["put the bowl on the plate"], seed=3)
        ref = backend.predict(base)
        wrist = ObservationBatch(base.state, base.instructions,
                                 {"image": base.images["image"],
                                  "wrist_image": 255 - base.images["wrist_image"]})
        assert not torch.allclose(backend.predict(wrist), ref)
        prop = ObservationBatch(base.state + 0.5, base.instructions, base.images)
        assert not torch.allclose(backend.predict(prop), ref)


def test_bad_oft_inputs(backend):
    o = obs(["a"], seed=4)
    with pytest.raises(InputError, match="exactly the camera"):
        backend.predict(ObservationBatch(o.state, o.instructions, {"image": o.images["image"]}))
    with pytest.raises(InputError, match="proprio"):
        backend.predict(ObservationBatch(o.state[:, :3], o.instructions, o.images))


def test_oft_experts_admitted_and_served(oft):
    from policy_server.cli import main
    from policy_server.models.openvla.backend import OpenVLABackend
    from policy_server.serving import EngineConfig, build_engine

    root = oft["root"]
    base = OpenVLABackend.load(oft["converted"])
    experts = {}
    for i, (name, key) in enumerate((("spatial", SPATIAL), ("object", "libero_object_no_noops"))):
        g = torch.Generator().manual_seed(50 + i)
        with torch.no_grad():
            for pname, p in base.module.named_parameters():
                film = ".scale." in pname or ".shift." in pname  # FiLM projectors are expert tensors too
                if p.ndim == 2 and (film or pname.startswith(("language_model.model.layers", "action_head"))):
                    p.add_(0.05 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        cfg = json.loads((oft["converted"] / "config.json").read_text())
        cfg["carve_unnorm_key"] = key
        experts[name] = U.save_checkpoint(base.module, root / f"oft-expert-{name}", cfg)
    state = root / "oft-state"
    for name in experts:
        assert main(["admit", str(state), "--base", str(oft["converted"]), "--expert", str(experts[name]),
                     "--skill", name, "--instruction", f"do the {name} task", "--method", "bank",
                     "--no-progress"]) == 0
    o = obs(["do the spatial task", "do the object task"], seed=9)
    own = {}
    for i, name in enumerate(experts):
        one = ObservationBatch(o.state[i:i + 1], o.instructions[i:i + 1],
                               {k: v[i:i + 1] for k, v in o.images.items()})
        own[name] = OpenVLABackend.load(experts[name]).predict(one)[0].numpy()
    for mode in ("auto", "side"):  # folded weights, and residuals beside the base (FiLM linears too)
        engine = build_engine(EngineConfig(base_dir=str(oft["converted"]), state_dir=str(state),
                                           mode=mode, max_wait_ms=0.0))
        try:
            mixed = engine.runtime.infer(o, list(experts))
            for i, name in enumerate(experts):
                want = np.clip(own[name], engine.spec.action_low, engine.spec.action_high)
                np.testing.assert_allclose(mixed[i], want, rtol=1e-4, atol=1e-5, err_msg=mode)
        finally:
            engine.close()


def _copy_published(src: Path, dst: Path, edit_vision=None) -> Path:
    """A copy of a published FiLM dir whose vision-backbone pickle is ``edit_vision(state_dict)``."""
    import shutil

    shutil.copytree(src, dst)
    pt = next(dst.glob("vision_backbone--*_checkpoint.pt"))
    if edit_vision is not None:
        torch.save(edit_vision(torch.load(pt, weights_only=True)), pt)
    return dst


@pytest.mark.parametrize("oft", [True], indirect=True, ids=["film"])  # FiLM only
def test_film_convert_refuses_bad_backbone(oft, tmp_path):
    """A vision pickle without FiLM projectors, with a half LoRA pair or with keys the checkpoint
    does not have is refused naming the problem; nothing is written. An ``adapter_config.json``
    beside it supplies the LoRA alpha (here one that doubles the update, so the fold differs)."""
    from policy_server.models.openvla.convert import convert_oft
    from policy_server.tensors.checkpoint import open_checkpoint

    drop = (lambda pred: lambda sd: {k: v for k, v in sd.items() if not pred(k)})
    cases = {
        "no FiLM projectors": drop(lambda k: ".scale." in k or ".shift." in k),
        "lacks lora_B": drop(lambda k: k.endswith("blocks.0.block.attn.qkv.lora_B.default.weight")),
        "unexpected 1": lambda sd: dict(sd, **{"vision_backbone.featurizer.extra.weight": torch.zeros(2)}),
    }
    for i, (msg, edit) in enumerate(cases.items()):
        src = _copy_published(oft["published"], tmp_path / f"src{i}", edit)
        with pytest.raises(InputError, match=msg):
            convert_oft(src, tmp_path / f"out{i}", allow_pickle=True, chunk=U.CHUNK)
        assert not (tmp_path / f"out{i}").exists()
    src = _copy_published(oft["published"], tmp_path / "alpha")
    (src / "lora_adapter").mkdir()
    (src / "lora_adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    qkv = "vision_backbone.featurizer.blocks.1.attn.qkv.weight"
    with open_checkpoint(convert_oft(src, tmp_path / "a8", allow_pickle=True, chunk=U.CHUNK)) as r, \
            open_checkpoint(oft["converted"]) as ref, open_checkpoint(oft["published"]) as pub:
        # W = W0 + s B A: doubling s doubles the distance from the pre-LoRA weight
        torch.testing.assert_close(r.get(qkv) - pub.get(qkv), 2 * (ref.get(qkv) - pub.get(qkv)),
                                   rtol=1e-4, atol=1e-5)
    (src / "lora_adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8}))
    with pytest.raises(InputError, match="rank 4"):
        convert_oft(src, tmp_path / "r8", allow_pickle=True, chunk=U.CHUNK)
