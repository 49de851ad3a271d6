"""Bounded episode streams: a cap on concurrent episodes, a per-stream idle timeout, and a drain
that can end running episodes with a status of the server's choosing.

The server runs on grpc.aio, so an episode is a task on one event loop that reads its stream with
``await context.read()``. An idle robot therefore holds no thread, and a waiting handler can be
woken: :class:`EpisodeStream` arms a timer for each read (the idle timeout) and the drain calls
:meth:`EpisodeSlots.end_all`; either one cancels the handler's task with a *verdict*, and the
handler answers DEADLINE_EXCEEDED or UNAVAILABLE itself (a client cancelling its call also
cancels the task, with no verdict: that one just ends).
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc


class EpisodeStream:
    """One running episode's task on the server's loop, and why the server ended it.

    ``verdict``: None, or (status code, message) once the idle timer or the drain cancelled the
    task; the handler turns a cancellation with a verdict into that status."""

    __slots__ = ("loop", "task", "verdict", "waiting_for", "idle_s", "inflight")

    def __init__(self, idle_s: float | None):
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.verdict: tuple[grpc.StatusCode, str] | None = None
        self.waiting_for = ""
        self.idle_s = idle_s
        self.inflight = None  # the pool's future of the episode's latest step (or routing)

    async def read(self, context, waiting_for: str):
        """``await context.read()`` bounded by the idle timeout (a timer handle per read: no
        task, no thread)."""
        if self.idle_s is None:
            return await context.read()
        self.waiting_for = waiting_for
        timer = self.loop.call_later(self.idle_s, self._idle)
        try:
            return await context.read()
        finally:
            timer.cancel()

    def _idle(self) -> None:
        self.end(grpc.StatusCode.DEADLINE_EXCEEDED,
                 f"episode: no {self.waiting_for} within {self.idle_s:g}s (the server's idle "
                 "limit per episode); episode ended, open a new one")

    def end(self, code: grpc.StatusCode, message: str) -> None:
        """End the episode with ``code`` (call on the loop): cancel its task with a verdict."""
        if self.verdict is None and not self.task.done():
            self.verdict = (code, message)
            self.task.cancel()


SHUTDOWN_MESSAGE = ("server is shutting down; the episode was ended after the drain grace "
                    "period (retry on another server)")


class EpisodeRefused(Exception):
    """No slot for a new episode: ``reason`` is "draining" or "full"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class EpisodeSlots:
    """Counts running episodes against ``limit``; ``drain`` refuses new ones, ``end_all`` ends
    the running ones (their handlers answer UNAVAILABLE). Thread-safe: episodes enter and leave
    on the server's loop, the drain runs in the thread that stops the server."""

    def __init__(self, limit: int):
        self.limit = limit
        self.shutdown = threading.Event()
        self._active = 0
        self._draining = False
        self._cond = threading.Condition()
        self._streams: set[EpisodeStream] = set()

    @property
    def active(self) -> int:
        return self._active

    def enter(self, stream: EpisodeStream | None = None) -> None:
        """Take a slot for ``stream`` (None: count only), or raise :class:`EpisodeRefused`
        (checked under the same lock as the drain flag, so no episode starts after the drain
        saw zero running)."""
        with self._cond:
            if self._draining:
                raise EpisodeRefused("draining", "server is shutting down; not accepting new "
                                                 "episodes (retry on another server)")
            if self._active >= self.limit:
                raise EpisodeRefused("full", f"server is at its limit of {self.limit} "
                                             "concurrent episodes; retry later")
            self._active += 1
            if stream is not None:
                self._streams.add(stream)

    def leave(self, stream: EpisodeStream | None = None) -> None:
        """Give ``stream``'s slot back."""
        with self._cond:
            self._active -= 1
            self._streams.discard(stream)
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
        """End every running episode with UNAVAILABLE (from any thread): each one's task is
        cancelled on its loop with that verdict, whether it waits for a message or for its
        inference."""
        self.shutdown.set()
        with self._cond:
            streams = list(self._streams)
        for st in streams:
            try:
                st.loop.call_soon_threadsafe(st.end, grpc.StatusCode.UNAVAILABLE,
                                             SHUTDOWN_MESSAGE)
            except RuntimeError:  # the loop is closed: nothing runs there any more
                pass

