"""Deprecated flag spellings that keep working for a while, with a one-line warning on stderr."""

from __future__ import annotations

import argparse
import sys


def deprecated_alias(new_flag: str):
    """An argparse action class for an old spelling of ``new_flag``: stores the value under the
    new flag's ``dest`` and prints ``carve: warning: OLD is deprecated; use NEW`` once per use."""

    class DeprecatedAlias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"carve: warning: {option_string} is deprecated; use {new_flag}",
                  file=sys.stderr)
            setattr(namespace, self.dest, values)

    return DeprecatedAlias
