"""Bounded episode streams on a real server over a real merge state: more idle streams than the
episode limit leave health and the unary calls answering promptly, the streams beyond the limit
get RESOURCE_EXHAUSTED, and an idle episode is ended with DEADLINE_EXCEEDED."""

from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
from carve_client import PolicyClient, PolicyError
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_server.errors import InputError
from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.serving import EngineConfig, build_engine
from serving_utils import make_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return make_stack(tmp_path_factory.mktemp("stack"))


def _server(stack, **kw):
    cfg = EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]), router="exact")
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(port=0, **kw))
    return server, server.start()


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_idle_streams_beyond_the_limit_leave_health_and_unary_calls_prompt(stack):
    """The reported case: with the defaults (64 workers), 64 idle streams used to make health
    checks, ListSkills and new episodes time out. Here 70 idle streams are opened."""
    server, port = _server(stack)  # defaults: 64 workers, 60 episodes
    limit = server.servicer.slots.limit
    assert limit == 60
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(7)]
    feeds, calls = [], []
    try:
        for i in range(limit + 22):
            q: queue.Queue = queue.Queue()
            feeds.append(q)
            calls.append(pb_grpc.PolicyServiceStub(channels[i % 7]).Episode(iter(q.get, None)))
        assert _wait(lambda: sum(c.done() for c in calls) >= 22, 20)
        time.sleep(0.3)  # nothing else finishes: the first `limit` streams stay open
        done = [c for c in calls if c.done()]
        assert len(done) == 22 and server.servicer.active_episodes == limit
        for c in done:
            assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"limit of {limit} concurrent episodes" in c.details()
        health = health_pb2_grpc.HealthStub(channels[0])
        answered = []
        for _ in range(5):
            t0 = time.perf_counter()
            st = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            answered.append(time.perf_counter() - t0)
            assert st.status == health_pb2.HealthCheckResponse.SERVING
        print(f"health with {len(calls)} idle streams open: "
              f"{', '.join(f'{t * 1e3:.1f}' for t in answered)} ms")
        assert sorted(answered)[2] < 0.1, answered  # the median, robust to one loaded moment
        client = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=1.0)
        assert len(client.list_skills()) == 3 and client.server_info()["num_skills"] == 3
        with pytest.raises(PolicyError) as e:
            client.episode("", skill="drawer")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        client.close()
    finally:
        for c in calls:
            c.cancel()
        for q in feeds:
            q.put(None)
        for ch in channels:
            ch.close()
        server.stop(1.0)
    assert server.servicer.active_episodes == 0


def test_an_idle_episode_is_ended_with_deadline_exceeded(stack):
    server, port = _server(stack, episode_idle_timeout_s=0.5)
    try:
        client = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=10)
        with client.episode("", skill="button") as ep:
            assert ep.infer(np.zeros(39, np.float32)).shape == (4, 4)  # activity keeps it open
            time.sleep(0.3)
            assert ep.infer(np.zeros(39, np.float32)).shape == (4, 4)
            t0 = time.monotonic()
            with pytest.raises(PolicyError) as e:
                ep._next("the server's idle verdict")  # wait for the server to end it
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no Observation or EpisodeEnd within 0.5s" in e.value.details
            assert time.monotonic() - t0 < 3.0
        # a stream that never even sends EpisodeStart is ended too
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        q: queue.Queue = queue.Queue()
        call = pb_grpc.PolicyServiceStub(ch).Episode(iter(q.get, None))
        with pytest.raises(grpc.RpcError) as e2:
            next(call)
        assert e2.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no EpisodeStart" in e2.value.details()
        q.put(None)
        ch.close()
        assert _wait(lambda: server.servicer.active_episodes == 0, 5)
        client.close()
    finally:
        server.stop(1.0)


@pytest.mark.parametrize("kw,option", [
    ({"max_episodes": 61}, "--max-episodes"), ({"max_episodes": 0}, "--max-episodes"),
    ({"max_workers": 8, "max_episodes": 5}, "--max-episodes"),
    ({"max_workers": 4}, "--max-workers"), ({"episode_idle_timeout_s": 0}, "--episode-idle"),
    ({"tls_cert": "c.pem"}, "--tls-cert and --tls-key")])
def test_bad_server_settings_are_input_errors_naming_the_option(kw, option):
    with pytest.raises(InputError, match=option):
        ServerConfig(**kw).validate()


def test_second_start_and_unknown_kinds_still_fail_precondition(stack):
    server, port = _server(stack)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        start = pb.EpisodeRequest(start=pb.EpisodeStart(skill="drawer"))
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.PolicyServiceStub(ch).Episode(iter([start, pb.EpisodeRequest()]),
                                                        timeout=20))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "empty message after the episode started" in e.value.details()
        ch.close()
    finally:
        server.stop(1.0)


def test_idle_streams_hold_no_server_threads(stack):
    """On grpc.aio an open episode waiting for its robot is a suspended task, not a blocked
    thread: 40 idle streams add no server thread (the thread-per-stream design held two each:
    a worker and a reader), and a step still runs once one of them sends an observation."""
    import threading

    server, port = _server(stack)

    def server_threads() -> int:
        return sum(t.name.startswith(("carve-rpc", "carve-stream")) for t in threading.enumerate())

    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    feeds, calls = [], []
    try:
        stub = pb_grpc.PolicyServiceStub(ch)
        start = pb.EpisodeRequest(start=pb.EpisodeStart(skill="drawer"))
        before = server_threads()
        for _ in range(40):
            q: queue.Queue = queue.Queue()
            q.put(start)
            feeds.append(q)
            calls.append(stub.Episode(iter(q.get, None), timeout=60))
        for c in calls:
            assert next(c).WhichOneof("msg") == "started"  # all 40 opened, now idle
        assert _wait(lambda: server.servicer.active_episodes == 40, 10)
        time.sleep(0.3)
        # opening routed in the pool (a few threads at most); waiting holds none
        assert server_threads() - before <= 8, server_threads() - before
        feeds[0].put(pb.EpisodeRequest(observation=pb.Observation(state=pb.Tensor(
            dtype="float32", shape=[39], data=np.zeros(39, np.float32).tobytes()))))
        assert next(calls[0]).WhichOneof("msg") == "chunk"
    finally:
        for c in calls:
            c.cancel()
        for q in feeds:
            q.put(None)
        ch.close()
        server.stop(1.0)
