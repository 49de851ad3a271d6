"""The OpenVLA / Prismatic family, implemented natively (timm ViTs + transformers Llama), loading
the published checkpoint layout unchanged and never running a checkpoint's Python.

Importing this package needs neither timm nor transformers; ``OpenVLABackend.load`` imports them
and raises ``InputError`` with the install hint when timm is missing.
"""

from policy_server.models.openvla.config import MODEL_TYPES, OpenVLAConfig, parse_config, read_config


def backend_class():
    """The ``OpenVLABackend`` class (imported on demand: it pulls in torch-side helpers only)."""
    from policy_server.models.openvla.backend import OpenVLABackend

    return OpenVLABackend


def detect(path, config: dict):
    """Registry detector: ``OpenVLABackend`` for a config.json with model_type openvla/prismatic
    (cheap: reads nothing else and imports neither timm nor transformers)."""
    return backend_class() if config.get("model_type") in MODEL_TYPES else None


__all__ = ["detect", "MODEL_TYPES", "OpenVLAConfig", "parse_config", "read_config", "backend_class"]
