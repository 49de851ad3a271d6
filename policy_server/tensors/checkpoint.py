"""Reading and writing model checkpoints in the Hugging Face layout, one tensor at a time.

A checkpoint is a directory holding ``model.safetensors`` or ``model.safetensors.index.json`` plus
its shards (a direct path to one ``.safetensors`` file is accepted too). Only the safetensors
headers are parsed up front; :meth:`CheckpointReader.get` reads a single tensor into an owned
buffer, so merging a 7B model never holds more than a few tensors in RAM.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``, ``*.pth``) can execute code when loaded, so
they are refused unless the caller opts in with ``allow_pickle=True`` (CLI ``--allow-pickle``); even
then they go through ``torch.load(weights_only=True, mmap=True)``, which only rebuilds tensors and
plain containers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from policy_server.errors import InputError
from policy_server.tensors.durable import fsync_dir, fsync_file
from policy_server.tensors.safetensors_io import (
    read_safetensors_header,
    read_tensor_at,
    safetensors_index,
)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
#: file names/suffixes that are weights (never copied from a template directory)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_MIB = 1 << 20


def file_digest(file: Path, h) -> None:
    """Feed size + first and last MiB of ``file`` into hash ``h`` (cheap identity check)."""
    size = file.stat().st_size
    h.update(f"{file.name}:{size}\n".encode())
    with open(file, "rb") as f:
        h.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            h.update(f.read(_MIB))


class CheckpointReader:
    """Lazy, read-only view of one checkpoint.

    ``path``: the directory (or file) it was opened from. Tensor metadata comes from the headers;
    tensor data is read on :meth:`get` only.
    """

    def __init__(self, path: Path, files: list[Path], key_file: dict[str, Path],
                 meta: dict[str, tuple[tuple[int, ...], torch.dtype]], pickled: bool = False):
        self.path = path
        self.files = files
        self._key_file = key_file
        self._meta = meta
        self._pickled = pickled
        self._handles: dict[Path, object] = {}
        self._pickle_sd: dict[Path, dict[str, torch.Tensor]] = {}
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._meta)} tensors)"

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def keys(self) -> list[str]:
        """All tensor keys, sorted."""
        return sorted(self._meta)

    def _check(self, key: str) -> None:
        if key not in self._meta:
            raise InputError(f"{self.path}: no tensor {key!r} in this checkpoint")

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key`` (from the header, no data read)."""
        self._check(key)
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        """Storage dtype of tensor ``key`` (from the header)."""
        self._check(key)
        return self._meta[key][1]

    def file_of(self, key: str) -> Path:
        """The file holding tensor ``key``."""
        self._check(key)
        return self._key_file[key]

    def _handle(self, file: Path):
        """(fd, header index) of a safetensors file, opened once and kept until close()."""
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = (os.open(file, os.O_RDONLY), safetensors_index(file))
        return handle

    def get(self, key: str) -> torch.Tensor:
        """Load tensor ``key`` in its storage dtype and shape: an owned CPU copy, safe to modify."""
        self._check(key)
        file = self._key_file[key]
        if self._pickled:
            sd = self._pickle_sd.get(file)
            if sd is None:
                sd = self._pickle_sd[file] = _load_pickle(file)
            return sd[key].clone()
        try:
            fd, index = self._handle(file)
            shape, dtype, offset, nbytes = index[key]
            # an owned buffer per call: callers fold weights in place (the runtime adds the core to
            # base tensors), and nothing stays mapped once the caller drops the tensor
            return read_tensor_at(fd, offset, nbytes, shape, dtype)
        except InputError as e:
            raise InputError(f"{file}: cannot read tensor {key!r}: {e}") from e
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{file}: cannot read tensor {key!r}: {e}") from e

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``key`` (dim 0), storage dtype, an owned CPU copy;
        only those bytes are read, so a huge tensor can be walked block by block."""
        shape = self.shape(key)
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise InputError(f"{self.path}: rows [{start}, {stop}) out of range for tensor "
                             f"{key!r} of shape {list(shape)}")
        if self._pickled:
            return self.get(key)[start:stop].clone()
        file = self._key_file[key]
        try:
            fd, index = self._handle(file)
            _shape, dtype, offset, _nbytes = index[key]
            row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
            return read_tensor_at(fd, offset + start * row, (stop - start) * row,
                                  (stop - start, *shape[1:]), dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{file}: cannot read rows of tensor {key!r}: {e}") from e

    def num_params(self) -> int:
        """Total number of scalars over all tensors."""
        n = 0
        for shape, _ in self._meta.values():
            k = 1
            for s in shape:
                k *= s
            n += k
        return n

    def tensor_bytes(self, keys=None) -> int:
        """Bytes of the tensors' data in their storage dtypes (headers excluded); ``keys``: only
        those (default all)."""
        total = 0
        for key in (self._meta if keys is None else keys):
            shape, dtype = self._meta[key]
            total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return total

    def file_bytes(self) -> int:
        """Bytes of the weight files on disk (what ``du`` of the weights would give)."""
        return sum(f.stat().st_size for f in self.files)

    def fingerprint(self) -> str:
        """sha256 hex over the sorted (key, shape, dtype) list, each file's size and its first and
        last MiB: cheap on a 15 GB checkpoint, yet a different base or a re-saved file changes it."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key in sorted(self._meta):
                shape, dtype = self._meta[key]
                h.update(f"{key}|{list(shape)}|{str(dtype).removeprefix('torch.')}\n".encode())
            for file in sorted(self.files, key=lambda p: p.name):
                file_digest(file, h)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def close(self) -> None:
        """Close open file handles (reopened lazily on the next get)."""
        for fd, _index in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._pickle_sd.clear()

    def __del__(self):
        for fd, _index in getattr(self, "_handles", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """Load an opted-in pickle checkpoint as a flat {key: tensor} dict (weights_only, mmap)."""
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        try:  # old (non-zip) torch.save format cannot be memory-mapped
            obj = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e2:
            raise InputError(f"{file}: cannot load with torch.load(weights_only=True): {e2}") from e
    # Lightning / training scripts wrap the weights; unwrap the common containers.
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and not any(
                isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{file}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{file}: entries that are not tensors: {bad[:5]}")
    return obj


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        data = json.loads(index_file.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index_file}: malformed index (need a 'weight_map' object): {e}") from e
    return weight_map


def _open_sharded(directory: Path, index_file: Path, pickled: bool) -> CheckpointReader:
    weight_map = _read_index(index_file)
    if not weight_map:
        raise InputError(f"{index_file}: empty weight_map")
    shards = sorted(set(weight_map.values()))
    files = []
    for shard in shards:
        f = directory / shard
        if not f.is_file():
            example = next(k for k, v in weight_map.items() if v == shard)
            raise InputError(f"{index_file}: references missing shard {shard!r} "
                             f"(e.g. for tensor {example!r})")
        files.append(f)
    meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    key_file: dict[str, Path] = {}
    for f in files:
        if pickled:
            sd = _load_pickle(f)
            header = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
        else:
            header = read_safetensors_header(f)
        for k, m in header.items():
            if weight_map.get(k) == f.name:
                meta[k], key_file[k] = m, f
    missing = [k for k, v in weight_map.items() if k not in meta]
    if missing:
        raise InputError(f"{index_file}: tensor(s) {missing[:5]} listed in the index are not in "
                         f"their shard ({weight_map[missing[0]]})")
    return CheckpointReader(directory, files, key_file, meta, pickled=pickled)


def _open_file(file: Path, pickled: bool) -> CheckpointReader:
    if pickled:
        sd = _load_pickle(file)
        meta = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
        reader = CheckpointReader(file, [file], {k: file for k in meta}, meta, pickled=True)
        reader._pickle_sd[file] = sd
        return reader
    meta = read_safetensors_header(file)
    if not meta:
        raise InputError(f"{file}: holds no tensors")
    return CheckpointReader(file, [file], {k: file for k in meta}, meta)


def _refuse_pickle(file: Path) -> InputError:
    return InputError(
        f"{file}: is a pickle checkpoint, which can run arbitrary code when loaded; refusing. "
        f"Convert it to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) to load it "
        f"with torch.load(weights_only=True)")


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> CheckpointReader:
    """Open a checkpoint directory (or one ``.safetensors``/pickle file) for lazy reading.

    Looks for, in order: ``model.safetensors.index.json`` + shards, ``model.safetensors``, a single
    other ``*.safetensors`` file, then (only with ``allow_pickle``) ``pytorch_model.bin.index.json``,
    ``pytorch_model.bin`` or a single ``*.pt``/``*.pth``/``*.bin``. Raises :class:`InputError`
    naming the path for a missing directory, no weights file, a missing shard or a corrupt header.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"checkpoint {p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".safetensors":
            return _open_file(p, pickled=False)
        if p.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _refuse_pickle(p)
            return _open_file(p, pickled=True)
        if p.name.endswith(".index.json"):
            return _open_sharded(p.parent, p, pickled=p.name.startswith("pytorch_model"))
        raise InputError(f"checkpoint {p}: not a .safetensors file or a checkpoint directory")
    if (p / SAFE_INDEX).is_file():
        return _open_sharded(p, p / SAFE_INDEX, pickled=False)
    if (p / SAFE_SINGLE).is_file():
        return _open_file(p / SAFE_SINGLE, pickled=False)
    others = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if len(others) == 1 and others[0].name != "adapter_model.safetensors":
        return _open_file(others[0], pickled=False)
    pickles = [p / PICKLE_INDEX] if (p / PICKLE_INDEX).is_file() else []
    pickles += [p / PICKLE_SINGLE] if (p / PICKLE_SINGLE).is_file() else []
    if not pickles:
        pickles = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise _refuse_pickle(pickles[0])
        if pickles[0].name == PICKLE_INDEX:
            return _open_sharded(p, pickles[0], pickled=True)
        if len(pickles) > 1:
            raise InputError(f"checkpoint {p}: several pickle files {[f.name for f in pickles]}; "
                             f"pass the one to use")
        return _open_file(pickles[0], pickled=True)
    if len(others) > 1:
        raise InputError(f"checkpoint {p}: several .safetensors files {[f.name for f in others]} "
                         f"but no {SAFE_INDEX}")
    if (p / "adapter_config.json").is_file():
        raise InputError(f"checkpoint {p}: is a PEFT adapter directory, not a full checkpoint")
    raise InputError(f"checkpoint {p}: no weights file ({SAFE_SINGLE}, {SAFE_INDEX}, or "
                     f"{PICKLE_SINGLE} with --allow-pickle)")


# --------------------------------------------------------------------------------------- writing
def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name in (SAFE_INDEX, PICKLE_INDEX)


def _owns_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is its storage's only view from offset 0 (safe to save without a copy)."""
    return (t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


class CheckpointWriter:
    """Stream tensors into a new Hugging Face-layout checkpoint directory, atomically.

    Tensors are buffered until a shard reaches ``max_shard_bytes`` and then written, so memory
    stays at one shard. Everything goes to a temporary sibling directory; :meth:`close` (or leaving
    the ``with`` block without an exception) renames it to ``out_dir``, so readers never see a
    half-written checkpoint. One shard is written as ``model.safetensors``; more as
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``. Non-weight files
    (``config.json``, tokenizer, generation config...) are copied from ``template_dir`` if given.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 10**9,
                 template_dir: str | os.PathLike | None = None, overwrite: bool = False,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise InputError(f"output {self.out_dir} already exists (pass overwrite=True)")
        if max_shard_bytes <= 0:
            raise InputError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.max_shard_bytes = int(max_shard_bytes)
        self.template_dir = Path(template_dir) if template_dir is not None else None
        if self.template_dir is not None and not self.template_dir.is_dir():
            raise InputError(f"template directory {self.template_dir} does not exist")
        self.overwrite = overwrite
        self.metadata = {"format": "pt", **(metadata or {})}
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self._total = 0
        self._done = False

    def add(self, key: str, tensor: torch.Tensor, owned: bool = False) -> None:
        """Queue one tensor (any dtype, copied to a contiguous CPU tensor). ``owned``: the
        caller hands the tensor over (it never touches it again), so a contiguous CPU tensor
        that owns its whole storage is queued without a copy (a merge of a 0.27 GB embedding
        then does not hold it twice)."""
        if self._done:
            raise RuntimeError("CheckpointWriter already closed")
        if key in self._seen:
            raise InputError(f"tensor {key!r} written twice to {self.out_dir}")
        self._seen.add(key)
        # safetensors refuses views sharing storage; a contiguous clone is the safe form
        t = tensor.detach().to("cpu").contiguous()
        if not (owned and _owns_storage(t)):
            t = t.clone()
        nbytes = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buf[key] = t
        self._buf_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        f = self._tmp / f"shard-{len(self._shards):05d}.safetensors.part"
        save_file(self._buf, str(f), metadata=self.metadata)
        self._shards.append((f, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> Path:
        """Write the last shard, the index and the template files, then publish ``out_dir``."""
        if self._done:
            return self.out_dir
        try:
            self._flush()
            if not self._shards:
                raise InputError(f"no tensors written to {self.out_dir}")
            n = len(self._shards)
            if n == 1:
                os.replace(self._shards[0][0], self._tmp / SAFE_SINGLE)
            else:
                weight_map = {}
                for i, (f, keys) in enumerate(self._shards, 1):
                    name = f"model-{i:05d}-of-{n:05d}.safetensors"
                    os.replace(f, self._tmp / name)
                    weight_map.update({k: name for k in keys})
                index = {"metadata": {"total_size": self._total},
                         "weight_map": dict(sorted(weight_map.items()))}
                (self._tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            if self.template_dir is not None:
                for f in sorted(self.template_dir.iterdir()):
                    if f.is_file() and not f.name.startswith(".") and not _is_weight_file(f.name):
                        shutil.copy2(f, self._tmp / f.name)
            for f in self._tmp.iterdir():
                fsync_file(f)
            old = None
            if self.out_dir.exists():
                old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
                os.rename(self.out_dir, old)
            os.rename(self._tmp, self.out_dir)
            fsync_dir(self.out_dir.parent)  # make the rename itself durable
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written so far."""
        self._done = True
        self._buf = {}
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                    out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 10**9,
                    template_dir: str | os.PathLike | None = None, overwrite: bool = False,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write ``(key, tensor)`` pairs (or a dict) as a HF-layout checkpoint; returns ``out_dir``.

    Tensors keep their dtype. See :class:`CheckpointWriter` for sharding and atomicity.
    """
    items: Iterator = iter(tensors.items()) if isinstance(tensors, dict) else iter(tensors)
    with CheckpointWriter(out_dir, max_shard_bytes, template_dir, overwrite, metadata) as w:
        for key, t in items:
            w.add(key, t)
    return Path(out_dir)
