"""Backend registry: ``load_backend(dir)`` picks the ``PolicyBackend`` class from ``config.json``'s
``model_type`` (the Hugging Face convention), so the runtime and the service never name a backend.

Directories of other ecosystems (a LeRobot policy's ``config.json`` has ``"type"``, no
``model_type``) are recognised by *detectors*: ``register_detector(fn)`` with
``fn(path, config_dict) -> PolicyBackend subclass | None``, asked in registration order when no
``model_type`` matches. A detector must be cheap and must not import heavy packages unless the
directory is its own (the LeRobot one imports LeRobot only inside ``load``)."""

from __future__ import annotations

from pathlib import Path

import torch

from policy_server.errors import InputError
from policy_server.models.base import PolicyBackend
from policy_server.models.config_json import read_config_json

_BACKENDS: dict[str, type[PolicyBackend]] = {}
_DETECTORS: list = []


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


def register_detector(fn) -> None:
    """Add ``fn(path: Path, config: dict) -> type[PolicyBackend] | None`` (idempotent)."""
    if fn not in _DETECTORS:
        _DETECTORS.append(fn)


def detect_backend(path: str | Path) -> type[PolicyBackend]:
    """The backend class for the model directory ``path``: by ``model_type``, else the first
    detector that claims it; InputError naming what is registered otherwise."""
    path = Path(path)
    data = read_config_json(path)
    mt = data.get("model_type")
    if isinstance(mt, str) and mt in _BACKENDS:
        return _BACKENDS[mt]
    for fn in _DETECTORS:
        cls = fn(path, data)
        if cls is not None:
            return cls
    if not isinstance(mt, str):
        raise InputError(f"{path / 'config.json'}: no string 'model_type' field, and no "
                         "registered detector recognises it (e.g. a LeRobot policy needs "
                         "'type', 'input_features' and 'output_features')")
    raise InputError(f"{path / 'config.json'}: unknown model_type {mt!r}; registered: "
                     f"{sorted(_BACKENDS)}")


def backend_admission_hooks(base_dir: str | Path, expert_dir: str | Path) -> list:
    """The admission hooks the base's backend asks for (``PolicyBackend.admission_hooks``); none
    when ``base_dir`` is not a recognised model directory (e.g. a bare checkpoint), since
    admission itself works on tensors alone."""
    try:
        cls = detect_backend(base_dir)
    except InputError:
        return []
    return list(cls.admission_hooks(base_dir, expert_dir))


def read_model_type(path: str | Path) -> str:
    """``model_type`` from ``path/config.json``; InputError when missing or malformed."""
    data = read_config_json(Path(path))
    mt = data.get("model_type")
    if not isinstance(mt, str):
        raise InputError(f"{Path(path) / 'config.json'}: no string 'model_type' field")
    return mt


def load_backend(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **options) -> PolicyBackend:
    """Load the model directory ``path`` with the backend :func:`detect_backend` picks;
    ``options`` are backend-specific load options (e.g. LeRobot's ``vlm_dir``), passed only
    when given."""
    cls = detect_backend(path)
    return cls.load(path, device=device, dtype=dtype, **options)


def _register_builtins() -> None:
    from policy_server.models.demo_vla import MODEL_TYPE, DemoVLABackend

    register_backend(MODEL_TYPE, DemoVLABackend)
    # detectors import nothing heavy; the LeRobot one imports LeRobot only for a LeRobot dir
    from policy_server.models.lerobot import detect as detect_lerobot

    register_detector(detect_lerobot)
    # OpenVLA / Prismatic (model_type "openvla" | "prismatic"); timm is imported only on load
    from policy_server.models.openvla import detect as detect_openvla

    register_detector(detect_openvla)


_register_builtins()
