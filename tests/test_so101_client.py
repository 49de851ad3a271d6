"""SO-101 arm client: safety filter, FakeRobot dynamics, the control loop against an episode double
(and against the real gRPC service when it is importable)."""

import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

from clients.robot_interface import (SO101_MOTORS, FakeRobot, Robot, RobotNotConnectedError,
                                     camera_names, default_limits, motor_names)
from clients.safety import SafetyConfig, SafetyFilter, SafetyStop, hold_position
from clients.so101_client import ArmPolicyRunner, ArmRunConfig, _parse_camera

J = len(SO101_MOTORS)


# ------------------------------------------------------------------------------------------ safety

def _cfg(**kw):
    low, high = default_limits(SO101_MOTORS)
    return SafetyConfig(low, high, **kw)


def test_safety_clamps_limits_and_rate():
    f = SafetyFilter(_cfg(max_delta=5.0))
    measured = np.zeros(J)
    target = np.array([50.0, -500.0, 3.0, 0.0, 0.0, 150.0])
    out = f.filter(target, measured)
    # ramp of 5 per tick from the measured position, joint 2 reaches its target directly
    assert np.allclose(out, [5, -5, 3, 0, 0, 5])
    for _ in range(200):
        out = f.filter(target, measured)
    # converges to the *clamped* target: body joints in [-100, 100], gripper in [0, 100]
    assert np.allclose(out, [50, -100, 3, 0, 0, 100])
    assert f.n_clamped > 0 and f.n_rate_limited > 0


def test_safety_tracking_error_and_nan():
    f = SafetyFilter(_cfg(max_delta=50.0, max_tracking_error=10.0))
    out = f.filter(np.full(J, 40.0), np.zeros(J))
    assert np.allclose(out, 10.0)  # not more than 10 ahead of the (stuck) measured position
    with pytest.raises(SafetyStop) as e:
        f.filter(np.array([0, 0, np.nan, 0, 0, 0]), np.zeros(J))
    assert e.value.reason == "nan_action"
    with pytest.raises(SafetyStop) as e:
        f.filter(np.zeros(J), np.array([0, np.inf, 0, 0, 0, 0]))
    assert e.value.reason == "nan_state"
    with pytest.raises(SafetyStop, match="joints"):
        f.filter(np.zeros(J - 1), np.zeros(J))
    with pytest.raises(ValueError, match="max_delta"):
        _cfg(max_delta=0.0)
    with pytest.raises(ValueError, match="low > high"):
        SafetyConfig([1.0], [0.0])


# ------------------------------------------------------------------------------------ fake robot

def test_fake_robot_interface_and_dynamics():
    r = FakeRobot(cameras={"front": (48, 64)}, time_constant=0.02, max_speed=None)
    assert isinstance(r, Robot)
    assert motor_names(r) == list(SO101_MOTORS) and camera_names(r) == ["front"]
    with pytest.raises(RobotNotConnectedError):
        r.get_observation()
    r.connect()
    with pytest.raises(RuntimeError, match="already connected"):
        r.connect()
    obs0 = r.get_observation()
    assert obs0["front"].shape == (48, 64, 3) and obs0["front"].dtype == np.uint8
    sent = r.send_action({f"{m}.pos": 30.0 for m in SO101_MOTORS} | {"gripper.pos": 150.0})
    assert sent["gripper.pos"] == 100.0  # clipped to the gripper range like the firmware does
    time.sleep(0.15)  # ~7 time constants
    obs = r.get_observation()
    assert abs(obs["shoulder_pan.pos"] - 30.0) < 0.1 and abs(obs["gripper.pos"] - 100.0) < 0.5
    assert not np.array_equal(obs["front"], obs0["front"])  # the frame shows the new pose
    with pytest.raises(KeyError, match="gripper.pos"):
        r.send_action({"shoulder_pan.pos": 0.0})
    assert np.allclose(hold_position(r, list(SO101_MOTORS)), r.pos, atol=0.5)
    r.disconnect()
    assert not r.is_connected


def test_fake_robot_speed_limit():
    r = FakeRobot(cameras={}, time_constant=0.001, max_speed=100.0)
    r.connect()
    r.send_action({f"{m}.pos": 90.0 for m in SO101_MOTORS})
    t = time.monotonic()
    time.sleep(0.1)
    obs = r.get_observation()
    dt = time.monotonic() - t
    assert obs["shoulder_pan.pos"] <= 100.0 * dt + 1e-6 and obs["shoulder_pan.pos"] > 3.0


# ------------------------------------------------------------------------- episode double (server)

