"""Live version following: switch a running server to another merge-state version.

A reload builds a second engine beside the served one through the composition root
(``serving.StateSource.build``, files verified): the folded ``base + core`` is rebuilt tensor by
tensor from the base checkpoint and everything unchanged is shared with the served engine
(``runtime/refold.py``; a backend without ``PolicyBackend.with_module`` gets a whole new engine).
It then swaps it into the ``EngineHolder`` in one step: new episodes get the new engine, episodes
already running keep the engine they started on (each holds a pin; an engine is closed when it is
retired and its last pin is released, and its own tensors are freed with it). The transient peak
memory is therefore the rebuilt tensors plus the new version's residuals (docs/OPERATIONS.md).

Anything that goes wrong before the swap (unknown version, a version that fails to verify or to
load, a vanished state directory) leaves the served engine untouched; the failure is logged,
counted (``carve_state_reloads_total{result="failed"}``) and reported by ``ServerInfo``.
Reloads are serialized, so a follower and an admin ``Reload`` racing each other load a version
once (the second sees it already served: a no-op).
"""

from __future__ import annotations

import logging
import threading
import time

from policy_server.errors import CarveError

log = logging.getLogger("carve.reload")


class Reloader:
    """Switches ``holder``'s engine to versions of ``source`` (a ``serving.StateSource``).
    metrics: the server's ``Recorder``. ok / failed: reloads done / refused; last_error: why the
    latest one failed ("" after a success); last_time: when the latest one was attempted."""

    def __init__(self, holder, source, metrics):
        self.holder = holder
        self.source = source
        self.metrics = metrics
        self.ok = self.failed = 0
        self.last_error = ""
        self.last_time = 0.0
        self._lock = threading.Lock()  # one reload at a time

    def served_version(self) -> str:
        engine = self.holder.engine
        return str(engine.info().get("state_version", "")) if engine is not None else ""

    def reload(self, version: str | None = None) -> tuple[str, str, bool]:
        """Serve ``version`` (None: the state's CURRENT) to new episodes -> (previous version,
        served version, changed). Raises the ``CarveError`` (``UnknownVersion`` for a version
        that does not exist) or the load error, with the served engine unchanged."""
        with self._lock:
            self.last_time = time.time()
            previous = self.served_version()
            target = version
            try:
                target = version or self.source.current()
                self.source.check(target)
                if target == previous:
                    return previous, previous, False
                engine = self._build(target)
            except BaseException as e:
                self.report_failure(previous, target, e)
                raise
            engine.attach_metrics(self.metrics)
            self.holder.swap(engine)
            self.metrics.state_loaded(target, self.holder.loaded_at)
            self.metrics.reload("ok")
            self.ok += 1
            self.last_error = ""
            log.warning("state version %s -> %s: new episodes use %s; running episodes finish "
                        "on the version they started on", previous, target, target)
            return previous, target, True

    def _build(self, target: str):
        """The engine for ``target``, rebuilt beside the served one (pinned meanwhile, so a
        concurrent stop cannot close it under the rebuild)."""
        if self.holder.engine is None:
            return self.source.build(target)
        with self.holder.pinned() as served:
            return self.source.build(target, beside=served)

    def report_failure(self, previous: str, target: str | None, e: BaseException) -> None:
        """Log, count and keep (for ``ServerInfo``) a refused switch to ``target``."""
        self.failed += 1
        what = f"{type(e).__name__}: {e}" if not isinstance(e, CarveError) else str(e)
        self.last_error = f"reload to {target or 'CURRENT'} failed: {what}"
        self.metrics.reload("failed")
        log.error("%s; still serving %s", self.last_error, previous or "-")



class Follower:
    """Polls the state's ``CURRENT`` every ``interval_s`` and reloads when it changes (an
    admission or a rollback committed a version). Starts from the served version, so a server
    started on an older ``--version`` moves to ``CURRENT`` at the first poll. A failed reload is
    tried again only when ``CURRENT`` changes again (a bad version is not rebuilt every poll)."""

    def __init__(self, reloader: Reloader, interval_s: float):
        self.reloader = reloader
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._seen = reloader.served_version()
        self._thread = threading.Thread(target=self._run, name="carve-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """One look at ``CURRENT``; reload if it moved (errors are reported by the reloader)."""
        try:
            current = self.reloader.source.current()
        except CarveError as e:
            current, error = None, e
        else:
            error = None
        if current == self._seen:
            return
        self._seen = current
        if error is not None:  # vanished or unreadable state: report once, keep serving
            self.reloader.report_failure(self.reloader.served_version(), None, error)
            return
        try:
            self.reloader.reload(current)
        except Exception:  # noqa: BLE001 - reported by the reloader; keep following
            pass

    def stop(self) -> None:
        """No poll starts after this. A reload already building is not waited for (that could
        take long for a big model and the shutdown is bounded): the stopped holder closes the
        engine it finishes with."""
        self._stop.set()
