"""Durable file writes and the on-disk encoding of residual entries.

Residual entries of one skill live in one safetensors file under keys ``<tensor>::P``,
``<tensor>::Q`` (LowRank), ``<tensor>::D`` (Dense) and ``<tensor>::mask`` (Masked, bit-packed
uint8, 1 bit per coordinate; the tensor's shape lives in the manifest record because packing loses
it). Everything is written aside, fsynced and renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from policy_server.errors import IntegrityError
from policy_server.merge.entries import Dense, LowRank, Masked, ResidualEntry

SEP = "::"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_PAUSE_HITS: dict[str, int] = {}


def test_pause(stage: str) -> None:
    """Crash-safety test hook: park the process at a named stage so a SIGKILL lands there.

    Inert unless ``CARVE_TEST_PAUSE_AT=<stage>``. ``CARVE_TEST_PAUSE_SKIP=k`` lets the first ``k``
    hits of the stage pass (e.g. pause while writing the third file); ``CARVE_TEST_PAUSE_MARKER``
    names a file written (aside + rename, so a watcher never reads it half-written) when the pause
    starts; ``CARVE_TEST_PAUSE_SECONDS`` (default 60) bounds the sleep. Stages: ``file-aside``
    (a tensor file written to its temp name, not yet renamed), ``files-written`` (all data files
    staged, manifest not yet written), ``manifest-written`` (staging complete, not yet renamed to
    versions/<id>), ``before-current`` (version directory final, CURRENT not yet switched).
    """
    if os.environ.get("CARVE_TEST_PAUSE_AT") != stage:
        return
    hits = _PAUSE_HITS.get(stage, 0)
    _PAUSE_HITS[stage] = hits + 1
    if hits < int(os.environ.get("CARVE_TEST_PAUSE_SKIP", "0")):
        return
    marker = os.environ.get("CARVE_TEST_PAUSE_MARKER")
    if marker:
        tmp = Path(f"{marker}.tmp")
        tmp.write_text(stage)
        os.replace(tmp, marker)
    time.sleep(float(os.environ.get("CARVE_TEST_PAUSE_SECONDS", "60")))


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


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors_streaming(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` serialises every tensor into one in-memory buffer first, which
    doubled the admission's peak memory for a 2 GB core; this writes the same format (8-byte
    little-endian header length, JSON header padded to 8 bytes, raw little-endian data in header
    order) straight from each tensor's storage. Tensors of unsupported dtype raise TypeError.
    """
    header: dict = {}
    offset = 0
    items = sorted(tensors.items())  # safetensors' own order: readers do not depend on it
    for name, t in items:
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _name, t in items:
            if t.numel():
                flat = t.detach().cpu().contiguous().reshape(-1)
                f.write(memoryview(flat.view(torch.uint8).numpy()))
        f.flush()


def save_tensors_durable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file aside, fsync it, rename it into place and fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_safetensors_streaming(tensors, tmp)
    test_pause("file-aside")
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
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        # numpy would silently zero-pad a short buffer: that must read as damage, not as "False"
        raise IntegrityError(f"packed mask holds {packed.numel()} {packed.dtype} values, expected "
                             f"{(n + 7) // 8} uint8 for shape {list(shape)}")
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
        shape = [int(x) for x in rec.get("shape") or []]
        try:
            if kind == "lowrank":
                P, Q = flat[f"{name}{SEP}P"], flat[f"{name}{SEP}Q"]
                ok = (P.ndim == 2 and Q.ndim == 2 and P.shape[1] == Q.shape[0]
                      and (not shape or [P.shape[0], Q.shape[1]] == shape))
                if not ok:
                    raise IntegrityError(f"{source}: tensor {name!r}: P {list(P.shape)} @ Q "
                                         f"{list(Q.shape)} does not give shape {shape}")
                out[name] = LowRank(P, Q, float(rec.get("rel_error", 0.0)))
            elif kind == "dense":
                D = flat[f"{name}{SEP}D"]
                if shape and list(D.shape) != shape:
                    raise IntegrityError(f"{source}: tensor {name!r}: D has shape {list(D.shape)}, "
                                         f"manifest says {shape}")
                out[name] = Dense(D)
            elif kind in ("mask", "masked"):
                if "shape" not in rec:
                    raise IntegrityError(f"{source}: masked tensor {name!r} has no shape record")
                try:
                    out[name] = Masked(unpack_mask(flat[f"{name}{SEP}mask"], shape))
                except IntegrityError as e:
                    raise IntegrityError(f"{source}: tensor {name!r}: {e}") from None
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


class LazyTensors:
    """Read-on-demand view of a safetensors file: ``pop(key)`` / ``get(key)`` load one tensor, so
    a caller walking a 2 GB core tensor by tensor never holds it all (the admission engine)."""

    def __init__(self, path: Path):
        from policy_server.merge.checkpoint import safetensors_index

        self.path = path
        self._index = safetensors_index(path) if path.exists() else {}
        self._fd = os.open(path, os.O_RDONLY) if path.exists() else None
        self._keys = set(self._index)

    def _read(self, key: str) -> torch.Tensor:
        # plain reads, not a memory map: pages of an old multi-GB core must not stay resident
        from policy_server.merge.checkpoint import read_tensor_at

        shape, dtype, offset, nbytes = self._index[key]
        return read_tensor_at(self._fd, offset, nbytes, shape, dtype)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def keys(self):
        return set(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key, default=None):
        return self._read(key) if key in self._keys else default

    def pop(self, key, default=None):
        if key not in self._keys:
            return default
        self._keys.discard(key)
        return self._read(key)

    def items(self):
        for k in sorted(self._keys):
            yield k, self._read(k)


def load_tensors(path: Path, required: bool = False) -> dict[str, torch.Tensor]:
    """Load a whole safetensors file (state files are small next to a checkpoint).

    A file that does not exist reads as ``{}`` unless ``required`` (the manifest lists it), in
    which case that is an IntegrityError: a deleted residual file must never read as "no residual".
    """
    if not path.exists():
        if required:
            raise IntegrityError(f"{path}: listed in the manifest but missing")
        return {}
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise IntegrityError(f"cannot read {path}: {e}") from None
