"""A reference, not a competitor: what gRPC Python itself costs for carve's messages.

The server is a grpc.aio server whose ``Episode`` method echoes pre-serialized bytes (an
``EpisodeStarted``, then one fixed ``ActionChunk`` response per request) with identity
(de)serializers, so no protobuf parsing, decoding, validation, engine or servicer code runs; the
client sends the bytes of the same ``EpisodeRequest`` carve's client sends, through the same kind
of call as ``PolicyClient`` (a synchronous stream fed from a queue, read with ``next``). The gap
between this floor and carve-serve is carve's own work per step; the gap between this floor and
openpi is gRPC's (HTTP/2 framing, grpc's threads) against a websocket's. With ``policy_ms`` > 0
the sleep runs in a thread pool (as carve's steps do), so the floor also shows the best overlap
the design can reach.
"""

from __future__ import annotations

from bench.transport.common import CHUNK

METHOD = "/carve.policy.v1.PolicyService/Episode"


def _identity(b: bytes) -> bytes:
    return b


def serve(policy_ms: float, image_counts: list[int], conn, max_seconds: float) -> None:
    """Subprocess entry: one echo server on 127.0.0.1:0 (the same for every image count);
    sends {"ports": {n_images: port}} on ``conn``; runs until ``conn`` receives anything."""
    from bench.transport.common import noop_policy, set_threads, watch_parent
    set_threads()
    watch_parent(max_seconds)
    import asyncio

    import grpc
    import numpy as np
    from carve_client.codec import encode_tensor
    from carve_client.proto.carve.policy.v1 import policy_pb2 as pb

    started = pb.EpisodeResponse(started=pb.EpisodeStarted(episode_id="floor", skill="noop"))
    started_b = started.SerializeToString()
    chunk_b = pb.EpisodeResponse(chunk=pb.ActionChunk(
        actions=encode_tensor(np.zeros(CHUNK, np.float32)))).SerializeToString()

    async def episode(request_iterator, context):
        loop = asyncio.get_running_loop()
        first = True
        async for _ in request_iterator:
            if first:
                first = False
                yield started_b
                continue
            if policy_ms > 0:  # a real policy must not run on the loop
                await loop.run_in_executor(None, noop_policy, policy_ms)
            yield chunk_b

    async def main():
        from concurrent.futures import ThreadPoolExecutor
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(64))
        handler = grpc.method_handlers_generic_handler("carve.policy.v1.PolicyService", {
            "Episode": grpc.stream_stream_rpc_method_handler(episode, _identity, _identity)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send({"ports": {n: port for n in image_counts}})
        await asyncio.get_running_loop().run_in_executor(None, conn.poll, max_seconds)
        await server.stop(0)

    try:
        asyncio.run(main())
    except (EOFError, OSError):
        pass


class FloorClient:
    """One robot of the floor: the bytes of carve's ``EpisodeRequest`` for this observation over
    a synchronous grpc stream (queue-fed requests, ``next`` for each response)."""

    name = "floor"

    def __init__(self, port: int, state, images, timeout: float = 10.0):
        import queue

        import grpc
        from carve_client.codec import observation_proto
        from carve_client.proto.carve.policy.v1 import policy_pb2 as pb

        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self._channel).result(timeout)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._q.put(pb.EpisodeRequest(start=pb.EpisodeStart(skill="noop")).SerializeToString())
        self._obs = pb.EpisodeRequest(
            observation=observation_proto(state, images, 0)).SerializeToString()
        self._call = self._channel.stream_stream(METHOD, _identity, _identity)(
            iter(self._q.get, None), timeout=3600)
        next(self._call)  # EpisodeStarted

    def call(self):
        self._q.put(self._obs)
        return next(self._call)

    def close(self):
        self._q.put(None)
        self._call.cancel()
        self._channel.close()
