"""OpenVLA backend on tiny random checkpoints in the published layout: keys, an independent
reference forward (timm blocks + Llama run directly), batching, un-normalisation, bad input."""

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


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvla")
    return {"fused": U.make_checkpoint(root / "fused", seed=0, unnorm_key=SPATIAL),
            "sharded": U.make_checkpoint(root / "sharded", seed=0, shards=3, unnorm_key=SPATIAL),
            "single": U.make_checkpoint(root / "single", seed=1, fused=False, unnorm_key=SPATIAL)}


@pytest.fixture(scope="module")
def backend(ckpts):
    from policy_server.models.registry import load_backend

    return load_backend(ckpts["fused"])


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def obs(instr: list[str], imgs: np.ndarray) -> ObservationBatch:
    return ObservationBatch(np.zeros((len(instr), 0), np.float32), list(instr), {"image": imgs})


def test_registry_picks_openvla_and_keys_equal_files(ckpts, backend):
    from policy_server.models.openvla.backend import OpenVLABackend
    from policy_server.tensors.checkpoint import open_checkpoint

    assert isinstance(backend, OpenVLABackend)
    for name in ("fused", "sharded"):
        with open_checkpoint(ckpts[name]) as r:
            assert set(r.keys()) == set(backend.module.state_dict())
    keys = set(backend.module.state_dict())
    for k in ("vision_backbone.featurizer.blocks.1.ls1.scale_factor",
              "vision_backbone.featurizer.reg_token",
              "vision_backbone.fused_featurizer.attn_pool.latent",
              "projector.fc3.weight", "language_model.model.layers.1.self_attn.q_proj.weight",
              "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"):
        assert k in keys, k
    assert not any(k.endswith(".gamma") for k in keys)
    assert (Path(ckpts["sharded"]) / "model.safetensors.index.json").is_file()


def _ref_patches(vit, pixels):
    # independent of timm's forward_intermediates: embed, run all blocks but the last, drop prefix
    x = vit.patch_embed(pixels)
    x = vit._pos_embed(x)
    x = vit.norm_pre(x)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    return x[:, vit.num_prefix_tokens:]


