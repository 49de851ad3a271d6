"""MicroBatcher: concurrent mixed-skill requests batch together and get the same actions as
sequential calls; errors reach every waiter; back-pressure and drain on close."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from test_runtime import ToyBackend, make_batch, make_snapshot

from policy_server.errors import InputError, NonFiniteActions, StateError
from policy_server.models.base import ObservationBatch
from policy_server.runtime import BatcherClosed, BatcherFull, MicroBatcher, PolicyRuntime

SKILLS = ["pick", "place", "push", "wipe", None, "pick", "push", "place"]


def row(batch: ObservationBatch, i: int) -> ObservationBatch:
    return ObservationBatch(batch.state[i:i + 1], batch.instructions[i:i + 1],
                            {k: v[i:i + 1] for k, v in batch.images.items()})


def test_concurrent_mixed_skills_match_sequential_calls():
    steps = 3
    batches = [make_batch(len(SKILLS), seed=s) for s in range(steps)]
    seq_rt = PolicyRuntime(ToyBackend(), make_snapshot(), mode="auto")
    want = [[seq_rt.infer(row(b, i), [s])[0] for i, s in enumerate(SKILLS)] for b in batches]

    rt = PolicyRuntime(ToyBackend(), make_snapshot(), mode="auto")
    got = [[None] * len(SKILLS) for _ in range(steps)]
    barrier = threading.Barrier(len(SKILLS))
    # generous wait: every step's 8 requests should land in one batch even on a loaded machine
    with MicroBatcher(rt, max_batch=16, max_wait_ms=300.0) as mb:
        def robot(i):
            for t in range(steps):  # one episode: a step waits for the previous action chunk
                barrier.wait()
                got[t][i] = mb.submit(row(batches[t], i), SKILLS[i]).result(timeout=30)
        threads = [threading.Thread(target=robot, args=(i,)) for i in range(len(SKILLS))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    sizes = list(mb.batch_sizes)
    assert sum(sizes) == steps * len(SKILLS)
    assert max(sizes) > 1, sizes  # requests were actually batched (mixed skills: side path)
    for t in range(steps):
        for i in range(len(SKILLS)):
            # batched side path vs per-request fused weights: same math, different summation order
            np.testing.assert_allclose(got[t][i], want[t][i], rtol=1e-5, atol=1e-5)


def test_a_bad_row_fails_alone_and_bad_requests_fail_at_submit():
    """Fault isolation per row: a NaN output in one row of a batch fails only that request; the
    other rows of the same batch get exactly the actions they would get alone."""
    rt = PolicyRuntime(ToyBackend(), make_snapshot(nan_skill=True))
    b = make_batch(3)
    skills = ["pick", "broken", None]
    alone = [rt.infer(row(b, i), [s])[0] for i, s in enumerate(skills) if s != "broken"]
    with MicroBatcher(rt, max_batch=3, max_wait_ms=2000.0) as mb:
        with pytest.raises(StateError, match="'nope'"):
            mb.submit(row(b, 0), "nope")
        with pytest.raises(InputError, match="one observation"):
            mb.submit(b, "pick")
        futs = [mb.submit(row(b, i), s) for i, s in enumerate(skills)]
        with pytest.raises(NonFiniteActions, match=r"non-finite.*'broken'"):
            futs[1].result(timeout=30)
        got = [futs[0].result(timeout=30), futs[2].result(timeout=30)]
        ok = mb.submit(row(b, 0), "pick").result(timeout=30)  # worker survived
        assert ok.shape == (4, 3)
    assert list(mb.batch_sizes)[:1] == [3]  # the three really shared one forward
    for g, w in zip(got, alone):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(BatcherClosed):
        mb.submit(row(b, 0), "pick")


def test_a_batch_that_fails_as_a_whole_is_served_row_by_row():
    """A request whose input makes the batched forward raise (here: a missing camera) fails
    alone; the requests batched with it are served again one by one and get their actions."""
    rt = PolicyRuntime(ToyBackend(), make_snapshot())
    b = make_batch(3, seed=4)
    no_cam = ObservationBatch(b.state[1:2], b.instructions[1:2], {})
    with MicroBatcher(rt, max_batch=3, max_wait_ms=2000.0) as mb:
        futs = [mb.submit(row(b, 0), "pick"), mb.submit(no_cam, "place"),
                mb.submit(row(b, 2), "push")]
        with pytest.raises(Exception):
            futs[1].result(timeout=30)
        np.testing.assert_allclose(futs[0].result(timeout=30), rt.infer(row(b, 0), ["pick"])[0],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(futs[2].result(timeout=30), rt.infer(row(b, 2), ["push"])[0],
                                   rtol=1e-5, atol=1e-5)
    assert list(mb.batch_sizes)[0] == 3


class GatedRuntime:
    """Runtime stand-in whose infer blocks until released (to fill the queue)."""

    def __init__(self):
        self.gate = threading.Event()
        self.calls: list[int] = []

    def skill_index(self, skill):
        return 0

    def infer(self, batch, skills):
        self.gate.wait(30)
        self.calls.append(len(batch))
        return np.full((len(batch), 2, 1), float(len(self.calls)), dtype=np.float32)


def test_bounded_queue_and_close_drains():
    rt = GatedRuntime()
    b = make_batch(1)
    mb = MicroBatcher(rt, max_batch=2, max_wait_ms=0.0, max_queue=3)
    first = mb.submit(b, None)
    deadline = time.monotonic() + 10
    while not first.running() and time.monotonic() < deadline:  # worker holds it, blocked
        time.sleep(0.005)
    assert first.running()
    queued = [mb.submit(b, None) for _ in range(3)]
    with pytest.raises(BatcherFull, match="3 pending"):
        mb.submit(b, None)
    rt.gate.set()
    mb.close(timeout=30)
    assert all(f.done() and f.exception() is None for f in [first, *queued])
    assert sum(rt.calls) == 4 and max(rt.calls) <= 2


class OrderRuntime(GatedRuntime):
    """Gated stand-in that also records captures, to check the worker's ordering."""

    def __init__(self):
        super().__init__()
        self.log: list = []

    def infer(self, batch, skills):
        out = super().infer(batch, skills)
        self.log.append(("infer", len(batch)))
        return out

    def capture(self, batch, keys, skill=None):
        self.log.append(("capture", tuple(keys), skill))
        return {k: np.zeros((len(batch), 2), np.float32) for k in keys}


