"""Bearer-token authentication as a gRPC server interceptor.

Health checks and reflection stay open so orchestrators (Kubernetes probes, grpcurl) work without
the token; every PolicyService call needs ``authorization: Bearer <token>``, except the admin
``Reload``, which needs the separate admin token in the same header (checked by
``check_admin_token`` in the servicer, so a robot's token never switches versions).
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc
from carve_client.auth import TokenError
from carve_client.auth import read_token_file as _read_token_file

from policy_server.errors import InputError
from policy_server.service.wire import Abort

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHODS = ("/carve.policy.v1.PolicyService/Reload",)  # authenticated by the admin token


def check_admin_token(context, expected: str | None) -> None:
    """Aborts an admin call (raises ``wire.Abort``): PERMISSION_DENIED when the server has no
    admin token (admin calls are off), UNAUTHENTICATED without ``authorization: Bearer <admin
    token>`` or with a wrong one (constant-time compare)."""
    if not expected:
        raise Abort(grpc.StatusCode.PERMISSION_DENIED,
                    "admin calls are disabled: the server was started without "
                    "--admin-token-file")
    got = _authorization(context.invocation_metadata())
    if not hmac.compare_digest(got.encode(), f"Bearer {expected}".encode()):
        raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid 'authorization: Bearer <admin token>' metadata")


def _authorization(metadata) -> str:
    """The ``authorization`` value of call metadata ("" when absent)."""
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


def read_token_file(path: str | Path) -> str:
    """The token of ``--auth-token-file``: the file's content without surrounding whitespace (the
    clients' reader); an unreadable or empty file is an InputError (exit code 2)."""
    try:
        return _read_token_file(path)
    except TokenError as e:
        raise InputError(str(e)) from None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED (constant-time compare).
    A grpc.aio interceptor: the server runs on grpc.aio (see server.py)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid 'authorization: Bearer <token>' metadata")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES) or method in ADMIN_METHODS:
            return await continuation(handler_call_details)
        got = _authorization(handler_call_details.invocation_metadata)
        if hmac.compare_digest(got.encode(), self._expected):
            return await continuation(handler_call_details)
        return self._deny_stream if method.endswith("/Episode") else self._deny_unary
