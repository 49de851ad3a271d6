"""Prometheus metrics of one server: the metric objects, their ``/metrics`` endpoint and the thin
recorder the servicer, the server and the micro-batcher call.

Each ``PolicyServer`` owns its own :class:`ServerMetrics` with its own ``CollectorRegistry`` (never
prometheus' process-global default registry), so several servers in one process (the tests, the
benchmarks) never collide on metric names. With metrics off (no ``--metrics-port``) the server
holds :data:`NO_METRICS`, whose methods do nothing, so the serving paths never test a flag.

What is recorded where (names, labels and meaning are listed in docs/OPERATIONS.md):
- episodes, their route decisions and step latencies: the servicer hands the recorder the
  responses it sends (:meth:`Recorder.opened` the ``EpisodeStarted``, which carries the skill and
  route; :meth:`Recorder.step` each ``ActionChunk``, with its server receive/done times, so the
  latency is exactly the one reported to the client) and :meth:`Recorder.closed` the outcome;
- abstentions refused before an episode starts: :meth:`Recorder.route` from the servicer;
- errors by gRPC status, for every method (authentication refusals included): a server interceptor
  that reads the status the handler set when it aborted;
- batch size and queue wait: :meth:`Recorder.batch` from the micro-batcher's worker.
"""

from __future__ import annotations

import asyncio
import inspect

import grpc

CORE_ONLY = "(core-only)"  # skill label of an episode without a skill (never a valid skill name)
NO_SKILL = "(none)"        # skill label of an abstained route decision
COMPLETED = "completed"     # outcome of an episode the client ended

