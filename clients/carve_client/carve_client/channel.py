"""Channel construction and the retry schedule shared by the sync and asyncio clients."""

from __future__ import annotations

import grpc

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
