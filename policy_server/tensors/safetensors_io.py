"""safetensors files read and written one tensor at a time.

Readers parse only the header up front (:func:`safetensors_index`) and read each tensor with a
plain ``preadv`` into an owned buffer (:func:`read_tensor_at`, :class:`LazyTensors`); the writer
(:func:`write_safetensors_streaming`) serialises straight from each tensor's storage. Both keep a
streaming merge's resident memory at the tensors it holds, where ``safetensors.torch`` would build
one in-memory buffer of the whole file (or keep mapped pages of it resident).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from policy_server.errors import InputError, IntegrityError
from policy_server.tensors.durable import aside_path, fsync_file, publish, test_pause

_MIB = 1 << 20
#: a safetensors header larger than this is treated as corrupt rather than read into memory
_MAX_HEADER_BYTES = 100 * _MIB

#: safetensors dtype code -> torch dtype (the format's whole table, as far as torch has it)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
#: the dtypes the streaming writer stores (the ones every safetensors reader understands)
_WRITE_CODES: dict[torch.dtype, str] = {ST_DTYPES[c]: c for c in (
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")}


def read_safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Parse a safetensors header without loading data: {key: (shape, dtype)}.

    Checks that every tensor's byte range lies inside the file, so a truncated download is caught
    here with the file's name instead of as a segfault-like error deep inside a merge.
    """
    return {k: (shape, dtype) for k, (shape, dtype, _, _) in safetensors_index(file).items()}


def _raw_header(file: Path) -> tuple[dict, int, int]:
    """(header JSON, header length n, file size); InputError naming ``file`` when unreadable."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise InputError(f"{file}: not a safetensors file (shorter than its 8-byte header)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"{file}: corrupt safetensors header (declared length {n}, "
                                 f"file size {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise InputError(f"{file}: cannot read ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise InputError(f"{file}: corrupt safetensors header (not a JSON object)")
    return header, n, size


def safetensors_index(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
    """{key: (shape, dtype, absolute byte offset, byte length)} of a safetensors file.

    Every entry is validated (known dtype, byte range inside the file); InputError names the file
    and the tensor otherwise.
    """
    header, n, size = _raw_header(file)
    data_len = size - 8 - n
    out: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_s, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{file}: corrupt safetensors header entry for tensor {key!r}") from e
        if dtype_s not in ST_DTYPES:
            raise InputError(f"{file}: tensor {key!r} has unsupported dtype {dtype_s}")
        if not (0 <= begin <= end <= data_len):
            raise InputError(f"{file}: tensor {key!r} lies outside the file (offsets {begin}..{end}, "
                             f"data section {data_len} bytes): truncated or corrupt file")
        out[key] = (tuple(int(s) for s in shape), ST_DTYPES[dtype_s], 8 + n + begin, end - begin)
    return out


def read_tensor_at(fd: int, offset: int, nbytes: int, shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    """Read one tensor's bytes with ``os.preadv`` into a fresh buffer (thread-safe, no mmap).

    Reading instead of memory-mapping keeps a streaming merge's resident memory at the tensors it
    holds: mapped pages of a multi-GB checkpoint would otherwise stay resident (and count in RSS)
    long after each tensor was copied out.
    """
    buf = bytearray(nbytes)
    got = os.preadv(fd, [buf], offset) if nbytes else 0
    if got != nbytes:
        raise InputError(f"short read: {got} of {nbytes} bytes at offset {offset}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _header_bytes(specs: list[tuple[str, torch.dtype, list[int], int]]) -> bytes:
    """The 8-byte length + JSON header (padded to 8 bytes) for ``(name, dtype, shape, nbytes)``
    entries laid out back to back in the given order."""
    header: dict = {}
    offset = 0
    for name, dtype, shape, nbytes in specs:
        if dtype not in _WRITE_CODES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _WRITE_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_data(f, t: torch.Tensor) -> None:
    if t.numel():
        flat = t.detach().cpu().contiguous().reshape(-1)
        f.write(memoryview(flat.view(torch.uint8).numpy()))


def write_safetensors_streaming(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` serialises every tensor into one in-memory buffer first, which
    doubled the admission's peak memory for a 2 GB core; this writes the same format (8-byte
    little-endian header length, JSON header padded to 8 bytes, raw little-endian data in header
    order) straight from each tensor's storage. Tensors of unsupported dtype raise TypeError.
    """
    items = sorted(tensors.items())  # safetensors' own order: readers do not depend on it
    specs = [(n, t.dtype, list(t.shape), t.numel() * t.element_size()) for n, t in items]
    with open(path, "wb") as f:
        f.write(_header_bytes(specs))
        for _name, t in items:
            _write_data(f, t)
        f.flush()


class SpooledTensorWriter:
    """A safetensors file built from tensors handed over one at a time, none kept in memory.

    ``add`` appends each tensor's bytes to a spool file beside ``path``; ``finish`` writes the
    header (known only then) and copies the spool after it in bounded chunks, then publishes the
    file durably (aside, fsync, rename, fsync the directory). It costs one extra sequential write
    of the data and saves holding a whole core (a model's worth of deltas) in RAM until commit.
    """

    CHUNK = 64 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        self.spool = self.path.with_name(f".{self.path.name}.spool-{os.getpid()}")
        self._f = open(self.spool, "wb")
        self._specs: list[tuple[str, torch.dtype, list[int], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (names must be unique; order is kept)."""
        if tensor.dtype not in _WRITE_CODES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in "
                            f"safetensors")
        if any(n == name for n, *_ in self._specs):
            raise ValueError(f"tensor {name!r} added twice")
        self._specs.append((name, tensor.dtype, list(tensor.shape),
                            tensor.numel() * tensor.element_size()))
        _write_data(self._f, tensor)

    def finish(self) -> None:
        """Write and durably publish ``path``; the spool is removed."""
        self._f.close()
        tmp = aside_path(self.path)
        with open(tmp, "wb") as out, open(self.spool, "rb") as src:
            out.write(_header_bytes(self._specs))
            while chunk := src.read(self.CHUNK):
                out.write(chunk)
            out.flush()
        self.spool.unlink()
        test_pause("file-aside")
        fsync_file(tmp)
        publish(tmp, self.path)

    def abort(self) -> None:
        """Drop the spool (nothing is published)."""
        self._f.close()
        self.spool.unlink(missing_ok=True)


def save_tensors_durable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file aside, fsync it, rename it into place and fsync the directory."""
    tmp = aside_path(path)
    write_safetensors_streaming(tensors, tmp)
    test_pause("file-aside")
    fsync_file(tmp)
    publish(tmp, path)


class LazyTensors:
    """Read-on-demand view of a safetensors file: ``pop(key)`` / ``get(key)`` load one tensor, so
    a caller walking a 2 GB core tensor by tensor never holds it all (the admission stream).
    A missing file reads as empty."""

    def __init__(self, path: Path):
        self.path = path
        self._index = safetensors_index(path) if path.exists() else {}
        self._fd = os.open(path, os.O_RDONLY) if path.exists() else None
        self._keys = set(self._index)

    def _read(self, key: str) -> torch.Tensor:
        # plain reads, not a memory map: pages of an old multi-GB core must not stay resident
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
