"""Cameras of another size than the spec's: an engine that resizes (``resizes_images``, the
LeRobot backend) gets them resized to the spec's size before batching, bilinear as torch's
``interpolate(align_corners=False)``, and says so in the episode's notes; an engine that does not
keeps refusing them (INVALID_ARGUMENT naming the camera); an over-limit image is refused from its
header either way. Real servers on loopback over a real merge state (the demo VLA, made to
resize), plus one served tiny LeRobot ACT policy where LeRobot is installed."""

from __future__ import annotations

import asyncio
import struct

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from carve_client import AsyncPolicyClient, PolicyClient, PolicyError
from carve_client.codec import encode_image, encode_tensor

from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.service.validation import resize_bilinear
from policy_server.serving import EngineConfig, build_engine
from serving_utils import make_stack

H, W = 12, 20  # the spec's camera size (not square: a swapped height/width would show)
BIG = (18, 50)  # what the robot's camera sends (scales 1.5 and 2.5)
LEROBOT_BIG = (48, 64)  # the ACT test's camera; its feature is 32x32 (lerobot_utils.IMG)
LIMIT = 100_000
STATE = np.zeros(39, np.float32)


def torch_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference: torch bilinear (align_corners=False) on the float image -> float HWC."""
    t = torch.from_numpy(img).permute(2, 0, 1)[None].to(torch.float32)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].permute(
        1, 2, 0).numpy()


def reference_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``torch_resize`` rounded to uint8 (the wire's and the backends' image dtype)."""
    return np.clip(np.rint(torch_resize(img, size)), 0, 255).astype(np.uint8)


def camera(seed: int, hw: tuple[int, int] = BIG) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.mark.parametrize("src,dst", [((30, 44), (12, 20)), ((12, 20), (30, 44)),
                                     ((7, 5), (3, 9)), ((1, 1), (4, 3)), ((480, 640), (256, 256))])
def test_resize_matches_torch_bilinear(src, dst):
    """The numpy resize is torch's float bilinear up to the rounding to uint8, and within one
    grey level of torch's uint8 kernel (what LeRobot's async server runs on the camera image)."""
    img = camera(1, src)
    mine = resize_bilinear(img, *dst)
    assert mine.shape == (*dst, 3) and mine.dtype == np.uint8 and mine.flags["C_CONTIGUOUS"]
    assert np.abs(mine.astype(np.float64) - torch_resize(img, dst)).max() <= 0.5 + 1e-3
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    lerobot = F.interpolate(t, size=dst, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    assert np.abs(mine.astype(int) - lerobot.numpy().astype(int)).max() <= 1


def _serve(stack, resizes: bool):
    def factory():
        engine = build_engine(EngineConfig(base_dir=str(stack["base"]),
                                           state_dir=str(stack["state"]), router="exact"))
        # the demo VLA made a resizing backend, as the LeRobot backend is
        engine.runtime.backend.resizes_images = resizes
        return engine
    server = PolicyServer(factory, ServerConfig(port=0, max_image_pixels=LIMIT))
    port = server.start()
    client = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=30)
    client.wait_ready(60)
    return server, client


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return make_stack(tmp_path_factory.mktemp("stack"), cameras={"front": [H, W]})


@pytest.fixture(scope="module")
def resizing(stack):
    server, client = _serve(stack, True)
    yield client
    client.close()
    server.stop(1.0)


@pytest.fixture(scope="module")
def strict(stack):
    server, client = _serve(stack, False)
    yield client
    client.close()
    server.stop(1.0)


def _actions(client, img: np.ndarray, encode: str = "raw"):
    with client.episode("open the drawer", skill="drawer") as ep:
        return ep.infer(STATE, {"front": img}, encode=encode), ep.notes, ep.last_notes


def test_reference_is_what_the_server_computes():
    """The end-to-end comparisons below are exact because, for these size pairs, the numpy resize
    equals the rounded torch reference pixel for pixel (in general the two agree to float32
    rounding, which can tip a value lying exactly on .5 to the other grey level)."""
    for seed in range(2, 6):
        np.testing.assert_array_equal(resize_bilinear(camera(seed), H, W),
                                      reference_resize(camera(seed), (H, W)))
    np.testing.assert_array_equal(resize_bilinear(camera(6, LEROBOT_BIG), 32, 32),
                                  reference_resize(camera(6, LEROBOT_BIG), (32, 32)))


