"""Check which Meta-World v3 tasks the scripted policies of ``metaworld.policies`` solve reliably.

A task only belongs in a factory suite when its scripted expert succeeds almost always: the
factory keeps only successful demonstrations and gives up on a task after ``2 n + 2`` attempts,
and a policy that fails often also tends to produce odd, hard-to-clone trajectories. This runs
the scripted policy with exactly the factory's environment wrapper and seeding
(``MetaWorldEnv``, episode ``i`` = seeded placement ``i`` of ``--seed``) and the factory's episode
rule (stop at the first success step or at ``--max-steps``) and prints a table.

    python -m policy_server.sim.check_scripted                      # every v3 task, 8 episodes
    python -m policy_server.sim.check_scripted --tasks pick-place-v3 assembly-v3 --episodes 4
    python -m policy_server.sim.check_scripted --preset stream      # the tasks of one preset

``--json PATH`` also writes the per-task results. Exit status 0 always (it is a report; the
threshold ``--min`` only sets the ``ok`` column).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from policy_server.sim.metaworld_env import known_tasks, make_env, scripted_action, scripted_policy


def check_task(task: str, episodes: int = 8, seed: int = 0, max_steps: int = 150) -> dict:
    """Run the scripted policy of ``task`` for ``episodes`` seeded episodes.

    Returns {task, episodes, successes, success (list of bool), steps (list of int: the success
    step, or max_steps on failure), seconds}.
    """
    t0 = time.perf_counter()
    env = make_env(task, seed=seed, max_steps=max_steps)
    policy = scripted_policy(task)
    success, steps = [], []
    for ep in range(episodes):
        obs = env.reset(ep)
        ok, t = False, 0
        while t < max_steps and not ok:
            obs, _r, ok = env.step(scripted_action(policy, obs))
            t += 1
        success.append(bool(ok))
        steps.append(int(t))
    env.close()
    return {"task": task, "episodes": episodes, "successes": int(sum(success)),
            "success": success, "steps": steps, "seconds": round(time.perf_counter() - t0, 2)}


def format_table(rows: list[dict], min_successes: int) -> str:
    lines = ["| task | success | ok | mean steps (successes) | max steps (successes) | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ok_steps = [s for s, k in zip(r["steps"], r["success"]) if k]
        mean = f"{np.mean(ok_steps):.0f}" if ok_steps else "-"
        mx = f"{max(ok_steps)}" if ok_steps else "-"
        lines.append(f"| {r['task']} | {r['successes']}/{r['episodes']} | "
                     f"{'yes' if r['successes'] >= min_successes else 'no'} | {mean} | {mx} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m policy_server.sim.check_scripted",
                                 description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--tasks", nargs="+", default=None, help="v3 task names (default: all)")
    src.add_argument("--preset", default=None, help="check every task of this factory preset")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="placement seed (the factory's demos use "
                    "seed*1000 + task index; evaluation uses 1000)")
    ap.add_argument("--max-steps", type=int, default=150)
    ap.add_argument("--min", type=int, default=None,
                    help="successes needed for ok (default: episodes - 1)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    if args.preset:
        from policy_server.sim.suites import get_preset

        p = get_preset(args.preset)
        tasks = list(p.base_tasks) + [t for s in p.suites.values() for t in s]
    else:
        tasks = args.tasks or known_tasks()
    min_ok = args.min if args.min is not None else max(1, args.episodes - 1)
    rows = []
    for task in tasks:
        rows.append(check_task(task, args.episodes, args.seed, args.max_steps))
        r = rows[-1]
        print(f"{task}: {r['successes']}/{r['episodes']} ({r['seconds']:.1f} s)", file=sys.stderr,
              flush=True)
    print(format_table(rows, min_ok))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"episodes": args.episodes, "seed": args.seed, "max_steps": args.max_steps,
                       "min": min_ok, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
