"""Per-episode state of stateful LeRobot policies, kept by the backend, never inside the policy.

LeRobot policies keep rollout state on the policy object (diffusion's observation queues, ACT's
temporal ensembler, the sampling RNG). One policy object serves every robot here, so that state
lives in one :class:`EpisodeState` per episode id instead: concurrent episodes never share
queues, and a new episode (a new id) starts from a fresh state without touching anyone else's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch


@dataclass
class EpisodeState:
    """generator: this episode's sampling RNG (CPU, seeded at episode start), so an episode's
    noise sequence does not depend on which other episodes share its batches; queues: diffusion's
    ``{key: deque(maxlen=n_obs_steps)}`` of (1, ...) tensors; ensembler: ACT's
    ``ACTTemporalEnsembler`` when temporal ensembling is on."""

    generator: torch.Generator
    queues: dict | None = None
    ensembler: object | None = None
    steps: int = field(default=0)

    def snapshot(self) -> tuple:
        """What a failed call must be able to undo (the runtime may retry a batch another way,
        e.g. as fused skill groups): the RNG state, the queues' contents, the step count. The
        ensembler is updated only after the model forward succeeded, so it is not included."""
        queues = None if self.queues is None else {
            k: deque(q, maxlen=q.maxlen) for k, q in self.queues.items()}
        return self.generator.get_state(), queues, self.steps

    def restore(self, snap: tuple) -> None:
        rng, queues, self.steps = snap
        self.generator.set_state(rng)
        if queues is not None:
            self.queues = queues


class EpisodeStates:
    """episode id -> :class:`EpisodeState`, least-recently-used eviction past ``max_episodes``
    (an episode that ended without telling the backend must not leak memory forever).

    new_state: ``() -> EpisodeState`` (a fresh state; called for unseen ids and for rows without
    an id, whose state then lives for that one call only)."""

    def __init__(self, new_state, max_episodes: int = 1024):
        self._new = new_state
        self._max = int(max_episodes)
        self._states: OrderedDict[str, EpisodeState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, episode_id: str | None) -> EpisodeState:
        if episode_id is None:
            return self._new()
        with self._lock:
            st = self._states.get(episode_id)
            if st is None:
                st = self._states[episode_id] = self._new()
                while len(self._states) > self._max:
                    self._states.popitem(last=False)
            else:
                self._states.move_to_end(episode_id)
            return st

    def end(self, episode_id: str) -> None:
        """Forget an episode's state (a later call with the same id starts fresh)."""
        with self._lock:
            self._states.pop(episode_id, None)

    def __len__(self) -> int:
        return len(self._states)