class EpisodeDouble:
    """Stands in for the gRPC client's episode: ``spec`` + ``infer(state, images, encode)``.

    Predicts a chunk that moves every joint from the observed state toward ``goal`` by ``step``
    per row, after ``latency`` seconds; ``fail_at`` (call index) raises like a lost server,
    ``hang_at`` blocks, ``nan_at`` returns NaNs."""

    def __init__(self, goal, chunk=8, latency=0.02, images=None, fail_at=None, hang_at=None,
                 nan_at=None, state_dim=J):
        self.goal = np.asarray(goal, np.float32)
        self.spec = SimpleNamespace(action_dim=J, state_dim=state_dim, chunk_length=chunk,
                                    images=images or {}, action_low=[-100.0] * J,
                                    action_high=[100.0] * J)
        self.skill, self.confidence = "reach", 1.0
        self.latency, self.fail_at, self.hang_at, self.nan_at = latency, fail_at, hang_at, nan_at
        self.calls = []
        self.release = threading.Event()

    def infer(self, state, images=None, encode="raw"):
        i = len(self.calls)
        self.calls.append((np.array(state), images, encode))
        assert state.dtype == np.float32 and state.shape == (J,)
        time.sleep(self.latency)
        if self.fail_at is not None and i >= self.fail_at:
            raise ConnectionError("UNAVAILABLE: server went away")
        if self.hang_at is not None and i >= self.hang_at:
            self.release.wait(5.0)
        rows = np.arange(1, self.spec.chunk_length + 1, dtype=np.float32)[:, None]
        chunk = state + np.clip(self.goal - state, -3.0 * rows, 3.0 * rows)
        if self.nan_at is not None and i >= self.nan_at:
            chunk[2, 1] = np.nan
        return chunk


class ClientDouble:
    def __init__(self, ep):
        self.ep = ep
        self.opened = []

    @contextmanager
    def episode(self, instruction, skill=None, chunk_length=None, info=None):
        self.opened.append((instruction, skill, info))
        yield self.ep


def _runner(ep, robot=None, **cfg):
    robot = robot or FakeRobot(cameras={"front": (60, 80)}, time_constant=0.03)
    cfg.setdefault("hz", 50.0)
    cfg.setdefault("max_steps", 60)
    cfg.setdefault("blend", "latest_only")
    return ArmPolicyRunner(ClientDouble(ep), robot, ArmRunConfig("pick up the cube", **cfg),
                           SafetyConfig(*default_limits(SO101_MOTORS), max_delta=4.0)), robot


def test_runner_reaches_goal_with_prefetch_and_images():
    goal = [20.0, -15.0, 10.0, 5.0, 0.0, 40.0]
    ep = EpisodeDouble(goal, chunk=8, images={"front": SimpleNamespace(height=32, width=32)})
    runner, robot = _runner(ep, max_steps=90)
    rep = runner.run()
    assert rep.stop_reason == "done", rep.error
    assert rep.steps == 90 and rep.chunks >= 90 // 8
    # prefetch: requests overlap execution, so the arm is rarely left without an action once the
    # first chunk is in (loose bound: 2 shared CPU cores make latency spiky)
    assert rep.starved_ticks <= 0.1 * rep.steps, rep
    assert 35 < rep.achieved_hz <= 51
    assert np.allclose(robot.pos, goal, atol=1.5)
    # every command respected the per-tick limit (relative to the previous command)
    cmds = np.array(robot.send_log[:-1])  # the last one is the hold on shutdown
    assert np.abs(np.diff(cmds, axis=0)).max() <= 4.0 + 1e-6
    _, images, encode = ep.calls[0]
    assert images["front"].shape == (32, 32, 3) and encode == "jpeg"
    assert not robot.is_connected and robot.disconnect_count == 1


def test_prefetch_reduces_starvation():
    """Requesting only when the chunk has run out leaves >= 1 empty tick per chunk (latency 40 ms =
    2 ticks at 50 Hz); prefetching half a chunk ahead hides it."""
    goal = [20.0] * J
    late, _ = _runner(EpisodeDouble(goal, chunk=8, latency=0.04), max_steps=80, prefetch_steps=0)
    early, _ = _runner(EpisodeDouble(goal, chunk=8, latency=0.04), max_steps=80, prefetch_steps=4)
    r_late, r_early = late.run(), early.run()
    assert r_late.starved_ticks >= r_late.chunks - 1
    assert r_early.starved_ticks < r_late.starved_ticks / 2, (r_early, r_late)


def test_runner_stops_and_holds_on_server_loss():
    ep = EpisodeDouble([50.0] * 5 + [50.0], chunk=8, fail_at=3)
    runner, robot = _runner(ep, max_steps=500)
    rep = runner.run()
    assert rep.stop_reason == "server_lost" and "UNAVAILABLE" in rep.error
    assert rep.steps < 100
    # last command = hold at the measured position, then disconnected
    assert np.allclose(robot.send_log[-1], robot.pos, atol=2.0)
    assert not robot.is_connected


