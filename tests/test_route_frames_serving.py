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
                    assert ep.route["router"].startswith("hybrid") or ep.route["router"], ep.route
                    chunk = ep.infer(state0, {CAMERA: img})
                    assert chunk.shape == (spec.chunk_length, spec.action_dim)
            # the same instruction without the frame: the text alone is a coin toss between the
            # two skills (identical instructions), so the router cannot route it by the frame
            d = client.route(SAME)
            assert d["reason"] == "no observation: text only", d
            try:
                with client.episode(SAME) as ep:
                    text_only = (ep.skill, ep.confidence)
            except PolicyError as e:  # abstained and refused: also "not decided by a frame"
                text_only = (None, str(e))
            with client.episode(SAME, first_state=state0,
                                first_images={CAMERA: scene("bowl_on_box", rng)}) as ep:
                assert ep.skill == "bowl_on_box" and ep.confidence > text_only[1] \
                    if isinstance(text_only[1], float) else ep.skill == "bowl_on_box"
    finally:
        server.stop(grace=0)