def test_captures_are_served_alone_and_in_submission_order():
    rt = OrderRuntime()
    b = make_batch(1)
    mb = MicroBatcher(rt, max_batch=8, max_wait_ms=200.0)
    first = mb.submit(b, None)
    deadline = time.monotonic() + 10
    while not first.running() and time.monotonic() < deadline:
        time.sleep(0.005)
    before = [mb.submit(b, None) for _ in range(2)]
    cap = mb.capture(b, ["v.weight"], "pick")
    after = mb.submit(b, None)
    rt.gate.set()
    assert set(cap.result(30)) == {"v.weight"}
    for f in [first, *before, after]:
        f.result(30)
    mb.close(timeout=30)
    # the capture ends the batch it would have joined: nothing queued after it runs before it
    assert rt.log == [("infer", 1), ("infer", 2), ("capture", ("v.weight",), "pick"),
                      ("infer", 1)]
    with pytest.raises(BatcherClosed):
        mb.capture(b, ["v.weight"])


def test_capture_through_the_batcher_equals_the_runtime_capture():
    snap, b = make_snapshot(), make_batch(1, seed=3)
    rt = PolicyRuntime(ToyBackend(), snap, mode="auto")
    want = PolicyRuntime(ToyBackend(), snap, mode="auto").capture(b, ["v.weight"], "place")
    with MicroBatcher(rt, max_batch=4, max_wait_ms=1.0) as mb:
        with pytest.raises(StateError, match="unknown skill"):
            mb.capture(b, ["v.weight"], "fly")
        futs = [mb.submit(b, s) for s in ("pick", "push")]
        got = mb.capture(b, ["v.weight"], "place").result(30)
        for f in futs:
            f.result(30)
        with pytest.raises(InputError, match="no module"):
            mb.capture(b, ["nope"]).result(30)
    assert torch.equal(got["v.weight"], want["v.weight"])


def test_a_batch_stops_waiting_once_every_possible_peer_is_in():
    """With ``peers`` (the server's open-episode count) a lone request is served at once instead
    of waiting ``max_wait_ms`` for company that cannot come; without it, it waits."""
    rt = PolicyRuntime(ToyBackend(), make_snapshot(), mode="auto")
    obs = row(make_batch(1, seed=3), 0)
    with MicroBatcher(rt, max_batch=16, max_wait_ms=600.0) as mb:
        mb.submit(obs, "pick").result(timeout=30)  # warm up the model outside the timing
        t0 = time.perf_counter()
        mb.submit(obs, "pick").result(timeout=30)
        waited = time.perf_counter() - t0
        assert waited >= 0.55, waited  # no peers known: the batch waits for company
        mb.peers = lambda: 1
        t0 = time.perf_counter()
        alone = mb.submit(obs, "pick").result(timeout=30)
        assert time.perf_counter() - t0 < 0.3  # the one open episode is already in
        mb.peers = lambda: 2  # two episodes: two requests form one batch, served when both are in
        futs = [mb.submit(obs, "pick"), mb.submit(obs, "place")]
        for f in futs:
            f.result(timeout=30)
    assert list(mb.batch_sizes)[-1] == 2
    np.testing.assert_allclose(alone, futs[0].result(), rtol=1e-6, atol=1e-6)


def test_a_single_row_batch_is_not_copied():
    from policy_server.runtime.batcher import concat_observations

    one = row(make_batch(2, seed=1), 0)
    assert concat_observations([one]) is one
    two = concat_observations([one, row(make_batch(2, seed=1), 1)])
    assert two.state.shape[0] == 2 and len(two.instructions) == 2
