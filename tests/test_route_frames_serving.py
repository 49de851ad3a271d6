"""First-frame routing through the real pieces: skills admitted by ``carve admit --frames`` (the
CLI's ``main`` in this process, so the sentence embedder is loaded once), a real merge state, a
real ``PolicyServer`` on loopback serving ``build_engine`` with the hybrid router in descriptor
mode, and the real ``PolicyClient.episode(..., first_state=..., first_images=...)``.

Both skills are admitted with the *same* instruction, so the text cannot choose: only the first
frame can. The scenes are the synthetic LIBERO-spatial-like tables of test_route_frames (same
objects, the bowl somewhere else per task), with held-out init-state jitter at query time.

The LIBERO client's part (``run_suite`` opening the episode with the first frame) runs the real
simulator and is in the slow suite.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from carve_client import PolicyClient, PolicyError
from serving_utils import make_stack
from test_route_frames import SIDE, scene

from policy_server.cli import main as carve_main
from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.serving import EngineConfig, build_engine
from policy_server.state.store import StateStore
from router.descriptor import KEY_OBS_DESCRIPTORS

SAME = "pick up the black bowl and place it on the plate"  # both skills: text cannot decide
SKILLS = {"bowl_left": [SAME], "bowl_on_box": [SAME]}
CAMERA = "agentview"


def _carve(capsys, *args) -> tuple[int, str]:
    """``carve ARGS`` through the CLI's main -> (exit code, stderr)."""
    capsys.readouterr()
    rc = carve_main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _write_frames(path, task: str, rng, n: int = 3, camera: str = CAMERA, dtype=np.uint8):
    """n jittered first frames of ``task``: one npz, camera -> uint8 (n, SIDE, SIDE, 3)."""
    np.savez(path, **{camera: np.stack([scene(task, rng) for _ in range(n)]).astype(dtype)})
    return path


@pytest.fixture(scope="module")
def admitted(tmp_path_factory):
    """A demo base with one 96x96 camera, two experts, both admitted with --frames."""
    root = tmp_path_factory.mktemp("frames_e2e")
    stack = make_stack(root, cameras={CAMERA: [SIDE, SIDE]}, skills=SKILLS, rank=4, admitted=0)
    rng = np.random.default_rng(10)
    (root / "frames_left").mkdir()
    # one skill's frames as a directory of npz files, the other's as one file
    for i in range(2):
        _write_frames(root / "frames_left" / f"f{i}.npz", "bowl_left", rng, n=2)
    box = _write_frames(root / "frames_box.npz", "bowl_on_box", rng)
    frames = {"bowl_left": root / "frames_left", "bowl_on_box": box}
    return stack, frames, root


def test_admit_frames_bad_input_exits_2(admitted, capsys, tmp_path):
    stack, _, _ = admitted
    state = tmp_path / "state"
    rng = np.random.default_rng(11)
    bad = {
        "missing": (tmp_path / "nope.npz", "no such file"),
        "float": (_write_frames(tmp_path / "f.npz", "bowl_left", rng, dtype=np.float32),
                  "expected uint8"),
        "shape": (tmp_path / "s.npz", "has shape"),
        "camera": (_write_frames(tmp_path / "c.npz", "bowl_left", rng, camera="front"),
                   "not in the base's spec"),
        "empty_dir": (tmp_path / "empty", "no .npz files"),
    }
    np.savez(bad["shape"][0], **{CAMERA: np.zeros((2, SIDE, SIDE), np.uint8)})
    (tmp_path / "empty").mkdir()
    for what, (path, msg) in bad.items():
        rc, err = _carve(capsys, "admit", state, "--base", stack["base"], "--expert",
                         stack["experts"]["bowl_left"], "--skill", "bowl_left",
                         "--instruction", SAME, "--frames", path, "--no-progress", "--rank", "4")
        assert rc == 2, (what, err)
        assert msg in err and len(err.strip().splitlines()) == 1, (what, err)
    # a base whose spec cannot be read (no recognised model_type): no camera to check against
    odd = tmp_path / "odd_base"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "not_a_backend"}')
    rc, err = _carve(capsys, "admit", state, "--base", odd, "--expert",
                     stack["experts"]["bowl_left"], "--skill", "bowl_left", "--frames",
                     _write_frames(tmp_path / "ok.npz", "bowl_left", rng), "--no-progress")
    assert rc == 2 and "cannot read the camera names" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not state.exists()  # refused before anything was written


