"""The ``carve.policy.v1.PolicyService`` servicer: episodes, routing, skills, server info.

Every error is a typed gRPC status whose message names the offending field (never a bare "error"
string, never a pickled payload).

The servicer runs on grpc.aio (one event loop, see server.py): reading and writing the streams,
health and the cheap unary calls happen on the loop; everything that may block (decoding an
observation and running the engine, routing, a reload) runs in the servicer's thread pool, one
hand-off per step, so a slow policy never stalls another robot or a health check.

Actions leaving the server are finite and clipped to the model's declared bounds by the engine
(the runtime's one ``ActionGuard``); the transport does not re-check.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent import futures
from contextlib import contextmanager

import grpc
import numpy as np
from carve_client.codec import WireError, decision_to_proto, echo, fill_tensor, spec_to_proto
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc

from policy_server import __version__
from policy_server.errors import (BatcherClosed, BatcherFull, InputError, NonFiniteActions,
                                   StateError)
from policy_server.service.auth import check_admin_token
from policy_server.service.metrics import COMPLETED, NO_METRICS, Recorder
from policy_server.service.streams import EpisodeRefused, EpisodeSlots, EpisodeStream
from policy_server.service.validation import InputLimits, ObservationDecoder
from policy_server.serving import UnknownVersion
from policy_server.service.wire import Abort, Undecodable, abort

log = logging.getLogger("carve.service")

# EpisodeStarted.notes of an engine that resizes cameras (see ObservationDecoder)
RESIZE_NOTE = ("camera images of another size than the spec's are resized to it (bilinear, "
               "align_corners=False, as LeRobot's async policy server does); each ActionChunk's "
               "notes name the cameras resized for its observation")


def _call_soon(loop: asyncio.AbstractEventLoop, fn) -> None:
    """``fn()`` on ``loop`` from any thread; run here if the loop is already closed (shutdown),
    so a release is never lost."""
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:
        fn()


class EngineHolder:
    """The engine slot: empty until loading finishes (health NOT_SERVING meanwhile).
    ``engine``: the one new episodes get; ``loaded_at``: when it was put in service, unix seconds.

    Calls pin the engine they use (``pinned``), so ``swap`` can put a new one in service while
    running episodes finish on theirs: a replaced engine is closed when its last pin goes."""

    def __init__(self):
        self.engine = None
        self.ready = threading.Event()
        self.loaded_at = 0.0
        self._lock = threading.Lock()
        self._pins: dict[int, int] = {}      # id(engine) -> calls running on it
        self._retired: dict[int, object] = {}  # replaced engines still pinned
        self._closed = False
        self.on_serve = None  # called with each engine put in service by ``swap`` (or None)

    @contextmanager
    def pinned(self):
        """The engine in service now, kept open until the ``with`` block ends."""
        with self._lock:
            engine = self.engine
            self._pins[id(engine)] = self._pins.get(id(engine), 0) + 1
        try:
            yield engine
        finally:
            with self._lock:
                left = self._pins[id(engine)] = self._pins[id(engine)] - 1
                done = self._retired.pop(id(engine), None) if left == 0 else None
                if left == 0:
                    del self._pins[id(engine)]
            if done is not None:
                # the last pin may be released on the server's event loop, and closing joins
                # the engine's batcher thread: never block the loop (health, every stream) on it
                threading.Thread(target=done.close, name="carve-engine-close",
                                 daemon=True).start()

    def swap(self, engine) -> None:
        """Put ``engine`` in service for new calls; the replaced one is closed now if nothing
        pins it, else when its last pin is released."""
        with self._lock:
            if self._closed:  # a reload that finished after the server stopped
                old = engine
            else:
                old, self.engine = self.engine, engine
                self.loaded_at = time.time()
            if old is not None and self._pins.get(id(old)):
                self._retired[id(old)], old = old, None
        if old is not None:
            old.close()
        if self.on_serve is not None and engine is self.engine:
            self.on_serve(engine)

    def close(self) -> None:
        """Close every engine held (the server has stopped); a later ``swap`` closes its
        engine at once."""
        with self._lock:
            self._closed = True
            engines = [self.engine, *self._retired.values()]
            self._retired.clear()
        for engine in engines:
            if engine is not None:
                engine.close()


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    """Serves one ``PolicyEngine`` on a grpc.aio server; episodes run concurrently (one task per
    stream on the loop, their steps in ``pool``).

    limits: what observations may contain (``InputLimits``); max_episodes: concurrent episode
    streams (RESOURCE_EXHAUSTED beyond); idle_timeout_s: an episode with no message for that long
    is ended with DEADLINE_EXCEEDED (None: never); metrics: the server's ``Recorder`` (episodes,
    route decisions, steps; ``NO_METRICS``: off); pool: the ``concurrent.futures`` executor that
    runs decoding, inference, routing and reloads (None: a private 8-thread pool)."""

    def __init__(self, holder: EngineHolder, limits: InputLimits | None = None,
                 max_episodes: int = 60, idle_timeout_s: float | None = 30.0,
                 metrics: Recorder = NO_METRICS, pool=None):
        # steps need a pool whose futures outlive a cancelled caller (see ``_run``)
        self.pool = pool if pool is not None else futures.ThreadPoolExecutor(
            8, thread_name_prefix="carve-step")
        self.holder = holder
        self.limits = limits or InputLimits()
        self.idle_timeout_s = idle_timeout_s
        self.slots = EpisodeSlots(max_episodes)
        self.started = time.time()
        self._decoder: ObservationDecoder | None = None
        self.metrics = metrics
        self.reloader = None      # a reload.Reloader when the server serves a merge state
        self.admin_token = None   # the Reload RPC's token (None: Reload is refused)

    # -- helpers ----------------------------------------------------------------------------------
    @contextmanager
    def _pinned(self, context):
        """The engine in service, pinned for the call (a reload meanwhile does not close it)."""
        if not self.holder.ready.is_set():
            abort(context, grpc.StatusCode.UNAVAILABLE, "policy is still loading; retry shortly")
        with self.holder.pinned() as engine:
            yield engine

    def decoder(self, engine) -> ObservationDecoder:
        """The observation decoder for ``engine``'s spec and resizing (built once, on first use)."""
        resize = bool(engine.resizes_images)
        dec = self._decoder
        if dec is None or dec.spec is not engine.spec or dec.resize != resize:
            dec = self._decoder = ObservationDecoder(engine.spec, self.limits, resize=resize)
        return dec

    @property
    def active_episodes(self) -> int:
        return self.slots.active

    def _observation(self, engine, msg: pb.Observation, field: str, instruction: str, context,
                     notes: list[str] | None = None):
        """The decoded observation (facts such as resized cameras appended to ``notes``);
        aborts with the decoder's status on a refusal."""
        try:
            return self.decoder(engine)(msg, field, instruction, notes)
        except WireError as e:
            abort(context, e.code, str(e))

    def _choose_skill(self, engine, start: pb.EpisodeStart, first_obs, context):
        """-> (skill or None, RouteDecision proto, core_only flag); aborts on refusal."""
        names = {s["name"] for s in engine.skills()}
        if start.skill:
            if start.skill not in names:
                abort(context, grpc.StatusCode.NOT_FOUND,
                      f"start.skill: unknown skill {echo(start.skill)} "
                      f"(known: {', '.join(sorted(names)) or 'none'})")
            return start.skill, pb.RouteDecision(skill=start.skill, confidence=1.0, margin=1.0,
                                                 reason="skill id given by the client",
                                                 router="oracle"), False
        if not start.instruction.strip():
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "start.instruction: empty (give an instruction or a skill id)")
        decision = self._engine_call(context, "routing", engine.route, start.instruction,
                                     first_obs)
        dproto = decision_to_proto(decision)
        if not decision.abstained:
            return decision.skill, dproto, False
        if engine.routing.on_abstain == "core-only":
            return None, dproto, True
        self.metrics.route(dproto, refused=True)  # no EpisodeStarted will carry this decision
        cands = ", ".join(f"{s} ({v:.2f})" for s, v in decision.candidates[:5])
        abort(context, grpc.StatusCode.FAILED_PRECONDITION,
              f"start.instruction: router abstained ({decision.reason}); candidates: "
              f"{cands or 'none'}; pass a skill id or rephrase")

    # -- the episode stream -------------------------------------------------------------------
    async def _run(self, fn, *args, stream: EpisodeStream | None = None):
        """``fn(*args)`` in the servicer's pool (whatever may block must not run on the loop).
        stream: the episode the call belongs to; its ``inflight`` keeps the pool's future, since
        cancelling the awaiting task does not stop a call that already runs."""
        fut = self.pool.submit(fn, *args)
        if stream is not None:
            stream.inflight = fut
        return await asyncio.wrap_future(fut)

    async def Episode(self, request_iterator, context):
        """The bidirectional episode stream (read and written through ``context``)."""
        # the whole episode runs on the engine it started on, whatever reloads happen meanwhile
        pin = self._pinned(context)
        engine = pin.__enter__()
        stream = EpisodeStream(self.idle_timeout_s)
        try:
            self.slots.enter(stream)
        except EpisodeRefused as e:
            pin.__exit__(None, None, None)
            code = (grpc.StatusCode.UNAVAILABLE if e.reason == "draining"
                    else grpc.StatusCode.RESOURCE_EXHAUSTED)
            abort(context, code, str(e))
        opened: list = []  # the EpisodeStarted sent, for the metrics of its end
        outcome = "unknown"

        def release() -> None:
            """The episode's slot, metrics, backend state and engine pin, released together."""
            try:
                self.slots.leave(stream)
                if opened:
                    self.metrics.closed(opened[0], outcome)
                    # per-episode backend state (LeRobot's queues) would otherwise live until
                    # LRU eviction; a failure here must not replace the episode's own status
                    try:
                        engine.end_episode(opened[0].episode_id)
                    except Exception:  # noqa: BLE001
                        log.exception("episode %s: end_episode failed", opened[0].episode_id)
            finally:
                pin.__exit__(None, None, None)

        try:
            await self._episode(engine, stream, context, opened)
            outcome = COMPLETED
        except asyncio.CancelledError:
            if stream.verdict is None:  # the client cancelled or went away
                outcome = "cancelled"
                raise
            code, message = stream.verdict  # the idle timer or the drain ended it
            outcome = code.name.lower()
            raise Abort(code, message) from None
        except Abort as e:
            outcome = e.code.name.lower()
            raise
        finally:
            running = stream.inflight
            if running is not None and not running.done():
                # Cancelled while its step (or routing) still runs in the pool: release only
                # when that call is over, so --max-episodes keeps bounding the pool, the drain
                # waits for it, and end_episode never precedes the episode's last step.
                loop = asyncio.get_running_loop()
                running.add_done_callback(lambda _f: _call_soon(loop, release))
            else:
                release()

    async def _next(self, stream: EpisodeStream, context, waiting_for: str):
        """The next request of the stream, or None when the client half-closed it; the idle
        timeout and the drain end the episode through ``stream`` (see streams.py); undecodable
        bytes are INVALID_ARGUMENT."""
        item = await stream.read(context, waiting_for)
        if item is grpc.aio.EOF:
            return None
        if isinstance(item, Undecodable):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, item.details())
        return item

    async def _episode(self, engine, stream: EpisodeStream, context, opened: list) -> None:
        first = await self._next(stream, context, "EpisodeStart")
        if first is None:
            return
        start, chunk_len, started, skill = await self._run(self._open, engine, first, context,
                                                           stream=stream)
        await context.write(started)
        opened.append(started.started)
        self.metrics.opened(started.started)
        episode_id, instruction = started.started.episode_id, start.instruction
        i = 0
        while True:
            req = await self._next(stream, context, "Observation or EpisodeEnd")
            i += 1
            if req is None:
                return
            kind = req.WhichOneof("msg")
            if kind == "end":
                return
            if kind != "observation":
                abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                      f"message {i}: {kind or 'empty message'} after the episode started "
                      "(send observations or EpisodeEnd)")
            resp = await self._run(self._step, engine, req.observation, time.time(),
                                   instruction, episode_id, skill, chunk_len, stream=stream)
            await context.write(resp)
            self.metrics.step(resp.chunk)

    def _open(self, engine, first, context):
        """Checks EpisodeStart (in the pool: routing may run a model) -> (start, chunk length,
        EpisodeStarted response, skill)."""
        spec = engine.spec
        kind = first.WhichOneof("msg")
        if kind != "start":
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"{kind or 'empty message'}: the first message of an episode must be "
                  "EpisodeStart")
        start = first.start
        chunk_len = start.chunk_length or spec.chunk_length
        if not 0 < chunk_len <= spec.chunk_length:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"start.chunk_length: {chunk_len} is outside 1..{spec.chunk_length} (the "
                  "model's chunk length)")
        notes = [RESIZE_NOTE] if engine.resizes_images else []
        first_obs = (self._observation(engine, start.first_observation,
                                       "start.first_observation", start.instruction, context,
                                       notes)
                     if start.HasField("first_observation") else None)
        skill, dproto, core_only = self._choose_skill(engine, start, first_obs, context)
        episode_id = uuid.uuid4().hex[:12]
        log.info("episode %s: skill=%s instruction=%s client=%s", episode_id, skill,
                 echo(start.instruction, 200), echo(dict(start.client_info), 200))
        started = pb.EpisodeResponse(started=pb.EpisodeStarted(
            episode_id=episode_id, skill=skill or "", core_only=core_only, route=dproto,
            spec=spec_to_proto(spec), state_version=engine.info().get("state_version", ""),
            notes=notes))
        return start, chunk_len, started, skill

    def _step(self, engine, msg: pb.Observation, received: float, instruction: str,
              episode_id: str, skill, chunk_len: int) -> pb.EpisodeResponse:
        """One observation -> its ActionChunk response (in the pool: decoding and inference
        block). ``received``: when the message was read, unix seconds."""
        notes: list[str] = []
        obs = self._observation(engine, msg, "observation", instruction, None, notes)
        # backends with per-episode state (diffusion's observation queues) key it by this id
        obs.episode_ids = [episode_id]
        t0 = time.perf_counter()
        actions = self._infer(engine, obs, skill, None)
        resp = pb.EpisodeResponse()
        chunk = resp.chunk
        chunk.step = msg.step
        fill_tensor(chunk.actions, actions[:chunk_len])  # in place: no sub-message copy
        chunk.server_received_time = received
        chunk.server_done_time = time.time()
        chunk.inference_ms = (time.perf_counter() - t0) * 1e3
        chunk.notes.extend(notes)
        return resp

    def _infer(self, engine, obs, skill, context) -> np.ndarray:
        return np.asarray(self._engine_call(context, "inference", engine.infer, obs, skill),
                          dtype=np.float32)

    @staticmethod
    def _engine_call(context, what: str, fn, *args):
        """``fn(*args)`` with the engine's errors mapped to statuses (routing reads the model
        through the same batcher as inference, so both can meet overload and shutdown)."""
        try:
            return fn(*args)
        except NonFiniteActions as e:
            abort(context, grpc.StatusCode.INTERNAL,
                  f"the policy produced NaN/inf actions for this observation; nothing was sent "
                  f"to the robot ({e})")
        except BatcherFull as e:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {e}")
        except BatcherClosed:
            abort(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        except InputError as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except StateError as e:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception as e:  # noqa: BLE001 - report, never leak a bare "error"
            log.exception("%s failed", what)
            abort(context, grpc.StatusCode.INTERNAL, f"{what} failed: {type(e).__name__}: {e}")

    # -- unary calls --------------------------------------------------------------------------
    async def ListSkills(self, request, context):
        with self._pinned(context) as engine:
            return self._list_skills(engine)

    @staticmethod
    def _list_skills(engine):
        return pb.ListSkillsResponse(
            skills=[pb.SkillInfo(name=s["name"], instructions=s.get("instructions", []),
                                 description=s.get("description", ""), order=s.get("order", 0))
                    for s in engine.skills()],
            state_version=engine.info().get("state_version", ""))

    async def Route(self, request, context):
        with self._pinned(context) as engine:
            return await self._run(self._route, engine, request, context)

    def _route(self, engine, request, context):
        if not request.instruction.strip():
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "instruction: empty")
        obs = (self._observation(engine, request.observation, "observation",
                                 request.instruction, context)
               if request.HasField("observation") else None)
        return decision_to_proto(self._engine_call(context, "routing", engine.route,
                                                   request.instruction, obs))

    async def ServerInfo(self, request, context):
        with self._pinned(context) as engine:
            return self._server_info(engine)

    def _server_info(self, engine):
        info = engine.info()
        r = self.reloader
        return pb.ServerInfoResponse(
            server_version=__version__, backend=str(info.get("backend", "")),
            spec=spec_to_proto(engine.spec), mode=str(info.get("mode", "")),
            state_version=str(info.get("state_version", "")), num_skills=len(engine.skills()),
            uptime_s=time.time() - self.started, router=str(info.get("router", "")),
            state_loaded_time=self.holder.loaded_at,
            last_reload_error=r.last_error if r else "", last_reload_time=r.last_time if r else 0,
            reloads_ok=r.ok if r else 0, reloads_failed=r.failed if r else 0,
            extra={k: str(v) for k, v in info.items()
                   if k not in ("backend", "mode", "state_version", "router")})

    async def Reload(self, request, context):
        """Admin: switch new episodes to ``request.version`` (default CURRENT); see reload.py."""
        check_admin_token(context, self.admin_token)
        return await self._run(self._reload, request, context)

    def _reload(self, request, context):
        if self.reloader is None:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  "this server serves no merge state (started without --state): nothing to "
                  "reload")
        if not self.holder.ready.is_set():
            abort(context, grpc.StatusCode.UNAVAILABLE, "policy is still loading; retry shortly")
        try:
            previous, now, changed = self.reloader.reload(request.version or None)
        except UnknownVersion as e:
            abort(context, grpc.StatusCode.NOT_FOUND, f"version: {e}")
        except InputError as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"version: {e}")
        except Exception:  # noqa: BLE001 - verify/load failures: the old version is kept
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"{self.reloader.last_error}; still serving "
                  f"{self.reloader.served_version() or '-'}")
        return pb.ReloadResponse(previous_version=previous, state_version=now, changed=changed)
