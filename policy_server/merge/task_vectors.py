"""Task vectors ``tau = expert - base``, streamed one tensor at a time in float32.

An expert is either a full checkpoint (same keys, shapes and dtypes as the base) or a PEFT LoRA
adapter directory. :func:`open_expert` validates everything it can from headers alone *before* any
merge writes a byte, so a wrong base or a truncated expert fails in seconds with the tensor named,
not an hour into a 7B merge.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from policy_server.errors import InputError
from policy_server.merge.lora_adapter import LoraAdapter, is_lora_adapter_dir, open_lora_adapter
from policy_server.progress import progress as progress_bar
from policy_server.tensors.checkpoint import CheckpointReader, open_checkpoint

_MAX_LISTED = 5


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(repr(k) for k in keys[:_MAX_LISTED]) + more


def check_finite(tau: torch.Tensor, path: Path, key: str) -> torch.Tensor:
    """``tau`` itself; InputError naming the expert and tensor if it holds a NaN or inf."""
    # One NaN/inf in an expert would be averaged into the shared core and poison every skill.
    if not bool(torch.isfinite(tau).all()):
        bad = int((~torch.isfinite(tau)).sum())
        raise InputError(f"expert {path}: task vector of {key!r} has {bad} non-finite value(s)")
    return tau


class ExpertSource:
    """One fine-tuned expert seen as task vectors against ``base``.

    ``kind``: "full" | "lora"; ``path``: where it was opened from. :meth:`task_vector` returns a
    float32 tensor of the base tensor's shape, or None when the expert leaves the tensor untouched
    (LoRA modules it does not target; integer buffers of a full checkpoint).
    """

    kind: str = ""

    def __init__(self, path: Path, base: CheckpointReader):
        self.path = path
        self.base = base

    def keys(self) -> list[str]:
        """Base keys this expert may change (sorted)."""
        raise NotImplementedError

    def task_vector(self, key: str) -> torch.Tensor | None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def supports_rows(self, key: str) -> bool:
        """True when :meth:`task_vector_rows` can read ``key`` a row block at a time."""
        return False

    def task_vector_rows(self, key: str, start: int, stop: int,
                         base_rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 rows ``[start, stop)`` of ``key``'s task vector (only when
        :meth:`supports_rows`): what lets a huge tensor be admitted without a full copy. The
        caller checks them for non-finite values (once, not on every re-read). ``base_rows``:
        the base's rows ``[start, stop)`` when the caller already read them (a one-shot merge
        shares one read between its N experts)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read task vectors by rows")

    def bank_bytes(self) -> int:
        """Bytes this expert takes as a full model in its own dtypes: what an expert bank pays
        to keep it. Default: the base's tensors (an expert given as a delta implies a full model
        of the base's dtypes)."""
        return self.base.tensor_bytes()

    def close(self) -> None:
        """Release open file handles (reopened lazily if used again)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class FullExpert(ExpertSource):
    """A full fine-tuned checkpoint with exactly the base's keys."""

    kind = "full"

    def __init__(self, path: Path, base: CheckpointReader, reader: CheckpointReader):
        super().__init__(path, base)
        self.reader = reader
        self._float_keys = sorted(k for k in base.keys() if base.dtype(k).is_floating_point)

    def keys(self) -> list[str]:
        return list(self._float_keys)

    def task_vector(self, key: str) -> torch.Tensor | None:
        """float32 ``expert[key] - base[key]``; None for non-floating tensors (buffers)."""
        if key not in self.base:
            raise InputError(f"{self.path}: tensor {key!r} is not in the base {self.base.path}")
        if not self.base.dtype(key).is_floating_point:
            return None
        return check_finite(self.reader.get(key).float() - self.base.get(key).float(), self.path,
                            key)

    def fingerprint(self) -> str:
        return self.reader.fingerprint()

    def supports_rows(self, key: str) -> bool:
        return key in self.base and self.base.dtype(key).is_floating_point and bool(
            self.base.shape(key))

    def task_vector_rows(self, key: str, start: int, stop: int,
                         base_rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``expert[key][start:stop] - base[key][start:stop]``, reading only those rows
        (the base's are ``base_rows`` when given).

        Not checked for finite values: a row-block admission reads every block several times and
        checks them on its first pass (``CarveMethod.admit_blocked``)."""
        if base_rows is None:
            base_rows = self.base.get_rows(key, start, stop)
        return self.reader.get_rows(key, start, stop).float() - base_rows.float()

    def bank_bytes(self) -> int:
        """The expert checkpoint's tensors over the base's keys, in the expert's own dtypes."""
        return self.reader.tensor_bytes([k for k in self.base.keys() if k in self.reader])

    def close(self) -> None:
        self.reader.close()


class LoraExpert(ExpertSource):
    """A PEFT LoRA adapter; task vectors are ``scaling * B @ A`` (see :mod:`lora_adapter`)."""

    kind = "lora"

    def __init__(self, path: Path, base: CheckpointReader, adapter: LoraAdapter):
        super().__init__(path, base)
        self.adapter = adapter
        self._targets = adapter.bind(base)

    def keys(self) -> list[str]:
        return sorted(self._targets)

    def task_vector(self, key: str) -> torch.Tensor | None:
        """float32 delta for base tensor ``key``; None when the adapter does not touch it."""
        target = self._targets.get(key)
        if target is None:
            if key not in self.base:
                raise InputError(f"{self.path}: tensor {key!r} is not in the base {self.base.path}")
            return None
        what, obj = target
        if what == "lora":
            base_w = self.base.get(key) if obj.magnitude_key is not None else None
            tau = self.adapter.lora_delta(obj, self.base.shape(key), base_w)
        elif what == "bias":
            tau = self.adapter.bias_delta(obj)
        else:
            tau = self.adapter.weights.get(obj).float() - self.base.get(key).float()
        return check_finite(tau, self.path, key)

    def fingerprint(self) -> str:
        return self.adapter.fingerprint()

    def close(self) -> None:
        self.adapter.weights.close()


def _validate_full(path: Path, base: CheckpointReader, expert: CheckpointReader,
                   allow_dtype_mismatch: bool) -> None:
    bk, ek = set(base.keys()), set(expert.keys())
    missing, extra = sorted(bk - ek), sorted(ek - bk)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} base tensor(s) missing from the expert: {_listing(missing)}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) not in the base: {_listing(extra)}")
        raise InputError(f"expert {path} does not match base {base.path}: " + "; ".join(parts))
    for key in sorted(bk):
        if tuple(base.shape(key)) != tuple(expert.shape(key)):
            raise InputError(f"expert {path}: tensor {key!r} has shape {tuple(expert.shape(key))}, "
                             f"base {base.path} has {tuple(base.shape(key))}")
        bd, ed = base.dtype(key), expert.dtype(key)
        if bd.is_floating_point != ed.is_floating_point:
            raise InputError(f"expert {path}: tensor {key!r} is {ed} but {bd} in the base")
        if bd != ed and bd.is_floating_point and not allow_dtype_mismatch:
            raise InputError(f"expert {path}: tensor {key!r} is {ed} but {bd} in the base "
                             f"(pass allow_dtype_mismatch=True / --allow-dtype-mismatch to accept; "
                             f"task vectors are computed in float32)")
    # Integer buffers (position ids, step counters, token maps) are not merged, so an expert whose
    # buffers differ from the base would silently lose that change: refuse instead.
    for key in sorted(bk):
        if not base.dtype(key).is_floating_point:
            if base.dtype(key) != expert.dtype(key) or not torch.equal(base.get(key), expert.get(key)):
                raise InputError(f"expert {path}: non-floating tensor {key!r} differs from the base; "
                                 f"carve merges floating-point weights only")


