"""Blending overlapping action chunks, as a robot client executes them.

A new chunk usually arrives while the previous one still has actions left for the same timesteps.
``ChunkBlender`` keeps one action per future timestep and merges a new prediction into it with an
aggregate function, like LeRobot's async-inference client does:

* ``latest_only``: the newest prediction wins (no smoothing, lowest latency to react);
* ``average``: 0.5 * old + 0.5 * new;
* ``weighted_average``: 0.3 * old + 0.7 * new (favours the fresher prediction, smooths jitter);
* ``conservative``: 0.7 * old + 0.3 * new (strong smoothing).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

AGGREGATES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "latest_only": lambda old, new: new,
    "average": lambda old, new: 0.5 * old + 0.5 * new,
    "weighted_average": lambda old, new: 0.3 * old + 0.7 * new,
    "conservative": lambda old, new: 0.7 * old + 0.3 * new,
}


class ChunkBlender:
    """Timestep-indexed action queue with blending of overlapping chunks.

    ``add(start_step, chunk)`` with chunk (T, A) float32 covering steps start_step..start_step+T-1;
    ``action(step)`` -> (A,) float32, or None when no chunk covers ``step`` (the caller must hold
    position or wait). Steps before the last consumed one are dropped.
    """

    def __init__(self, mode: str = "weighted_average"):
        if mode not in AGGREGATES:
            raise ValueError(f"unknown blending mode {mode!r}; use one of {sorted(AGGREGATES)}")
        self.mode = mode
        self._agg = AGGREGATES[mode]
        self._actions: dict[int, np.ndarray] = {}
        self._consumed = -1

    def add(self, start_step: int, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2:
            raise ValueError(f"chunk must be (T, action_dim), got shape {chunk.shape}")
        for i, a in enumerate(chunk):
            step = start_step + i
            if step <= self._consumed:
                continue  # already executed: a late chunk cannot change the past
            old = self._actions.get(step)
            self._actions[step] = a.copy() if old is None else self._agg(old, a).astype(np.float32)

    def action(self, step: int) -> np.ndarray | None:
        """The action for ``step`` (consumes it and everything before it)."""
        for s in [s for s in self._actions if s < step]:
            del self._actions[s]
        self._consumed = max(self._consumed, step)
        return self._actions.pop(step, None)

    def remaining(self, step: int) -> int:
        """How many consecutive future actions from ``step`` on are queued."""
        n = 0
        while (step + n) in self._actions:
            n += 1
        return n