def test_frames_route_episodes_through_server_and_client(admitted, capsys):
    stack, frames, root = admitted
    for skill, path in frames.items():
        rc, err = _carve(capsys, "admit", stack["state"], "--base", stack["base"], "--expert",
                         stack["experts"][skill], "--skill", skill, "--instruction", SAME,
                         "--frames", path, "--no-progress", "--rank", "4")
        assert rc == 0, err
    with StateStore(stack["state"]).open() as snap:
        assert snap.skill_artifacts("bowl_left")[KEY_OBS_DESCRIPTORS].shape[0] == 4  # 2 files x 2
        assert snap.skill_artifacts("bowl_on_box")[KEY_OBS_DESCRIPTORS].shape[0] == 3

    cfg = EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]),
                       router="hybrid", router_options={"observation": "descriptor"})
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(port=0))
    port = server.start()
    try:
        with PolicyClient(f"127.0.0.1:{port}", timeout=60.0) as client:
            client.wait_ready(120)
            spec = client.server_info()["spec"]
            assert sorted(spec.images) == [CAMERA]
            state0 = np.zeros(spec.state_dim, np.float32)
            rng = np.random.default_rng(12)  # held-out jitter: no registered frame
            for want in ("bowl_left", "bowl_on_box", "bowl_left", "bowl_on_box"):
                img = scene(want, rng)
                with client.episode(SAME, first_state=state0, first_images={CAMERA: img}) as ep:
                    assert ep.skill == want, ep.route
                    assert ep.confidence > 0.5 + 0.05, ep.route  # text alone gives 0.5
                    assert "obs-descriptor" in ep.route["reason"], ep.route
                    chunk = ep.infer(state0, {CAMERA: img})
                    assert chunk.shape == (spec.chunk_length, spec.action_dim)
            # the same instruction without the frame: identical instructions split the text
            # 50/50, the router abstains and the server refuses the episode
            d = client.route(SAME)
            assert d["skill"] is None and "no observation: text only" in d["reason"], d
            with pytest.raises(PolicyError, match="abstained"):
                with client.episode(SAME):
                    pass
            # images without a state are sent, not dropped: this model needs its state, so the
            # server names the missing field instead of routing on text alone
            with pytest.raises(PolicyError, match=r"start\.first_observation\.state") as exc:
                with client.episode(SAME, first_images={CAMERA: scene("bowl_left", rng)}):
                    pass
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(grace=0)


def test_spec_camera_names_match_the_loaded_backends(admitted, tmp_path):
    """``carve admit --frames`` checks cameras against names read from config.json (no weights
    loaded); they must be the names the loaded backend's spec serves."""
    from policy_server.cli.admit import spec_camera_names
    from policy_server.models.openvla.tiny import make_checkpoint
    from policy_server.models.registry import load_backend

    stack, _, _ = admitted
    bases = [stack["base"], make_checkpoint(tmp_path / "openvla")]
    try:
        import lerobot_utils as lu
        from lerobot.policies.act.modeling_act import ACTPolicy
    except ImportError:  # LeRobot is optional (requirements-lerobot.txt)
        pass
    else:
        cams = ("front", "wrist")
        bases.append(lu.save_policy(ACTPolicy(lu.make_config("act", cameras=cams)),
                                    lu.make_stats(0, cameras=cams), tmp_path / "act"))
    for base in bases:
        assert spec_camera_names(base) == sorted(load_backend(base).spec.images), base
