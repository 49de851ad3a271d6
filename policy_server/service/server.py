"""The gRPC server: PolicyService + health + reflection, TLS, token auth, graceful shutdown.

Threading model: a grpc.aio server on one event loop in a thread of its own ("carve-grpc"),
so ``PolicyServer`` keeps its blocking API (``start``, ``stop``, ``wait``). Each episode stream
is a task on that loop: messages are read and written without a thread hand-off per message,
and an idle stream holds no thread at all. The blocking part of a step (decoding the
observation, the engine's inference) runs in a thread pool of ``max_workers`` threads, one
hand-off per step; concurrent episodes meet in the runtime's ``MicroBatcher``, which runs one
batched forward for all of them (torch releases the GIL), so a slow robot never stalls another
(unlike openpi's event loop, which runs inference inline). Health, ``ListSkills`` and
``ServerInfo`` are answered on the loop itself.

Bounds: at most ``max_episodes`` episode streams run at once (default and maximum: the pool's
threads minus ``RESERVED_WORKERS``, so every running episode can have a step in the pool while
routing and reloads still find a thread); an episode with no message for
``episode_idle_timeout_s`` is ended.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from policy_server.errors import CarveError, InputError
from policy_server.runtime.batcher import MicroBatcher
from policy_server.service.auth import TokenAuthInterceptor
from policy_server.service.metrics import make_metrics
from policy_server.service.reload import Follower, Reloader
from policy_server.service.servicer import EngineHolder, PolicyServicer
from policy_server.service.validation import InputLimits
from policy_server.service.wire import policy_service_handler

log = logging.getLogger("carve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name
_GRPC_GRACE_S = 1.0   # grpc's own grace once our episodes are done (unary calls in flight)
_END_WAIT_S = 1.0     # how long ended episodes get to send their UNAVAILABLE
RESERVED_WORKERS = 4  # pool threads episodes can never take (routing, reloads)


@dataclass
class ServerConfig:
    """Network settings. Keepalive values must be matched by clients (see carve_client/channel.py)."""

    host: str = "127.0.0.1"
    port: int = 50051               # 0 picks a free port
    max_workers: int = 64           # threads for steps, routing and reloads
    max_episodes: int | None = None  # concurrent episode streams; None: max_workers - RESERVED
    episode_idle_timeout_s: float | None = 30.0  # no message for that long ends an episode
    max_message_mb: int = 32
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    min_ping_interval_ms: int = 10_000
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    max_image_pixels: int = 4096 * 4096
    state_sigma: float | None = 1000.0   # state bound from the model's statistics (None: off)
    state_abs: float | None = 1e6        # state bound without statistics (None: off)
    metrics_port: int | None = None      # Prometheus /metrics port (0: a free one; None: off)
    admin_token: str | None = None       # the admin Reload RPC's token (None: Reload refused)
    follow_interval_s: float | None = None  # poll the state's CURRENT this often (None: off)

    def validate(self) -> None:
        """``InputError`` naming the option for a setting the server cannot run with."""
        if self.max_workers < RESERVED_WORKERS + 1:
            raise InputError(f"--max-workers: {self.max_workers} (at least "
                             f"{RESERVED_WORKERS + 1})")
        if not 0 < self.episode_limit <= self.max_workers - RESERVED_WORKERS:
            raise InputError(f"--max-episodes: {self.episode_limit} must be in 1.."
                             f"{self.max_workers - RESERVED_WORKERS} (--max-workers minus "
                             f"{RESERVED_WORKERS} kept for health and unary calls)")
        if self.episode_idle_timeout_s is not None and self.episode_idle_timeout_s <= 0:
            raise InputError(f"--episode-idle-timeout: {self.episode_idle_timeout_s} (> 0)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InputError("--tls-cert and --tls-key must be given together (TLS needs both "
                             "a certificate and its private key)")
        if self.follow_interval_s is not None and self.follow_interval_s <= 0:
            raise InputError(f"--follow-interval: {self.follow_interval_s} (> 0)")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InputError(f"--metrics-port: {self.metrics_port} (0..65535)")
        for opt, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path and not Path(path).is_file():
                raise InputError(f"{opt}: {path} is not a readable file")

    @property
    def episode_limit(self) -> int:
        """Concurrent episode streams allowed: ``max_episodes``, or every worker but the
        reserved ones."""
        if self.max_episodes is None:
            return self.max_workers - RESERVED_WORKERS
        return self.max_episodes

    @property
    def limits(self) -> InputLimits:
        """The observation limits these settings describe."""
        return InputLimits(self.max_image_pixels, self.state_sigma, self.state_abs)


class PolicyServer:
    """Owns the grpc server. ``engine`` is a PolicyEngine or a zero-argument factory that builds
    one (loaded in the background so health reports NOT_SERVING until it is ready). source: the
    ``serving.StateSource`` of the served state, enabling the admin ``Reload`` RPC and (with
    ``config.follow_interval_s``) following its ``CURRENT``; None: the version is fixed."""

    def __init__(self, engine_or_factory, config: ServerConfig | None = None, source=None):
        self.config = config or ServerConfig()
        self._factory: Callable | None = engine_or_factory if callable(engine_or_factory) \
            and not hasattr(engine_or_factory, "infer") else None
        self.holder = EngineHolder()
        self.holder.on_serve = self._bind_engine
        if self._factory is None:
            self.holder.engine = engine_or_factory
        self.config.validate()
        self.metrics = make_metrics(self.config.metrics_port is not None)
        self._pool = futures.ThreadPoolExecutor(max_workers=self.config.max_workers,
                                                thread_name_prefix="carve-rpc")
        self.servicer = PolicyServicer(self.holder, self.config.limits,
                                       self.config.episode_limit,
                                       self.config.episode_idle_timeout_s, self.metrics,
                                       pool=self._pool)
        self.metrics.bind_active(lambda: self.servicer.slots.active)
        self.servicer.admin_token = self.config.admin_token
        self.reloader = Reloader(self.holder, source, self.metrics) if source else None
        self.servicer.reloader = self.reloader
        self.follower: Follower | None = None
        self.health = health.aio.HealthServicer()
        self.load_error: BaseException | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._terminated = threading.Event()
        self.port: int | None = None
        self.metrics_port: int | None = None  # the bound /metrics port, once started

    def _options(self) -> list[tuple[str, int]]:
        c = self.config
        size = c.max_message_mb * 1024 * 1024
        return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                ("grpc.keepalive_time_ms", c.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", c.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", c.min_ping_interval_ms),
                ("grpc.http2.max_pings_without_data", 0)]

    def start(self, wait_loaded: bool = True) -> int:
        """Bind, start serving and load the engine. Returns the bound port."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run_loop():
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._loop_thread = threading.Thread(target=run_loop, name="carve-grpc", daemon=True)
        self._loop_thread.start()
        ready.wait()
        try:
            self._call(self._astart(), None)
        except BaseException:
            self._stop_loop()
            raise
        if self.holder.engine is not None:
            self._mark_ready()
        else:
            t = threading.Thread(target=self._load, name="carve-load", daemon=True)
            t.start()
            if wait_loaded:
                t.join()
                if self.load_error is not None:
                    self.stop(0)
                    raise self.load_error
        return self.port

    def _call(self, coro, timeout: float | None):
        """Run ``coro`` on the server's loop from another thread; its result (TimeoutError
        after ``timeout`` seconds, None: no limit)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _astart(self) -> None:
        c = self.config
        # metrics first: it counts the statuses of the calls the token check refuses too
        interceptors = self.metrics.interceptors() + (
            [TokenAuthInterceptor(c.auth_token)] if c.auth_token else [])
        server = grpc.aio.server(interceptors=interceptors, options=self._options())
        server.add_generic_rpc_handlers((policy_service_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._aset_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{c.host}:{c.port}"
        try:
            if c.tls_cert:
                with open(c.tls_key, "rb") as k, open(c.tls_cert, "rb") as crt:
                    creds = grpc.ssl_server_credentials([(k.read(), crt.read())])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
            raise InputError(f"--host/--port: could not bind {address} ({e})") from None
        if not self.port:
            raise InputError(f"--host/--port: could not bind {address} (in use?)")
        self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
        await server.start()
        self._server = server

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            self._loop_thread.join(5.0)
        self._pool.shutdown(wait=False)  # idle threads exit; a running step finishes first
        self._terminated.set()

    def _load(self) -> None:
        try:
            self.holder.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - surfaced to start() or to the log
            # a CarveError's message says it all; the CLI prints it (traceback only with -v)
            log.debug("loading the policy failed", exc_info=True)
            if not isinstance(e, CarveError):
                log.error("loading the policy failed: %s: %s", type(e).__name__, e)
            self.load_error = e
            return
        self._mark_ready()

    def _bind_engine(self, engine) -> None:
        """Tell the engine's micro-batcher (if it has one) how many episodes are open: each has
        at most one step pending, so a batch never waits for requests that cannot come."""
        batcher = getattr(engine, "batcher", None)
        if isinstance(batcher, MicroBatcher):
            slots = self.servicer.slots
            batcher.peers = lambda: slots.active

    def _mark_ready(self) -> None:
        engine = self.holder.engine
        self.holder.loaded_at = time.time()
        self._bind_engine(engine)
        engine.attach_metrics(self.metrics)
        self.metrics.state_loaded(str(engine.info().get("state_version", "")),
                                  self.holder.loaded_at)
        self.holder.ready.set()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.reloader is not None and self.config.follow_interval_s is not None:
            self.follower = Follower(self.reloader, self.config.follow_interval_s)
            self.follower.start()

    async def _aset_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _set_health(self, status) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():  # stopped (e.g. a load that ended after stop())
            return
        self._call(self._aset_health(status), 5.0)

    def stop(self, grace: float = 10.0) -> None:
        """Graceful shutdown, bounded by about ``grace`` + 3 seconds whatever came before: health
        NOT_SERVING and new episodes refused with UNAVAILABLE (the grpc server keeps accepting
        calls meanwhile, so a refused robot hears UNAVAILABLE, never CANCELLED); running episodes
        finish for up to ``grace`` seconds, then are ended with UNAVAILABLE; then the grpc server
        stops and the engine closes."""
        if self._server is None:
            return
        t0 = time.monotonic()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.follower is not None:
            self.follower.stop()
        slots = self.servicer.slots
        slots.drain()
        if not slots.wait_idle(grace):
            log.warning("%d episode(s) still running after %.1fs grace; ending them with "
                        "UNAVAILABLE", slots.active, grace)
            slots.end_all()
            # each handler's task is cancelled at once, even one waiting for its inference
            slots.wait_idle(_END_WAIT_S)
        try:
            self._call(self._server.stop(grace=_GRPC_GRACE_S), _GRPC_GRACE_S + 1.0)
        except TimeoutError:
            log.warning("grpc server did not report termination within %.1fs; going on",
                        _GRPC_GRACE_S + 1.0)
        self._server = None
        self._stop_loop()  # idle pool threads exit; none is left blocked in a handler
        self.metrics.close()
        self.holder.close()
        log.info("stopped in %.2fs", time.monotonic() - t0)

    def wait(self) -> None:
        """Block until the server has stopped."""
        if self._server is not None:
            self._terminated.wait()
