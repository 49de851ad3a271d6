"""The one action guard: what a policy predicted becomes what a robot may receive.

Clip to the announced bounds, reject non-finite values. Applied once per batch by whatever produces
an engine's actions (the runtime, for the production engine); the gRPC transport trusts the engine
and does not re-check (a second copy of the rule would drift). numpy only, so torch-free engines
(test doubles, remote policies) can apply the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policy_server.errors import NonFiniteActions


class ActionGuard:
    """Shape check, non-finite rejection and clipping for one served spec.

    spec: a ``PolicySpec`` (``chunk_length``, ``action_dim``, ``action_low``, ``action_high``).
    """

    def __init__(self, spec):
        self.shape = (int(spec.chunk_length), int(spec.action_dim))
        self.low = np.asarray(spec.action_low, dtype=np.float32)
        self.high = np.asarray(spec.action_high, dtype=np.float32)

    def __call__(self, actions: np.ndarray, skills: Sequence[str | None]) -> np.ndarray:
        """(B, chunk, A) actions of the batch rows run under ``skills`` -> a float32 (B, chunk, A)
        copy clipped to the bounds. ``RuntimeError`` on a wrong shape; ``NonFiniteActions`` naming
        the rows and their skills when any value is NaN/inf (nothing of the batch is returned)."""
        want = (len(skills), *self.shape)
        if tuple(actions.shape) != want:
            raise RuntimeError(f"backend returned actions of shape {tuple(actions.shape)}, "
                               f"expected {want}")
        y = np.array(actions, dtype=np.float32, copy=True)
        bad = ~np.isfinite(y).reshape(len(skills), -1).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad).tolist()
            raise NonFiniteActions(f"non-finite actions for batch rows {rows} "
                                   f"(skills {[skills[i] for i in rows]}); nothing was returned")
        np.clip(y, self.low, self.high, out=y)
        return y
