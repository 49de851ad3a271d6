"""``carve train``: build the demo base VLA and its Meta-World skill experts (the expert factory)."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="build the demo VLA base + skill experts from scripted Meta-World demos",
        description="Collect scripted Meta-World demonstrations, pretrain the demo VLA base on the "
                    "base tasks and fine-tune one expert per suite (full or PEFT LoRA). Cached "
                    "under $CARVE_CACHE_DIR (default ~/.cache/carve-serve) by a hash of the preset.")
    p.add_argument("--preset", default="demo",
                   help="demo (~90 s), bench (~30 min) or stream (10 experts, ~50 min); see "
                        "policy_server/sim/suites.py; default demo")
    p.add_argument("--family", choices=("demo", "act"), default="demo",
                   help="model family: the project's demo VLA (default) or LeRobot ACT "
                        "policies (policy_server/training/act_factory.py; full fine-tunes, "
                        "no --lora/--eval)")
    p.add_argument("--out", default=None, help="output directory (default: under the cache dir)")
    p.add_argument("--lora", action="store_true", help="write experts as PEFT LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: the preset's)")
    p.add_argument("--eval", type=int, default=None, metavar="N",
                   help="evaluate base vs experts on N held-out episodes per task "
                        "(default: the preset's; 0 skips)")
    p.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    p.add_argument("--json", action="store_true", help="print factory.json instead of a summary")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from policy_server.errors import InputError
    from policy_server.training.train import build_factory

    if args.lora_rank is not None and args.lora_rank < 1:
        raise InputError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.family == "act":
        # the ACT factory writes full fine-tunes only and has no built-in evaluation (the
        # closed-loop benchmark evaluates it through the server); refuse rather than ignore
        bad = [f for f, v in (("--lora", args.lora), ("--lora-rank", args.lora_rank),
                              ("--eval", args.eval)) if v not in (None, False)]
        if bad:
            raise InputError(f"{', '.join(bad)}: not available with --family act")
        from policy_server.training.act_factory import build_act_factory

        res = build_act_factory(args.preset, out=args.out, force=args.force, progress=True)
    else:
        res = build_factory(args.preset, out=args.out, lora=args.lora, force=args.force,
                            lora_rank=args.lora_rank, eval_episodes=args.eval)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    fam = "act " if res.get("family") == "act" else ""
    print(f"factory {fam}{res['preset']} ({res['hash']}): {res['out']}  "
          f"[{res['total_seconds']:.1f} s]")
    b = res["base"]
    print(f"  base    {b['dir']}  loss {b['losses']['first']:.3f} -> {b['losses']['last']:.3f}")
    for e in res["experts"]:
        print(f"  {e['kind']:<4} {e['name']:<10} {e['dir']}  loss {e['losses']['first']:.3f} -> "
              f"{e['losses']['last']:.3f}  tasks: {', '.join(e['tasks'])}")
    if "eval" in res:
        print(f"  closed-loop success ({res['eval']['episodes']} episodes/task, held-out placements):")
        for name, r in res["eval"]["success"].items():
            for who, per_task in r.items():
                rates = ", ".join(f"{t} {v:.0%}" for t, v in per_task.items())
                print(f"    {name:<10} {who:<6} {rates}")
    return 0
