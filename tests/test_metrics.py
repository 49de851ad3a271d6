"""Prometheus metrics (``--metrics-port``): scraped over HTTP on loopback from a real ``carve
serve`` subprocess while episodes run, and in process from two servers at once (one registry
each), with the outcomes the counters must tell apart (completed, refused, NaN, unauthenticated)."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from carve_client import PolicyClient, PolicyError
from prometheus_client.parser import text_string_to_metric_families

from policy_server.service.engine_api import RoutingPolicy
from policy_server.service.server import PolicyServer, ServerConfig
from serving_utils import ServeProcess, make_stack
from test_client import STATE_DIM, NumpyLinearEngine

IMAGES = {"cam": np.zeros((8, 8, 3), np.uint8)}


def scrape(port: int) -> dict:
    """{(sample name, sorted label items): value} of ``/metrics`` on loopback ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sample ``name`` with exactly ``labels`` (0 when absent: a labelled counter appears
    only once it moved)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def run_episode(client: PolicyClient, instruction: str, steps: int, skill=None, images=None,
                state_dim: int = 39) -> None:
    with client.episode(instruction, skill=skill) as ep:
        for _ in range(steps):
            ep.infer(np.zeros(state_dim, np.float32), images)


def test_metrics_of_a_carve_serve_subprocess(tmp_path):
    stack = make_stack(tmp_path / "stack")
    with ServeProcess(stack, "--metrics-port", "0") as server:
        m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.line)
        assert m, server.line
        port = int(m.group(1))
        client = PolicyClient(server.target, retries=0)
        info = client.server_info()
        before = scrape(port)
        assert value(before, "carve_episodes_started_total", skill="button") == 0
        assert value(before, "carve_state_info", version=info["state_version"]) == 1
        assert value(before, "carve_state_loaded_timestamp_seconds") == pytest.approx(
            info["state_loaded_time"])
        assert 0 < time.time() - info["state_loaded_time"] < 600
        assert value(before, "carve_state_reloads_total", result="ok") == 0
        assert value(before, "carve_state_reloads_total", result="failed") == 0

        with client.episode("press the red button") as ep:
            ep.infer(np.zeros(39, np.float32))
            assert value(scrape(port), "carve_active_episodes") == 1
        for _ in range(2):
            run_episode(client, "press the red button", 3)
        run_episode(client, "", 2, skill="drawer")
        with pytest.raises(PolicyError) as e:
            run_episode(client, "", 1, skill="no-such-skill")
        assert e.value.code.name == "NOT_FOUND"
        with pytest.raises(PolicyError) as e:  # the exact router abstains; refused by default
            run_episode(client, "juggle three oranges", 1)
        assert e.value.code.name == "FAILED_PRECONDITION"
        client.close()

        after = scrape(port)
        assert value(after, "carve_episodes_started_total", skill="button") == 3
        assert value(after, "carve_episodes_started_total", skill="drawer") == 1
        assert value(after, "carve_episodes_finished_total", skill="button",
                     outcome="completed") == 3
        assert value(after, "carve_episodes_finished_total", skill="drawer",
                     outcome="completed") == 1
        assert value(after, "carve_route_decisions_total", router="exact", skill="button") == 3
        assert value(after, "carve_route_decisions_total", router="oracle", skill="drawer") == 1
        assert value(after, "carve_route_decisions_total", router="exact", skill="(none)") == 1
        assert value(after, "carve_route_abstentions_total", router="exact",
                     action="refused") == 1
        assert value(after, "carve_router_confidence_count", router="exact") == 4
        assert value(after, "carve_grpc_errors_total", method="Episode", code="NOT_FOUND") == 1
        assert value(after, "carve_grpc_errors_total", method="Episode",
                     code="FAILED_PRECONDITION") == 1
        steps = 1 + 2 * 3 + 2
        assert value(after, "carve_step_latency_seconds_count") == steps
        assert value(after, "carve_step_latency_seconds_sum") > 0
        assert value(after, "carve_batch_size_sum") == steps  # every step went through the batcher
        assert value(after, "carve_batch_queue_wait_seconds_count") == steps
        assert value(after, "carve_active_episodes") == 0
        rc, _took, err = server.terminate()
        assert rc == 0, err


def _server(engine, **kw) -> PolicyServer:
    server = PolicyServer(engine, ServerConfig(port=0, metrics_port=0, **kw))
    server.start()
    return server


def test_two_servers_in_one_process_count_apart():
    """One registry per server: two servers in one process neither collide on metric names nor
    see each other's episodes; and what the counters tell apart: a core-only abstention, a NaN
    step (INTERNAL), a missing token (UNAUTHENTICATED)."""
    a = _server(NumpyLinearEngine(nan_skill="place", routing=RoutingPolicy("core-only")))
    b = _server(NumpyLinearEngine(), auth_token="s3cret")
    try:
        ca = PolicyClient(f"127.0.0.1:{a.port}", retries=0)
        run_episode(ca, "juggle", 2, images=IMAGES, state_dim=STATE_DIM)  # core-only
        with pytest.raises(PolicyError):
            run_episode(ca, "place the cube", 1, images=IMAGES, state_dim=STATE_DIM)
        ca.close()
        cb = PolicyClient(f"127.0.0.1:{b.port}", retries=0)
        with pytest.raises(PolicyError):
            cb.list_skills()
        cb.close()

        sa, sb = scrape(a.metrics_port), scrape(b.metrics_port)
        assert value(sa, "carve_episodes_started_total", skill="(core-only)") == 1
        assert value(sa, "carve_episodes_finished_total", skill="(core-only)",
                     outcome="completed") == 1
        assert value(sa, "carve_route_abstentions_total", router="exact",
                     action="core_only") == 1
        assert value(sa, "carve_episodes_finished_total", skill="place", outcome="internal") == 1
        assert value(sa, "carve_grpc_errors_total", method="Episode", code="INTERNAL") == 1
        assert value(sa, "carve_grpc_errors_total", method="ListSkills",
                     code="UNAUTHENTICATED") == 0
        assert value(sb, "carve_grpc_errors_total", method="ListSkills",
                     code="UNAUTHENTICATED") == 1
        assert value(sb, "carve_episodes_started_total", skill="(core-only)") == 0
    finally:
        a.stop(0)
        b.stop(0)
    with pytest.raises(urllib.error.URLError):  # the endpoint stops with its server
        scrape(a.metrics_port)


def test_metrics_are_off_by_default_and_the_port_is_checked():
    from policy_server.errors import InputError

    server = PolicyServer(NumpyLinearEngine(), ServerConfig(port=0))
    server.start()
    try:
        assert server.metrics_port is None and not server.metrics.enabled
        client = PolicyClient(f"127.0.0.1:{server.port}", retries=0)
        info = client.server_info()
        assert info["state_loaded_time"] > 0  # ServerInfo reports it with metrics off too
        client.close()
    finally:
        server.stop(0)
    with pytest.raises(InputError, match="--metrics-port"):
        ServerConfig(metrics_port=70000).validate()
