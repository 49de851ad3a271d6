"""Channel construction and the retry schedule shared by the sync and asyncio clients."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2_grpc

from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc

# Must stay compatible with the server's keepalive policy (ServerConfig.min_ping_interval_ms).
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
                     ("grpc.keepalive_permit_without_calls", 1)]
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``authorization: Bearer <token>`` (empty without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def make_channel(target: str, tls_root_cert: str | bytes | None = None, tls: bool = False,
                 aio: bool = False):
    """A grpc (or grpc.aio) channel to ``target`` ("host:port"). TLS when ``tls`` or a root
    certificate (PEM bytes, or a path to them) is given; otherwise plaintext."""
    opts = KEEPALIVE_OPTIONS + [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    mod = grpc.aio if aio else grpc
    if tls or tls_root_cert:
        root = tls_root_cert
        if isinstance(root, str):
            with open(root, "rb") as f:
                root = f.read()
        return mod.secure_channel(target, grpc.ssl_channel_credentials(root), options=opts)
    return mod.insecure_channel(target, options=opts)


def retry_delays(retries: int, backoff_s: float) -> list[float | None]:
    """Sleep before each retry, exponential from ``backoff_s``; the final None marks the last
    attempt (``retries + 1`` attempts in all)."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    return [backoff_s * 2 ** i for i in range(retries)] + [None]


class ClientConnection:
    """What the sync and asyncio clients share: target, auth metadata, channel, stubs and the
    timeout/retry policy. ``timeout`` (seconds, None = unbounded) bounds every call."""

    _aio = False

    def __init__(self, target: str, token: str | None = None,
                 tls_root_cert: str | bytes | None = None, tls: bool = False,
                 timeout: float | None = 30.0, retries: int = 3, backoff_s: float = 0.2):
        self.target = target
        self._metadata = auth_metadata(token)
        self._channel = make_channel(target, tls_root_cert, tls, aio=self._aio)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
