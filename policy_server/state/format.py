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


def storage_accounting(m: dict, root: Path) -> dict:
    """Stored parameters/bytes of the state and its fraction of a full expert bank.

    core_params: dense core entries; residual_params: every skill's stored parameters (masks count
    1/32 of a float parameter per coordinate); checkpoint_params: the base checkpoint's size P;
    bank_params = T * P for T skills (a bank keeps every expert whole).
    fraction_of_bank = stored_params / bank_params (the state alone);
    fraction_of_bank_with_base = (P + stored_params) / bank_params (what a server holds: the base
    plus the state, the number the CARVE paper reports).
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
    return {
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
