"""Python client library for carve-serve (sync and asyncio), numpy in, numpy out.

    client = PolicyClient("127.0.0.1:50051")
    client.wait_ready(30)
    with client.episode("open the drawer") as ep:      # the server routes to a skill
        print(ep.skill, ep.confidence)
        chunk = ep.infer(state=obs)                      # (chunk_length, action_dim) float32

Errors surface as :class:`PolicyError` with the gRPC status code and the server's message.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_server.models.base import ImageSpec, PolicySpec
from policy_server.service.codec import decode_tensor, encode_image, encode_tensor
from policy_server.service.gen.carve.policy.v1 import policy_pb2 as pb
from policy_server.service.gen.carve.policy.v1 import policy_pb2_grpc as pb_grpc

# Must stay compatible with the server's keepalive policy (ServerConfig.min_ping_interval_ms).
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
                     ("grpc.keepalive_permit_without_calls", 1)]
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)


class PolicyError(RuntimeError):
    """A failed call: ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "PolicyError":
        return cls(e.code(), e.details() or "")


def spec_from_proto(s: pb.ActionSpec) -> PolicySpec:
    return PolicySpec(state_dim=s.state_dim, action_dim=s.action_dim, chunk_length=s.chunk_length,
                      action_low=list(s.action_low), action_high=list(s.action_high),
                      images={k: ImageSpec(v.height, v.width, v.channels)
                              for k, v in s.images.items()},
                      normalization={k: list(v.values) for k, v in s.normalization.items()},
                      name=s.model)


def _decision(d: pb.RouteDecision) -> dict:
    return {"skill": d.skill or None, "confidence": d.confidence, "margin": d.margin,
            "abstained": d.abstained, "reason": d.reason, "router": d.router,
            "candidates": [{"skill": c.skill, "score": c.score} for c in d.candidates]}


def observation_proto(state: np.ndarray, images: dict | None, step: int, encode: str
                      ) -> pb.Observation:
    """Build an Observation message. state: (state_dim,) float; images: key -> uint8 HWC."""
    return pb.Observation(
        step=step, client_time=time.time(),
        state=encode_tensor(np.asarray(state, dtype=np.float32)),
        images={k: encode_image(v, encode) for k, v in (images or {}).items()})


class _Credentials:
    def __init__(self, token: str | None):
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()


def _channel(target: str, tls_root_cert: str | bytes | None, tls: bool, aio: bool):
    opts = KEEPALIVE_OPTIONS + [("grpc.max_receive_message_length", 32 * 1024 * 1024),
                                ("grpc.max_send_message_length", 32 * 1024 * 1024)]
    mod = grpc.aio if aio else grpc
    if tls or tls_root_cert:
        root = tls_root_cert
        if isinstance(root, str):
            with open(root, "rb") as f:
                root = f.read()
        return mod.secure_channel(target, grpc.ssl_channel_credentials(root), options=opts)
    return mod.insecure_channel(target, options=opts)


