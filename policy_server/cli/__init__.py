"""The ``carve`` command line. Each sub-command lives in its own module with ``register(sub)``.

Errors are one line on stderr (the traceback too with ``-v`` where a command has it). Exit codes:
0 ok, 1 unexpected failure, 2 bad input, 3 state problem, 4 integrity (checksum) error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from policy_server.errors import CarveError

# module name -> registers one or more sub-commands
_COMMAND_MODULES = ("admit", "merge", "state", "route", "serve", "convert", "demo", "train", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carve", description="Continual merging of VLA skill experts and a gRPC policy server.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"policy_server.cli.{name}").register(sub)
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
    verbose = bool(getattr(args, "verbose", False))
    try:
        rc = args.func(args)
    except CarveError as e:
        if verbose:
            traceback.print_exc()
        print(f"carve: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("carve: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line; the traceback only with -v
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (run with -v for the traceback)"
        print(f"carve: unexpected error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
