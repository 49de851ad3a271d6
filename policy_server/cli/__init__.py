"""The ``carve`` command line. Each sub-command lives in its own module with ``register(sub)``.

Exit codes: 0 ok, 1 unexpected failure, 2 bad input, 3 state problem, 4 integrity (checksum) error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from policy_server.errors import CarveError

# module name -> registers one or more sub-commands
_COMMAND_MODULES = ("admit", "merge", "state", "route", "serve", "demo", "train", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carve", description="Continual merging of VLA skill experts and a gRPC policy server.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"policy_server.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"policy_server.cli.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def _version() -> str:
    from policy_server import __version__

    return f"carve-serve {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except CarveError as e:
        print(f"carve: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("carve: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