class Episode:
    """One open episode on a bidirectional stream. Use through ``PolicyClient.episode``."""

    def __init__(self, stub, metadata, start: pb.EpisodeStart, timeout: float | None):
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(pb.EpisodeRequest(start=start))
        self._timeout = timeout
        self._call = stub.Episode(iter(self._requests.get, None), metadata=metadata)
        self._step = 0
        self._closed = False
        first = self._next()
        if first.WhichOneof("msg") != "started":
            raise PolicyError(grpc.StatusCode.INTERNAL, "server did not answer EpisodeStarted")
        st = first.started
        self.episode_id = st.episode_id
        self.skill: str | None = st.skill or None
        self.core_only = st.core_only
        self.route = _decision(st.route)
        self.confidence = float(st.route.confidence)
        self.spec = spec_from_proto(st.spec)
        self.state_version = st.state_version
        self.last_timing: dict = {}

    def _next(self) -> pb.EpisodeResponse:
        try:
            return next(self._call)
        except grpc.RpcError as e:
            self._closed = True
            self._requests.put(None)  # unblock grpc's request-consumer thread
            raise PolicyError.from_rpc(e) from None
        except StopIteration:
            self._closed = True
            self._requests.put(None)
            raise PolicyError(grpc.StatusCode.UNAVAILABLE, "server closed the episode") from None

    def infer(self, state: np.ndarray, images: dict[str, np.ndarray] | None = None,
              encode: str = "raw") -> np.ndarray:
        """Send one observation; returns the action chunk (chunk_length, action_dim) float32.

        state: (state_dim,) float32; images: camera key -> uint8 HWC RGB; encode: how images
        travel ("raw", "jpeg" or "png")."""
        if self._closed:
            raise PolicyError(grpc.StatusCode.FAILED_PRECONDITION, "episode is closed")
        t0 = time.perf_counter()
        self._requests.put(pb.EpisodeRequest(
            observation=observation_proto(state, images, self._step, encode)))
        resp = self._next()
        if resp.WhichOneof("msg") != "chunk":
            raise PolicyError(grpc.StatusCode.INTERNAL, "expected an ActionChunk")
        self._step += 1
        c = resp.chunk
        self.last_timing = {"round_trip_ms": (time.perf_counter() - t0) * 1e3,
                            "inference_ms": c.inference_ms}
        return decode_tensor(c.actions, "actions").astype(np.float32)

    def close(self, reason: str = "done") -> None:
        if not self._closed:
            self._requests.put(pb.EpisodeRequest(end=pb.EpisodeEnd(reason=reason)))
            self._requests.put(None)
            self._closed = True
            try:
                for _ in self._call:  # drain so the server sees a clean end
                    pass
            except grpc.RpcError:
                pass

    def __enter__(self) -> "Episode":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed:
            self._requests.put(None)
            self._call.cancel()
            self._closed = True
        else:
            self.close()


