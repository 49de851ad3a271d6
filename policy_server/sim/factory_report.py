"""Print a factory build's own closed-loop evaluation (``factory.json`` ``eval``) as a table.

The factory evaluates, on held-out placements (MT1 seed ``EVAL_SEED``), every expert on its own
suite - which is exactly what the expert bank serves with the oracle skill id - and the base on
the same tasks. This reads that back without rerunning anything:

    python -m policy_server.sim.factory_report --preset stream      # the cached default build
    python -m policy_server.sim.factory_report PATH/factory.json [--lora]

Averages are over tasks (every task weighs the same) and, in brackets, over suites (the
benchmark's ``acc`` convention: a suite's success is the mean over its tasks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def summarize(factory: dict) -> dict:
    """{rows: [{suite, tasks, expert {task: rate}, base {task: rate}}], episodes, bank_task_avg,
    base_task_avg, bank_suite_avg, base_suite_avg, base_on_base_tasks}; rates in [0, 1].
    KeyError when the build has no ``eval`` section (built with eval_episodes=0)."""
    ev = factory["eval"]
    rows = []
    for e in factory["experts"]:
        r = ev["success"][e["name"]]
        rows.append({"suite": e["name"], "tasks": list(e["tasks"]), "expert": r["expert"],
                     "base": r["base"]})
    ex = [v for r in rows for v in r["expert"].values()]
    ba = [v for r in rows for v in r["base"].values()]
    return {"rows": rows, "episodes": ev["episodes"],
            "bank_task_avg": float(np.mean(ex)), "base_task_avg": float(np.mean(ba)),
            "bank_suite_avg": float(np.mean([np.mean(list(r["expert"].values())) for r in rows])),
            "base_suite_avg": float(np.mean([np.mean(list(r["base"].values())) for r in rows])),
            "base_on_base_tasks": ev["success"].get("base_tasks", {}).get("base", {})}


def format_report(factory: dict) -> str:
    s = summarize(factory)
    lines = [f"factory {factory['preset']} ({factory['hash']}, "
             f"{'LoRA' if factory.get('lora') else 'full fine-tune'} experts), "
             f"{s['episodes']} held-out episodes per task, build {factory['total_seconds']:.0f} s",
             "", "| # | suite | task | expert (bank) | base |", "|---|---|---|---|---|"]
    for i, r in enumerate(s["rows"], 1):
        for t in r["tasks"]:
            lines.append(f"| {i} | {r['suite']} | {t} | {100 * r['expert'][t]:.0f} | "
                         f"{100 * r['base'][t]:.0f} |")
    lines += ["", f"bank average: {100 * s['bank_task_avg']:.1f} % over tasks "
              f"({100 * s['bank_suite_avg']:.1f} % over suites)",
              f"base average: {100 * s['base_task_avg']:.1f} % over tasks "
              f"({100 * s['base_suite_avg']:.1f} % over suites)"]
    if s["base_on_base_tasks"]:
        lines.append("base on its own pretraining tasks: " + ", ".join(
            f"{t} {100 * v:.0f} %" for t, v in s["base_on_base_tasks"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m policy_server.sim.factory_report",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("factory_json", nargs="?", default=None)
    ap.add_argument("--preset", default=None, help="read the cached build of this preset")
    ap.add_argument("--lora", action="store_true", help="with --preset: the LoRA build")
    args = ap.parse_args(argv)
    if args.factory_json:
        path = Path(args.factory_json)
    else:
        from policy_server.sim.suites import get_preset
        from policy_server.training.train import cache_dir, preset_hash

        p = get_preset(args.preset or "demo")
        key = preset_hash(p, args.lora, p.lora_rank)
        path = cache_dir() / "factory" / f"{p.name}-{key}{'-lora' if args.lora else ''}" / \
            "factory.json"
    if not path.is_file():
        print(f"{path}: no factory.json (build it first: carve train --preset ...)")
        return 2
    factory = json.loads(path.read_text())
    if "eval" not in factory:
        print(f"{path}: built without evaluation (eval_episodes=0); rebuild with --eval N")
        return 2
    print(format_report(factory))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
