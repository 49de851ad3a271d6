"""Two tiny OpenVLA experts admitted with ``carve admit`` and served through the composition root:
served actions equal each expert's own forward (lossless ``bank`` merge), per-skill unnorm keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("timm", reason="timm is the OpenVLA backend's optional dependency")

import openvla_utils as U  # noqa: E402
from policy_server.errors import InputError  # noqa: E402
from policy_server.models.base import ObservationBatch  # noqa: E402

torch.set_num_threads(1)
SKILLS = U.SKILLS


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return U.build_bank_stack(tmp_path_factory.mktemp("openvla_serve"))


def _obs(instr, imgs):
    return ObservationBatch(np.zeros((len(instr), 0), np.float32), list(instr), {"image": imgs})


def _imgs(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["auto", "side"])
def test_served_actions_equal_expert_forward(stack, mode):
    from policy_server.models.openvla.backend import OpenVLABackend
    from policy_server.serving import EngineConfig, build_engine

    engine = build_engine(EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]),
                                       router="text", mode=mode, max_wait_ms=0.0))
    try:
        imgs = _imgs(2, seed=7)
        names = list(SKILLS)
        own = {}
        for i, name in enumerate(names):
            exp = OpenVLABackend.load(stack["experts"][name])
            assert exp.unnorm_key == SKILLS[name][0]
            o = _obs([SKILLS[name][1]], imgs[i:i + 1])
            own[name] = exp.predict(o)[0].numpy()
            served = engine.infer(o, name)
            np.testing.assert_allclose(served, own[name], rtol=1e-5, atol=1e-5)
        base = OpenVLABackend.load(stack["base"], unnorm_key=SKILLS[names[0]][0])
        differs = [not np.allclose(base.predict(_obs([SKILLS[n][1]], imgs[i:i + 1]))[0].numpy(), own[n])
                   for i, n in enumerate(names)]
        assert any(differs), "the experts must act differently from the base for this to test merging"
        # one mixed batch: each row with its own skill's weights and statistics
        mixed = engine.runtime.infer(_obs([SKILLS[n][1] for n in names], imgs), names)
        for i, name in enumerate(names):
            np.testing.assert_allclose(mixed[i], own[name], rtol=1e-5, atol=1e-5)
        # core-only: the base has two datasets and no carve_unnorm_key -> refused, naming the keys
        with pytest.raises(InputError, match="libero_object_no_noops"):
            engine.runtime.infer(_obs(["anything"], imgs[:1]), [None])
    finally:
        engine.close()


def test_skill_statistics_recorded_at_admission(stack):
    from policy_server.models.openvla.skills import ARTIFACT, decode_stats
    from policy_server.state.store import StateStore

    snap = StateStore(stack["state"]).open()
    for name, (key, _) in SKILLS.items():
        got_key, stats = decode_stats(snap.skill_artifacts(name)[ARTIFACT])
        assert got_key == key and stats["action"]["q01"] == U.norm_stats()[key]["action"]["q01"]


def test_admission_refuses_other_architecture(stack, tmp_path):
    import json
    import shutil

    from policy_server.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(stack["experts"]["spatial"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_action_bins"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    rc = main(["admit", str(tmp_path / "st"), "--base", str(stack["base"]), "--expert", str(bad),
               "--skill", "bad", "--method", "bank", "--no-progress"])
    assert rc == 2
    assert not (tmp_path / "st" / "CURRENT").exists()


def test_lora_adapter_admission_equals_dense_equivalent(stack, tmp_path):
    """An OpenVLA-style PEFT adapter (LoRA on the LM's attention/MLP and the projector, saved as
    ``base_model.model.<module>``) admits to the same served model as its merged dense expert."""
    from ckpt_utils import write_lora_adapter

    from policy_server.cli import main
    from policy_server.models.openvla.backend import OpenVLABackend
    from policy_server.serving import EngineConfig, build_engine

    base = OpenVLABackend.load(stack["base"])
    g = torch.Generator().manual_seed(11)
    r, alpha = 4, 8
    mods = {}
    for name, p in base.module.named_parameters():
        lora_target = name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))
        if lora_target or name == "projector.fc1.weight":
            mods[name[:-len(".weight")]] = (torch.randn(r, p.shape[1], generator=g) * 0.3,
                                            torch.randn(p.shape[0], r, generator=g) * 0.3)
    adapter = write_lora_adapter(tmp_path / "adapter", mods, r=r, lora_alpha=alpha)
    with torch.no_grad():
        sd = dict(base.module.named_parameters())
        for mod, (A, B) in mods.items():
            sd[mod + ".weight"].add_((alpha / r) * B @ A)
    import json

    cfg = json.loads((stack["base"] / "config.json").read_text())
    cfg["carve_unnorm_key"] = SKILLS["spatial"][0]
    dense = U.save_checkpoint(base.module, tmp_path / "dense", cfg)
    outs = []
    o = _obs([SKILLS["spatial"][1]], _imgs(1, seed=21))
    for name, expert in (("lora", adapter), ("dense", dense)):
        st = tmp_path / f"state-{name}"
        assert main(["admit", str(st), "--base", str(stack["base"]), "--expert", str(expert),
                     "--skill", "spatial", "--instruction", SKILLS["spatial"][1],
                     "--method", "bank", "--no-progress"]) == 0
        cfg_e = EngineConfig(base_dir=str(stack["base"]), state_dir=str(st), max_wait_ms=0.0)
        engine = build_engine(cfg_e)
        try:
            engine.runtime.backend.unnorm_key = SKILLS["spatial"][0]  # the adapter has no stats
            outs.append(engine.runtime.backend.predict_tokens(o.with_skills(["spatial"])))
            outs.append(engine.infer(o, "spatial"))
        finally:
            engine.close()
    assert torch.equal(outs[0], outs[2])
    np.testing.assert_allclose(outs[1], outs[3], rtol=1e-5, atol=1e-5)


def test_served_equals_exported_skill_in_process(stack, tmp_path):
    """``carve state export --format full`` of a skill, loaded by the backend in-process, acts as
    the server serving that skill (the export copies config.json and the tokenizer from the base)."""
    from policy_server.cli import main
    from policy_server.models.openvla.backend import OpenVLABackend
    from policy_server.serving import EngineConfig, build_engine

    out = tmp_path / "export-object"
    assert main(["state", "export", str(stack["state"]), "--skill", "object", "--base",
                 str(stack["base"]), "--out", str(out), "--format", "full", "--no-progress"]) == 0
    exported = OpenVLABackend.load(out, unnorm_key=SKILLS["object"][0])
    o = _obs([SKILLS["object"][1]], _imgs(1, seed=33))
    engine = build_engine(EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]),
                                       max_wait_ms=0.0))
    try:
        np.testing.assert_allclose(engine.infer(o, "object"), exported.predict(o)[0].numpy(),
                                   rtol=1e-5, atol=1e-5)
    finally:
        engine.close()


def test_expert_key_choice_rules(stack, tmp_path):
    import json
    import shutil

    from policy_server.models.openvla.skills import OpenVLAStatsHook, decode_stats

    def hook_for(edit, ds=None):
        d = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        shutil.copytree(stack["experts"]["spatial"], d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("carve_unnorm_key", None)
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        if ds is not None:
            (d / "dataset_statistics.json").write_text(json.dumps(ds))
        return OpenVLAStatsHook(stack["base"], d)

    stats = U.norm_stats()
    # a dataset the base lacks (what fine-tuning added) wins
    new = dict(stats, libero_goal_no_noops=stats["libero_spatial_no_noops"])
    h = hook_for(lambda c: c.update(norm_stats=new))
    assert decode_stats(h.artifacts()["openvla_action_stats"])[0] == "libero_goal_no_noops"
    # finetune.py's dataset_statistics.json with one dataset wins over an ambiguous config
    h = hook_for(lambda c: None, ds={"libero_10_no_noops": stats["libero_object_no_noops"]})
    assert decode_stats(h.artifacts()["openvla_action_stats"])[0] == "libero_10_no_noops"
    # ambiguous: refused, listing the keys
    with pytest.raises(InputError, match="carve_unnorm_key.*|libero_object_no_noops"):
        hook_for(lambda c: None)