def test_runner_stops_on_timeout_and_nan():
    ep = EpisodeDouble([10.0] * J, chunk=4, hang_at=2)
    runner, robot = _runner(ep, max_steps=500, request_timeout_s=0.2)
    rep = runner.run()
    ep.release.set()
    assert rep.stop_reason == "timeout" and not robot.is_connected

    ep = EpisodeDouble([10.0] * J, chunk=4, nan_at=1)
    runner, robot = _runner(ep, max_steps=500)
    rep = runner.run()
    assert rep.stop_reason == "nan_action" and not robot.is_connected


def test_runner_stops_on_robot_fault_and_rejects_wrong_spec():
    ep = EpisodeDouble([10.0] * J, chunk=4)
    runner, robot = _runner(ep, robot=FakeRobot(cameras={}, fail_after=10), max_steps=500)
    rep = runner.run()
    assert rep.stop_reason == "robot_error" and rep.steps == 10

    ep = EpisodeDouble([10.0] * J, chunk=4, state_dim=39)
    runner, robot = _runner(ep)
    with pytest.raises(ValueError, match="state_dim=39"):
        runner.run()
    assert not robot.is_connected and robot.send_log  # held and disconnected before raising


def test_runner_unreachable_server_is_safe():
    """A real gRPC client to a port nobody listens on: the run must stop cleanly, arm held."""
    from carve_client import PolicyClient

    client = PolicyClient("127.0.0.1:1", timeout=0.5, retries=0)
    robot = FakeRobot(cameras={})
    runner = ArmPolicyRunner(client, robot, ArmRunConfig("x", hz=30, max_steps=30),
                             SafetyConfig(*default_limits(SO101_MOTORS)))
    t = time.monotonic()
    rep = runner.run()
    assert rep.stop_reason in ("server_lost", "timeout"), rep
    assert time.monotonic() - t < 10 and not robot.is_connected


def test_image_plan_matches_lerobot_keys_and_order():
    ep = EpisodeDouble([0.0] * J)
    runner, _ = _runner(ep, robot=FakeRobot(cameras={"top": (40, 40), "wrist": (30, 30)}))
    plan = runner._image_plan({"observation.images.wrist": (16, 16), "cam_high": (8, 8)})
    assert plan == {"observation.images.wrist": ("wrist", (16, 16)), "cam_high": ("top", (8, 8))}
    with pytest.raises(ValueError, match="robot cameras"):
        runner._image_plan({"a": (8, 8), "b": (8, 8), "c": (8, 8)})


def test_parse_camera():
    assert _parse_camera("front=0:640x480") == ("front", {"index_or_path": 0, "width": 640,
                                                          "height": 480, "fps": 30})
    assert _parse_camera("wrist=/dev/video2:320x240@15")[1]["index_or_path"] == "/dev/video2"
    with pytest.raises(Exception, match="KEY=INDEX_OR_PATH"):
        _parse_camera("front")


class BackendEpisode:
    """In-process stand-in for the server side that runs the *real* demo VLA backend (untrained),
    so the arm client's observation plumbing is checked against a real model contract: state
    (1, 6) float32, camera (1, H, W, 3) uint8 at the spec size, chunk (T, 6)."""

    def __init__(self, instruction):
        torch = pytest.importorskip("torch", reason="the robot-side environment may run without torch")
        from policy_server.models.base import ObservationBatch
        from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig

        cfg = DemoVLAConfig(state_dim=J, action_dim=J, chunk_length=6, hidden_dim=32, mlp_dim=64,
                            cameras={"front": [32, 32]}, action_low=[-100.0] * J,
                            action_high=[100.0] * J, action_std=[5.0] * J, state_std=[50.0] * J)
        self.backend = DemoVLABackend(cfg)
        self.spec, self.skill = self.backend.spec, None
        self._torch, self._batch, self.instruction = torch, ObservationBatch, instruction
        self.n = 0
        # warm up (first forward pays torch's lazy init) so latencies are representative
        self.infer(np.zeros(J, np.float32), {"front": np.zeros((32, 32, 3), np.uint8)})
        self.n = 0

    def infer(self, state, images=None, encode="raw"):
        batch = self._batch(state=state[None], instructions=[self.instruction],
                            images={k: v[None] for k, v in (images or {}).items()})
        with self._torch.inference_mode():
            out = self.backend.predict(batch)[0].numpy()
        self.n += 1
        return np.clip(out, self.spec.action_low, self.spec.action_high)


