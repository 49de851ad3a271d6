"""Request building and response parsing shared by the sync and asyncio clients."""

from __future__ import annotations

import grpc
import numpy as np

from carve_client.codec import (decision_from_proto, decode_tensor, observation_proto,
                                spec_from_proto)
from carve_client.errors import PolicyError
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb


def episode_start(instruction: str, skill: str | None = None, chunk_length: int | None = None,
                  info: dict | None = None, first_state: np.ndarray | None = None,
                  first_images: dict[str, np.ndarray] | None = None) -> pb.EpisodeStart:
    """EpisodeStart message; ``first_state`` (state_dim,) float / ``first_images`` (key -> uint8
    HWC) let routers that look at the first observation use it. Either one alone is sent too
    (a missing state as an empty one, which the server refuses with INVALID_ARGUMENT naming
    ``start.first_observation.state`` when its model needs a state): never dropped silently."""
    start = pb.EpisodeStart(instruction=instruction, skill=skill or "",
                            chunk_length=chunk_length or 0,
                            client_info={k: str(v) for k, v in (info or {}).items()})
    if first_state is not None or first_images:
        state = np.zeros(0, np.float32) if first_state is None else first_state
        start.first_observation.CopyFrom(observation_proto(state, first_images, 0, "raw"))
    return start


def route_dict(d: pb.RouteDecision) -> dict:
    """RouteDecision message -> the JSON-ready dict the clients return
    (``RouteDecision.to_json``)."""
    return decision_from_proto(d).to_json()


def skills_from_proto(r: pb.ListSkillsResponse) -> list[dict]:
    """ListSkillsResponse -> [{"name", "instructions", "description", "order"}]."""
    return [{"name": s.name, "instructions": list(s.instructions), "description": s.description,
             "order": s.order} for s in r.skills]


def server_info_from_proto(r: pb.ServerInfoResponse) -> dict:
    """ServerInfoResponse -> dict (``spec`` as a PolicySpec, ``extra`` as a plain dict)."""
    return {"server_version": r.server_version, "backend": r.backend, "mode": r.mode,
            "state_version": r.state_version, "num_skills": r.num_skills,
            "uptime_s": r.uptime_s, "router": r.router, "spec": spec_from_proto(r.spec),
            "extra": dict(r.extra), "state_loaded_time": r.state_loaded_time,
            "last_reload_error": r.last_reload_error, "last_reload_time": r.last_reload_time,
            "reloads_ok": r.reloads_ok, "reloads_failed": r.reloads_failed}


def chunk_from_response(resp: pb.EpisodeResponse) -> tuple[np.ndarray, float]:
    """EpisodeResponse carrying an ActionChunk -> ((chunk_length, action_dim) float32 actions,
    the server's inference_ms); PolicyError(INTERNAL) for any other message."""
    if resp.WhichOneof("msg") != "chunk":
        raise PolicyError(grpc.StatusCode.INTERNAL, "expected an ActionChunk")
    actions = decode_tensor(resp.chunk.actions, "actions")  # a fresh, writable array
    if actions.dtype != np.float32:
        actions = actions.astype(np.float32)
    return actions, resp.chunk.inference_ms


class EpisodeInfo:
    """What the server announced when the episode opened (mixed into the episode classes).

    episode_id; skill (None = core-only or abstained); confidence, route (dict, see
    ``route_dict``); core_only; spec (PolicySpec); state_version; notes (list of str: facts
    about how the server converts this episode's observations, e.g. that it resizes cameras of
    another size). last_notes: the notes of the latest action chunk (e.g. "camera 'front':
    480x640 resized to 256x256 (bilinear)"), empty when the observation was used as sent.
    """

    def _set_started(self, first: pb.EpisodeResponse) -> None:
        if first.WhichOneof("msg") != "started":
            raise PolicyError(grpc.StatusCode.INTERNAL, "server did not answer EpisodeStarted")
        st = first.started
        self.episode_id = st.episode_id
        self.skill: str | None = st.skill or None
        self.core_only = st.core_only
        self.route = route_dict(st.route)
        self.confidence = float(st.route.confidence)
        self.spec = spec_from_proto(st.spec)
        self.state_version = st.state_version
        self.notes: list[str] = list(st.notes)
        self.last_notes: list[str] = []

    def _take_chunk(self, resp: pb.EpisodeResponse) -> tuple[np.ndarray, float]:
        """``chunk_from_response`` that also records the chunk's notes in ``last_notes``."""
        actions, inference_ms = chunk_from_response(resp)
        self.last_notes = list(resp.chunk.notes)
        return actions, inference_ms
