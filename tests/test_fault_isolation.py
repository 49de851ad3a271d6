"""One robot's bad input never costs another robot its step: a real gRPC server on loopback over a
real merge state (demo VLA), normal episodes running concurrently with one that sends a finite but
absurd state (1e30 in every element, the reported case)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from carve_client import PolicyClient, PolicyError

from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.serving import EngineConfig, build_engine
from serving_utils import make_stack

CAM = {"front": [16, 16]}
GOOD_SKILLS = ["drawer", "button", "window", "button"]
STEPS = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return make_stack(tmp_path_factory.mktemp("stack"), cameras=CAM)


def _serve(stack, **server_kw):
    # a generous batching window so the bad robot's row really shares batches with the others
    cfg = EngineConfig(base_dir=str(stack["base"]), state_dir=str(stack["state"]),
                       router="exact", max_wait_ms=40.0)
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(port=0, **server_kw))
    return server, server.start()


def _mixed_run(port):
    """4 normal episodes + 1 robot opening an episode per step with a 1e30 state, all stepping
    together. -> (errors of the normal robots, (code, details) per bad step)."""
    rng = np.random.default_rng(0)
    img = {"front": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)}
    barrier = threading.Barrier(len(GOOD_SKILLS) + 1, timeout=60)
    good_errors, bad = [], []

    def good(skill):
        c = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=30)
        try:
            with c.episode("", skill=skill) as ep:
                for _ in range(STEPS):
                    barrier.wait()
                    try:
                        out = ep.infer(rng.standard_normal(39).astype(np.float32), img)
                        assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
                    except PolicyError as e:
                        good_errors.append(e)
                        return
        finally:
            c.close()

    def evil():
        c = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=30)
        try:
            for _ in range(STEPS):
                ep = c.episode("", skill="drawer")
                barrier.wait()
                try:
                    ep.infer(np.full(39, 1e30, np.float32), img)
                    bad.append((None, "served"))
                except PolicyError as e:
                    bad.append((e.code, e.details))
        finally:
            c.close()

    threads = [threading.Thread(target=good, args=(s,)) for s in GOOD_SKILLS]
    threads.append(threading.Thread(target=evil))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return good_errors, bad


def test_absurd_state_is_refused_before_the_model_and_others_keep_their_steps(stack):
    server, port = _serve(stack)
    try:
        good_errors, bad = _mixed_run(port)
    finally:
        server.stop(1.0)
    assert good_errors == []
    assert len(bad) == STEPS
    for code, details in bad:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "observation.state" in details and "outside the accepted range" in details


def test_nan_output_fails_only_its_own_row(stack):
    """With the input bound switched off the 1e30 state reaches the model and yields NaN: that
    row alone gets INTERNAL; the rows batched with it get their actions (before: the whole batch
    failed with "non-finite actions for batch rows [2]")."""
    server, port = _serve(stack, state_sigma=None, state_abs=None)
    try:
        good_errors, bad = _mixed_run(port)
        sizes = list(server.holder.engine.batcher.batch_sizes)
    finally:
        server.stop(1.0)
    assert good_errors == []
    assert max(sizes) == len(GOOD_SKILLS) + 1, sizes  # the bad row shared a forward
    for code, details in bad:
        assert code == grpc.StatusCode.INTERNAL, details
        assert "NaN/inf actions for this observation" in details
