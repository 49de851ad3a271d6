"""MicroBatcher: group concurrent single-observation requests into one ``runtime.infer`` call.

Several robots (episodes) call in from their own threads; one worker thread takes the oldest
request, then keeps collecting until ``max_batch`` requests or until that oldest request has waited
``max_wait_ms``, runs one batched inference (mixed skills are fine: the runtime picks fused or the
side path), and resolves each request's future with its own (chunk, A) row, or with the error of
that row alone (a NaN output; or, when the whole batched call fails, the error each row meets when
the batch is re-run row by row), so one robot's bad observation never fails another robot's step.
The bounded wait caps the latency a request pays for batching; the bounded queue gives
back-pressure instead of an unbounded backlog (the service maps ``BatcherFull`` to RESOURCE_EXHAUSTED).

Feature captures for the observation routers (``capture``) go through the same queue: the worker
runs each one alone, in submission order with the inference requests around it, so a route sees
exactly the weights and ordering an inference submitted at that moment would.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from policy_server.errors import BatcherClosed, BatcherFull, InputError
from policy_server.models.base import ObservationBatch

__all__ = ["BatcherClosed", "BatcherFull", "MicroBatcher", "concat_observations"]


@dataclass
class _Request:
    obs: ObservationBatch
    skill: str | None
    future: Future
    t_submit: float  # time.monotonic()


@dataclass
class _Capture:
    obs: ObservationBatch
    keys: tuple[str, ...]
    skill: str | None
    future: Future


_STOP = object()


def concat_observations(obs: list[ObservationBatch]) -> ObservationBatch:
    """Stack size-1 observations into one batch (state (B, S), images key -> (B, H, W, C)).
    A single observation is returned as it is: it already is a batch of one, and stacking
    would only copy its images."""
    if len(obs) == 1:
        return obs[0]
    keys = set(obs[0].images)
    for o in obs:
        if set(o.images) != keys:
            raise InputError(f"requests disagree on camera keys: {sorted(keys)} vs "
                             f"{sorted(o.images)}")
    return ObservationBatch(
        state=np.concatenate([o.state for o in obs], axis=0),
        instructions=[s for o in obs for s in o.instructions],
        images={k: np.concatenate([o.images[k] for o in obs], axis=0) for k in sorted(keys)},
        episode_ids=ObservationBatch.concat_context(obs, "episode_ids"))


class MicroBatcher:
    """Thread-based request batcher in front of a ``PolicyRuntime``.

    max_batch: most requests per ``infer``; max_wait_ms: longest the oldest request of a batch
    waits for company; max_queue: pending requests beyond which ``submit`` raises ``BatcherFull``.
    ``batch_sizes``: sizes of the most recent batches (for metrics and tests); ``metrics``: an
    object whose ``batch(size, waits_s)`` hears of every batched forward (the server's metrics
    recorder, set by the engine), or None. ``peers``: None, or a callable giving how many callers
    can have a request pending at most (the server sets it to its number of open episodes, each
    of which waits for its step before sending the next): a batch stops waiting for company once
    it holds that many, so a lone robot never pays ``max_wait_ms``.
    """

    def __init__(self, runtime, max_batch: int = 16, max_wait_ms: float = 2.0,
                 max_queue: int = 256, history: int = 4096):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise InputError(f"MicroBatcher: bad limits max_batch={max_batch}, "
                             f"max_wait_ms={max_wait_ms}, max_queue={max_queue}")
        self.runtime = runtime
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.metrics = None
        self.peers = None
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._close_lock = threading.Lock()  # orders submit's closed check against close()
        self._worker = threading.Thread(target=self._loop, name="carve-microbatcher", daemon=True)
        self._worker.start()

    def submit(self, observation: ObservationBatch, skill: str | None) -> Future:
        """Queue one observation (a batch of size 1). The future resolves to (chunk, A) float32,
        or to the exception ``runtime.infer`` raised for its batch. Raises at once for an unknown
        skill (``StateError``), a batch not of size 1 (``InputError``), a full queue
        (``BatcherFull``) or a closed batcher (``BatcherClosed``)."""
        if len(observation) != 1 or observation.state.shape[0] != 1:
            raise InputError(f"submit takes one observation, got a batch of {len(observation)}")
        # validate here so one bad request cannot fail the batch it would have joined
        self.runtime.skill_index(skill)
        fut: Future = Future()
        self._put(_Request(observation, skill, fut, time.monotonic()))
        return fut

    def capture(self, observation: ObservationBatch, module_keys, skill: str | None = None
                ) -> Future:
        """Queue a routing-feature capture (``runtime.capture``) of ``observation`` under
        ``skill``; the future resolves to {key: float32 (N, in)}. Served alone by the worker, in
        order with the inference requests. Raises at once like ``submit``."""
        if len(observation) == 0:
            raise InputError("capture: empty observation batch")
        self.runtime.skill_index(skill)
        fut: Future = Future()
        self._put(_Capture(observation, tuple(module_keys), skill, fut))
        return fut

    def _put(self, item) -> None:
        with self._close_lock:
            if self._closed:
                raise BatcherClosed("MicroBatcher is closed")
            try:
                self._q.put_nowait(item)
            except queue.Full:
                raise BatcherFull(f"MicroBatcher queue full ({self.max_queue} pending requests)"
                                  ) from None

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, serve every queued one, stop the worker."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._q.put(_STOP)  # blocks only while the queue is full, i.e. until the worker drains
        self._worker.join(timeout)

    def __enter__(self) -> "MicroBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        held = None  # an item that ended the previous batch's collection, served next
        while True:
            first = held if held is not None else self._q.get()
            held = None
            if first is _STOP:
                return  # nothing is queued after _STOP
            if isinstance(first, _Capture):
                self._serve_capture(first)
                continue
            batch = [first]
            deadline = first.t_submit + self.max_wait
            limit = self.max_batch
            peers = self.peers
            if peers is not None:  # nobody else can join: do not wait for them
                limit = max(1, min(limit, peers()))
            while len(batch) < limit:
                remaining = deadline - time.monotonic()
                try:
                    item = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP or isinstance(item, _Capture):
                    held = item  # keep the order: serve this batch first, then the item
                    break
                batch.append(item)
            self._serve(batch)

    def _serve_capture(self, req: _Capture) -> None:
        if not req.future.set_running_or_notify_cancel():
            return
        try:
            req.future.set_result(self.runtime.capture(req.obs, req.keys, req.skill))
        except BaseException as exc:  # the waiting route must hear about it, whatever it is
            req.future.set_exception(exc)

    def _serve(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes.append(len(live))
        if self.metrics is not None:
            start = time.monotonic()
            self.metrics.batch(len(live), [start - r.t_submit for r in live])
        try:
            results = self._infer_rows(live)
        except Exception as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            # fault isolation: one row's bad input must not fail the others, so a failed batch
            # is served again row by row and only the offending rows' futures get the error
            for r in live:
                self._serve_alone(r)
            return
        except BaseException as exc:  # every waiter must hear about it, whatever it is
            for r in live:
                r.future.set_exception(exc)
            return
        for r, res in zip(live, results):
            if isinstance(res, BaseException):
                r.future.set_exception(res)
            else:
                r.future.set_result(res)

    def _serve_alone(self, req: _Request) -> None:
        try:
            res = self._infer_rows([req])[0]
        except Exception as exc:
            res = exc
        if isinstance(res, BaseException):
            req.future.set_exception(res)
        else:
            req.future.set_result(res)

    def _infer_rows(self, reqs: list[_Request]) -> list:
        """Per-row results (actions or an exception) of one batched forward. A runtime with
        ``infer_rows`` reports bad rows individually; one with only ``infer`` (all or nothing)
        raises for the batch, and ``_serve`` then isolates by serving the rows alone."""
        obs = concat_observations([r.obs for r in reqs])
        skills = [r.skill for r in reqs]
        per_row = getattr(self.runtime, "infer_rows", None)
        if per_row is not None:
            return per_row(obs, skills)
        return list(self.runtime.infer(obs, skills))
