"""Meta-World closed-loop client: runs simulator episodes against a carve-serve policy server.

One gRPC episode per simulator episode, so the server routes (or takes the oracle skill id) once per
episode exactly as it would for a robot. Observations are Meta-World's 39-D state vector; the
server's action chunks are executed open loop for ``replan_every`` steps before the next request.

Command line::

    python -m clients.metaworld_client --server 127.0.0.1:50051 --task reach-v3 --episodes 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from carve_client import PolicyClient, TokenError, read_token

from clients.sim import SimError
from clients.sim.metaworld_env import DEFAULT_MAX_STEPS, make_env
from clients.sim.metaworld_tasks import instruction_for


@dataclass
class EpisodeRecord:
    """One simulator episode run through the server."""

    episode: int
    success: bool
    steps: int
    skill: str | None
    confidence: float
    requests: int
    seconds: float


@dataclass
class TaskResult:
    """All episodes of one task. ``skills`` counts which skill the server chose per episode."""

    task: str
    instruction: str
    episodes: list[EpisodeRecord] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return float(np.mean([e.success for e in self.episodes])) if self.episodes else 0.0

    @property
    def skills(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.episodes:
            key = e.skill or "<core-only>"
            out[key] = out.get(key, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"task": self.task, "instruction": self.instruction,
                "success_rate": self.success_rate, "skills": self.skills,
                "episodes": [asdict(e) for e in self.episodes]}


def run_task(client, task: str, n_episodes: int = 1, seed: int = 1000,
             instruction: str | None = None, skill: str | None = None,
             max_steps: int = DEFAULT_MAX_STEPS, replan_every: int | None = None) -> TaskResult:
    """Run ``n_episodes`` of Meta-World ``task`` through ``client`` (a
    ``carve_client.PolicyClient``).

    instruction: defaults to the task's suite instruction; skill: oracle skill id (None = let the
    server's router choose); replan_every: steps executed per chunk (default: the whole chunk).
    Episode ``i`` uses the seeded placement ``i`` of ``seed`` (see ``clients.sim.metaworld_env``).
    Raises ``clients.sim.SimError`` for an unknown task or a missing Meta-World.
    """
    if instruction is None:
        instruction = instruction_for(task)
    env = make_env(task, seed=seed, max_steps=max_steps)
    result = TaskResult(task, instruction)
    try:
        for ep_idx in range(n_episodes):
            t0 = time.perf_counter()
            obs = env.reset(ep_idx)
            ok, t, requests = False, 0, 0
            with client.episode(instruction, skill=skill,
                                info={"client": "metaworld", "task": task}) as ep:
                per_chunk = replan_every or ep.spec.chunk_length
                while t < max_steps and not ok:
                    chunk = ep.infer(state=np.asarray(obs, dtype=np.float32))
                    requests += 1
                    for action in chunk[:per_chunk]:
                        obs, _reward, ok = env.step(action)
                        t += 1
                        if ok or t >= max_steps:
                            break
                result.episodes.append(EpisodeRecord(
                    ep_idx, bool(ok), t, ep.skill, float(ep.confidence), requests,
                    round(time.perf_counter() - t0, 3)))
    finally:
        env.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of carve serve")
    p.add_argument("--task", action="append", required=True, help="Meta-World v3 task (repeatable)")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--instruction", help="override the task's suite instruction")
    p.add_argument("--skill", help="oracle skill id (default: the server routes)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS)
    p.add_argument("--replan-every", type=int, default=None)
    p.add_argument("--token-file",
                   help="bearer token file for an authenticated server (default: env CARVE_TOKEN)")
    p.add_argument("--json", action="store_true", help="print one JSON object per task")
    args = p.parse_args(argv)
    try:
        token = read_token(args.token_file)
    except TokenError as e:
        p.error(str(e))
    client = PolicyClient(args.server, token=token)
    for task in args.task:
        try:
            res = run_task(client, task, args.episodes, args.seed, args.instruction, args.skill,
                           args.max_steps, args.replan_every)
        except SimError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(res.to_dict()))
        else:
            print(f"{task:28s} success {res.success_rate:5.1%}  skills {res.skills}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
