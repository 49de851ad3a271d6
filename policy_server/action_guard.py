"""The one action guard: what a policy predicted becomes what a robot may receive.

Clip to the announced bounds, reject non-finite values, per row: a row with NaN/inf is withheld
and only that row's request fails (``rows``), or the whole batch fails (``__call__``, for callers
that want all or nothing). Applied once per batch by whatever produces
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

    def rows(self, actions: np.ndarray, skills: Sequence[str | None]
             ) -> tuple[np.ndarray, list[int]]:
        """(B, chunk, A) actions of the batch rows run under ``skills`` -> (a float32 copy
        clipped to the bounds, the indices of rows holding any NaN/inf). A bad row is left
        unclipped and must not be sent; the other rows are unaffected by it. ``RuntimeError`` on
        a wrong shape."""
        want = (len(skills), *self.shape)
        if tuple(actions.shape) != want:
            raise RuntimeError(f"backend returned actions of shape {tuple(actions.shape)}, "
                               f"expected {want}")
        y = np.array(actions, dtype=np.float32, copy=True)
        bad = ~np.isfinite(y).reshape(len(skills), -1).all(axis=1)
        np.clip(y, self.low, self.high, out=y)
        return y, np.flatnonzero(bad).tolist()

    @staticmethod
    def error(rows: list[int], skills: Sequence[str | None]) -> NonFiniteActions:
        """The ``NonFiniteActions`` naming ``rows`` and their skills."""
        return NonFiniteActions(f"non-finite actions for batch rows {rows} "
                                f"(skills {[skills[i] for i in rows]})")

    def __call__(self, actions: np.ndarray, skills: Sequence[str | None]) -> np.ndarray:
        """Like :meth:`rows`, but all or nothing: ``NonFiniteActions`` naming the bad rows and
        their skills when any value is NaN/inf (nothing of the batch is returned)."""
        y, bad = self.rows(actions, skills)
        if bad:
            raise NonFiniteActions(f"{self.error(bad, skills)}; nothing was returned")
        return y