_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)
_WAIT_BUCKETS = (.0001, .00025, .0005, .001, .002, .005, .01, .025, .05, .1, .25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CONFIDENCE_BUCKETS = (.1, .2, .3, .4, .5, .6, .7, .8, .9, .95, .99, 1.0)


def status_name(context, exc: BaseException | None) -> str:
    """The gRPC status a handler ended with, as its name (``"NOT_FOUND"``): ``CANCELLED`` when
    the client went away (grpc.aio cancels the handler's task), the code the handler aborted
    with, else ``UNKNOWN`` (what grpc answers for an exception that escapes a handler)."""
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code.name
    return "UNKNOWN" if exc is not None else "OK"


class Recorder:
    """Metrics off: every method does nothing (and ``episode`` passes the stream through)."""

    enabled = False

    def opened(self, started) -> None:
        """An episode started: its ``EpisodeStarted`` message was sent."""

    def step(self, chunk) -> None:
        """One ``ActionChunk`` was sent (its server receive and done times give the latency)."""

    def closed(self, started, outcome: str) -> None:
        """A started episode ended: ``outcome`` is ``COMPLETED`` or the lower-case name of the
        status it ended with (``"internal"``, ``"cancelled"``...)."""

    def route(self, decision, refused: bool) -> None:
        """A route decision (RouteDecision proto) made to open an episode; ``refused``: the
        episode was refused because the router abstained (the servicer reports only those: the
        decisions of started episodes are read from their ``EpisodeStarted``)."""

    def batch(self, size: int, waits_s: list[float]) -> None:
        """One batched forward of ``size`` requests that waited ``waits_s`` in the queue."""

    def state_loaded(self, version: str, loaded_at: float) -> None:
        """The served state version and when it was loaded (unix seconds)."""

    def reload(self, result: str) -> None:
        """A reload while serving: ``"ok"`` (switched) or ``"failed"`` (old version kept)."""

    def bind_active(self, count) -> None:
        """``count()``: the number of episode streams running now (read at each scrape)."""

    def interceptors(self) -> list:
        """Server interceptors to install (first in the chain)."""
        return []

    def serve(self, host: str, port: int) -> int | None:
        """Start the ``/metrics`` endpoint; -> its bound port (None: none started)."""
        return None

    def close(self) -> None:
        """Stop the ``/metrics`` endpoint."""


NO_METRICS = Recorder()


class ServerMetrics(Recorder):
    """The metrics of one server, in a registry of its own, served over HTTP by :meth:`serve`."""

    enabled = True

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        r = self.registry = CollectorRegistry()
        self.episodes_started = Counter("carve_episodes_started", "Episodes started (an "
                                        "EpisodeStarted was sent)", ["skill"], registry=r)
        self.episodes_finished = Counter("carve_episodes_finished", "Started episodes that "
                                         "ended, by how", ["skill", "outcome"], registry=r)
        self.route_decisions = Counter("carve_route_decisions", "Route decisions of episode "
                                       "openings", ["router", "skill"], registry=r)
        self.abstentions = Counter("carve_route_abstentions", "Route decisions where the router "
                                   "abstained, by what followed", ["router", "action"],
                                   registry=r)
        self.confidence = Histogram("carve_router_confidence", "Confidence of route decisions",
                                    ["router"], buckets=_CONFIDENCE_BUCKETS, registry=r)
        self.step_latency = Histogram("carve_step_latency_seconds", "Server-side time of one "
                                      "episode step: observation received to action chunk ready",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("carve_batch_size", "Requests per batched forward",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("carve_batch_queue_wait_seconds", "Time a request waited in "
                                    "the micro-batcher queue before its forward started",
                                    buckets=_WAIT_BUCKETS, registry=r)
        self.active = Gauge("carve_active_episodes", "Episode streams running now", registry=r)
        self.state = Info("carve_state", "The merge-state version being served", registry=r)
        self.state_loaded_at = Gauge("carve_state_loaded_timestamp_seconds", "When the served "
                                     "state version was loaded (unix time)", registry=r)
        self.reloads = Counter("carve_state_reloads", "State reloads while serving, by result",
                               ["result"], registry=r)
        for result in ("ok", "failed"):  # exported at 0 before the first reload
            self.reloads.labels(result)
        self.errors = Counter("carve_grpc_errors", "RPCs that ended with a non-OK status",
                              ["method", "code"], registry=r)
        self._http = None

    # -- recording ----------------------------------------------------------------------------
    def opened(self, started) -> None:
        self.episodes_started.labels(started.skill or CORE_ONLY).inc()
        if started.HasField("route"):
            self.route(started.route, refused=False)

    def step(self, chunk) -> None:
        self.step_latency.observe(max(0.0, chunk.server_done_time - chunk.server_received_time))

    def closed(self, started, outcome: str) -> None:
        self.episodes_finished.labels(started.skill or CORE_ONLY, outcome).inc()

    def route(self, decision, refused: bool) -> None:
        router = decision.router or "unknown"
        self.route_decisions.labels(router, decision.skill or NO_SKILL).inc()
        self.confidence.labels(router).observe(decision.confidence)
        if decision.abstained:
            self.abstentions.labels(router, "refused" if refused else "core_only").inc()

    def batch(self, size: int, waits_s: list[float]) -> None:
        self.batch_size.observe(size)
        for w in waits_s:
            self.queue_wait.observe(max(0.0, w))

    def state_loaded(self, version: str, loaded_at: float) -> None:
        self.state.info({"version": version or ""})
        self.state_loaded_at.set(loaded_at)

    def reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def bind_active(self, count) -> None:
        self.active.set_function(count)

    def interceptors(self) -> list:
        return [_ErrorCounter(self.errors)]

    # -- exposition ---------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serves ``/metrics`` over plain HTTP on ``host:port`` (0: a free port) from a daemon
        thread; -> the bound port. ``InputError`` when it cannot bind."""
        from prometheus_client import start_http_server

        from policy_server.errors import InputError

        try:
            self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise InputError(f"--metrics-port: could not bind {host}:{port} ({e})") from None
        return self._http.server_address[1]

    def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()  # returns once serve_forever has left its loop
            http.server_close()


class _ErrorCounter(grpc.aio.ServerInterceptor):
    """Counts every RPC that ends with a non-OK status, by method and status name. Installed
    first, so it also sees the refusals of the interceptors after it (token auth)."""

    def __init__(self, counter):
        self.counter = counter

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED itself
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method))
        return handler._replace(stream_unary=self._unary(handler.stream_unary, method))

    def _count(self, method: str, context, exc: BaseException | None) -> None:
        name = status_name(context, exc)
        if name != "OK":
            self.counter.labels(method, name).inc()

    # the server's handlers are coroutines (PolicyService, health) or async generators
    # (health's Watch); each wrapper keeps its kind
    def _unary(self, fn, method: str):
        async def handle(request, context):
            try:
                out = await fn(request, context)
            except BaseException as e:
                self._count(method, context, e)
                raise
            self._count(method, context, None)
            return out

        return handle

    def _stream(self, fn, method: str):
        if not inspect.isasyncgenfunction(fn):
            return self._unary(fn, method)

        async def handle(request, context):
            exc: BaseException | None = None
            try:
                async for resp in fn(request, context):
                    yield resp
            except BaseException as e:
                exc = e
                raise
            finally:
                self._count(method, context, exc)

        return handle


def make_metrics(enabled: bool) -> Recorder:
    """A fresh :class:`ServerMetrics` when ``enabled``, else :data:`NO_METRICS`."""
    return ServerMetrics() if enabled else NO_METRICS

