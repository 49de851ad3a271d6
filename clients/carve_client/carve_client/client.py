"""Synchronous client for carve-serve, numpy in, numpy out.

    client = PolicyClient("127.0.0.1:50051", timeout=5.0)
    client.wait_ready(30)
    with client.episode("open the drawer") as ep:      # the server routes to a skill
        print(ep.skill, ep.confidence)
        chunk = ep.infer(state=obs)                      # (chunk_length, action_dim) float32

Errors surface as :class:`PolicyError` with the gRPC status code and the server's message. The
client's ``timeout`` bounds every call: each unary RPC, the episode's opening and each ``infer``
(a stalled server gives DEADLINE_EXCEEDED, never a hang).
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from carve_client.channel import RETRY_CODES, ClientConnection, retry_delays
from carve_client.codec import fill_observation, observation_proto
from carve_client.errors import PolicyError
from carve_client.messages import (EpisodeInfo, episode_start, route_dict, server_info_from_proto,
                                   skills_from_proto)
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb

# Opening an episode is also retried on CANCELLED: a server that shuts down answers new episodes
# UNAVAILABLE, but a call in flight at the very instant grpc's core stops is cancelled by the core
# before any handler sees it. Before EpisodeStarted nothing has happened, so a retry is safe.
EPISODE_OPEN_RETRY_CODES = (*RETRY_CODES, grpc.StatusCode.CANCELLED)
# That window lasts as long as the server's grpc core takes to stop (tens of ms, more on a loaded
# host), so a retry after CANCELLED waits at least this long: it then reaches either a server
# still refusing with UNAVAILABLE or a closed port (UNAVAILABLE too), not the same window again.
CANCELLED_RETRY_MIN_S = 0.1


class Episode(EpisodeInfo):
    """One open episode on a bidirectional stream. Use through ``PolicyClient.episode``.

    Responses are read in the calling thread (``next`` on grpc's stream: no hand-off through a
    reader thread and a queue, which cost more than the whole gRPC round trip on a small
    machine). grpc's blocking stream iterator has no per-message deadline, so a watchdog thread
    per episode cancels the stream when a wait outlives ``timeout`` seconds (None = forever); it
    sleeps until the pending wait's deadline and never wakes per step. A deadline miss closes the
    episode, since a late answer could no longer be matched to its observation.
    """

    def __init__(self, stub, metadata, start: pb.EpisodeStart, timeout: float | None):
        # SimpleQueue: grpc's request-consumer thread blocks in get(); the C queue is the
        # cheapest hand-off to it
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(pb.EpisodeRequest(start=start))
        self._timeout = timeout
        self._step = 0
        self._closed = False
        self._expired = False      # the watchdog cancelled the stream on a missed deadline
        self._pending: tuple[float] | None = None  # (deadline,) of the wait in progress
        self._stop_watch = threading.Event()
        self.last_timing: dict = {}
        self._call = stub.Episode(iter(self._requests.get, None), metadata=metadata)
        self._watchdog = None
        if timeout is not None:
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name="carve-episode-watchdog")
            self._watchdog.start()
        try:
            self._set_started(self._next("EpisodeStarted"))
        except PolicyError:
            if not self._closed:  # an unexpected first message: do not leave the stream open
                self._shut(cancel=True)
            raise

    def _watch(self) -> None:
        """Cancel the stream when the pending wait passes its deadline (see the class doc)."""
        while not self._stop_watch.is_set():
            pending = self._pending
            now = time.monotonic()
            if pending is None:
                self._stop_watch.wait(self._timeout)
                continue
            if now < pending[0]:
                self._stop_watch.wait(pending[0] - now)
                continue
            if self._pending is pending:  # the same wait is still in progress: it missed
                self._expired = True
                self._call.cancel()
                return

    def _shut(self, cancel: bool) -> None:
        self._closed = True
        self._requests.put(None)  # ends grpc's request-consumer thread
        if cancel:
            self._call.cancel()
        self._stop_watch.set()

    def _receive(self):
        """The next response, None at the end of the stream; raises grpc.RpcError. The wait is
        bounded by the watchdog."""
        if self._timeout is not None:
            self._pending = (time.monotonic() + self._timeout,)
        try:
            return next(self._call)
        except StopIteration:
            return None
        finally:
            self._pending = None

    def _next(self, waiting_for: str) -> pb.EpisodeResponse:
        try:
            item = self._receive()
        except grpc.RpcError as e:
            if self._expired:
                self._shut(cancel=False)
                raise PolicyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"no {waiting_for} from the server within "
                                  f"{self._timeout}s") from None
            self._shut(cancel=False)
            raise PolicyError.from_rpc(e) from None
        if item is None:
            self._shut(cancel=False)
            raise PolicyError(grpc.StatusCode.UNAVAILABLE, "server closed the episode")
        return item

    def infer(self, state: np.ndarray, images: dict[str, np.ndarray] | None = None,
              encode: str = "raw") -> np.ndarray:
        """Send one observation; returns the action chunk (chunk_length, action_dim) float32.

        state: (state_dim,) float32; images: camera key -> uint8 HWC RGB; encode: how images
        travel ("raw", "jpeg" or "png"). PolicyError(DEADLINE_EXCEEDED) when no chunk arrives
        within the client's timeout."""
        if self._closed:
            raise PolicyError(grpc.StatusCode.FAILED_PRECONDITION, "episode is closed")
        t0 = time.perf_counter()
        req = pb.EpisodeRequest()
        fill_observation(req.observation, state, images, self._step, encode)
        self._requests.put(req)
        actions, inference_ms = self._take_chunk(self._next("ActionChunk"))
        self._step += 1
        self.last_timing = {"round_trip_ms": (time.perf_counter() - t0) * 1e3,
                            "inference_ms": inference_ms}
        return actions

    def close(self, reason: str = "done") -> None:
        """End the episode cleanly (the server sees EpisodeEnd), waiting at most ``timeout``."""
        if self._closed:
            return
        self._requests.put(pb.EpisodeRequest(end=pb.EpisodeEnd(reason=reason)))
        self._requests.put(None)  # half-close: the server sees the end of the request stream
        self._closed = True
        try:  # drain so the server's status arrives and the stream ends cleanly
            while self._receive() is not None:
                pass
        except grpc.RpcError:
            pass  # ended with a status (or cancelled by the watchdog): the episode is over
        self._stop_watch.set()

    def __enter__(self) -> "Episode":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed:
            self._shut(cancel=True)
        else:
            self.close()


