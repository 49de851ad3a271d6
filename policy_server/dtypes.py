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

#: store-dtype spelling for "each tensor in its base parameter's own dtype" (the default of a new
#: state: a bf16 base gets a bf16 core and bf16 factors, its float32 norms stay float32)
PARAM_DTYPE = "param"
STORE_DTYPE_NAMES: tuple[str, ...] = (PARAM_DTYPE, *DTYPE_NAMES)


def check_store_dtype_spec(spec: str | torch.dtype | None, field: str = "store dtype"
                           ) -> str | None:
    """``"param"`` or a dtype's manifest name; None stays None (not given); InputError else."""
    if spec is None or spec == PARAM_DTYPE:
        return spec
    return dtype_name(parse_dtype(spec, field))


def storage_dtype(spec: str, param_dtype: torch.dtype | str) -> torch.dtype:
    """The dtype a tensor is stored in under store-dtype ``spec`` (``"param"`` or a name).

    ``param_dtype``: the base parameter's dtype (torch dtype or manifest name). Under ``"param"``
    a dtype outside :data:`DTYPES` (float64, float8 ...) falls back to float32, the dtype every
    method computes in, so nothing is stored coarser than it was computed for no saving.
    """
    if spec != PARAM_DTYPE:
        return parse_dtype(spec, "store dtype")
    name = dtype_name(param_dtype)
    return DTYPES.get(name, torch.float32)


def state_dtypes(manifest: dict) -> tuple[str, str]:
    """(residual store dtype spec, core dtype spec) of a merge state's manifest.

    States written before ``core_dtype`` existed stored the core in ``store_dtype`` (float32 by
    default then), so that is what an absent ``core_dtype`` means.
    """
    store = manifest.get("store_dtype", "float32")
    return store, manifest.get("core_dtype", store)


def manifest_tensor_dtype(manifest: dict, key: str, core: bool = False) -> torch.dtype:
    """The dtype tensor ``key`` of a state is stored in: its core (``core=True``) or its residual
    factors, resolved from the manifest's dtype specs and its base tensor table (a key missing
    from the table, or a state without one, resolves ``"param"`` to float32)."""
    spec = state_dtypes(manifest)[1 if core else 0]
    table = (manifest.get("base") or {}).get("tensors") or {}
    return storage_dtype(spec, (table.get(key) or {}).get("dtype", "float32"))
