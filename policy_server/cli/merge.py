"""``carve merge``: one-shot merge of N experts into a checkpoint (or a state, for per-skill
methods such as TALL masks or the expert bank). Registers ``merge`` only."""

from __future__ import annotations

import json

from policy_server.cli.admit import (
    _storage_line,
    add_common_input_flags,
    add_method_option_flags,
    collect_method_options,
)
from policy_server.errors import InputError


def run_merge(args) -> int:
    from policy_server.state.oneshot import merge

    skills = args.skill or None
    if skills is not None and len(skills) != len(args.expert):
        raise InputError(f"{len(skills)} --skill name(s) for {len(args.expert)} --expert(s): "
                         f"give one --skill per --expert, in the same order")
    report = merge(args.method, args.base, args.expert, args.out,
                   options=collect_method_options(args, args.method), skills=skills,
                   allow_pickle=args.allow_pickle, allow_dtype_mismatch=args.allow_dtype_mismatch,
                   dense_patterns=args.dense_pattern or (), store_dtype=args.store_dtype,
                   core_dtype=args.core_dtype, overwrite=args.overwrite, progress=not args.no_progress, seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    if report["kind"] == "checkpoint":
        print(f"merged {report['experts']} experts with {report['method']} into checkpoint "
              f"{report['out']} ({report['wall_s']:.1f}s)")
    else:
        print(f"merged {report['experts']} experts with {report['method']} into merge state "
              f"{report['out']} version {report['version']} ({report['wall_s']:.1f}s)")
        print(f"  {_storage_line(report['storage'])}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help="one-shot merge of several experts",
                       description="Merge N experts at once, streaming tensor by tensor. Methods "
                                   "with per-skill parts write a merge state to OUT, the others a "
                                   "Hugging Face checkpoint base + merged delta.")
    p.add_argument("--method", required=True, help="merge method (e.g. ties, dare, tall_mask)")
    p.add_argument("--base", required=True, metavar="BASE_DIR")
    p.add_argument("--expert", required=True, action="append", metavar="EXPERT_DIR",
                   help="expert checkpoint or PEFT adapter directory (repeat per expert)")
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--skill", action="append", metavar="NAME",
                   help="skill name per expert, same order (default: the directory names)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output checkpoint (never an existing state)")
    add_common_input_flags(p)
    add_method_option_flags(p)
    p.set_defaults(func=run_merge)
