"""Durable file writes and the on-disk encoding of residual entries.

Residual entries of one skill live in one safetensors file under keys ``<tensor>::P``,
``<tensor>::Q`` (LowRank), ``<tensor>::D`` (Dense) and ``<tensor>::mask`` (Masked, bit-packed
uint8, 1 bit per coordinate; the tensor's shape lives in the manifest record because packing loses
it). Everything is written aside, fsynced and renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from policy_server.errors import IntegrityError
from policy_server.merge.entries import Dense, LowRank, Masked, ResidualEntry

SEP = "::"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename (+ fsync of the directory)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_tensors_durable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors ``save_file`` with the same write-aside + fsync + rename discipline."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor (any shape) -> uint8 (ceil(numel/8),) little-bit-order packed."""
    arr = mask.detach().to(torch.bool).reshape(-1).cpu().numpy()
    return torch.from_numpy(np.packbits(arr, bitorder="little").copy())


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: uint8 (k,) -> bool tensor of ``shape``."""
    n = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.cpu().numpy().astype(np.uint8), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def encode_entries(entries: dict[str, ResidualEntry], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Residual entries -> flat safetensors dict (float tensors cast to the store dtype)."""
    out: dict[str, torch.Tensor] = {}
    for name, e in entries.items():
        if isinstance(e, LowRank):
            out[f"{name}{SEP}P"] = e.P.detach().to(dtype).cpu()
            out[f"{name}{SEP}Q"] = e.Q.detach().to(dtype).cpu()
        elif isinstance(e, Dense):
            out[f"{name}{SEP}D"] = e.D.detach().to(dtype).cpu()
        elif isinstance(e, Masked):
            out[f"{name}{SEP}mask"] = pack_mask(e.mask)
        else:
            raise TypeError(f"tensor {name!r}: not a residual entry: {type(e).__name__}")
    return out


def decode_entries(flat: dict[str, torch.Tensor], records: dict[str, dict], source: str
                   ) -> dict[str, ResidualEntry]:
    """Flat safetensors dict + manifest tensor records -> residual entries.

    ``records[tensor]`` carries ``kind``, ``shape`` and ``rel_error``; a key without a record or a
    record without its keys is an IntegrityError naming ``source``.
    """
    out: dict[str, ResidualEntry] = {}
    for name, rec in records.items():
        kind = rec.get("kind")
        try:
            if kind == "lowrank":
                out[name] = LowRank(flat[f"{name}{SEP}P"], flat[f"{name}{SEP}Q"],
                                    float(rec.get("rel_error", 0.0)))
            elif kind == "dense":
                out[name] = Dense(flat[f"{name}{SEP}D"])
            elif kind in ("mask", "masked"):
                out[name] = Masked(unpack_mask(flat[f"{name}{SEP}mask"], rec["shape"]))
            else:
                raise IntegrityError(f"{source}: tensor {name!r} has unknown entry kind {kind!r}")
        except KeyError as e:
            raise IntegrityError(f"{source}: tensor {name!r} ({kind}) is missing key {e}") from None
    return out


def entry_kind(e: ResidualEntry) -> str:
    return {LowRank: "lowrank", Dense: "dense", Masked: "masked"}[type(e)]


def entry_bytes(e: ResidualEntry, dtype: torch.dtype) -> int:
    """Bytes the entry takes on disk in ``dtype`` (masks: packed bits)."""
    item = torch.empty((), dtype=dtype).element_size()
    if isinstance(e, Masked):
        return (e.mask.numel() + 7) // 8
    return e.numel() * item


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a whole safetensors file (state files are small next to a checkpoint)."""
    if not path.exists():
        return {}
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise IntegrityError(f"cannot read {path}: {e}") from None