class PolicyClient:
    """Synchronous client. ``retries`` reconnect attempts (exponential backoff from
    ``backoff_s``) are made when opening an episode or calling a unary RPC hits UNAVAILABLE."""

    def __init__(self, target: str, token: str | None = None,
                 tls_root_cert: str | bytes | None = None, tls: bool = False,
                 timeout: float | None = 30.0, retries: int = 3, backoff_s: float = 0.2):
        self.target = target
        self._creds = _Credentials(token)
        self._channel = _channel(target, tls_root_cert, tls, aio=False)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s

    def _retry(self, fn):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as e:
                err = PolicyError.from_rpc(e)
            except PolicyError as e:
                err = e
            if err.code not in RETRY_CODES or attempt == self.retries:
                raise err
            time.sleep(delay)
            delay *= 2

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's health check reports SERVING (TimeoutError otherwise)."""
        end = time.monotonic() + timeout
        while True:
            try:
                r = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"policy server at {self.target} not SERVING after {timeout}s")
            time.sleep(0.1)

    def health(self) -> str:
        r = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def episode(self, instruction: str, skill: str | None = None, chunk_length: int | None = None,
                info: dict | None = None, first_state: np.ndarray | None = None,
                first_images: dict | None = None) -> Episode:
        """Open an episode (context manager). ``skill`` forces a skill id; otherwise the server
        routes ``instruction`` (using the first observation too when given)."""
        start = pb.EpisodeStart(instruction=instruction, skill=skill or "",
                                chunk_length=chunk_length or 0,
                                client_info={k: str(v) for k, v in (info or {}).items()})
        if first_state is not None:
            start.first_observation.CopyFrom(observation_proto(first_state, first_images, 0, "raw"))
        return self._retry(lambda: Episode(self._stub, self._creds.metadata, start, self.timeout))

    def list_skills(self) -> list[dict]:
        r = self._retry(lambda: self._stub.ListSkills(pb.ListSkillsRequest(),
                                                      metadata=self._creds.metadata,
                                                      timeout=self.timeout))
        return [{"name": s.name, "instructions": list(s.instructions),
                 "description": s.description, "order": s.order} for s in r.skills]

    def route(self, instruction: str, state: np.ndarray | None = None,
              images: dict | None = None) -> dict:
        req = pb.RouteRequest(instruction=instruction)
        if state is not None:
            req.observation.CopyFrom(observation_proto(state, images, 0, "raw"))
        r = self._retry(lambda: self._stub.Route(req, metadata=self._creds.metadata,
                                                 timeout=self.timeout))
        return _decision(r)

    def server_info(self) -> dict:
        r = self._retry(lambda: self._stub.ServerInfo(pb.ServerInfoRequest(),
                                                      metadata=self._creds.metadata,
                                                      timeout=self.timeout))
        return {"server_version": r.server_version, "backend": r.backend, "mode": r.mode,
                "state_version": r.state_version, "num_skills": r.num_skills,
                "uptime_s": r.uptime_s, "router": r.router, "spec": spec_from_proto(r.spec),
                "extra": dict(r.extra)}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncEpisode:
    """asyncio counterpart of :class:`Episode` (``async with client.episode(...) as ep``)."""

    def __init__(self, stub, metadata, start: pb.EpisodeStart):
        self._stub, self._metadata, self._start = stub, metadata, start
        self._step = 0

    async def __aenter__(self) -> "AsyncEpisode":
        self._call = self._stub.Episode(metadata=self._metadata)
        try:
            await self._call.write(pb.EpisodeRequest(start=self._start))
            first = await self._call.read()
        except grpc.RpcError as e:
            raise PolicyError.from_rpc(e) from None
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "started":
            raise PolicyError(grpc.StatusCode.INTERNAL, "server did not answer EpisodeStarted")
        st = first.started
        self.episode_id, self.skill = st.episode_id, st.skill or None
        self.confidence, self.core_only = float(st.route.confidence), st.core_only
        self.route, self.spec = _decision(st.route), spec_from_proto(st.spec)
        return self

    async def infer(self, state: np.ndarray, images: dict | None = None,
                    encode: str = "raw") -> np.ndarray:
        try:
            await self._call.write(pb.EpisodeRequest(
                observation=observation_proto(state, images, self._step, encode)))
            resp = await self._call.read()
        except grpc.RpcError as e:
            raise PolicyError.from_rpc(e) from None
        if resp is grpc.aio.EOF:
            raise PolicyError(grpc.StatusCode.UNAVAILABLE, "server closed the episode")
        self._step += 1
        return decode_tensor(resp.chunk.actions, "actions").astype(np.float32)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._call.cancel()
            return
        try:
            await self._call.write(pb.EpisodeRequest(end=pb.EpisodeEnd(reason="done")))
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError:
            pass


class AsyncPolicyClient:
    """asyncio client (grpc.aio) with the same calls as :class:`PolicyClient`."""

    def __init__(self, target: str, token: str | None = None,
                 tls_root_cert: str | bytes | None = None, tls: bool = False,
                 timeout: float | None = 30.0, retries: int = 3, backoff_s: float = 0.2):
        self._creds = _Credentials(token)
        self._channel = _channel(target, tls_root_cert, tls, aio=True)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s

    def episode(self, instruction: str, skill: str | None = None,
                chunk_length: int | None = None, info: dict | None = None) -> AsyncEpisode:
        start = pb.EpisodeStart(instruction=instruction, skill=skill or "",
                                chunk_length=chunk_length or 0,
                                client_info={k: str(v) for k, v in (info or {}).items()})
        return AsyncEpisode(self._stub, self._creds.metadata, start)

    async def _retry(self, make):
        import asyncio

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return await make()
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES or attempt == self.retries:
                    raise PolicyError.from_rpc(e) from None
            await asyncio.sleep(delay)
            delay *= 2

    async def list_skills(self) -> list[dict]:
        r = await self._retry(lambda: self._stub.ListSkills(
            pb.ListSkillsRequest(), metadata=self._creds.metadata, timeout=self.timeout))
        return [{"name": s.name, "instructions": list(s.instructions),
                 "description": s.description, "order": s.order} for s in r.skills]

    async def route(self, instruction: str) -> dict:
        r = await self._retry(lambda: self._stub.Route(
            pb.RouteRequest(instruction=instruction), metadata=self._creds.metadata,
            timeout=self.timeout))
        return _decision(r)

    async def close(self) -> None:
        await self._channel.close()
