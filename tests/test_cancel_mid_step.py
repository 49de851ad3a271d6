"""A robot that cancels (or vanishes) while its step runs in the server's pool: the step cannot be
stopped, so the episode's slot, its backend state and its engine pin are released only once the
step is over (``--max-episodes`` keeps bounding the pool, ``end_episode`` never precedes the
episode's last step), and a retired engine is closed off the event loop, so health and every
other stream stay prompt. Real grpc.aio server on loopback, real client stubs."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
from carve_client.codec import observation_proto
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_server.models.base import PolicySpec
from policy_server.service.engine_api import PolicyEngine
from policy_server.service.server import PolicyServer, ServerConfig
from router.base import RouteDecision

STEP_S = 1.0


class SlowEngine(PolicyEngine):
    """One skill; every step takes STEP_S; records what happens when, and on which thread."""

    spec = PolicySpec(state_dim=3, action_dim=1, chunk_length=1, action_low=[-1.0],
                      action_high=[1.0])

    def __init__(self, name: str):
        self.name, self.log, self.busy = name, [], threading.Event()

    def skills(self):
        return [{"name": "pick", "instructions": ["pick"], "description": "", "order": 0}]

    def route(self, instruction, observation=None):
        return RouteDecision("pick", 1.0, [("pick", 1.0)], margin=1.0, router="test")

    def infer(self, observation, skill):
        self.busy.set()
        time.sleep(STEP_S)
        self.log.append(("infer-end", time.monotonic()))
        self.busy.clear()
        return np.zeros((1, 1), np.float32)

    def end_episode(self, episode_id):
        self.log.append(("end_episode", time.monotonic()))

    def close(self):  # like RuntimeEngine.close: joins a batcher that may be mid-forward
        self.log.append(("close", threading.current_thread().name))
        while self.busy.is_set():
            time.sleep(0.01)


def _open(stub):
    q: queue.Queue = queue.Queue()
    call = stub.Episode(iter(q.get, None))
    q.put(pb.EpisodeRequest(start=pb.EpisodeStart(skill="pick")))
    assert next(call).WhichOneof("msg") == "started"
    return q, call


@pytest.fixture
def served():
    engine = SlowEngine("old")
    server = PolicyServer(engine, ServerConfig(host="127.0.0.1", port=0, max_workers=5,
                                               max_episodes=1))
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, engine, pb_grpc.PolicyServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    channel.close()
    server.stop(grace=0)


def test_slot_and_episode_state_outlive_a_cancelled_step(served):
    server, engine, stub, _ = served
    q, call = _open(stub)
    q.put(pb.EpisodeRequest(observation=observation_proto(np.zeros(3), None, 0)))
    time.sleep(0.3)
    call.cancel()
    time.sleep(0.2)
    # the step still runs: its slot is still taken, so the limit of 1 still holds
    assert server.servicer.slots.active == 1
    with pytest.raises(grpc.RpcError) as exc:
        _open(stub)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    deadline = time.monotonic() + 5
    while server.servicer.slots.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.servicer.slots.active == 0
    kinds = [k for k, _ in engine.log]
    assert kinds == ["infer-end", "end_episode"], engine.log  # never before the last step
    q3, call3 = _open(stub)  # and the slot is free again
    q3.put(None)
    call3.cancel()


def test_retired_engine_is_closed_off_the_event_loop(served):
    server, old, stub, health = served
    q, call = _open(stub)
    q.put(pb.EpisodeRequest(observation=observation_proto(np.zeros(3), None, 0)))
    time.sleep(0.2)
    server.holder.swap(SlowEngine("new"))  # a live reload: the old engine stays pinned
    call.cancel()
    time.sleep(0.05)
    t0 = time.monotonic()
    health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    answered = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while not any(k == "close" for k, _ in old.log) and time.monotonic() < deadline:
        time.sleep(0.02)
    closes = [who for k, who in old.log if k == "close"]
    assert closes and closes[0] != "carve-grpc", old.log
    # health is answered while the retired engine's step is still finishing
    assert answered < STEP_S / 2, answered
