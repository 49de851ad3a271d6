"""``carve state export``: write one skill as a full checkpoint or a PEFT LoRA adapter.

The ``state`` command group lives in ``policy_server/cli/state.py``; it hooks this in with
``add_export_parser(state_subparsers)``. ``python -m policy_server.cli.export ...`` runs the same
command standalone.
"""

from __future__ import annotations

import argparse
import json
import sys


def run_export(args) -> int:
    from policy_server.state.export import export_skill

    report = export_skill(args.state_dir, args.skill, args.base, args.out, format=args.format,
                          version=args.version, dense=args.dense, allow_pickle=args.allow_pickle,
                          allow_base_mismatch=args.allow_base_mismatch,
                          overwrite=args.overwrite, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    elif report["format"] == "full":
        print(f"exported skill {report['skill']!r} (version {report['version']}) as a full "
              f"checkpoint to {report['out']} ({report['wall_s']:.1f}s)")
    else:
        print(f"exported skill {report['skill']!r} (version {report['version']}) as a PEFT LoRA "
              f"adapter to {report['out']}: {report['lora_modules']} modules, r={report['r']}, "
              f"{report['dense']['tensors']} dense residual(s) as {report['dense']['mode']}; "
              f"base: {report['out']}/base_with_core ({report['wall_s']:.1f}s)")
    return 0


def add_export_parser(state_sub) -> argparse.ArgumentParser:
    """Add ``export`` to the ``carve state`` sub-parsers; returns the new parser."""
    p = state_sub.add_parser(
        "export", help="export one skill as a checkpoint or a PEFT adapter",
        description="Export a skill of a merge state: 'full' = base + core + residual as a "
                    "Hugging Face checkpoint; 'peft' = its low-rank residuals as a PEFT LoRA "
                    "adapter plus OUT/base_with_core (base + core).")
    p.add_argument("state_dir", metavar="STATE_DIR")
    p.add_argument("--skill", required=True, metavar="NAME")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--base", required=True, metavar="BASE_DIR",
                   help="the base checkpoint the state was built on (fingerprint-checked)")
    p.add_argument("--format", choices=("full", "peft"), default="full")
    p.add_argument("--version", default=None, help="state version (default: current)")
    p.add_argument("--dense", choices=("modules_to_save", "fold", "error"),
                   default="modules_to_save",
                   help="peft: what to do with dense residuals (biases, norms, dense-pattern "
                        "tensors): PEFT modules_to_save (default), fold into base_with_core "
                        "(making it skill-specific), or refuse")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle base checkpoint")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="export even when BASE_DIR's fingerprint is not the one the state records "
                        "(logs a warning); refused by default")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_export)
    return p


def main(argv=None) -> int:
    """Standalone entry: ``python -m policy_server.cli.export STATE_DIR --skill ...``."""
    from policy_server.errors import CarveError

    parser = argparse.ArgumentParser(prog="carve state")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except CarveError as e:
        print(f"carve: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
