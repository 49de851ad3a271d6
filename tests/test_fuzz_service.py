"""Seeded fuzzing of every PolicyService RPC and every request field against `carve serve` (a real
subprocess over a real merge state with a camera): no request may get UNKNOWN or INTERNAL, every
refusal names the mutated field, the server stays healthy and its resident memory stays flat."""

from __future__ import annotations

import struct
import time
from collections import Counter

import grpc
import numpy as np
from carve_client import PolicyClient
from carve_client.codec import encode_image, encode_tensor
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving_utils import ServeProcess, make_stack

N_CASES = 1200
SEED = 11
RSS_BOUND_MB = 64  # resident growth allowed after warm-up (allocator slack, grpc buffers)
BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
CAM = {"front": [16, 16]}
# what a refusal of an Episode stream whose messages are arbitrary names: the bytes, the message
# kind or a field of the start / observation message
ANY_EPISODE_FIELD = ("request:", "EpisodeStart", "message", "start.", "observation")
DTYPE_NAMES = ["float32", "float64", "float16", "uint8", "int32", "int64", "", "bool",
               "float8", "complex64", "x" * 300]


class Gen:
    """Seeded generator of valid and mutated request parts; each mutation returns the field
    name a refusal must mention."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.img = self.rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        self.png = encode_image(self.img, "png").encoded
        self.jpeg = encode_image(self.img, "jpeg").encoded

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def text(self, n_max: int = 64) -> str:
        n = int(self.rng.integers(0, n_max))
        return "".join(chr(int(c)) for c in self.rng.integers(32, 0x2FFF, n))

    def shape(self) -> list[int]:
        dims = int(self.rng.integers(0, 11))
        pool = [0, 1, 3, 16, 39, 2 ** 31, 2 ** 32, 2 ** 62, -1, -(2 ** 40)]
        return [self.pick(pool) for _ in range(dims)]

    def tensor(self) -> pb.Tensor:
        kind = int(self.rng.integers(4))
        if kind == 0:  # random dtype/shape/data
            return pb.Tensor(dtype=self.pick(DTYPE_NAMES), shape=self.shape(),
                             data=self.rng.bytes(int(self.rng.integers(0, 400))))
        if kind == 1:  # right size, wild values
            vals = self.pick([np.nan, np.inf, -np.inf, 1e30, -1e38, 1e300, 1e5, 0.0, 5e-324])
            dt = self.pick([np.float32, np.float64])
            with np.errstate(over="ignore"):
                arr = np.full(39, vals).astype(dt)
            return encode_tensor(arr)
        if kind == 2:  # right shape claim, wrong byte count
            return pb.Tensor(dtype="float32", shape=[39],
                             data=b"\x00" * int(self.rng.integers(0, 300)))
        return encode_tensor(self.rng.standard_normal(int(self.rng.integers(0, 80))).astype(
            self.pick([np.float32, np.float64, np.int32, np.uint8])))

    def image(self) -> pb.Image:
        kind = int(self.rng.integers(7))
        if kind == 0:
            return pb.Image(raw=self.tensor())
        if kind == 1:
            return pb.Image(encoded=self.rng.bytes(int(self.rng.integers(0, 300))))
        if kind == 2:  # truncated or bit-flipped real image
            src = bytearray(self.pick([self.png, self.jpeg]))
            if self.rng.random() < 0.5:
                return pb.Image(encoded=bytes(src[:int(self.rng.integers(0, len(src)))]))
            for _ in range(int(self.rng.integers(1, 20))):
                src[int(self.rng.integers(len(src)))] = int(self.rng.integers(256))
            return pb.Image(encoded=bytes(src))
        if kind == 3:  # PNG header declaring any size
            w, h = (int(self.pick([0, 1, 16, 4096, 20000, 2 ** 31 - 1])) for _ in range(2))
            head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(
                ">IIBBBBB", w, h, 8, 2, 0, 0, 0)
            return pb.Image(encoded=head + self.rng.bytes(int(self.rng.integers(0, 64))))
        if kind == 4:
            return pb.Image(format=self.pick(["raw", "png", "jpeg", self.text(20)]))
        if kind == 5:
            return encode_image(self.rng.integers(0, 255, (int(self.rng.integers(1, 40)),
                                                           int(self.rng.integers(1, 40)), 3),
                                                  dtype=np.uint8), self.pick(["raw", "png"]))
        return pb.Image(encoded=self.png)

    def observation(self, field: str) -> tuple[pb.Observation, str]:
        """A valid observation with one field mutated -> (message, field a refusal names)."""
        obs = pb.Observation(step=int(self.rng.integers(0, 2 ** 63 - 1)),
                             state=encode_tensor(self.rng.standard_normal(39).astype(np.float32)),
                             images={"front": pb.Image(encoded=self.png)})
        what = int(self.rng.integers(4))
        if what == 0:
            obs.state.CopyFrom(self.tensor())
            return obs, f"{field}.state"
        if what == 1:
            obs.ClearField("state")
            return obs, f"{field}.state"
        if what == 2:
            obs.images["front"].CopyFrom(self.image())
            return obs, f"{field}.images["
        obs.images[self.text(40) or "side"].CopyFrom(self.image())
        if self.rng.random() < 0.5:
            del obs.images["front"]
        return obs, f"{field}.images["

    def start(self) -> tuple[pb.EpisodeStart, str]:
        start = pb.EpisodeStart(skill="drawer")
        what = int(self.rng.integers(5))
        if what == 0:
            start.skill = self.pick(["", self.text(), "s" * 10_000])
            start.instruction = self.text() if self.rng.random() < 0.5 else ""
            return start, "start."
        if what == 1:
            start.chunk_length = int(self.pick([0, 1, 4, 5, 2 ** 32 - 1]))
            return start, "start.chunk_length"
        if what == 2:
            for _ in range(int(self.rng.integers(0, 50))):
                start.client_info[self.text(30)] = self.text(300)
            return start, "start."
        if what == 3:
            start.skill = ""
            start.instruction = self.pick(["open the top drawer", "  ", self.text(2000)])
            return start, "start.instruction"
        obs, field = self.observation("start.first_observation")
        start.first_observation.CopyFrom(obs)
        start.skill = ""
        start.instruction = "open the top drawer"
        return start, field

    def episode(self) -> tuple[list, str]:
        """An Episode request stream (messages or raw bytes) and the field a refusal names."""
        ok = pb.EpisodeRequest(start=pb.EpisodeStart(skill="button"))
        what = int(self.rng.integers(5))
        if what == 0:
            start, field = self.start()
            return [pb.EpisodeRequest(start=start)], field
        if what == 1:
            obs, field = self.observation("observation")
            return [ok, pb.EpisodeRequest(observation=obs)], field
        if what == 2:  # wrong message kinds
            other = self.pick([pb.EpisodeRequest(), ok, pb.EpisodeRequest(
                observation=pb.Observation())])
            return ([other, ok] if self.rng.random() < 0.5 else [ok, other]), ANY_EPISODE_FIELD
        # raw bytes: refused as unparsable, or they parse (protobuf skips unknown fields) into
        # some message that is then refused for its content
        junk = (self.rng.bytes(int(self.rng.integers(1, 200))) if what == 3
                else ok.SerializeToString()[:-1] + self.rng.bytes(3))
        return [junk], ANY_EPISODE_FIELD

    def route(self) -> tuple[object, str]:
        what = int(self.rng.integers(3))
        if what == 0:
            return pb.RouteRequest(instruction=self.pick(["", " ", self.text(3000)])), \
                "instruction"
        if what == 1:
            obs, field = self.observation("observation")
            return pb.RouteRequest(instruction="open the top drawer", observation=obs), field
        return self.rng.bytes(int(self.rng.integers(1, 100))), ("request:", "instruction",
                                                                 "observation")


def _ser(m):
    return m if isinstance(m, bytes) else m.SerializeToString()


def _check(code, details, field, failures, case):
    """Records a failure: a bad code, a refusal not naming ``field`` (a string or a tuple of
    acceptable names) or an unbounded message."""
    names = (field,) if isinstance(field, str) else field
    if code in BAD_CODES:
        failures.append((case, code, details))
    elif code != grpc.StatusCode.OK and not any(n in details for n in names):
        failures.append((case, code, f"does not name {names}: {details}"))
    elif code != grpc.StatusCode.OK and len(details) > 1100:
        failures.append((case, code, f"unbounded message of {len(details)} chars"))


def _run_case(ch, gen: Gen, i: int, failures: list, seen: Counter) -> None:
    rpc = ("Episode", "Episode", "Episode", "Route", "ListSkills", "ServerInfo")[i % 6]
    path = f"/carve.policy.v1.PolicyService/{rpc}"
    ident = dict(request_serializer=_ser, response_deserializer=lambda b: b)
    try:
        if rpc == "Episode":
            msgs, field = gen.episode()
            list(ch.stream_stream(path, **ident)(iter(msgs), timeout=20))
        elif rpc == "Route":
            msg, field = gen.route()
            ch.unary_unary(path, **ident)(msg, timeout=20)
        else:  # no fields: only bytes that do not parse can be wrong
            field = "request:"
            ch.unary_unary(path, **ident)(gen.rng.bytes(int(gen.rng.integers(1, 60))),
                                          timeout=20)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    seen[(rpc, code.name)] += 1
    _check(code, details, field, failures, (i, rpc))


def test_fuzz_every_rpc_and_field(tmp_path_factory):
    stack = make_stack(tmp_path_factory.mktemp("stack"), cameras=CAM)
    gen = Gen(SEED)
    failures: list = []
    seen: Counter = Counter()
    t0 = time.monotonic()
    with ServeProcess(stack) as srv:
        ch = grpc.insecure_channel(srv.target)
        for i in range(200):  # warm-up: every code path and allocator arena once
            _run_case(ch, gen, i, failures, seen)
        rss0 = srv.memory_kb("VmRSS")
        for i in range(200, N_CASES):
            _run_case(ch, gen, i, failures, seen)
        rss1 = srv.memory_kb("VmRSS")
        health = health_pb2_grpc.HealthStub(ch)
        st = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert st.status == health_pb2.HealthCheckResponse.SERVING
        client = PolicyClient(srv.target, retries=0, timeout=10)
        with client.episode("", skill="drawer") as ep:  # still serving real episodes
            out = ep.infer(np.zeros(39, np.float32), {"front": gen.img})
            assert np.isfinite(out).all()
        client.close()
        ch.close()
        rc, took, err = srv.terminate(timeout=30)
    grown_mb = (rss1 - rss0) / 1024
    print(f"fuzz: {N_CASES} cases in {time.monotonic() - t0:.1f}s, RSS {rss0 / 1024:.0f} -> "
          f"{rss1 / 1024:.0f} MiB, exit {rc} in {took:.2f}s")
    print(sorted(seen.items()))
    assert failures == [], failures[:10]
    # the generator really reaches the refusals (a fuzz that only sent valid requests would pass)
    codes = Counter()
    for (_rpc, code), n in seen.items():
        codes[code] += n
    assert codes["INVALID_ARGUMENT"] > N_CASES // 3 and codes["RESOURCE_EXHAUSTED"] > 0
    assert codes["NOT_FOUND"] > 0 and codes["FAILED_PRECONDITION"] > 0 and codes["OK"] > 0
    assert {rpc for rpc, code in seen if code == "INVALID_ARGUMENT"} == {
        "Episode", "Route", "ListSkills", "ServerInfo"}
    assert grown_mb < RSS_BOUND_MB, grown_mb
    assert rc == 0 and "Traceback" not in err, err[-2000:]
