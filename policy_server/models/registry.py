"""Backend registry: ``load_backend(dir)`` picks the ``PolicyBackend`` class from ``config.json``'s
``model_type`` (the Hugging Face convention), so the runtime and the service never name a backend."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from policy_server.errors import InputError
from policy_server.models.base import PolicyBackend

_BACKENDS: dict[str, type[PolicyBackend]] = {}


def register_backend(model_type: str, cls: type[PolicyBackend]) -> type[PolicyBackend]:
    """Map ``model_type`` to ``cls`` (a ``PolicyBackend`` subclass); re-registering the same class
    is a no-op, a different class for a taken name is an error."""
    if not (isinstance(cls, type) and issubclass(cls, PolicyBackend)):
        raise InputError(f"register_backend({model_type!r}): {cls!r} is not a PolicyBackend subclass")
    old = _BACKENDS.get(model_type)
    if old is not None and old is not cls:
        raise InputError(f"model_type {model_type!r} is already registered to {old.__name__}")
    _BACKENDS[model_type] = cls
    return cls


def registered_backends() -> dict[str, type[PolicyBackend]]:
    return dict(_BACKENDS)


def read_model_type(path: str | Path) -> str:
    """``model_type`` from ``path/config.json``; InputError when missing or malformed."""
    cfg = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise InputError(f"{path}: not a model directory")
    if not cfg.is_file():
        raise InputError(f"{path}: no config.json (expected a Hugging Face-layout model directory)")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg}: invalid JSON: {e}") from None
    mt = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(mt, str):
        raise InputError(f"{cfg}: no string 'model_type' field")
    return mt


def load_backend(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
                 ) -> PolicyBackend:
    """Load the model directory ``path`` with the backend registered for its ``model_type``."""
    mt = read_model_type(path)
    cls = _BACKENDS.get(mt)
    if cls is None:
        raise InputError(f"{Path(path) / 'config.json'}: unknown model_type {mt!r}; registered: "
                         f"{sorted(_BACKENDS)}")
    return cls.load(path, device=device, dtype=dtype)


def _register_builtins() -> None:
    from policy_server.models.demo_vla import MODEL_TYPE, DemoVLABackend

    register_backend(MODEL_TYPE, DemoVLABackend)


_register_builtins()
