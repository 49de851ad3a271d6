"""Client-library tests against a real loopback server backed by a small numpy test double
(no torch on the serving path), plus the chunk-blending math."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from carve_client import (AsyncPolicyClient, ChunkBlender, ImageSpec, PolicyClient, PolicyError,
                          PolicySpec, RouteDecision)
from carve_client.client import CANCELLED_RETRY_MIN_S

from policy_server.models.base import ObservationBatch
from policy_server.action_guard import ActionGuard
from policy_server.service.engine_api import PolicyEngine, RoutingPolicy
from policy_server.service.server import PolicyServer, ServerConfig

STATE_DIM, A, T = 6, 3, 4


class NumpyLinearEngine(PolicyEngine):
    """Test double: actions[t] = W_skill @ state * (t + 1) + 0.01 * mean(image), no torch.

    Skills are routed by exact instruction match; an unknown instruction abstains."""

    def __init__(self, nan_skill: str | None = None, routing: RoutingPolicy | None = None):
        rng = np.random.default_rng(0)
        self.W = {s: rng.standard_normal((A, STATE_DIM)).astype(np.float32)
                  for s in ("pick", "place")}
        self.W[None] = np.zeros((A, STATE_DIM), np.float32)  # core-only: a zero policy
        self.nan_skill = nan_skill
        self.routing = routing or RoutingPolicy()
        self._spec = PolicySpec(state_dim=STATE_DIM, action_dim=A, chunk_length=T,
                                action_low=[-5.0] * A, action_high=[5.0] * A,
                                images={"cam": ImageSpec(8, 8)}, name="numpy-linear")

    @property
    def spec(self) -> PolicySpec:
        return self._spec

    def skills(self) -> list[dict]:
        return [{"name": s, "instructions": [f"{s} the cube"], "description": "", "order": i}
                for i, s in enumerate(("pick", "place"))]

    def route(self, instruction, observation=None) -> RouteDecision:
        for s in ("pick", "place"):
            if instruction == f"{s} the cube":
                return RouteDecision(s, 1.0, [(s, 1.0)], margin=1.0, router="exact")
        return RouteDecision(None, 0.0, [("pick", 0.1), ("place", 0.05)], abstained=True,
                             reason="no exact match", router="exact")

    def infer(self, observation: ObservationBatch, skill):
        # an engine hands out guarded actions: the servicer does not clip or check them again
        return ActionGuard(self._spec)(self._raw(observation, skill)[None], [skill])[0]

    def _raw(self, observation: ObservationBatch, skill):
        if self.nan_skill is not None and skill == self.nan_skill:
            return np.full((T, A), np.nan, np.float32)
        base = self.W[skill] @ observation.state[0]
        img = float(observation.images["cam"].mean()) * 0.01 if observation.images else 0.0
        return np.stack([base * (t + 1) + img for t in range(T)]).astype(np.float32)

    def expected(self, state, skill, image=None):
        img = float(image.mean()) * 0.01 if image is not None else 0.0
        base = self.W[skill] @ state
        return np.clip(np.stack([base * (t + 1) + img for t in range(T)]), -5, 5)


def _start(engine, **kw):
    server = PolicyServer(engine, ServerConfig(port=kw.pop("port", 0), **kw))
    return server, server.start()


@pytest.fixture(scope="module")
def served():
    engine = NumpyLinearEngine(nan_skill="place")
    server, port = _start(engine)
    client = PolicyClient(f"127.0.0.1:{port}", retries=0)
    client.wait_ready(10)
    yield engine, client, port
    client.close()
    server.stop(1.0)


def test_sync_episode_actions_match_engine_and_are_clipped(served):
    engine, client, _ = served
    rng = np.random.default_rng(1)
    with client.episode("pick the cube") as ep:
        assert ep.skill == "pick" and ep.confidence == pytest.approx(1.0)
        assert (ep.spec.action_dim, ep.spec.chunk_length) == (A, T)
        for enc in ("raw", "png"):  # png is lossless, so the image term is exact
            state = rng.standard_normal(STATE_DIM).astype(np.float32) * 2
            img = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            out = ep.infer(state, {"cam": img}, encode=enc)
            assert out.shape == (T, A) and out.dtype == np.float32
            np.testing.assert_allclose(out, engine.expected(state, "pick", img), rtol=1e-5, atol=1e-5)
            assert out.max() <= 5.0 and out.min() >= -5.0


def test_nan_actions_become_internal_error(served):
    _, client, _ = served
    with pytest.raises(PolicyError) as ei:
        with client.episode("place the cube") as ep:
            ep.infer(np.zeros(STATE_DIM, np.float32), {"cam": np.zeros((8, 8, 3), np.uint8)})
    assert ei.value.code == grpc.StatusCode.INTERNAL and "NaN" in str(ei.value)


def test_abstention_refused_with_candidates(served):
    _, client, _ = served
    with pytest.raises(PolicyError) as ei:
        client.episode("juggle")
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "pick" in str(ei.value) and "place" in str(ei.value)
    r = client.route("juggle")
    assert r["abstained"] and [c["skill"] for c in r["candidates"]][:2] == ["pick", "place"]


def test_core_only_fallback():
    engine = NumpyLinearEngine(routing=RoutingPolicy(on_abstain="core-only"))
    server, port = _start(engine)
    try:
        with PolicyClient(f"127.0.0.1:{port}", retries=0) as c:
            c.wait_ready(10)
            with c.episode("juggle") as ep:
                assert ep.skill is None and ep.core_only
                out = ep.infer(np.ones(STATE_DIM, np.float32), {"cam": np.zeros((8, 8, 3), np.uint8)})
                np.testing.assert_allclose(out, 0.0)
    finally:
        server.stop(1.0)


def test_reconnect_with_backoff_when_server_comes_up_late():
    # Reserve a port, release it, and bring the server up on it after the client started trying.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    holder = {}
    t = threading.Timer(0.6, lambda: holder.update(server=_start(NumpyLinearEngine(), port=port)[0]))
    t.start()
    client = PolicyClient(f"127.0.0.1:{port}", retries=6, backoff_s=0.1, timeout=2.0)
    try:
        t0 = time.monotonic()
        skills = client.list_skills()
        assert [s["name"] for s in skills] == ["pick", "place"]
        assert time.monotonic() - t0 >= 0.5  # it really waited for the server
    finally:
        t.join()
        client.close()
        holder["server"].stop(0.5)


def test_no_retries_surfaces_unavailable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=1.0) as c:
        with pytest.raises(PolicyError) as ei:
            c.list_skills()
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE


def test_async_client_episode_and_unary(served):
    engine, _, port = served

    async def go():
        c = AsyncPolicyClient(f"127.0.0.1:{port}", retries=0)
        try:
            names = [s["name"] for s in await c.list_skills()]
            r = await c.route("place the cube")
            state = np.arange(STATE_DIM, dtype=np.float32) / 10
            img = np.full((8, 8, 3), 7, np.uint8)
            async with c.episode("pick the cube") as ep:
                outs = [await ep.infer(state, {"cam": img}) for _ in range(3)]
            return names, r, ep.skill, outs, state, img
        finally:
            await c.close()

    names, r, skill, outs, state, img = asyncio.run(go())
    assert names == ["pick", "place"] and r["skill"] == "place" and skill == "pick"
    for out in outs:
        np.testing.assert_allclose(out, engine.expected(state, "pick", img), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- blending math
def test_blending_modes_on_overlapping_chunks():
    c1 = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)     # steps 0..3
    c2 = np.array([[10.0], [20.0], [30.0], [40.0]], np.float32)  # steps 2..5
    want = {"latest_only": [0, 1, 10, 20, 30, 40],
            "average": [0, 1, 6, 11.5, 30, 40],
            "weighted_average": [0, 1, 0.3 * 2 + 7, 0.3 * 3 + 14, 30, 40]}
    for mode, expected in want.items():
        b = ChunkBlender(mode)
        b.add(0, c1)
        b.add(2, c2)
        got = [float(b.action(s)[0]) for s in range(6)]
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=mode)
        assert b.action(6) is None


def test_blending_never_rewrites_executed_steps():
    b = ChunkBlender("average")
    b.add(0, np.zeros((4, 2), np.float32))
    assert b.action(0) is not None and b.action(1) is not None
    b.add(0, np.ones((4, 2), np.float32))  # a late chunk: steps 0, 1 already executed
    assert b.remaining(2) == 2
    np.testing.assert_allclose(b.action(2), 0.5)
    with pytest.raises(ValueError, match="shape"):
        b.add(5, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="mode"):
        ChunkBlender("median")


# ---------------------------------------------------------------- deadlines on the episode stream
class StallingEngine(NumpyLinearEngine):
    """Sleeps ``stall_s`` in every inference (and in routing when ``stall_route``): a server that
    stalls mid-episode."""

    def __init__(self, stall_s: float, stall_route: bool = False):
        super().__init__()
        self.stall_s, self.stall_route = stall_s, stall_route

    def route(self, instruction, observation=None) -> RouteDecision:
        if self.stall_route:
            time.sleep(self.stall_s)
        return super().route(instruction, observation)

    def infer(self, observation: ObservationBatch, skill):
        time.sleep(self.stall_s)
        return super().infer(observation, skill)


@pytest.fixture
def stalling_server():
    servers = []

    def start(engine):
        server, port = _start(engine)
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.stop(0)


OBS = (np.zeros(STATE_DIM, np.float32), {"cam": np.zeros((8, 8, 3), np.uint8)})


def test_stalled_infer_raises_deadline_exceeded_within_timeout(stalling_server):
    port = stalling_server(StallingEngine(stall_s=5.0))
    with PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=0.5) as c:
        c.wait_ready(10)
        with pytest.raises(PolicyError) as ei:
            with c.episode("pick the cube") as ep:
                t0 = time.monotonic()
                ep.infer(*OBS)
        waited = time.monotonic() - t0
    assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value
    assert 0.4 <= waited < 2.0, waited
    with pytest.raises(PolicyError) as closed:
        ep.infer(*OBS)  # a deadline miss closes the episode: a late chunk has no observation
    assert closed.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_stalled_episode_start_raises_deadline_exceeded(stalling_server):
    port = stalling_server(StallingEngine(stall_s=5.0, stall_route=True))
    with PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=0.5) as c:
        c.wait_ready(10)
        t0 = time.monotonic()
        with pytest.raises(PolicyError) as ei:
            c.episode("pick the cube")
        assert time.monotonic() - t0 < 2.0
    assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_timeout_bounds_each_call_not_the_whole_episode(stalling_server):
    # 8 answers of 0.1 s each outlast the 0.5 s timeout together but never one at a time.
    port = stalling_server(StallingEngine(stall_s=0.1))
    with PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=0.5) as c:
        c.wait_ready(10)
        t0 = time.monotonic()
        with c.episode("pick the cube") as ep:
            outs = [ep.infer(*OBS) for _ in range(8)]
        assert time.monotonic() - t0 > 0.5
    assert all(o.shape == (T, A) for o in outs)


def test_async_stalled_infer_raises_deadline_exceeded(stalling_server):
    port = stalling_server(StallingEngine(stall_s=5.0))

    async def go():
        async with AsyncPolicyClient(f"127.0.0.1:{port}", retries=0, timeout=0.5) as c:
            await c.wait_ready(10)
            async with c.episode("pick the cube") as ep:
                t0 = time.monotonic()
                try:
                    await ep.infer(*OBS)
                except PolicyError as e:
                    return e, time.monotonic() - t0
        return None, 0.0

    err, waited = asyncio.run(go())
    assert err is not None and err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
    assert 0.4 <= waited < 2.0, waited


def test_episode_open_is_retried_on_cancelled_but_unary_calls_are_not():
    """A call in flight when a server's grpc core stops is CANCELLED by the core; before
    EpisodeStarted nothing has happened, so the client retries the opening (a real grpc server on
    loopback cancels the first attempt of each call)."""
    from concurrent import futures

    from carve_client.proto.carve.policy.v1 import policy_pb2 as pb

    attempts = {"Episode": 0, "ListSkills": 0}

    def episode(request_iterator, context):
        attempts["Episode"] += 1
        next(request_iterator)
        if attempts["Episode"] % 2 == 1:
            context.cancel()
            return
        yield pb.EpisodeResponse(started=pb.EpisodeStarted(episode_id="e1", skill="pick"))

    def list_skills(request, context):
        attempts["ListSkills"] += 1
        context.cancel()

    handler = grpc.method_handlers_generic_handler("carve.policy.v1.PolicyService", {
        "Episode": grpc.stream_stream_rpc_method_handler(
            episode, pb.EpisodeRequest.FromString, pb.EpisodeResponse.SerializeToString),
        "ListSkills": grpc.unary_unary_rpc_method_handler(
            list_skills, pb.ListSkillsRequest.FromString,
            pb.ListSkillsResponse.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        c = PolicyClient(f"127.0.0.1:{port}", retries=1, backoff_s=0.01, timeout=10)
        t0 = time.monotonic()
        ep = c.episode("pick the cube")
        assert ep.episode_id == "e1" and attempts["Episode"] == 2
        # the retry after CANCELLED waits past a stopping core's window, not just backoff_s
        assert time.monotonic() - t0 >= CANCELLED_RETRY_MIN_S
        ep._shut(cancel=True)
        with pytest.raises(PolicyError) as e:
            c.list_skills()
        assert e.value.code == grpc.StatusCode.CANCELLED and attempts["ListSkills"] == 1
        c.close()
        once = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=10)
        with pytest.raises(PolicyError) as e:
            once.episode("pick the cube")
        assert e.value.code == grpc.StatusCode.CANCELLED
        once.close()
    finally:
        server.stop(0)
