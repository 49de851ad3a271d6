"""What the gRPC servicer needs from the policy side, and the adapter onto the real runtime.

The servicer only talks to a :class:`PolicyEngine`, so transport code never touches torch and the
engine can be tested without a network (openpi's split of ``BasePolicy.infer`` vs its server).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from policy_server.models.base import ObservationBatch, PolicySpec
from router.base import RouteDecision, Router


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

    def info(self) -> dict:
        """Free-form facts for ServerInfo (backend, mode, state version, router...)."""
        return {}

    def close(self) -> None:
        """Release resources; called after the server stopped."""


class RuntimeEngine(PolicyEngine):
    """The production engine: a ``PolicyRuntime`` behind a ``MicroBatcher``, plus a router.

    runtime: ``policy_server.runtime.PolicyRuntime``; router: any ``router.base.Router``;
    snapshot: the ``StateSnapshot`` being served (for skill metadata), or None for base-only.
    """

    def __init__(self, runtime, router: Router, snapshot=None, routing: RoutingPolicy | None = None,
                 max_batch: int = 16, max_wait_ms: float = 2.0, backend_name: str = ""):
        from policy_server.runtime import MicroBatcher

        self.runtime = runtime
        self.router = router
        self.snapshot = snapshot
        self.routing = routing or RoutingPolicy()
        self.batcher = MicroBatcher(runtime, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.backend_name = backend_name
        self.started = time.time()

    @property
    def spec(self) -> PolicySpec:
        return self.runtime.spec

    def skills(self) -> list[dict]:
        if self.snapshot is None:
            return []
        out = []
        for name in self.snapshot.skill_names():
            rec = self.snapshot.skill(name)
            out.append({"name": name, "instructions": list(rec.get("instructions", [])),
                        "description": rec.get("description", ""),
                        "order": int(rec.get("order", 0))})
        return out

    def route(self, instruction: str, observation: ObservationBatch | None = None) -> RouteDecision:
        return self.router.route(instruction, observation)

    def infer(self, observation: ObservationBatch, skill: str | None) -> np.ndarray:
        return np.asarray(self.batcher.submit(observation, skill).result(), dtype=np.float32)

    def info(self) -> dict:
        return {"backend": self.backend_name, "mode": self.runtime.mode,
                "state_version": self.snapshot.version if self.snapshot is not None else "",
                "router": getattr(self.router, "name", type(self.router).__name__)}

    def close(self) -> None:
        self.batcher.close()