def test_runner_with_real_demo_vla_backend():
    ep = BackendEpisode("pick up the cube")
    robot = FakeRobot(cameras={"front": (120, 160)})
    runner = ArmPolicyRunner(ClientDouble(ep), robot,
                             ArmRunConfig("pick up the cube", hz=30, max_steps=60),
                             SafetyConfig(*default_limits(SO101_MOTORS), max_delta=2.0))
    rep = runner.run()
    assert rep.stop_reason == "done", rep.error
    # every received chunk came from the model; at most the last request is still in flight
    assert ep.n >= rep.chunks >= 3 and rep.requests - rep.chunks <= 1
    cmds = np.array(robot.send_log)
    assert np.all(np.isfinite(cmds)) and cmds.shape[1] == J
    assert np.abs(np.diff(cmds[:-1], axis=0)).max() <= 2.0 + 1e-6


def test_cli_fake_robot(monkeypatch, capsys):
    """CLI wiring: argument parsing, FakeRobot with a camera, PolicyClient construction, JSON report
    and exit code (the client library is replaced by the double so no server is needed)."""
    import json

    from clients import so101_client

    made = {}

    def fake_policy_client(target, token=None, tls_root_cert=None, timeout=None, **kw):
        made.update(target=target, token=token, timeout=timeout)
        return ClientDouble(EpisodeDouble([5.0] * J, chunk=6,
                                          images={"front": SimpleNamespace(height=24, width=24)}))

    monkeypatch.setattr(so101_client, "PolicyClient", fake_policy_client)
    monkeypatch.setenv("CARVE_TOKEN", "s3cret")
    rc = so101_client.main(["--server", "10.0.0.2:50051", "--robot", "fake", "--instruction", "go",
                            "--hz", "50", "--max-steps", "25", "--camera", "front=0:64x48",
                            "--blend", "latest_only", "--timeout", "1.5"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["stop_reason"] == "done" and out["steps"] == 25
    assert made == {"target": "10.0.0.2:50051", "token": "s3cret", "timeout": 1.5}


# --------------------------------------------------------------- real gRPC service on loopback

def _demo_engine(delay_s=0.0):
    """A ``PolicyEngine`` over a real (untrained) demo VLA with an SO-101-shaped spec, served by the
    real ``PolicyServer``; ``delay_s`` slows inference (to kill the server mid-request)."""
    from policy_server.service.engine_api import PolicyEngine
    from router.base import RouteDecision

    backend = BackendEpisode("pick up the cube").backend

    class Engine(PolicyEngine):
        spec = backend.spec

        def skills(self):
            return [{"name": "pick", "instructions": ["pick up the cube"], "description": "",
                     "order": 0}]

        def route(self, instruction, observation=None):
            return RouteDecision("pick", 1.0, [("pick", 1.0)], margin=1.0, router="test")

        def infer(self, observation, skill):
            import torch

            time.sleep(delay_s)
            with torch.inference_mode():
                return backend.predict(observation)[0].numpy()

    return Engine()


def _serve(engine):
    from policy_server.service.server import PolicyServer, ServerConfig

    server = PolicyServer(engine, ServerConfig(host="127.0.0.1", port=0))
    return server, server.start()


def test_runner_over_real_grpc_loopback():
    from carve_client import PolicyClient

    server, port = _serve(_demo_engine())
    try:
        client = PolicyClient(f"127.0.0.1:{port}", timeout=5.0)
        client.wait_ready(10)
        robot = FakeRobot(cameras={"front": (120, 160)})
        runner = ArmPolicyRunner(client, robot, ArmRunConfig("pick up the cube", hz=30,
                                                             max_steps=45, encode="jpeg"),
                                 SafetyConfig(*default_limits(SO101_MOTORS), max_delta=2.0))
        rep = runner.run()
        assert rep.stop_reason == "done", rep.error
        assert rep.skill == "pick" and rep.chunks >= 4 and rep.latency_max_s < 1.0
        assert not robot.is_connected
        client.close()
    finally:
        server.stop(grace=0)


def test_runner_stops_safely_when_server_killed_mid_run():
    from carve_client import PolicyClient

    server, port = _serve(_demo_engine(delay_s=0.05))
    client = PolicyClient(f"127.0.0.1:{port}", timeout=2.0, retries=0)
    robot = FakeRobot(cameras={"front": (60, 80)})
    runner = ArmPolicyRunner(client, robot, ArmRunConfig("pick up the cube", hz=30,
                                                         max_steps=10_000, request_timeout_s=1.0),
                             SafetyConfig(*default_limits(SO101_MOTORS), max_delta=2.0))
    result = {}
    t = threading.Thread(target=lambda: result.update(rep=runner.run()))
    t.start()
    time.sleep(1.5)
    server.stop(grace=0)  # the server goes away while the arm is moving
    t.join(15)
    assert not t.is_alive()
    rep = result["rep"]
    assert rep.stop_reason in ("server_lost", "timeout", "starved"), rep
    assert 10 < rep.steps < 10_000 and rep.chunks > 0
    assert not robot.is_connected
    assert np.allclose(robot.send_log[-1], robot.pos, atol=3.0)  # last command = hold
    client.close()
