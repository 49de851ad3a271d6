"""The one base-fingerprint rule: a merge state is only used with the base it was merged from.

Serve, route, export and admit all call :func:`check_base`; each refuses a mismatched (or an
unrecorded) base unless the user passes ``--allow-base-mismatch`` explicitly, in which case a
warning is logged and the caller goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from policy_server.errors import StateError

log = logging.getLogger("carve.base_check")


def recorded_fingerprint(manifest: dict) -> str | None:
    """The base fingerprint a state manifest recorded, or None."""
    return (manifest.get("base") or {}).get("fingerprint") or None


def check_base(manifest: dict, base_fingerprint: str, base_dir: str | Path, state_desc: str,
               allow_mismatch: bool = False) -> None:
    """Raise ``StateError`` unless ``base_fingerprint`` (of ``base_dir``) is the one ``manifest``
    recorded. ``state_desc`` names the state in the message (e.g. ``"state S version v000003"``).
    A manifest without a fingerprint is refused too: nothing proves the base is right."""
    want = recorded_fingerprint(manifest)
    if want == base_fingerprint:
        return
    if want is None:
        problem = (f"{state_desc} records no base fingerprint, so {Path(base_dir)} cannot be "
                   f"checked against it")
    else:
        problem = (f"base {Path(base_dir)} (fingerprint {base_fingerprint[:12]}) is not the base "
                   f"of {state_desc} (fingerprint {want[:12]})")
    if allow_mismatch:
        log.warning("%s; going on because --allow-base-mismatch was given", problem)
        return
    raise StateError(f"{problem}; pass --allow-base-mismatch to use it anyway")
