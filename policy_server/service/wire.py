"""How PolicyService is registered with grpc.aio: request deserializers that never raise, status
messages of bounded length, and the one way a handler ends a call with a status (:class:`Abort`).

grpc's generated ``add_PolicyServiceServicer_to_server`` deserializes with ``FromString``; when that
raises, grpc answers INTERNAL "Exception deserializing request!" and, for a stream, leaves the
call half-finished so that ``server.stop(grace).wait()`` never returns (reproduced with ~25 such
streams). Here the deserializer returns an :class:`Undecodable` marker instead and the servicer
answers INVALID_ARGUMENT naming the message type, through the normal path.

Handlers (and the synchronous helpers they run, on the event loop or in the servicer's thread
pool) end a call by raising :class:`Abort` (``abort(...)``); the wrappers here turn it into
grpc.aio's ``await context.abort``, which cannot be called from a worker thread or a plain
function.
"""

from __future__ import annotations

import grpc
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["PolicyService"]
MAX_DETAILS = 1000  # status message characters; far below the 8 KiB default metadata limit


class Undecodable:
    """Stands in for a request whose bytes do not parse as ``message`` (a type name)."""

    def __init__(self, message: str, nbytes: int, error: BaseException):
        self.message, self.nbytes, self.error = message, nbytes, error

    def details(self) -> str:
        """The INVALID_ARGUMENT message for this request."""
        return (f"request: {self.nbytes} bytes do not parse as {self.message} "
                f"({type(self.error).__name__})")


def safe_deserializer(cls):
    """``cls.FromString`` that returns an :class:`Undecodable` instead of raising."""
    name = cls.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's bad bytes
            return Undecodable(name, len(data), e)

    return deserialize


def bounded(details: str) -> str:
    """``details`` cut to :data:`MAX_DETAILS` characters (a status message that exceeds the
    client's metadata limit reaches it as RESOURCE_EXHAUSTED instead of the real status)."""
    if len(details) <= MAX_DETAILS:
        return details
    return f"{details[:MAX_DETAILS - 30]}... ({len(details)} chars in all)"


class Abort(Exception):
    """End the current call with ``code`` and the (bounded) ``details``: raised anywhere below a
    handler, turned into ``context.abort`` by the wrappers of :func:`policy_service_handler`."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, bounded(details)


def abort(context, code: grpc.StatusCode, details: str):
    """Raise :class:`Abort` with a bounded message (``context``: the call's, unused; kept so
    the call sites read as grpc's ``context.abort``)."""
    raise Abort(code, details)


def _unary(fn):
    async def handle(request, context):
        try:
            if isinstance(request, Undecodable):
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())
            return await fn(request, context)
        except Abort as e:
            await context.abort(e.code, e.details)

    return handle


def _stream(fn):
    async def handle(request_iterator, context):
        try:
            await fn(request_iterator, context)
        except Abort as e:
            await context.abort(e.code, e.details)

    return handle


def policy_service_handler(servicer) -> grpc.GenericRpcHandler:
    """The generic handler serving ``servicer`` (coroutine methods named as the RPCs; Episode
    reads and writes through its context) for every method of ``carve.policy.v1.PolicyService``
    on a grpc.aio server, with :func:`safe_deserializer` request parsing. Unary
    methods answer an undecodable request with INVALID_ARGUMENT here; ``Episode`` receives the
    :class:`Undecodable` marker in its request stream and answers the same."""
    handlers = {}
    for method in SERVICE.methods:
        req_cls = getattr(pb, method.input_type.name)
        resp_cls = getattr(pb, method.output_type.name)
        fn = getattr(servicer, method.name)
        kw = {"request_deserializer": safe_deserializer(req_cls),
              "response_serializer": resp_cls.SerializeToString}
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(_stream(fn), **kw)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(fn), **kw)
        else:  # the proto has no such methods today; refuse to serve one silently wrong
            raise NotImplementedError(f"{method.full_name}: streaming kind not supported")
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