@pytest.mark.parametrize("encode", ["raw", "png"])
def test_other_size_is_resized_and_noted(resizing, encode):
    big = camera(2)
    actions, notes, last = _actions(resizing, big, encode)
    ref, ref_notes, ref_last = _actions(resizing, reference_resize(big, (H, W)))
    np.testing.assert_array_equal(actions, ref)
    assert any("resized" in n and "bilinear" in n for n in notes) and notes == ref_notes
    assert last == [f"camera 'front': {BIG[0]}x{BIG[1]} resized to {H}x{W} (bilinear)"]
    assert ref_last == []  # sent at the spec's size: used as sent, nothing to say


def test_first_observation_resize_is_in_the_start_notes(resizing):
    with resizing.episode("open the drawer", skill="drawer", first_state=STATE,
                          first_images={"front": camera(3)}) as ep:
        assert f"camera 'front': {BIG[0]}x{BIG[1]} resized to {H}x{W} (bilinear)" in ep.notes


def test_async_client_exposes_the_notes(resizing):
    async def run():
        async with AsyncPolicyClient(resizing.target, retries=0, timeout=30) as client:
            async with client.episode("open the drawer", skill="drawer") as ep:
                actions = await ep.infer(STATE, {"front": camera(4)})
                return actions, ep.notes, ep.last_notes

    actions, notes, last = asyncio.run(run())
    assert actions.shape[0] > 0 and notes and last[0].startswith("camera 'front'")


def test_non_resizing_engine_still_refuses_other_sizes(strict):
    for encode in ("raw", "png"):
        with pytest.raises(PolicyError) as e:
            _actions(strict, camera(5), encode)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "observation.images['front']" in e.value.details
    _, notes, last = _actions(strict, camera(5, (H, W)))
    assert notes == [] and last == []


def _png_header(width: int, height: int) -> bytes:
    """PNG magic + an IHDR declaring ``width`` x ``height`` and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\x00" * 4


@pytest.mark.parametrize("client_name", ["resizing", "strict"])
def test_over_limit_image_is_refused_from_its_header(request, client_name):
    client = request.getfixturevalue(client_name)
    bomb = encode_image(np.zeros((1, 1, 3), np.uint8), "raw")
    bomb.ClearField("raw")
    bomb.encoded, bomb.format = _png_header(20_000, 20_000), "png"
    raw = encode_image(np.zeros((1, 1, 3), np.uint8), "raw")
    raw.raw.CopyFrom(encode_tensor(np.zeros(3, np.uint8)))
    del raw.raw.shape[:]
    raw.raw.shape.extend([5000, 5000, 3])  # declares 25 M pixels, carries 3 bytes
    for img in (bomb, raw):
        with pytest.raises(PolicyError) as e:
            _send(client, img)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details
        assert "exceeds the server's limit" in e.value.details


def _send(client, image_msg):
    """One episode whose observation carries ``image_msg`` as camera 'front'."""
    from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
    from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(client.target)
    try:
        obs = pb.Observation(step=0, state=encode_tensor(STATE), images={"front": image_msg})
        reqs = [pb.EpisodeRequest(start=pb.EpisodeStart(skill="drawer")),
                pb.EpisodeRequest(observation=obs)]
        list(pb_grpc.PolicyServiceStub(ch).Episode(iter(reqs), timeout=30))
    except grpc.RpcError as e:
        raise PolicyError.from_rpc(e) from None
    finally:
        ch.close()


def test_lerobot_act_policy_resizes_a_camera_of_another_size(tmp_path):
    """A served tiny ACT policy: a camera of another size gets actions, the note, and
    the actions of the same image resized by the reference and sent at the feature size."""
    pytest.importorskip("lerobot", reason="LeRobot is an optional backend")
    from lerobot_utils import IMG, SD, build_family

    fam = build_family(tmp_path, "act", n_experts=1, steps=1)
    server = PolicyServer(lambda: build_engine(EngineConfig(
        base_dir=str(fam["base"]), router="exact", abstain="core-only")), ServerConfig(port=0))
    port = server.start()
    try:
        with PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=60) as client:
            client.wait_ready(60)
            assert IMG == 32  # LEROBOT_BIG's exactness is checked above for 32x32
            big = camera(6, LEROBOT_BIG)
            state = np.linspace(-1, 1, SD).astype(np.float32)

            def run(img):
                with client.episode("pick up the cube") as ep:
                    return ep.infer(state, {"front": img}), ep.notes, ep.last_notes

            actions, notes, last = run(big)
            ref, _, ref_last = run(reference_resize(big, (IMG, IMG)))
    finally:
        server.stop(1.0)
    assert np.isfinite(actions).all()
    np.testing.assert_allclose(actions, ref, rtol=1e-6, atol=1e-6)
    h, w = LEROBOT_BIG
    assert notes and ref_last == []
    assert last == [f"camera 'front': {h}x{w} resized to {IMG}x{IMG} (bilinear)"]
