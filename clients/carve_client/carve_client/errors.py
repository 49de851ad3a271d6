"""The one error type the clients raise for a failed call."""

from __future__ import annotations

import grpc


class PolicyError(RuntimeError):
    """A failed call: ``code`` is the grpc.StatusCode, ``details`` the server's (or the client's)
    message. A call that outlives the client's ``timeout`` is DEADLINE_EXCEEDED."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "PolicyError":
        """Wrap a grpc.RpcError (its status code and details)."""
        return cls(e.code(), e.details() or "")
