"""Malformed observations and request bytes get typed statuses naming the field, decided before
anything large is allocated; a decompression bomb is refused from its header (the server's peak
memory is measured). A real server on loopback over a real merge state."""

from __future__ import annotations

import struct
import zlib

import grpc
import numpy as np
import pytest
from carve_client import PolicyClient, PolicyError
from carve_client.codec import encode_image, encode_tensor, observation_proto
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc

from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.serving import EngineConfig, build_engine
from serving_utils import ServeProcess, make_stack

CAM = {"front": [16, 16]}
LIMIT = 1_000_000
INV, RES = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
IMG = "observation.images['front']"


def png(width: int, height: int, body: bytes | None = None, bit_depth: int = 8,
        color: int = 2) -> bytes:
    """A PNG declaring ``width`` x ``height``; ``body`` is the raw (unfiltered) pixel stream,
    all-zero rows when None (a 1-bit grayscale 20000x20000 one is a 48 KB bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    if body is None:
        bpp = {0: 1, 2: 3}[color]
        row = b"\x00" * (1 + (width * bpp * bit_depth + 7) // 8)
        comp = zlib.compressobj(9)
        body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    else:
        body = zlib.compress(body)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def jpeg_header(width: int, height: int) -> bytes:
    """SOI + a baseline SOF0 declaring ``width`` x ``height`` + a few bytes: no real image."""
    sof = struct.pack(">BBHBHHB", 0xFF, 0xC0, 17, 8, height, width, 3) + b"\x01\x22\x00" * 3
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x02" + b"\x00" * 32 + b"\xff\xd9"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return make_stack(tmp_path_factory.mktemp("stack"), cameras=CAM)


@pytest.fixture(scope="module")
def port(stack):
    cfg = EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]), router="exact")
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(port=0, max_image_pixels=LIMIT))
    yield server.start()
    server.stop(1.0)


def _state():
    return encode_tensor(np.zeros(39, np.float32))


def _episode(port, *observations, start=None):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        reqs = [pb.EpisodeRequest(start=start or pb.EpisodeStart(skill="drawer"))]
        reqs += [pb.EpisodeRequest(observation=o) for o in observations]
        return list(pb_grpc.PolicyServiceStub(ch).Episode(iter(reqs), timeout=30))
    finally:
        ch.close()


def _image_obs(image: pb.Image) -> pb.Observation:
    return pb.Observation(state=_state(), images={"front": image})


GOOD = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
IMAGE_CASES = {
    "empty bytes": (pb.Image(encoded=b"", format="png"), INV, "empty"),
    "png 100000x100000": (pb.Image(encoded=png(100000, 100000, b"\x00" * 64)), RES, "exceeds"),
    "jpeg 60000x60000": (pb.Image(encoded=jpeg_header(60000, 60000)), RES, "exceeds"),
    "png 0x16": (pb.Image(encoded=png(0, 16, b"")), INV, "0x16"),
    "jpeg of another size": (encode_image(np.zeros((32, 32, 3), np.uint8), "jpeg"), INV,
                             "expected 16x16"),
    "corrupt jpeg body": (pb.Image(encoded=jpeg_header(16, 16)), INV, "decode"),
    "truncated png": (pb.Image(encoded=encode_image(GOOD, "png").encoded[:40]), INV, "decode"),
    "png without IHDR": (pb.Image(encoded=b"\x89PNG\r\n\x1a\n" + b"\x00" * 30), INV, "IHDR"),
    "bmp": (pb.Image(encoded=b"BM" + b"\x00" * 100), INV, "neither JPEG nor PNG"),
    "random bytes": (pb.Image(encoded=bytes(range(256)) * 4), INV, "neither JPEG nor PNG"),
    "no payload": (pb.Image(format="raw"), INV, "neither raw nor encoded"),
    "raw overflowing shape": (pb.Image(raw=pb.Tensor(dtype="uint8",
                                                     shape=[2 ** 32, 2 ** 32, 3])), RES, "exceeds"),
    "raw float image": (pb.Image(raw=encode_tensor(np.zeros((16, 16, 3), np.float32))), INV,
                        "uint8 HWC"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_images_are_typed_and_name_the_camera(port, case):
    image, code, text = IMAGE_CASES[case]
    with pytest.raises(grpc.RpcError) as e:
        _episode(port, _image_obs(image))
    assert e.value.code() == code, e.value.details()
    assert IMG in e.value.details() and text in e.value.details(), e.value.details()


STATE_CASES = {
    "overflowing shape, no data": (pb.Tensor(dtype="float32", shape=[2 ** 32, 2 ** 32]), "bytes"),
    "too many dims": (pb.Tensor(dtype="float32", shape=[1] * 9, data=b"\x00" * 4), "dimensions"),
    "negative dim": (pb.Tensor(dtype="float32", shape=[-39]), "negative"),
    "float64 1e300": (encode_tensor(np.full(39, 1e300)), "overflows float32"),
    "long dtype name": (pb.Tensor(dtype="x" * 5000, shape=[39]), "unsupported dtype"),
    "int state": (encode_tensor(np.zeros(39, np.int64)), "dtype int64"),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_bad_states_are_refused_at_the_wire_naming_the_field(port, case):
    tensor, text = STATE_CASES[case]
    obs = pb.Observation(state=tensor, images={"front": encode_image(GOOD)})
    with pytest.raises(grpc.RpcError) as e:
        _episode(port, obs)
    assert e.value.code() == INV, e.value.details()
    assert "observation.state" in e.value.details() and text in e.value.details()
    assert len(e.value.details()) < 400  # values are echoed with a bounded length


@pytest.mark.parametrize("method,request_cls", [
    ("Episode", "EpisodeRequest"), ("ListSkills", "ListSkillsRequest"),
    ("Route", "RouteRequest"), ("ServerInfo", "ServerInfoRequest")])
def test_undecodable_request_bytes_are_invalid_argument(port, method, request_cls):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    kind = ch.stream_stream if method == "Episode" else ch.unary_unary
    call = kind(f"/carve.policy.v1.PolicyService/{method}", request_serializer=lambda b: b,
                response_deserializer=lambda b: b)
    garbage = b"\xff\xff\xff\x0f not a protobuf"
    with pytest.raises(grpc.RpcError) as e:
        if method == "Episode":
            list(call(iter([garbage]), timeout=20))
        else:
            call(garbage, timeout=20)
    ch.close()
    assert e.value.code() == INV, e.value.details()
    assert f"do not parse as carve.policy.v1.{request_cls}" in e.value.details()


def test_long_values_are_echoed_bounded(port):
    """A 10k-character unknown skill id used to be echoed whole; the client then saw
    RESOURCE_EXHAUSTED "metadata size exceeds soft limit" instead of NOT_FOUND."""
    client = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=20)
    try:
        with pytest.raises(PolicyError) as e:
            client.episode("", skill="s" * 10_000)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert "start.skill" in e.value.details and len(e.value.details) < 400
        with pytest.raises(PolicyError) as e:
            with client.episode("", skill="drawer") as ep:
                ep.infer(np.zeros(39, np.float32), {"front": GOOD, "k" * 10_000: GOOD})
        assert e.value.code == INV and "unknown camera" in e.value.details
        assert len(e.value.details) < 400
    finally:
        client.close()


def test_route_and_start_observations_are_checked_the_same_way(port):
    client = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=20)
    try:
        with pytest.raises(PolicyError) as e:
            client.route("open the top drawer", np.full(39, 1e30, np.float32), {"front": GOOD})
        assert e.value.code == INV and "observation.state" in e.value.details
        with pytest.raises(PolicyError) as e:
            client.episode("open the top drawer", first_state=np.zeros(39, np.float32),
                           first_images={"front": np.zeros((8, 8, 3), np.uint8)})
        assert e.value.code == INV and "start.first_observation.images['front']" in \
            e.value.details
    finally:
        client.close()
    with pytest.raises(grpc.RpcError) as e:
        _episode(port, start=pb.EpisodeStart(skill="drawer", chunk_length=2 ** 31))
    assert e.value.code() == INV and "start.chunk_length" in e.value.details()


def test_decompression_bomb_is_refused_from_its_header_without_decoding(stack):
    """A 48 KB PNG declaring 20000x20000 (1.2 GB decoded) is refused with RESOURCE_EXHAUSTED and
    the server's peak resident memory grows by less than one decoded image of the limit (before:
    +2.2 GB). Measured on a `carve serve` process with the default limit of 4096x4096."""
    bomb = png(20000, 20000, bit_depth=1, color=0)
    assert len(bomb) < 100_000
    limit_bytes = 4096 * 4096 * 3
    with ServeProcess(stack) as srv:
        client = PolicyClient(srv.target, retries=0, timeout=30)
        with client.episode("", skill="drawer") as ep:  # warm up every code path once
            ep.infer(np.zeros(39, np.float32), {"front": GOOD}, encode="png")
        before = srv.memory_kb("VmHWM")
        ch = grpc.insecure_channel(srv.target)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                _call_episode(ch, pb.Observation(state=_state(), images={
                    "front": pb.Image(encoded=bomb, format="png")}))
            assert e.value.code() == RES and IMG in e.value.details()
            assert "20000x20000" in e.value.details()
        ch.close()
        grown = (srv.memory_kb("VmHWM") - before) * 1024
        client.close()
    print(f"peak RSS growth while refusing the bomb 3 times: {grown / 2**20:.1f} MiB")
    assert grown < limit_bytes, grown


def _call_episode(ch, obs):
    reqs = [pb.EpisodeRequest(start=pb.EpisodeStart(skill="drawer")),
            pb.EpisodeRequest(observation=obs)]
    return list(pb_grpc.PolicyServiceStub(ch).Episode(iter(reqs), timeout=30))


def test_observation_proto_round_trip_still_decodes(port):
    """The safe decoder still serves every encoding the client sends."""
    client = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=20)
    try:
        with client.episode("", skill="drawer") as ep:
            outs = [ep.infer(np.zeros(39, np.float32), {"front": GOOD}, encode=enc)
                    for enc in ("raw", "png")]
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
        assert observation_proto(np.zeros(39), {"front": GOOD}, 0).state.dtype == "float32"
    finally:
        client.close()


def test_state_bound_comes_from_the_model_statistics_where_it_has_them():
    """mean/std: at most `state_sigma` standard deviations from the mean (a constant dimension,
    std 0, falls back to the absolute bound); min/max: the range widened by `state_sigma` ranges;
    no statistics: |x| <= state_abs. 0 / None switches a bound off."""
    from carve_client.codec import WireError

    from policy_server.models.base import PolicySpec
    from policy_server.service.validation import InputLimits, ObservationDecoder

    def spec(norm):
        return PolicySpec(state_dim=3, action_dim=1, chunk_length=1, action_low=[-1.0],
                          action_high=[1.0], normalization=norm)

    def obs(values):
        return pb.Observation(state=encode_tensor(np.asarray(values, np.float32)))

    limits = InputLimits(state_sigma=10.0, state_abs=1e6)
    d = ObservationDecoder(spec({"state_mean": [100.0, 0.0, 5.0],
                                 "state_std": [2.0, 1.0, 0.0]}), limits)
    assert d.state(obs([119.0, -9.0, 9e5]), "observation").shape == (3,)
    with pytest.raises(WireError, match=r"observation.state: element 0 = 121 .*\[80, 120\]"):
        d.state(obs([121.0, 0.0, 5.0]), "observation")
    with pytest.raises(WireError, match="element 2 = 2e"):
        d.state(obs([100.0, 0.0, 2e6]), "observation")
    d = ObservationDecoder(spec({"state_min": [0.0] * 3, "state_max": [1.0] * 3}), limits)
    assert d.state(obs([10.4, -9.9, 0.5]), "o").shape == (3,)
    with pytest.raises(WireError, match="element 1"):
        d.state(obs([0.5, -10.6, 0.5]), "o")
    d = ObservationDecoder(spec({}), limits)
    with pytest.raises(WireError, match=r"\|state\| <= 1e\+06"):
        d.state(obs([0.0, 2e6, 0.0]), "o")
    off = ObservationDecoder(spec({}), InputLimits(state_sigma=None, state_abs=None))
    assert off.state(obs([1e30, 0.0, 0.0]), "o")[0] == np.float32(1e30)
    with pytest.raises(WireError, match="NaN or inf"):
        off.state(obs([np.inf, 0.0, 0.0]), "o")


def test_state_less_policy_gets_bounds_without_statistics():
    """A policy with state_dim 0 (plain OpenVLA) used to raise KeyError('state_mean') here: empty
    statistics "matched" its zero-length state."""
    from policy_server.models.base import PolicySpec
    from policy_server.service.validation import InputLimits, state_bounds

    spec = PolicySpec(state_dim=0, action_dim=7, chunk_length=1, action_low=[-1.0] * 7,
                      action_high=[1.0] * 7)
    low, high, _ = state_bounds(spec, InputLimits())
    assert low.shape == high.shape == (0,)
