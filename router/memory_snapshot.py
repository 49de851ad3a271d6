"""The part of a merge-state snapshot a router reads, held in memory.

Routers are built from a ``StateSnapshot`` (``skill_names``, ``skill`` records, hook
``skill_artifacts``, ``core``); this stand-in carries the same surface for what never touches
disk: the routing benchmarks' tuning grids (which would otherwise re-admit every expert per grid
point) and the router tests.
"""

from __future__ import annotations


class InMemorySnapshot:
    """records: {skill: skill record, e.g. {"instructions": [...], "description": ""}};
    artifacts: {skill: {artifact name: tensor}} as admission hooks store them; version: what
    ``snapshot.version`` reports."""

    def __init__(self, records: dict[str, dict], artifacts: dict[str, dict] | None = None,
                 version: str = "v000001"):
        self._skills = records
        self._arts = artifacts or {}
        self.version = version

    def skill_names(self) -> list[str]:
        return list(self._skills)

    def skill(self, name: str) -> dict:
        return self._skills[name]

    def skill_artifacts(self, name: str) -> dict:
        return dict(self._arts.get(name, {}))

    def core(self) -> dict:
        return {}
