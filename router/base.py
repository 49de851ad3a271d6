"""The router interface shared by the text, value-subspace and hybrid routers.

A router answers "which skill should run this episode?" with a confidence, the ranked candidates and
an explicit abstention, so the service can refuse (FAILED_PRECONDITION) or fall back to core-only
instead of silently running the wrong skill.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from carve_client.routing import RouteDecision  # noqa: F401  (re-exported)


class Router(ABC):
    """Maps an instruction (and optionally the first observation) to a RouteDecision."""

    name: str = ""

    @abstractmethod
    def route(self, instruction: str, observation=None) -> RouteDecision:
        """Route one episode. ``observation`` is a ``policy_server.models.base.ObservationBatch`` of
        size 1 (the first observation) for routers that use it, else ignored."""

    def route_many(self, instructions: list[str]) -> list[RouteDecision]:
        return [self.route(t) for t in instructions]


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class ExactRouter(Router):
    """Routes only instructions registered verbatim (case and whitespace folded); abstains otherwise.

    The baseline the service uses when no embedding router is configured.
    """

    name = "exact"

    def __init__(self, skill_instructions: dict[str, list[str]]):
        self._index: dict[str, str] = {}
        for skill, texts in skill_instructions.items():
            for t in texts:
                self._index.setdefault(_normalise(t), skill)
        self._skills = list(skill_instructions)

    def route(self, instruction: str, observation=None) -> RouteDecision:
        skill = self._index.get(_normalise(instruction))
        if skill is None:
            return RouteDecision(None, 0.0, [(s, 0.0) for s in self._skills], 0.0, True,
                                 "instruction is not registered verbatim for any skill", self.name)
        cands = [(skill, 1.0)] + [(s, 0.0) for s in self._skills if s != skill]
        return RouteDecision(skill, 1.0, cands, 1.0, False, "exact registered instruction", self.name)
