"""Bounded episode streams: a cap on concurrent episodes, a per-stream idle timeout, and a drain
that can end running episodes with a status of the server's choosing.

grpc's synchronous server gives an Episode handler a blocking request iterator with no timeout and
no way to wake it, so an idle robot would hold its worker thread forever and a draining server
could only end it by cancelling (the client then sees CANCELLED, which it does not retry). An
:class:`Inbox` moves the stream's requests into a small queue on a daemon thread; the handler waits
on that queue with a timeout and is woken by :class:`EpisodeSlots` when the drain's grace ends,
and answers DEADLINE_EXCEEDED or UNAVAILABLE itself.
"""

from __future__ import annotations

import queue
import threading
import time

EOF = object()        # the client half-closed the stream
IDLE = object()       # nothing arrived within the idle timeout
SHUTDOWN = object()   # the server's drain grace ended
_SLICE_S = 0.25       # how often a waiting handler looks at the shutdown flag
_DEPTH = 4            # requests read ahead of the handler (grpc flow control holds the rest)


class StreamGone:
    """The client cancelled the stream or the connection broke (``error``: the RpcError)."""

    def __init__(self, error: BaseException):
        self.error = error


class Inbox:
    """The requests of one stream, read on a daemon thread into a queue of :data:`_DEPTH`."""

    def __init__(self, request_iterator):
        self._q: queue.Queue = queue.Queue(maxsize=_DEPTH)
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._pump, args=(request_iterator,),
                                        name="carve-stream-reader", daemon=True)
        self._reader.start()

    def _put(self, item) -> bool:
        # bounded wait per try, so a reader whose handler has gone does not block forever
        while not self._closed.is_set():
            try:
                self._q.put(item, timeout=_SLICE_S)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self, request_iterator) -> None:
        try:
            for req in request_iterator:
                if not self._put(req):
                    return
        except Exception as e:  # noqa: BLE001 - grpc.RpcError when the client cancels
            self._put(StreamGone(e))
            return
        self._put(EOF)

    def get(self, timeout: float | None, shutdown: threading.Event):
        """The next request, :data:`EOF`, a :class:`StreamGone`, :data:`IDLE` after ``timeout``
        seconds (None: no limit) or :data:`SHUTDOWN` once ``shutdown`` is set."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if shutdown.is_set():
                return SHUTDOWN
            wait = _SLICE_S if end is None else min(_SLICE_S, end - time.monotonic())
            if wait <= 0:
                return IDLE
            try:
                return self._q.get(timeout=wait)
            except queue.Empty:
                continue

    def close(self) -> None:
        """The handler is done: let the reader thread end (it exits with the RPC)."""
        self._closed.set()


class EpisodeRefused(Exception):
    """No slot for a new episode: ``reason`` is "draining" or "full"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class EpisodeSlots:
    """Counts running episodes against ``limit``; ``drain`` refuses new ones, ``end_all`` wakes
    the running ones (their handlers answer UNAVAILABLE)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.shutdown = threading.Event()
        self._active = 0
        self._draining = False
        self._cond = threading.Condition()

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> None:
        """Take a slot, or raise :class:`EpisodeRefused` (checked under the same lock as the
        drain flag, so no episode starts after the drain saw zero running)."""
        with self._cond:
            if self._draining:
                raise EpisodeRefused("draining", "server is shutting down; not accepting new "
                                                 "episodes (retry on another server)")
            if self._active >= self.limit:
                raise EpisodeRefused("full", f"server is at its limit of {self.limit} "
                                             "concurrent episodes; retry later")
            self._active += 1

    def leave(self) -> None:
        """Give a slot back."""
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def drain(self) -> None:
        """Refuse every new episode from now on."""
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Block until no episode runs (at most ``timeout`` seconds); True when idle."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._active:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def end_all(self) -> None:
        """Wake every waiting episode handler with :data:`SHUTDOWN`."""
        self.shutdown.set()
