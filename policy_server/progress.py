"""The one progress-bar helper of the long-running commands (admit, merge, export)."""

from __future__ import annotations

from collections.abc import Iterable


def progress(it: Iterable, enabled: bool, desc: str, total: int | None = None,
             unit: str = "tensor", leave: bool = True) -> Iterable:
    """``it`` wrapped in a tqdm bar on stderr when ``enabled``; ``it`` itself otherwise (tqdm is
    then not even imported). ``leave=False`` erases the bar when done (nested bars)."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True)
