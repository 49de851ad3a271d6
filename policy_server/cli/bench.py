"""``carve bench closed-loop``: the closed-loop continual-merging benchmark in one command.

Admits the preset's experts one at a time into every compared method, serves each step's model
through the real gRPC server and runs every admitted skill's Meta-World tasks through the real
client (oracle skill id and text router). Writes ``results.json``, ``table.md`` and PNG plots.
The implementation lives in ``bench/closed_loop`` (repository checkout only).
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (closed-loop continual merging)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    c = bsub.add_parser("closed-loop", help="continual merging evaluated in closed loop "
                        "(Meta-World over gRPC), CARVE Table-2 style")
    c.add_argument("--preset", default=None, choices=["demo", "bench"],
                   help="expert factory preset (default demo)")
    c.add_argument("--methods", default=None,
                   help="comma-separated method labels (bank, carve-r4/16/64, carve-e0.9, "
                        "carve-r16-drift, ta, magmax, opcm, ties, dare, tsv, resmerge, tall_mask)")
    c.add_argument("--episodes", type=int, default=None, help="episodes per task (default 2)")
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
    c.add_argument("--keep-work", action="store_true",
                   help="keep the built states (and the last step's one-shot merges) in OUT/_work")
    c.set_defaults(func=run_closed_loop)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_closed_loop(args) -> int:
    from bench.closed_loop.methods import DEFAULT_METHODS, QUICK_METHODS
    from bench.closed_loop.run import run_benchmark

    quick = args.quick
    res = run_benchmark(
        preset=args.preset or "demo",
        methods=args.methods or ",".join(QUICK_METHODS if quick else DEFAULT_METHODS),
        episodes=args.episodes or (1 if quick else 2),
        out=args.out or ("results/closed-loop-quick" if quick else "results/closed-loop"),
        with_router=True if args.with_router is None else args.with_router,
        seed=args.seed, max_experts=args.max_experts, keep_work=args.keep_work)
    failed = [n for n, m in res["methods"].items() if m.get("error")]
    if failed:
        print(f"[bench] failed methods: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
