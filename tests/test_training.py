"""Expert factory pieces: BC training lowers the loss, PEFT-format LoRA adapters, tiny factory."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from policy_server.errors import InputError
from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig
from policy_server.sim.metaworld_env import Demos
from policy_server.training.lora import (DEFAULT_TARGET_MODULES, LoRALinear, inject_lora,
                                         merge_peft_adapter, save_peft_adapter)
from policy_server.training.train import ChunkDataset, norm_stats, train_backend

torch.set_num_threads(1)


def _synthetic_demos(task, n_ep=4, T=30, seed=0):
    """Demos whose actions are a smooth function of the state (learnable, like a scripted policy)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n_ep * T, 39)).astype(np.float32)
    act = np.tanh(obs[:, :4] - 0.5 * obs[:, 35:39]).astype(np.float32)
    ep = np.repeat(np.arange(n_ep, dtype=np.int32), T)
    return Demos(task, obs, act, ep, np.ones(n_ep, bool))


def _small_cfg(data):
    return DemoVLAConfig(hidden_dim=64, mlp_dim=128, num_expert_blocks=1, vocab_size=512,
                         text_dim=32, **norm_stats(data.obs, data.chunks[:, 0]))


def test_chunk_dataset_pads_with_last_action():
    d = _synthetic_demos("reach-v3", n_ep=2, T=5)
    ds = ChunkDataset([d], chunk_length=3)
    assert ds.chunks.shape == (10, 3, 4) and ds.obs.shape == (10, 39)
    np.testing.assert_array_equal(ds.chunks[0, 1], d.actions[1])
    np.testing.assert_array_equal(ds.chunks[4, 2], d.actions[4])   # episode 0 ends at step 4
    np.testing.assert_array_equal(ds.chunks[5, 0], d.actions[5])   # episode 1 starts fresh
    assert ds.instructions == ["reach the red goal point with the gripper"]


def test_training_lowers_loss_and_is_deterministic():
    ds = ChunkDataset([_synthetic_demos("reach-v3"), _synthetic_demos("push-v3", seed=1)], 4)
    runs = []
    for _ in range(2):
        be = DemoVLABackend(_small_cfg(ds), seed=0)
        runs.append(train_backend(be, ds, steps=120, lr=2e-3, batch_size=64, seed=0, progress=False))
    losses = runs[0]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert runs[0] == runs[1]  # fixed seeds -> bit-identical on CPU


def test_lora_adapter_is_peft_format_and_merges_exactly(tmp_path):
    ds = ChunkDataset([_synthetic_demos("reach-v3")], 4)
    be = DemoVLABackend(_small_cfg(ds), seed=0)
    base_sd = {k: v.clone() for k, v in be.module.state_dict().items()}
    torch.manual_seed(0)
    adapted = inject_lora(be.module, DEFAULT_TARGET_MODULES, r=4, alpha=8.0)
    assert "action_expert.head.cross_attn.v_proj" in adapted and "action_expert.head.out_proj" not in adapted
    trainable = [n for n, p in be.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    losses = train_backend(be, ds, steps=40, lr=5e-3, batch_size=32, seed=0, progress=False)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    out = save_peft_adapter(be.module, tmp_path / "lora", DEFAULT_TARGET_MODULES, 4, 8.0,
                            base_model_name_or_path="base")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["use_rslora"] is False and cfg["fan_in_fan_out"] is False
    assert cfg["bias"] == "none" and cfg["modules_to_save"] is None
    assert sorted(cfg["target_modules"]) == sorted(DEFAULT_TARGET_MODULES)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(adapted)
    for mod in adapted:
        a = tensors[f"base_model.model.{mod}.lora_A.weight"]
        b = tensors[f"base_model.model.{mod}.lora_B.weight"]
        w = base_sd[f"{mod}.weight"]
        assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
    # merged weights = base + (alpha/r) * B @ A, and the merged plain model reproduces the adapted one
    merged = merge_peft_adapter(base_sd, out)
    mod = "action_expert.blocks.0.cross_attn.v_proj"
    a = tensors[f"base_model.model.{mod}.lora_A.weight"]
    b = tensors[f"base_model.model.{mod}.lora_B.weight"]
    torch.testing.assert_close(merged[f"{mod}.weight"], base_sd[f"{mod}.weight"] + 2.0 * b @ a)
    assert not torch.equal(merged[f"{mod}.weight"], base_sd[f"{mod}.weight"])  # it did learn
    plain = DemoVLABackend(be.config, seed=0)
    plain.module.load_state_dict(merged)
    from policy_server.models.base import ObservationBatch
    batch = ObservationBatch(ds.obs[:5], [ds.instructions[0]] * 5)
    torch.testing.assert_close(plain.predict(batch), be.predict(batch), atol=1e-5, rtol=1e-5)
    assert isinstance(be.module.get_submodule(mod), LoRALinear)


def test_lora_errors():
    be = DemoVLABackend(DemoVLAConfig(hidden_dim=64, mlp_dim=128))
    with pytest.raises(InputError, match="match no nn.Linear"):
        inject_lora(be.module, ["nonexistent_proj"], 4, 8)
    with pytest.raises(InputError, match="rank"):
        inject_lora(be.module, ["q_proj"], 0, 8)


def test_tiny_factory_real_metaworld(tmp_path, monkeypatch):
    """End to end on the real simulator with a tiny preset: demos cached, base + full and LoRA
    experts written, factory.json complete, a second call served from cache."""
    pytest.importorskip("metaworld", reason="Meta-World is the optional sim extra")
    from policy_server.models.registry import load_backend
    from policy_server.sim.suites import Preset
    from policy_server.training.train import build_factory

    monkeypatch.setenv("CARVE_CACHE_DIR", str(tmp_path / "cache"))
    p = Preset(name="tiny", base_tasks=["reach-v3"], suites={"buttons": ["button-press-topdown-v3"]},
               episodes_base=2, episodes_expert=2, max_steps=120, base_steps=30, expert_steps=20,
               batch_size=32, model={"hidden_dim": 64, "mlp_dim": 128, "num_expert_blocks": 1})
    res = build_factory(p, progress=False)
    assert (tmp_path / "cache" / "demos" / "reach-v3-n2-s0-m120.npz").is_file()
    fj = json.loads((tmp_path / "cache" / "factory" / f"tiny-{res['hash']}" / "factory.json").read_text())
    assert fj == json.loads(json.dumps(res))
    e = res["experts"][0]
    assert e["kind"] == "full" and e["tasks"] == ["button-press-topdown-v3"]
    assert e["instructions"] == ["press the button from the top"]
    base, exp = load_backend(res["base"]["dir"]), load_backend(e["dir"])
    assert base.config.state_std == exp.config.state_std        # experts reuse the base's stats
    assert res["base"]["losses"]["last"] < res["base"]["losses"]["first"]
    assert build_factory(p, progress=False)["total_seconds"] == res["total_seconds"]  # cached
    lo = build_factory(p, lora=True, lora_rank=2, progress=False)
    ldir = lo["experts"][0]["dir"]
    assert lo["experts"][0]["kind"] == "lora" and lo["out"] != res["out"]
    assert json.loads((tmp_path / "cache" / "factory" / ldir.split("/factory/")[1] /
                       "adapter_config.json").read_text())["r"] == 2


def test_factory_refuses_foreign_out_dir(tmp_path):
    from policy_server.training.train import build_factory

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(InputError, match="not a carve factory output"):
        build_factory("demo", out=tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "x"
