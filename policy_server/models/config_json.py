"""The one reader of a model directory's ``config.json`` (every backend and the registry use it),
so a missing, malformed or non-object config gets the same clear error everywhere."""

from __future__ import annotations

import json
from pathlib import Path

from policy_server.errors import InputError


def read_config_json(path: str | Path, expected: str = "a Hugging Face-layout model directory"
                     ) -> dict:
    """``path/config.json`` as a dict. ``InputError`` when ``path`` is not a directory, has no
    config.json (the message says ``expected``), or the file is not a JSON object."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a model directory")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise InputError(f"{path}: no config.json (expected {expected})")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{cfg}: expected a JSON object")
    return data
