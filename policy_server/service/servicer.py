"""The ``carve.policy.v1.PolicyService`` servicer: episodes, routing, skills, server info.

Every error is a typed gRPC status whose message names the offending field (never a bare "error"
string, never a pickled payload). Actions leaving the server are finite and clipped to the model's
declared bounds by the engine (the runtime's one ``ActionGuard``); the transport does not re-check.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc
import numpy as np
from carve_client.codec import (
    WireError,
    decision_to_proto,
    decode_image,
    decode_tensor,
    encode_tensor,
    spec_to_proto,
)
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc

from policy_server import __version__
from policy_server.errors import (BatcherClosed, BatcherFull, InputError, NonFiniteActions,
                                   StateError)
from policy_server.models.base import ObservationBatch

log = logging.getLogger("carve.service")


class EngineHolder:
    """The engine slot: empty until loading finishes (health NOT_SERVING meanwhile)."""

    def __init__(self):
        self.engine = None
        self.ready = threading.Event()


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    """Serves one ``PolicyEngine``; episodes run concurrently (one thread per stream)."""

    def __init__(self, holder: EngineHolder, max_image_pixels: int = 4096 * 4096):
        self.holder = holder
        self.max_image_pixels = max_image_pixels
        self.started = time.time()
        self.draining = threading.Event()
        self._active = 0
        self._active_lock = threading.Condition()

    # -- helpers ----------------------------------------------------------------------------------
    def _engine(self, context):
        if not self.holder.ready.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "policy is still loading; retry shortly")
        return self.holder.engine

    @property
    def active_episodes(self) -> int:
        return self._active

    def wait_idle(self, timeout: float) -> bool:
        """Block until no episode runs (or ``timeout`` seconds); True when idle."""
        end = time.monotonic() + timeout
        with self._active_lock:
            while self._active:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._active_lock.wait(left)
        return True

    def _observation(self, msg: pb.Observation, spec, field: str) -> ObservationBatch:
        """Validate an Observation against the spec and make a batch of one."""
        if not msg.HasField("state"):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.state: missing")
        state = decode_tensor(msg.state, f"{field}.state")
        if state.dtype not in (np.float32, np.float64):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{field}.state: dtype {state.dtype} (float32 expected)")
        if state.shape != (spec.state_dim,):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{field}.state: shape {list(state.shape)} (expected [{spec.state_dim}])")
        if not np.all(np.isfinite(state)):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.state: contains NaN or inf")
        images = {}
        for key in msg.images:
            if key not in spec.images:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{field}.images[{key!r}]: unknown camera (model takes "
                                f"{sorted(spec.images) or 'no images'})")
        for key, ispec in spec.images.items():
            if key not in msg.images:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{field}.images[{key!r}]: missing camera")
            img = decode_image(msg.images[key], f"{field}.images[{key!r}]", self.max_image_pixels)
            want = (ispec.height, ispec.width, ispec.channels)
            if img.shape != want:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{field}.images[{key!r}]: shape {list(img.shape)} "
                                f"(expected {list(want)})")
            images[key] = img[None]
        return ObservationBatch(state=state.astype(np.float32)[None], instructions=[""],
                                images=images)

    def _choose_skill(self, engine, start: pb.EpisodeStart, first_obs, context):
        """-> (skill or None, RouteDecision proto, core_only flag); aborts on refusal."""
        names = {s["name"] for s in engine.skills()}
        if start.skill:
            if start.skill not in names:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"start.skill: unknown skill {start.skill!r} "
                              f"(known: {', '.join(sorted(names)) or 'none'})")
            return start.skill, pb.RouteDecision(skill=start.skill, confidence=1.0, margin=1.0,
                                                 reason="skill id given by the client",
                                                 router="oracle"), False
        if not start.instruction.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "start.instruction: empty (give an instruction or a skill id)")
        decision = self._engine_call(context, "routing", engine.route, start.instruction,
                                     first_obs)
        dproto = decision_to_proto(decision)
        if not decision.abstained:
            return decision.skill, dproto, False
        if engine.routing.on_abstain == "core-only":
            return None, dproto, True
        cands = ", ".join(f"{s} ({v:.2f})" for s, v in decision.candidates[:5])
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"start.instruction: router abstained ({decision.reason}); candidates: "
                      f"{cands or 'none'}; pass a skill id or rephrase")

    # -- RPCs -------------------------------------------------------------------------------------
    def Episode(self, request_iterator, context):
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        engine = self._engine(context)
        with self._active_lock:
            self._active += 1
        try:
            yield from self._episode(engine, request_iterator, context)
        finally:
            with self._active_lock:
                self._active -= 1
                self._active_lock.notify_all()

    def _episode(self, engine, request_iterator, context):
        spec = engine.spec
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        kind = first.WhichOneof("msg")
        if kind != "start":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{kind or 'empty message'}: the first message of an episode must be "
                          "EpisodeStart")
        start = first.start
        chunk_len = start.chunk_length or spec.chunk_length
        if chunk_len > spec.chunk_length:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"start.chunk_length: {chunk_len} exceeds the model's chunk length "
                          f"{spec.chunk_length}")
        try:
            first_obs = (self._observation(start.first_observation, spec, "start.first_observation")
                         if start.HasField("first_observation") else None)
            if first_obs is not None:
                first_obs.instructions = [start.instruction]
        except WireError as e:
            context.abort(e.code, str(e))
        skill, dproto, core_only = self._choose_skill(engine, start, first_obs, context)
        episode_id = uuid.uuid4().hex[:12]
        log.info("episode %s: skill=%s instruction=%r client=%s", episode_id, skill,
                 start.instruction, dict(start.client_info))
        yield pb.EpisodeResponse(started=pb.EpisodeStarted(
            episode_id=episode_id, skill=skill or "", core_only=core_only, route=dproto,
            spec=spec_to_proto(spec), state_version=engine.info().get("state_version", "")))
        for i, req in enumerate(request_iterator):
            kind = req.WhichOneof("msg")
            if kind == "end":
                return
            if kind != "observation":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"message {i + 1}: {kind or 'empty message'} after the episode "
                              "started (send observations or EpisodeEnd)")
            received = time.time()
            try:
                obs = self._observation(req.observation, spec, "observation")
            except WireError as e:
                context.abort(e.code, str(e))
            obs.instructions = [start.instruction]
            t0 = time.perf_counter()
            actions = self._infer(engine, obs, skill, context)
            chunk = actions[:chunk_len]
            yield pb.EpisodeResponse(chunk=pb.ActionChunk(
                step=req.observation.step, actions=encode_tensor(chunk),
                server_received_time=received, server_done_time=time.time(),
                inference_ms=(time.perf_counter() - t0) * 1e3))

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
            context.abort(grpc.StatusCode.INTERNAL, f"the policy produced NaN/inf actions; "
                          f"nothing was sent to the robot ({e})")
        except BatcherFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {e}")
        except BatcherClosed:
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        except InputError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except StateError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception as e:  # noqa: BLE001 - report, never leak a bare "error"
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {type(e).__name__}: {e}")

    def ListSkills(self, request, context):
        engine = self._engine(context)
        return pb.ListSkillsResponse(
            skills=[pb.SkillInfo(name=s["name"], instructions=s.get("instructions", []),
                                 description=s.get("description", ""), order=s.get("order", 0))
                    for s in engine.skills()],
            state_version=engine.info().get("state_version", ""))

    def Route(self, request, context):
        engine = self._engine(context)
        if not request.instruction.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instruction: empty")
        obs = None
        if request.HasField("observation"):
            try:
                obs = self._observation(request.observation, engine.spec, "observation")
            except WireError as e:
                context.abort(e.code, str(e))
            obs.instructions = [request.instruction]
        return decision_to_proto(self._engine_call(context, "routing", engine.route,
                                                   request.instruction, obs))

    def ServerInfo(self, request, context):
        engine = self._engine(context)
        info = engine.info()
        return pb.ServerInfoResponse(
            server_version=__version__, backend=str(info.get("backend", "")),
            spec=spec_to_proto(engine.spec), mode=str(info.get("mode", "")),
            state_version=str(info.get("state_version", "")), num_skills=len(engine.skills()),
            uptime_s=time.time() - self.started, router=str(info.get("router", "")),
            extra={k: str(v) for k, v in info.items()
                   if k not in ("backend", "mode", "state_version", "router")})
