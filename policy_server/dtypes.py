"""The one table of floating dtypes carve-serve accepts by name (CLI flags, manifests, configs)."""

from __future__ import annotations

import torch

from policy_server.errors import InputError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"torch.bfloat16"`` -> ``"bfloat16"`` (the manifest spelling)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    """A dtype from its name; ``InputError`` naming ``field`` (e.g. ``--dtype``) otherwise."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = dtype_name(name) if name is not None else None
    if key not in DTYPES:
        raise InputError(f"{field} {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[key]
