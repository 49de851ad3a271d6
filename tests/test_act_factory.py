"""The ACT expert factory (policy_server/training/act_factory.py) on real LeRobot classes.

Fast: a tiny ACT directory (saved with ``save_pretrained`` + processors) loads in LeRobot and in
the server's LeRobot backend, its preprocessor fills ACT's environment state from the Meta-World
state vector, the backend's actions equal LeRobot's ``select_action`` pipeline, and the training
loop (LeRobot's ACT loss) learns.

End to end: a 2-suite ACT factory from scripted Meta-World demonstrations, then the closed-loop
benchmark (bank + CARVE r16) through the real gRPC server and the real Meta-World client; the
bank's served actions equal LeRobot's in-process pipeline on each expert checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot.policies.act.modeling_act", reason="lerobot not installed "
                    "(pip install -r requirements-lerobot.txt; --no-deps lerobot==0.4.4)")

from policy_server.training import act_factory as af  # noqa: E402

torch.set_num_threads(1)
SD, AD = 39, 4
TINY = {"dim_model": 32, "n_heads": 2, "dim_feedforward": 64, "n_encoder_layers": 1,
        "chunk_size": 6, "n_action_steps": 4}
TOL = dict(rtol=1e-5, atol=1e-5)


def _lerobot_actions(policy_dir, state: np.ndarray, instruction: str) -> np.ndarray:
    """LeRobot's own pipeline on one checkpoint: preprocessor -> ``select_action`` ->
    postprocessor, ``n_action_steps`` times from a fresh ``reset`` (one chunk computed at
    ``state``): (n_action_steps, A) float32, clipped to Meta-World's action space."""
    policy, pre, post = af.load_policy_dir(policy_dir)
    policy.reset()
    obs = {"observation.state": torch.from_numpy(np.asarray(state, np.float32)),
           "task": instruction}
    with torch.no_grad():
        acts = [post(policy.select_action(pre(dict(obs))))
                for _ in range(policy.config.n_action_steps)]
    return np.clip(torch.cat(acts).numpy(), af.ACTION_LOW, af.ACTION_HIGH)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny ACT policy dir with statistics from synthetic 39-D states / 4-D actions."""
    from lerobot.policies.act.modeling_act import ACTPolicy

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    obs = rng.normal(0.3, 0.2, (200, SD)).astype(np.float32)
    obs[:, 20:] = 0.0  # constant dims (unused object slots): the std floor must keep them finite
    acts = np.clip(rng.normal(0, 0.5, (200, AD)), -1, 1).astype(np.float32)
    cfg = af.make_act_config(SD, AD, af.act_options("demo", TINY))
    pre, post = af.make_processors(cfg, af.dataset_stats(obs, acts))
    out = af.save_policy_dir(ACTPolicy(cfg), pre, post, tmp_path_factory.mktemp("act") / "p")
    return out, obs


def test_saved_dir_loads_in_lerobot_with_environment_state(tiny_dir):
    d, obs = tiny_dir
    steps = json.loads((d / "policy_preprocessor.json").read_text())["steps"]
    # saved by import path, so LeRobot loads it without this module pre-imported
    assert steps[1]["class"] == ("policy_server.training.act_processors."
                                 "StateAsEnvironmentStateStep")
    policy, pre, _ = af.load_policy_dir(d)
    assert policy.config.env_state_feature.shape == (SD,) and not policy.config.image_features
    out = pre({"observation.state": torch.from_numpy(obs[0]), "task": "x"})
    mean = torch.from_numpy(obs.mean(0))
    std = torch.from_numpy(np.maximum(obs.std(0), 0.05))
    want = (torch.from_numpy(obs[0]) - mean) / (std + 1e-8)
    np.testing.assert_allclose(out["observation.state"][0], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["observation.environment_state"][0], want,
                               rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out["observation.state"]).all()


def test_backend_serves_it_like_lerobot(tiny_dir):
    from policy_server.models.base import ObservationBatch
    from policy_server.models.lerobot.backend import LeRobotBackend
    from policy_server.models.registry import detect_backend, load_backend

    d, obs = tiny_dir
    assert detect_backend(d) is LeRobotBackend
    be = load_backend(d)
    spec = be.spec
    # what the Meta-World client needs: a 39-D state, no camera, [-1, 1] bounds
    assert (spec.state_dim, spec.action_dim, spec.chunk_length) == (SD, AD, 4)
    assert spec.images == {}
    assert spec.action_low == [-1.0] * AD and spec.action_high == [1.0] * AD
    got = be.predict(ObservationBatch(obs[:2], ["a", "b"], {}, episode_ids=["e0", "e1"]))
    for i in range(2):
        np.testing.assert_allclose(np.clip(got[i].numpy(), -1, 1),
                                   _lerobot_actions(d, obs[i], "a"), **TOL)


def test_train_act_learns_and_options_are_checked():
    from lerobot.policies.act.modeling_act import ACTPolicy

    from policy_server.errors import InputError

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    states = torch.randn(64, SD, generator=g)
    w = torch.randn(SD, AD, generator=g) * 0.3
    chunks = (states @ w)[:, None, :].repeat(1, TINY["chunk_size"], 1)  # learnable map
    pol = ACTPolicy(af.make_act_config(SD, AD, af.act_options("demo", TINY)))
    losses = af.train_act(pol, states, chunks, steps=120, lr=3e-3, batch_size=32, seed=0,
                          state_noise=0.0)
    assert len(losses) == 120 and not pol.training
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    with pytest.raises(InputError, match="unknown ACT option"):
        af.act_options("demo", {"dim_modle": 8})
    with pytest.raises(InputError, match="n_action_steps"):
        af.act_options("demo", {"chunk_size": 2, "n_action_steps": 4})
    with pytest.raises(InputError, match="steps >= 1"):
        af.train_act(pol, states, chunks, 0, 1e-3, 8, 0, 0.0)


def test_cli_family_act_refuses_lora(capsys):
    from policy_server.cli import main as carve

    assert carve(["train", "--family", "act", "--lora"]) == 2
    assert "--lora" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end, real sim + server
# 39 s measured on the shared 2-core box (198 s at load average ~12): demo collection, 5 server
# starts, Meta-World episodes. Like test_closed_loop.py's smoke run it stays in the default suite
# (it is the one real end-to-end check); skipped without Meta-World.
def test_act_factory_closed_loop_through_real_server(tmp_path, monkeypatch):
    """2-suite ACT factory (tiny, few steps) -> bank + CARVE r16 through the real gRPC server and
    the real Meta-World client; the bank serves each expert exactly as LeRobot runs it."""
    pytest.importorskip("metaworld", reason="Meta-World is the optional sim extra")
    from bench.closed_loop.run import run_benchmark
    from carve_client import PolicyClient
    from clients.sim.metaworld_env import make_env
    from policy_server.service.server import PolicyServer, ServerConfig
    from policy_server.serving import EngineConfig, build_engine
    from policy_server.sim.suites import Preset

    monkeypatch.setenv("CARVE_CACHE_DIR", str(tmp_path / "cache"))
    p = Preset(name="tinyact", base_tasks=["reach-v3"],
               suites={"buttons": ["button-press-topdown-v3"], "windows": ["window-open-v3"]},
               episodes_base=2, episodes_expert=2, max_steps=120)
    opts = dict(TINY, base_steps=40, expert_steps=20, batch_size=32, lr_expert=2e-3)
    factory = af.build_act_factory(p, act=opts)
    assert factory["family"] == "act" and [e["name"] for e in factory["experts"]] == [
        "buttons", "windows"]
    assert "act-tinyact-" in factory["out"] and factory["config"]["act"]["dim_model"] == 32
    # cached: the same request returns the build on disk, not a new one
    assert af.build_act_factory(p, act=opts) == factory
    for e in factory["experts"]:  # every expert carries the base's statistics, byte for byte
        for f in ("policy_preprocessor_step_4_normalizer_processor.safetensors",
                  "policy_postprocessor_step_0_unnormalizer_processor.safetensors"):
            assert (Path(e["dir"]) / f).read_bytes() == (
                Path(factory["base"]["dir"]) / f).read_bytes()

    out = tmp_path / "res"
    res = run_benchmark(factory=factory, methods="bank,carve-r16", episodes=1, max_experts=2,
                        with_router=False, out=out, max_steps=30, keep_work=True,
                        log=lambda *a: None)
    for name in ("bank", "carve-r16"):
        m = res["methods"][name]
        assert m["error"] is None, m["error"]
        s = m["summary"]
        assert s["complete"] and [len(r) for r in s["oracle"]["acc"]] == [1, 2]
        assert all(0.0 <= v <= 1.0 for row in s["oracle"]["acc"] for v in row)
        last = m["steps"][-1]
        assert set(last["skills"]) == {"buttons", "windows"}
        eps = last["skills"]["windows"]["tasks"]["window-open-v3"]["oracle"]["episodes"]
        assert len(eps) == 1 and eps[0]["skill"] == "windows" and eps[0]["requests"] >= 1
        assert 0.0 < s["storage_fraction"] and last["storage"]["skills"] == 2
    assert res["methods"]["bank"]["summary"]["storage_fraction"] == 1.0

    # the bank state the benchmark served, served again: each skill's chunk at a real first
    # Meta-World observation equals LeRobot's own pipeline on that expert's directory
    state_dir = out / "_work" / "bank" / "state"
    server = PolicyServer(lambda: build_engine(EngineConfig(
        base_dir=factory["base"]["dir"], state_dir=str(state_dir), router="exact")),
        ServerConfig(host="127.0.0.1", port=0))
    port = server.start()
    client = PolicyClient(f"127.0.0.1:{port}", retries=0)
    try:
        client.wait_ready(60)
        served = {}
        for e in factory["experts"]:
            env = make_env(e["tasks"][0], seed=1000, max_steps=30)
            try:
                obs = np.asarray(env.reset(0), np.float32)
            finally:
                env.close()
            with client.episode(e["instructions"][0], skill=e["name"]) as ep:
                got = ep.infer(state=obs)
            np.testing.assert_allclose(got, _lerobot_actions(e["dir"], obs, e["instructions"][0]),
                                       **TOL)
            served[e["name"]] = (obs, got)
        # not a tautology: the base at the same observation commands something else
        obs, got = served["windows"]
        base = _lerobot_actions(factory["base"]["dir"], obs, "x")
        assert np.abs(got - base).max() > 1e-4
    finally:
        client.close()
        server.stop(1.0)
