"""Meta-World (v3) environments with seeded per-episode placements.

Variation between episodes: ``gymnasium.make("Meta-World/MT1", env_name=..., seed=seed)`` builds
the MT1 benchmark whose 50 "tasks" are object/goal placements drawn from ``seed``; the env's own
wrapper would pick one at random from an unseeded RNG on every reset, so we switch that off and
choose placement ``i`` of episode ``i`` from ``numpy.random.default_rng([seed, i])`` ourselves.
The same ``(task, seed, episode)`` therefore always gives the same scene, and different ``seed``
values give disjoint placement sets (use one seed for training demos and another for evaluation).

Observations are Meta-World's 39-D state (hand xyz, gripper opening, two object poses, previous
frame of the same, goal xyz) as float32; actions are 4-D (dx, dy, dz, gripper) in [-1, 1].
"""

from __future__ import annotations

import warnings

import numpy as np

from clients.sim import SimError

OBS_DIM = 39
ACTION_DIM = 4
DEFAULT_MAX_STEPS = 150  # scripted policies finish the suite tasks in < 100 steps


def import_metaworld():
    """(gymnasium, metaworld's task -> scripted-policy class map); SimError when Meta-World is
    not installed."""
    try:
        import gymnasium as gym
        import metaworld  # noqa: F401  (registers the Meta-World/* gymnasium ids)
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as e:  # pragma: no cover - depends on the optional [sim] extra
        raise SimError(f"Meta-World is not installed ({e}); pip install 'carve-serve[sim]'") from None
    return gym, ENV_POLICY_MAP


def known_tasks() -> list[str]:
    """Every Meta-World v3 task name."""
    _, pmap = import_metaworld()
    return sorted(pmap)


class MetaWorldEnv:
    """One Meta-World task with seeded per-episode placements.

    ``reset(episode) -> obs (39,) float32``; ``step(action (4,)) -> (obs, reward, success: bool)``.
    """

    def __init__(self, task: str, seed: int = 0, max_steps: int = DEFAULT_MAX_STEPS):
        gym, pmap = import_metaworld()
        if task not in pmap:
            raise SimError(f"unknown Meta-World task {task!r}; v3 names such as 'reach-v3', "
                           f"known: {sorted(pmap)[:8]}...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gymnasium's observation-space bound warnings
            self.env = gym.make("Meta-World/MT1", env_name=task, seed=int(seed),
                                max_episode_steps=max_steps, disable_env_checker=True)
        self.task = task
        self.seed = int(seed)
        self.max_steps = max_steps
        self._placements = self.env.get_wrapper_attr("tasks")
        self.env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)

    def reset(self, episode: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(episode)])
        self.env.unwrapped.set_task(self._placements[int(rng.integers(len(self._placements)))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs, _ = self.env.reset(seed=int(rng.integers(2**31)))
        return np.asarray(obs, dtype=np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(ACTION_DIM), -1.0, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs, reward, _term, _trunc, info = self.env.step(a)
        return np.asarray(obs, dtype=np.float32), float(reward), bool(info.get("success", 0.0) > 0.5)

    def close(self) -> None:
        self.env.close()


def make_env(task_name: str, seed: int = 0, max_steps: int = DEFAULT_MAX_STEPS) -> MetaWorldEnv:
    """A seeded :class:`MetaWorldEnv` for a v3 task name (e.g. ``"push-v3"``)."""
    return MetaWorldEnv(task_name, seed=seed, max_steps=max_steps)