def open_expert(path: str | os.PathLike, base: CheckpointReader, allow_pickle: bool = False,
                allow_dtype_mismatch: bool = False) -> ExpertSource:
    """Open ``path`` as an expert of ``base``: a PEFT adapter directory (``adapter_config.json``)
    or a full checkpoint; validates keys, shapes and dtypes up front (InputError naming the
    tensor). A full expert whose fingerprint equals the base's gives a warning."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"expert {p}: no such file or directory")
    if is_lora_adapter_dir(p):
        return LoraExpert(p, base, open_lora_adapter(p, allow_pickle=allow_pickle))
    reader = open_checkpoint(p, allow_pickle=allow_pickle)
    _validate_full(p, base, reader, allow_dtype_mismatch)
    if reader.fingerprint() == base.fingerprint():
        # legal (a zero task vector) but almost always a wrong path, so say so loudly
        warnings.warn(f"expert {p} is identical to the base {base.path} (same fingerprint)",
                      stacklevel=2)
    return FullExpert(p, base, reader)


def iter_task_vectors(base: CheckpointReader, expert: ExpertSource,
                      keys: Iterable[str] | None = None,
                      progress: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield ``(key, tau)`` for ``keys`` (default: every base key, sorted), one tensor at a time.

    tau: float32, shape ``base.shape(key)``, or None when the expert does not touch the tensor.
    A tqdm bar on stderr shows progress when ``progress``.
    """
    key_list = list(keys) if keys is not None else base.keys()
    for key in progress_bar(key_list, progress, f"tau {Path(expert.path).name}", len(key_list),
                            leave=False):
        yield key, expert.task_vector(key)