def _reference_tokens(be, ckpt_dir, instruction, img):
    """Greedy decode by re-running the full sequence each step (no cache), with weights read
    straight from the files into a fresh LlamaForCausalLM."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    sd = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"}))
    lm.load_state_dict({k[len("language_model."):]: v for k, v in sd.items()
                        if k.startswith("language_model.")})
    lm.eval()
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    dino = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    sig = (x - 0.5) / 0.5
    vb = be.module.vision_backbone
    feats = torch.cat([_ref_patches(vb.featurizer, dino), _ref_patches(vb.fused_featurizer, sig)], dim=2)
    g = torch.nn.functional.gelu
    h = g(feats @ sd["projector.fc1.weight"].T + sd["projector.fc1.bias"])
    h = g(h @ sd["projector.fc2.weight"].T + sd["projector.fc2.bias"])
    proj = h @ sd["projector.fc3.weight"].T + sd["projector.fc3.bias"]
    prompt = f"In: What action should the robot take to {instruction.lower()}?\nOut:"
    ids = be.tokenizer(prompt)["input_ids"] + [be.tokenizer.convert_tokens_to_ids("\u2581")]
    assert ids[0] == be.tokenizer.bos_token_id
    emb = sd["language_model.model.embed_tokens.weight"]
    seq = torch.cat([emb[ids[:1]], proj[0], emb[ids[1:]]])[None]
    out = []
    for _ in range(U.ACTION_DIM):
        logits = lm(inputs_embeds=seq).logits[0, -1]
        t = int(logits[U.V_TOK - 256:U.V_TOK].argmax()) + U.V_TOK - 256
        out.append(t)
        seq = torch.cat([seq, emb[[t]][None]], dim=1)
    return out


def hand_unnorm(tokens, stats):
    edges = np.linspace(-1, 1, 256)
    centers = (edges[:-1] + edges[1:]) / 2
    b = np.clip(U.V_TOK - np.asarray(tokens) - 1, 0, 254)
    x = centers[b]
    lo, hi, m = np.array(stats["q01"]), np.array(stats["q99"]), np.array(stats["mask"])
    return np.where(m, 0.5 * (x + 1) * (hi - lo) + lo, x)


def test_matches_independent_reference(ckpts, backend):
    with torch.no_grad():
        for i, instr in enumerate(["Pick up the black bowl", "open the top drawer"]):
            img = images(1, seed=10 + i)
            ref = _reference_tokens(backend, ckpts["fused"], instr, img[0])
            got = backend.predict_tokens(obs([instr], img))[0].tolist()
            assert got == ref
            act = backend.predict(obs([instr], img))
            assert act.shape == (1, 1, U.ACTION_DIM) and act.dtype == torch.float32
            want = hand_unnorm(ref, U.norm_stats()[SPATIAL]["action"])
            np.testing.assert_allclose(act[0, 0].numpy(), want, rtol=1e-6, atol=1e-6)


def test_image_changes_the_action(backend):
    toks = {tuple(backend.predict_tokens(obs(["pick up the bowl"], images(1, seed=s)))[0].tolist())
            for s in range(4)}
    assert len(toks) > 1, "the image must influence the action (the remote-code bug ignores it)"


def test_batched_equals_single_decodes(backend):
    instr = ["pick up the bowl", "open the top drawer of the cabinet", "x"]
    imgs = images(3, seed=3)
    batched = backend.predict_tokens(obs(instr, imgs))
    for i in range(3):
        single = backend.predict_tokens(obs(instr[i:i + 1], imgs[i:i + 1]))
        assert batched[i].tolist() == single[0].tolist()


def test_sharded_and_single_backbone(ckpts, backend):
    from policy_server.models.openvla.backend import OpenVLABackend

    sharded = OpenVLABackend.load(ckpts["sharded"])
    o = obs(["pick up the bowl"], images(1, seed=5))
    assert torch.equal(sharded.predict(o), backend.predict(o))
    single = OpenVLABackend.load(ckpts["single"])
    assert not single.config.use_fused_vision_backbone
    assert single.module.projector.n == 2 and not hasattr(single.module.projector, "fc3")
    assert single.predict(o).shape == (1, 1, U.ACTION_DIM)


def test_unnormalisation_by_hand(backend):
    tokens = torch.tensor([[U.V_TOK - 1, U.V_TOK - 256, U.V_TOK - 128, U.V_TOK - 2, U.V_TOK - 200,
                            U.V_TOK - 50, U.V_TOK - 1]])
    for key in (SPATIAL, "libero_object_no_noops"):
        got = backend.tokens_to_actions(tokens, unnorm_key=key)[0].numpy()
        np.testing.assert_allclose(got, hand_unnorm(tokens[0].numpy(), U.norm_stats()[key]["action"]),
                                   rtol=1e-6, atol=1e-7)
    # gripper dim is mask=False: passes through as the bin centre in [-1, 1]
    assert abs(got[-1] - (-1 + 1 / 255)) < 1e-6
    with pytest.raises(InputError, match="available"):
        backend.tokens_to_actions(tokens, unnorm_key="bridge_orig")


def _edit(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field,value,match", [
    ("vision_backbone_id", "eva-vit-g", "vision_backbone_id.*supported"),
    ("arch_specifier", "linear", "arch_specifier.*supported"),
    ("llm_backbone_id", "phi-2-3b", "llm_backbone_id.*supported"),
    ("image_resize_strategy", "warp", "image_resize_strategy"),
    ("carve_unnorm_key", "bridge_orig", "bridge_orig.*available"),
])
def test_bad_config_fields(ckpts, tmp_path, field, value, match):
    from policy_server.models.registry import load_backend

    with pytest.raises(InputError, match=match):
        load_backend(_edit(Path(ckpts["fused"]), tmp_path / "bad", **{field: value}))


def test_missing_field_and_missing_tensor(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    from policy_server.models.openvla.backend import OpenVLABackend

    d = _edit(Path(ckpts["fused"]), tmp_path / "nofield")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["text_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="text_config"):
        OpenVLABackend.load(d)
    d = _edit(Path(ckpts["fused"]), tmp_path / "nokey")
    sd = load_file(str(d / "model.safetensors"))
    del sd["projector.fc2.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(InputError, match="projector.fc2.bias"):
        OpenVLABackend.load(d)


def test_bad_images(backend):
    with pytest.raises(InputError, match="expected uint8\\(1, 224, 224, 3\\)"):
        backend.predict(obs(["a"], np.zeros((1, 112, 112, 3), np.uint8)))
    with pytest.raises(InputError, match="exactly the camera"):
        backend.predict(ObservationBatch(np.zeros((1, 0), np.float32), ["a"],
                                         {"image": images(1), "wrist_image": images(1)}))


def test_preprocessing_resize_strategies():
    from policy_server.models.openvla.vision import ImageTransform

    img = np.random.default_rng(0).integers(0, 256, (1, 120, 200, 3), dtype=np.uint8)
    for strategy in ("resize-naive", "resize-crop", "letterbox"):
        out = ImageTransform(56, strategy, (0.5,) * 3, (0.5,) * 3)(img)
        assert out.shape == (1, 3, 56, 56) and out.dtype == torch.float32
    same = ImageTransform(224, "letterbox", (0.5,) * 3, (0.25,) * 3)(images(1))
    np.testing.assert_allclose(same.numpy(), ((images(1).transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25),
                               rtol=1e-5, atol=1e-5)


def test_without_timm_is_a_clear_error(ckpts, monkeypatch):
    import sys

    from policy_server.models.openvla.backend import OpenVLABackend

    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(InputError, match="requirements-openvla.txt"):
        OpenVLABackend.load(ckpts["fused"])


def test_bf16_load_allocates_in_bf16(ckpts, backend):
    from policy_server.models.openvla.backend import OpenVLABackend

    bf = OpenVLABackend.load(ckpts["fused"], dtype=torch.bfloat16)
    assert {p.dtype for p in bf.module.parameters()} == {torch.bfloat16}
    o = obs(["pick up the bowl"], images(1, seed=6))
    out = bf.predict(o)
    assert out.dtype == torch.float32 and out.shape == (1, 1, U.ACTION_DIM)
    for k, v in bf.module.state_dict().items():  # every tensor came from the file, none left random
        assert torch.equal(v, backend.module.state_dict()[k].to(torch.bfloat16)), k
