"""The gRPC server: PolicyService + health + reflection, TLS, token auth, graceful shutdown.

Threading model: grpc's synchronous server with a thread pool; each episode stream holds one worker
thread and blocks only on its own inference future. Concurrent episodes meet in the runtime's
``MicroBatcher``, which runs one batched forward for all of them (torch releases the GIL), so a slow
or idle robot never stalls another (unlike a single-threaded event loop doing inference inline).
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from policy_server.service.auth import TokenAuthInterceptor
from policy_server.service.servicer import EngineHolder, PolicyServicer

log = logging.getLogger("carve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name


@dataclass
class ServerConfig:
    """Network settings. Keepalive values must be matched by clients (see carve_client/channel.py)."""

    host: str = "127.0.0.1"
    port: int = 50051               # 0 picks a free port
    max_workers: int = 64           # concurrent streams + unary calls
    max_message_mb: int = 32
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    min_ping_interval_ms: int = 10_000
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    max_image_pixels: int = 4096 * 4096


class PolicyServer:
    """Owns the grpc server. ``engine`` is a PolicyEngine or a zero-argument factory that builds
    one (loaded in the background so health reports NOT_SERVING until it is ready)."""

    def __init__(self, engine_or_factory, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self._factory: Callable | None = engine_or_factory if callable(engine_or_factory) \
            and not hasattr(engine_or_factory, "infer") else None
        self.holder = EngineHolder()
        if self._factory is None:
            self.holder.engine = engine_or_factory
        self.servicer = PolicyServicer(self.holder, self.config.max_image_pixels)
        self.health = health.HealthServicer()
        self.load_error: BaseException | None = None
        self._server: grpc.Server | None = None
        self.port: int | None = None

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
        c = self.config
        interceptors = [TokenAuthInterceptor(c.auth_token)] if c.auth_token else []
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=c.max_workers,
                                                        thread_name_prefix="carve-rpc"),
                             interceptors=interceptors, options=self._options())
        pb_grpc.add_PolicyServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{c.host}:{c.port}"
        if c.tls_cert or c.tls_key:
            if not (c.tls_cert and c.tls_key):
                raise ValueError("TLS needs both a certificate and a key file")
            with open(c.tls_key, "rb") as k, open(c.tls_cert, "rb") as crt:
                creds = grpc.ssl_server_credentials([(k.read(), crt.read())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not bind {address}")
        server.start()
        self._server = server
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

    def _load(self) -> None:
        try:
            self.holder.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - surfaced to start() or to the log
            log.exception("loading the policy failed")
            self.load_error = e
            return
        self._mark_ready()

    def _mark_ready(self) -> None:
        self.holder.ready.set()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float = 10.0) -> None:
        """Graceful shutdown: refuse new episodes, let running ones finish (up to ``grace`` s),
        then stop the server and close the engine."""
        if self._server is None:
            return
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.servicer.draining.set()
        if not self.servicer.wait_idle(grace):
            log.warning("%d episode(s) still running after %.1fs grace; cancelling",
                        self.servicer.active_episodes, grace)
        self._server.stop(grace=1.0).wait()
        self._server = None
        if self.holder.engine is not None:
            self.holder.engine.close()

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()