class PolicyClient(ClientConnection):
    """Synchronous client. ``timeout`` (seconds, None = unbounded) bounds every call, including
    each ``Episode.infer``; ``retries`` reconnect attempts (exponential backoff from ``backoff_s``)
    are made when opening an episode or calling a unary RPC hits UNAVAILABLE (opening an episode
    also on CANCELLED, see ``EPISODE_OPEN_RETRY_CODES``)."""

    def _retry(self, fn, codes=RETRY_CODES):
        for delay in retry_delays(self.retries, self.backoff_s):
            try:
                return fn()
            except grpc.RpcError as e:
                err = PolicyError.from_rpc(e)
            except PolicyError as e:
                err = e
            if err.code not in codes or delay is None:
                raise err
            if err.code == grpc.StatusCode.CANCELLED:
                delay = max(delay, CANCELLED_RETRY_MIN_S)
            time.sleep(delay)

    def _unary(self, method, request):
        return self._retry(lambda: method(request, metadata=self._metadata, timeout=self.timeout))

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
        """The server's overall health status name ("SERVING", "NOT_SERVING", ...)."""
        try:
            r = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        except grpc.RpcError as e:
            raise PolicyError.from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def episode(self, instruction: str, skill: str | None = None, chunk_length: int | None = None,
                info: dict | None = None, first_state: np.ndarray | None = None,
                first_images: dict | None = None) -> Episode:
        """Open an episode (context manager). ``skill`` forces a skill id; otherwise the server
        routes ``instruction`` (using the first observation too when given)."""
        start = episode_start(instruction, skill, chunk_length, info, first_state, first_images)
        return self._retry(lambda: Episode(self._stub, self._metadata, start, self.timeout),
                           EPISODE_OPEN_RETRY_CODES)

    def list_skills(self) -> list[dict]:
        """[{"name", "instructions", "description", "order"}] of the served skills."""
        return skills_from_proto(self._unary(self._stub.ListSkills, pb.ListSkillsRequest()))

    def route(self, instruction: str, state: np.ndarray | None = None,
              images: dict | None = None) -> dict:
        """Dry-run the server's router: the decision as a dict (skill, confidence, candidates,
        margin, abstained, reason, router, runner_up)."""
        req = pb.RouteRequest(instruction=instruction)
        if state is not None:
            req.observation.CopyFrom(observation_proto(state, images, 0, "raw"))
        return route_dict(self._unary(self._stub.Route, req))

    def server_info(self) -> dict:
        """Server version, backend, mode, state version, skill count, router and spec."""
        return server_info_from_proto(self._unary(self._stub.ServerInfo, pb.ServerInfoRequest()))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
