"""MicroBatcher: group concurrent single-observation requests into one ``runtime.infer`` call.

Several robots (episodes) call in from their own threads; one worker thread takes the oldest
request, then keeps collecting until ``max_batch`` requests or until that oldest request has waited
``max_wait_ms``, runs one batched inference (mixed skills are fine: the runtime picks fused or the
side path), and resolves each request's future with its own (chunk, A) row. The bounded wait caps
the latency a request pays for batching; the bounded queue gives back-pressure instead of an
unbounded backlog (the service maps ``BatcherFull`` to RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from policy_server.errors import InputError
from policy_server.models.base import ObservationBatch


class BatcherFull(RuntimeError):
    """The request queue is at ``max_queue``; retry later."""


class BatcherClosed(RuntimeError):
    """``submit`` after ``close``."""


@dataclass
class _Request:
    obs: ObservationBatch
    skill: str | None
    future: Future
    t_submit: float  # time.monotonic()


_STOP = object()


def concat_observations(obs: list[ObservationBatch]) -> ObservationBatch:
    """Stack size-1 observations into one batch (state (B, S), images key -> (B, H, W, C))."""
    keys = set(obs[0].images)
    for o in obs:
        if set(o.images) != keys:
            raise InputError(f"requests disagree on camera keys: {sorted(keys)} vs "
                             f"{sorted(o.images)}")
    return ObservationBatch(
        state=np.concatenate([o.state for o in obs], axis=0),
        instructions=[s for o in obs for s in o.instructions],
        images={k: np.concatenate([o.images[k] for o in obs], axis=0) for k in sorted(keys)})


class MicroBatcher:
    """Thread-based request batcher in front of a ``PolicyRuntime``.

    max_batch: most requests per ``infer``; max_wait_ms: longest the oldest request of a batch
    waits for company; max_queue: pending requests beyond which ``submit`` raises ``BatcherFull``.
    ``batch_sizes``: sizes of the most recent batches (for metrics and tests).
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
        with self._close_lock:
            if self._closed:
                raise BatcherClosed("MicroBatcher is closed")
            try:
                self._q.put_nowait(_Request(observation, skill, fut, time.monotonic()))
            except queue.Full:
                raise BatcherFull(f"MicroBatcher queue full ({self.max_queue} pending requests)"
                                  ) from None
        return fut

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
        stop = False
        while not stop:
            first = self._q.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = first.t_submit + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True  # serve what we hold, then exit (nothing is queued after _STOP)
                    break
                batch.append(item)
            self._serve(batch)

    def _serve(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes.append(len(live))
        try:
            obs = concat_observations([r.obs for r in live])
            actions = self.runtime.infer(obs, [r.skill for r in live])
        except BaseException as exc:  # every waiter must hear about it, whatever it is
            for r in live:
                r.future.set_exception(exc)
            return
        for r, a in zip(live, actions):
            r.future.set_result(a)
