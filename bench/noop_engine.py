"""A ``PolicyEngine`` that runs no model: isolates serialisation, image decoding and the gRPC
stream in the transport benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from policy_server.service.engine_api import PolicyEngine
from router.base import ExactRouter


class NoopEngine(PolicyEngine):
    """One skill ``"noop"``; ``act()`` returns the (chunk_length, action_dim) float32 chunk
    (e.g. zeros, possibly after a sleep that emulates a policy's compute time)."""

    def __init__(self, spec, act: Callable[[], np.ndarray]):
        self._spec = spec
        self._act = act
        self._router = ExactRouter({"noop": ["noop"]})

    @property
    def spec(self):
        return self._spec

    def skills(self):
        return [{"name": "noop", "instructions": ["noop"], "description": "", "order": 1}]

    def route(self, instruction, observation=None):
        return self._router.route(instruction)

    def infer(self, observation, skill):
        return self._act()
