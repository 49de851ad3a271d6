"""Meta-World (v3) scripted demonstrations and closed-loop rollouts for the expert factory.

The environment itself (seeded per-episode placements, see ``clients.sim.metaworld_env``) is
simulator-side and shared with the Meta-World client; it is re-exported here with its errors
raised as ``InputError`` (the CLI's exit code 2).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from clients.sim import metaworld_env as _env
from clients.sim.metaworld_env import (ACTION_DIM, DEFAULT_MAX_STEPS, OBS_DIM,  # noqa: F401
                                       MetaWorldEnv)
from policy_server.errors import InputError
from policy_server.sim import input_errors

PolicyFn = Callable[[np.ndarray, str], np.ndarray]

make_env = input_errors()(_env.make_env)
known_tasks = input_errors()(_env.known_tasks)


def scripted_action(policy, obs: np.ndarray) -> np.ndarray:
    """``policy.get_action(obs)`` clipped to [-1, 1] as (4,) float32. Meta-World's policies warn on
    every call that their gains exceed the action bounds; the clip here is exactly what the env
    does, so the warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = policy.get_action(obs)
    return np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)


def scripted_policy(task: str):
    """The hand-written expert of ``metaworld.policies`` for ``task`` (``get_action(obs)``)."""
    with input_errors():
        _, pmap = _env.import_metaworld()
    if task not in pmap:
        raise InputError(f"no scripted policy for {task!r}")
    return pmap[task]()


@dataclass
class Demos:
    """Successful scripted demonstrations of one task.

    obs: (N, 39) float32; actions: (N, 4) float32 in [-1, 1]; episode: (N,) int32 episode index
    (0..n_kept-1, consecutive steps of one episode are contiguous); attempted_success: (n_tried,)
    bool, success of every episode tried (failures are dropped from the arrays).
    """

    task: str
    obs: np.ndarray
    actions: np.ndarray
    episode: np.ndarray
    attempted_success: np.ndarray
    seconds: float = 0.0

    def save(self, path) -> None:
        np.savez_compressed(path, task=np.array(self.task), obs=self.obs, actions=self.actions,
                            episode=self.episode, attempted_success=self.attempted_success,
                            seconds=np.array(self.seconds))

    @classmethod
    def load(cls, path) -> "Demos":
        with np.load(path, allow_pickle=False) as z:
            return cls(str(z["task"]), z["obs"], z["actions"], z["episode"],
                       z["attempted_success"], float(z["seconds"]))

    @property
    def n_episodes(self) -> int:
        return int(self.episode.max()) + 1 if len(self.episode) else 0


def collect_demos(task: str, n_episodes: int, seed: int = 0, max_steps: int = DEFAULT_MAX_STEPS,
                  max_attempts: int | None = None) -> Demos:
    """Run the scripted policy until ``n_episodes`` successful episodes are collected.

    An episode stops at the first success step (that step's action is kept) or after
    ``max_steps``; unsuccessful episodes are discarded. Raises InputError when fewer than
    ``n_episodes`` succeed within ``max_attempts`` (default ``2 * n_episodes + 2``) tries.
    """
    if n_episodes < 1:
        raise InputError(f"n_episodes must be >= 1, got {n_episodes}")
    t0 = time.perf_counter()
    env = make_env(task, seed=seed, max_steps=max_steps)
    policy = scripted_policy(task)
    obs_l, act_l, ep_l, tried = [], [], [], []
    max_attempts = max_attempts or 2 * n_episodes + 2
    ep = 0
    while len(ep_l) < n_episodes and ep < max_attempts:
        obs = env.reset(ep)
        e_obs, e_act, ok = [], [], False
        for _ in range(max_steps):
            a = scripted_action(policy, obs)
            e_obs.append(obs)
            e_act.append(a)
            obs, _r, ok = env.step(a)
            if ok:
                break
        tried.append(ok)
        if ok:
            obs_l.append(np.stack(e_obs))
            act_l.append(np.stack(e_act))
            ep_l.append(np.full(len(e_obs), len(ep_l), dtype=np.int32))
        ep += 1
    env.close()
    if len(ep_l) < n_episodes:
        raise InputError(f"{task}: scripted policy succeeded in only {len(ep_l)}/{ep} episodes "
                         f"(seed {seed}, max_steps {max_steps}); need {n_episodes}")
    return Demos(task, np.concatenate(obs_l), np.concatenate(act_l), np.concatenate(ep_l),
                 np.asarray(tried, dtype=bool), time.perf_counter() - t0)


@dataclass
class RolloutResult:
    """Closed-loop evaluation of one task: success (n,) bool and steps (n,) int per episode."""

    task: str
    success: list[bool] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.success)) if self.success else 0.0

    def to_dict(self) -> dict:
        return {"task": self.task, "success": list(map(bool, self.success)),
                "steps": list(map(int, self.steps)), "success_rate": self.success_rate,
                "seconds": round(self.seconds, 3)}


def rollout(policy_fn: PolicyFn, task: str, n_episodes: int, seed: int = 1000,
            max_steps: int = DEFAULT_MAX_STEPS, replan_every: int = 1,
            instruction: str | None = None) -> RolloutResult:
    """Evaluate ``policy_fn(obs (39,) float32, instruction) -> (chunk, 4)`` on ``task``.

    Each chunk is executed open loop for ``min(replan_every, chunk)`` steps, then the policy is
    queried again. An episode succeeds as soon as Meta-World reports success. ``instruction``
    defaults to the task's suite instruction.
    """
    if replan_every < 1:
        raise InputError(f"replan_every must be >= 1, got {replan_every}")
    if instruction is None:
        from policy_server.sim.suites import instruction_for

        instruction = instruction_for(task)
    t0 = time.perf_counter()
    env = make_env(task, seed=seed, max_steps=max_steps)
    res = RolloutResult(task)
    for ep in range(n_episodes):
        obs = env.reset(ep)
        ok, t = False, 0
        while t < max_steps and not ok:
            chunk = np.asarray(policy_fn(obs, instruction), dtype=np.float32)
            if chunk.ndim == 1:
                chunk = chunk[None]
            if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM or not np.all(np.isfinite(chunk)):
                raise InputError(f"policy_fn returned {chunk.shape}, expected finite (chunk, 4)")
            for a in chunk[:replan_every]:
                obs, _r, ok = env.step(a)
                t += 1
                if ok or t >= max_steps:
                    break
        res.success.append(ok)
        res.steps.append(t)
    env.close()
    res.seconds = time.perf_counter() - t0
    return res


def scripted_policy_fn(task: str) -> PolicyFn:
    """A ``policy_fn`` backed by the scripted expert (chunk of 1): the upper bound for rollouts."""
    pol = scripted_policy(task)
    return lambda obs, _instr: scripted_action(pol, obs)[None]
