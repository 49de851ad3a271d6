"""What the gRPC servicer needs from the policy side: the :class:`PolicyEngine` interface and the
abstention policy.

The servicer only talks to a :class:`PolicyEngine`, so transport code never touches torch and the
engine can be tested without a network (openpi's split of ``BasePolicy.infer`` vs its server).
The production engine over the runtime, ``RuntimeEngine``, is built by the composition root
``policy_server.serving``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from policy_server.models.base import ObservationBatch, PolicySpec
from router.base import RouteDecision


@dataclass
class RoutingPolicy:
    """What to do when the router abstains: ``"refuse"`` (FAILED_PRECONDITION listing the
    candidates) or ``"core-only"`` (run the shared core without a skill residual)."""

    on_abstain: str = "refuse"

    def __post_init__(self):
        if self.on_abstain not in ("refuse", "core-only"):
            raise ValueError(f"on_abstain must be 'refuse' or 'core-only', got {self.on_abstain!r}")


class PolicyEngine(ABC):
    """The policy behind the service. ``infer`` may be called from many threads at once."""

    routing = RoutingPolicy()

    @property
    @abstractmethod
    def spec(self) -> PolicySpec:
        """Observation/action contract of the served model."""

    @abstractmethod
    def skills(self) -> list[dict]:
        """[{name, instructions, description, order}] in admission order."""

    @abstractmethod
    def route(self, instruction: str, observation: ObservationBatch | None = None) -> RouteDecision:
        """Pick a skill for an episode (no side effects)."""

    @abstractmethod
    def infer(self, observation: ObservationBatch, skill: str | None) -> np.ndarray:
        """One observation (batch of 1) -> (chunk_length, action_dim) float32, clipped, finite.
        ``skill`` None runs the core only."""

    @property
    def resizes_images(self) -> bool:
        """Whether camera images of another size than the spec's are accepted (resized to it by
        the transport, and said so in the episode's notes) instead of refused."""
        return False

    def end_episode(self, episode_id: str) -> None:
        """The episode ``episode_id`` (from its EpisodeStarted) ended, however it ended: drop
        any per-episode state. Called once per opened episode, from the server's event loop, so
        it must not block. Default: nothing."""

    def info(self) -> dict:
        """Free-form facts for ServerInfo (backend, mode, state version, router...)."""
        return {}

    def attach_metrics(self, recorder) -> None:
        """Hand the server's metrics recorder to the engine's internals (the production engine
        gives it to its micro-batcher for batch sizes and queue waits); called once, when the
        engine is put in service."""

    def close(self) -> None:
        """Release resources; called after the server stopped."""
