"""Bearer-token authentication as a gRPC server interceptor.

Health checks and reflection stay open so orchestrators (Kubernetes probes, grpcurl) work without
the token; every PolicyService call needs ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc
from carve_client.auth import TokenError
from carve_client.auth import read_token_file as _read_token_file

from policy_server.errors import InputError

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_token_file(path: str | Path) -> str:
    """The token of ``--auth-token-file``: the file's content without surrounding whitespace (the
    clients' reader); an unreadable or empty file is an InputError (exit code 2)."""
    try:
        return _read_token_file(path)
    except TokenError as e:
        raise InputError(str(e)) from None


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED (constant-time compare)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or invalid 'authorization: Bearer <token>' metadata")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny_stream if method.endswith("/Episode") else self._deny_unary
