"""The routing decision type: what a router answers and what the ``Route`` call returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RouteDecision:
    """One routing decision.

    skill: chosen skill name, or None when abstained; confidence in [0, 1]; candidates: (skill,
    score) pairs, best first (scores are the router's own scale, confidence is calibrated to [0, 1]);
    margin: best minus runner-up confidence; abstained: True when below the configured thresholds;
    reason: a human-readable explanation (why abstained, which instruction matched...).
    """

    skill: str | None
    confidence: float
    candidates: list[tuple[str, float]] = field(default_factory=list)
    margin: float = 0.0
    abstained: bool = False
    reason: str = ""
    router: str = ""

    @property
    def runner_up(self) -> str | None:
        return self.candidates[1][0] if len(self.candidates) > 1 else None

    def to_json(self) -> dict:
        """A JSON-ready dict: the fields, candidates as ``{"skill", "score"}`` and ``runner_up``."""
        d = asdict(self)
        d["candidates"] = [{"skill": s, "score": float(v)} for s, v in self.candidates]
        d["runner_up"] = self.runner_up
        return d
