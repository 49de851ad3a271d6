"""The merge-state manifest: schema version, validation and storage accounting.

The manifest is the one JSON file that describes a version (docs/STATE_FORMAT.md). The admission
fills ``base``, ``method``, ``store_dtype`` and the skill records; the store fills ``version``,
``parent``, ``created``, ``files`` and ``storage``.
"""

from __future__ import annotations

from pathlib import Path

from policy_server.errors import IntegrityError

FORMAT_VERSION = 1


def new_manifest() -> dict:
    """The manifest of an empty state, before the first commit."""
    return {"format_version": FORMAT_VERSION, "skills": [], "store_dtype": "float32",
            "admissions": 0}


def check_manifest(m: dict, source: str) -> None:
    """Reject a manifest this code cannot read correctly (IntegrityError naming ``source``)."""
    if not isinstance(m, dict):
        raise IntegrityError(f"{source}: manifest is not a JSON object")
    fv = m.get("format_version")
    if not isinstance(fv, int):
        raise IntegrityError(f"{source}: manifest has no integer format_version")
    if fv > FORMAT_VERSION:
        raise IntegrityError(f"{source}: state format {fv} is newer than this carve-serve "
                             f"understands ({FORMAT_VERSION}); upgrade carve-serve")
    skills = m.get("skills", [])
    if not isinstance(skills, list) or not all(isinstance(s, dict) and "name" in s
                                               for s in skills):
        raise IntegrityError(f"{source}: manifest 'skills' must be a list of records with a name")
    names = [s["name"] for s in skills]
    if len(set(names)) != len(names):
        raise IntegrityError(f"{source}: duplicate skill names in manifest")
    for rel, meta in (m.get("files") or {}).items():
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise IntegrityError(f"{source}: file entry {rel!r} escapes the version directory")
        if not isinstance(meta, dict) or "sha256" not in meta or "bytes" not in meta:
            raise IntegrityError(f"{source}: file entry {rel!r} lacks sha256/bytes")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _base_tensor_bytes(base: dict) -> int:
    """Bytes of the base's tensor data from the manifest's tensor table (shape x dtype size)."""
    total = 0
    for rec in (base.get("tensors") or {}).values():
        total += _numel(rec.get("shape", [])) * _itemsize(rec.get("dtype", "float32"))
    return total


def _itemsize(name: str) -> int:
    import torch

    dt = getattr(torch, str(name).removeprefix("torch."), None)
    return torch.empty((), dtype=dt).element_size() if isinstance(dt, torch.dtype) else 4


def bytes_accounting(m: dict) -> dict:
    """The byte figures of a version (docs/STATE_FORMAT.md, ``storage``).

    version_bytes: every file of the version as stored (the manifest's ``files``; the manifest
    itself is not among them); base_bytes: the base's weight files on disk (its tensor data for
    states recorded before that was kept); bank_bytes: the sum over skills of each expert as a
    full model in its own dtypes (``source.bank_bytes``; the base's tensor bytes for skills
    recorded before that was kept); and the two fractions a user pays: the state alone and the
    state plus the base, over the bank.
    """
    base = m.get("base") or {}
    base_tensor = int(base.get("tensor_bytes") or _base_tensor_bytes(base))
    base_bytes = int(base.get("file_bytes") or base_tensor)
    bank = sum(int((s.get("source") or {}).get("bank_bytes") or base_tensor)
               for s in m.get("skills", []))
    version = sum(int(v["bytes"]) for v in (m.get("files") or {}).values())
    return {"version_bytes": version, "base_bytes": base_bytes, "bank_bytes": bank,
            "bytes_fraction_of_bank": (version / bank) if bank else None,
            "bytes_fraction_of_bank_with_base": ((version + base_bytes) / bank) if bank else None}


def storage_accounting(m: dict, root: Path) -> dict:
    """Stored parameters/bytes of the state and its fraction of a full expert bank.

    core_params: dense core entries; residual_params: every skill's stored parameters (masks count
    1/32 of a float parameter per coordinate); checkpoint_params: the base checkpoint's size P;
    bank_params = T * P for T skills (a bank keeps every expert whole).
    fraction_of_bank = stored_params / bank_params (the state alone);
    fraction_of_bank_with_base = (P + stored_params) / bank_params (what a server holds: the base
    plus the state, the number the CARVE paper reports). The byte figures beside them are
    :func:`bytes_accounting`'s.
    """
    from safetensors import safe_open

    core_params = 0
    core_path = root / "core.safetensors"
    if core_path.exists():
        with safe_open(str(core_path), "pt") as f:
            for k in f.keys():
                core_params += _numel(f.get_slice(k).get_shape())
    residual_params = sum(int(s.get("stored_params", 0)) for s in m.get("skills", []))
    files = m.get("files", {})
    stored_bytes = sum(v["bytes"] for k, v in files.items()
                       if k == "core.safetensors" or k.startswith("skills/"))
    artifact_bytes = sum(v["bytes"] for k, v in files.items() if k.startswith("artifacts/"))
    aux_bytes = sum(v["bytes"] for k, v in files.items() if k == "state_aux.safetensors")
    ckpt = int((m.get("base") or {}).get("num_params", 0))
    t = len(m.get("skills", []))
    bank = t * ckpt
    stored = core_params + residual_params
    by = bytes_accounting(m)
    return {**by,
        "core_params": core_params,
        "residual_params": residual_params,
        "stored_params": stored,
        "stored_bytes": stored_bytes,
        "aux_bytes": aux_bytes,
        "artifact_bytes": artifact_bytes,
        "checkpoint_params": ckpt,
        "skills": t,
        "bank_params": bank,
        "fraction_of_bank": (stored / bank) if bank else None,
        "fraction_of_bank_with_base": ((ckpt + stored) / bank) if bank else None,
    }
