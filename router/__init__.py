"""Skill routers: pick a skill for an episode from its instruction (and first observation)."""

from router.base import ExactRouter, RouteDecision, Router  # noqa: F401
