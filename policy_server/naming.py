"""The one skill-name rule: a skill name becomes a file name (``skills/<name>.safetensors``)."""

from __future__ import annotations

import re

from policy_server.errors import InputError

SKILL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_skill_name(name: str) -> str:
    """Return ``name`` when it is a valid skill name; InputError naming it otherwise."""
    if not isinstance(name, str) or not SKILL_NAME_RE.match(name):
        raise InputError(f"invalid skill name {name!r}: use 1-128 characters from [A-Za-z0-9_.-], "
                         f"starting with a letter or digit (it becomes a file name)")
    return name
