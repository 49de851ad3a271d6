"""asyncio client (grpc.aio) with the calls of :class:`carve_client.client.PolicyClient`.

    async with AsyncPolicyClient("127.0.0.1:50051", timeout=5.0) as client:
        async with client.episode("open the drawer") as ep:
            chunk = await ep.infer(state=obs)           # (chunk_length, action_dim) float32

``timeout`` bounds every call, each stream read and write of an episode included.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from carve_client.channel import RETRY_CODES, ClientConnection, retry_delays
from carve_client.codec import observation_proto
from carve_client.errors import PolicyError
from carve_client.messages import (EpisodeInfo, episode_start, route_dict, server_info_from_proto,
                                   skills_from_proto)
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb


class AsyncEpisode(EpisodeInfo):
    """asyncio counterpart of :class:`carve_client.client.Episode`
    (``async with client.episode(...) as ep``). A failed or timed-out stream operation closes the
    episode (later ``infer`` calls are FAILED_PRECONDITION)."""

    def __init__(self, stub, metadata, start: pb.EpisodeStart, timeout: float | None):
        self._stub, self._metadata, self._start = stub, metadata, start
        self._timeout = timeout
        self._step = 0
        self._call = None
        self._closed = False

    async def _bounded(self, awaitable, what: str):
        """Await one stream operation within the timeout; a miss cancels the stream."""
        try:
            return await asyncio.wait_for(awaitable, self._timeout)
        except asyncio.TimeoutError:
            self._closed = True
            self._call.cancel()
            raise PolicyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no {what} from the server within {self._timeout}s") from None
        except grpc.RpcError as e:
            self._closed = True
            raise PolicyError.from_rpc(e) from None

    async def _read(self, what: str) -> pb.EpisodeResponse:
        resp = await self._bounded(self._call.read(), what)
        if resp is grpc.aio.EOF:
            self._closed = True
            raise PolicyError(grpc.StatusCode.UNAVAILABLE, "server closed the episode")
        return resp

    async def __aenter__(self) -> "AsyncEpisode":
        self._call = self._stub.Episode(metadata=self._metadata)
        await self._bounded(self._call.write(pb.EpisodeRequest(start=self._start)), "flow control")
        self._set_started(await self._read("EpisodeStarted"))
        return self

    async def infer(self, state: np.ndarray, images: dict[str, np.ndarray] | None = None,
                    encode: str = "raw") -> np.ndarray:
        """Send one observation; the action chunk (chunk_length, action_dim) float32 (see
        ``Episode.infer``)."""
        if self._closed:
            raise PolicyError(grpc.StatusCode.FAILED_PRECONDITION, "episode is closed")
        await self._bounded(self._call.write(pb.EpisodeRequest(
            observation=observation_proto(state, images, self._step, encode))), "flow control")
        actions, _ = self._take_chunk(await self._read("ActionChunk"))
        self._step += 1
        return actions

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        self._closed = True
        if exc_type is not None:
            self._call.cancel()
            return
        try:
            end = pb.EpisodeRequest(end=pb.EpisodeEnd(reason="done"))
            await self._bounded(self._call.write(end), "flow control")
            await self._bounded(self._call.done_writing(), "flow control")
            while await self._bounded(self._call.read(), "end of stream") is not grpc.aio.EOF:
                pass
        except PolicyError:
            pass  # the episode is over either way; the stream was cancelled on a deadline miss


class AsyncPolicyClient(ClientConnection):
    """asyncio client (grpc.aio) with the same calls and options as ``PolicyClient``."""

    _aio = True

    def episode(self, instruction: str, skill: str | None = None,
                chunk_length: int | None = None, info: dict | None = None,
                first_state: np.ndarray | None = None,
                first_images: dict | None = None) -> AsyncEpisode:
        """An episode to open with ``async with`` (arguments as ``PolicyClient.episode``)."""
        start = episode_start(instruction, skill, chunk_length, info, first_state, first_images)
        return AsyncEpisode(self._stub, self._metadata, start, self.timeout)

    async def _unary(self, method, request):
        for delay in retry_delays(self.retries, self.backoff_s):
            try:
                return await method(request, metadata=self._metadata, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES or delay is None:
                    raise PolicyError.from_rpc(e) from None
            await asyncio.sleep(delay)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server's health check reports SERVING (TimeoutError otherwise)."""
        end = time.monotonic() + timeout
        while True:
            try:
                r = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"policy server at {self.target} not SERVING after {timeout}s")
            await asyncio.sleep(0.1)

    async def list_skills(self) -> list[dict]:
        """[{"name", "instructions", "description", "order"}] of the served skills."""
        return skills_from_proto(await self._unary(self._stub.ListSkills, pb.ListSkillsRequest()))

    async def route(self, instruction: str, state: np.ndarray | None = None,
                    images: dict | None = None) -> dict:
        """Dry-run the server's router (see ``PolicyClient.route``)."""
        req = pb.RouteRequest(instruction=instruction)
        if state is not None:
            req.observation.CopyFrom(observation_proto(state, images, 0, "raw"))
        return route_dict(await self._unary(self._stub.Route, req))

    async def server_info(self) -> dict:
        """Server version, backend, mode, state version, skill count, router and spec."""
        return server_info_from_proto(
            await self._unary(self._stub.ServerInfo, pb.ServerInfoRequest()))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncPolicyClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
