"""``carve bench closed-loop``: the closed-loop continual-merging benchmark in one command.

Admits the preset's experts one at a time into every compared method, serves each step's model
through the real gRPC server and runs every admitted skill's Meta-World tasks through the real
client (oracle skill id and text router). Writes ``results.json``, ``table.md`` and PNG plots.
Finished (method, step) results are cached under ``OUT/_cache``: rerunning the same command
(after an interruption, or with more methods) evaluates only what is missing.
The implementation lives in ``bench/closed_loop`` (repository checkout only).
"""

from __future__ import annotations

import shlex
import sys


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (closed-loop continual merging)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    c = bsub.add_parser("closed-loop", help="continual merging evaluated in closed loop "
                        "(Meta-World over gRPC), CARVE Table-2 style")
    c.add_argument("--preset", default=None,
                   help="expert factory preset (policy_server/sim/suites.py; default demo)")
    c.add_argument("--family", choices=("demo", "act"), default="demo",
                   help="expert family: the demo VLA (default) or LeRobot ACT policies "
                        "(policy_server/training/act_factory.py), trained on the same demos")
    c.add_argument("--lora", action="store_true",
                   help="experts as PEFT LoRA adapters of the base (the factory's --lora "
                        "variant, trained on first use like `carve train --lora`); default: full "
                        "fine-tunes (demo family only)")
    c.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="LoRA rank of that factory (default: the preset's)")
    c.add_argument("--methods", default=None,
                   help="comma-separated method labels, or 'all' for every registered one (bank, "
                        "carve-r4/16/64, carve-e0.9/0.95, carve-r16-drift, carve-r16-rate-t1, "
                        "carve-r16-rate-count, carve-r16-bf16core, ta, magmax, opcm, ties, dare, "
                        "tsv, resmerge, iso_c, iso_cts, tall_mask, tall_mask-heads)")
    c.add_argument("--episodes", type=int, default=None,
                   help="episodes per task (default 20: the pooled 95%% half-width stays <= 5 "
                        "points with >= 20 tasks; --quick: 1)")
    c.add_argument("--curve-episodes", type=int, default=None, metavar="N",
                   help="episodes per task of the older skills at non-final steps (the rest of "
                        "the per-step curve; default: --episodes). The final step and each "
                        "skill at its own admission step always get --episodes")
    c.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run methods in N worker processes (default 1; at most one per core "
                        "helps: each uses about one)")
    c.add_argument("--no-router-reuse", dest="router_reuse", action="store_false",
                   help="run every routed episode for real, even where the router picks the "
                        "oracle's skill (default: reuse the oracle's episodes there, checked "
                        "on one task per step)")
    c.add_argument("--out", default=None, help="results directory (default results/closed-loop)")
    c.add_argument("--seed", type=int, default=1000, help="episode placement seed")
    c.add_argument("--max-experts", type=int, default=None,
                   help="admit only the first N experts of the factory")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--with-router", dest="with_router", action="store_true", default=None,
                   help="also evaluate through the text router, instruction only (default)")
    g.add_argument("--oracle-only", dest="with_router", action="store_false",
                   help="evaluate with the oracle skill id only")
    c.add_argument("--quick", action="store_true",
                   help="CI smoke: demo preset, carve-r16 + ta, 1 episode per task, router on")
    c.add_argument("--fresh", action="store_true",
                   help="ignore cached steps in OUT/_cache and evaluate everything again")
    c.add_argument("--keep-work", action="store_true",
                   help="keep the built states (and the last step's one-shot merges) in OUT/_work")
    c.set_defaults(func=run_closed_loop)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_closed_loop(args) -> int:
    from bench.closed_loop.methods import DEFAULT_METHODS, QUICK_METHODS
    from bench.closed_loop.run import DEFAULT_EPISODES, run_benchmark
    from policy_server.errors import InputError
    from policy_server.sim.suites import PRESETS

    quick = args.quick
    preset = args.preset or "demo"
    if preset not in PRESETS:  # checked here so a typo exits 2 before the embedder loads
        raise InputError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    methods = args.methods or ",".join(QUICK_METHODS if quick else DEFAULT_METHODS)
    episodes = args.episodes if args.episodes is not None else (1 if quick else DEFAULT_EPISODES)
    out = args.out or ("results/closed-loop-quick" if quick else "results/closed-loop")
    with_router = True if args.with_router is None else args.with_router
    # The canonical command that reproduces this run (recorded in results.json, published).
    cmd = ["carve", "bench", "closed-loop", "--preset", preset, "--methods", methods,
           "--episodes", str(episodes), "--seed", str(args.seed), "--out", out]
    if args.max_experts is not None:
        cmd += ["--max-experts", str(args.max_experts)]
    if args.curve_episodes is not None:
        cmd += ["--curve-episodes", str(args.curve_episodes)]
    if not args.router_reuse:
        cmd.append("--no-router-reuse")
    if not with_router:
        cmd.append("--oracle-only")
    factory = None
    if args.lora_rank is not None and (not args.lora or args.lora_rank < 1):
        raise InputError("--lora-rank needs --lora and a rank >= 1, got "
                         f"{args.lora_rank}{'' if args.lora else ' without --lora'}")
    if args.lora:
        if args.family != "demo":
            raise InputError(f"--lora: the {args.family} family has no LoRA experts "
                             "(the demo VLA family has)")
        from policy_server.training.train import build_factory

        print(f"[bench] building/reusing the {preset!r} LoRA expert factory", flush=True)
        factory = build_factory(preset, lora=True, lora_rank=args.lora_rank)
        cmd += ["--lora"] + ([] if args.lora_rank is None else
                             ["--lora-rank", str(args.lora_rank)])
    if args.family == "act":
        from policy_server.training.act_factory import build_act_factory

        factory = build_act_factory(preset)
        cmd += ["--family", "act"]
    res = run_benchmark(factory=factory,
        preset=preset, methods=methods, episodes=episodes, out=out, with_router=with_router,
        seed=args.seed, max_experts=args.max_experts, keep_work=args.keep_work,
        command=shlex.join(cmd), use_cache=not args.fresh, curve_episodes=args.curve_episodes,
        jobs=args.jobs, router_reuse=args.router_reuse)
    failed = [n for n, m in res["methods"].items() if m.get("error")]
    if failed:
        print(f"[bench] failed methods: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
