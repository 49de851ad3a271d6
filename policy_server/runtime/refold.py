"""Rebuild a served runtime's folded ``base + core`` for another merge-state version, tensor by
tensor, beside the served one (the live reload path of ``carve serve --follow`` / ``Reload``).

Every CARVE admission moves the core, so the folded weights of the new version differ from the
served ones wherever either core (or any skill residual) touches a tensor. Episodes already running
keep the old weights (they are pinned to the old engine), so the new set is built next to them:

* **rebuilt** (new tensors): every tensor the new core touches, every tensor the served core
  touched (it must go back to the plain base), and every tensor any skill residual of either
  version targets: the fused mode merges a skill into its targets *in place*, so a target shared
  by two runtimes would be changed under the other one's feet. Each is streamed from the base
  checkpoint in row blocks (``CheckpointReader.get_rows``), the new core's rows are added in
  float32 (exactly what ``fold_core`` computes at startup, so the result is bitwise the startup
  fold), cast to the tensor's serving dtype and written into a fresh tensor on the serving device;
* **shared** (same objects): every other parameter and every buffer (normalisation statistics,
  rotary tables, frozen embeddings, ...), plus the backend's non-weight parts through
  ``PolicyBackend.with_module`` (config, tokenizer, image transforms); the text router's
  embedding model is process-wide (``router.embedder.shared_embedder``).

Transient memory: the rebuilt tensors (their serving dtype) + the new version's residual stacks +
at most one row block of float32 temporaries (``BLOCK_BYTES``) and one row block of the core.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from policy_server.errors import StateError
from policy_server.runtime.runtime import PolicyRuntime
from policy_server.runtime.skill_bank import ParamIndex
from policy_server.tensors.safetensors_io import read_tensor_at, safetensors_index

log = logging.getLogger(__name__)

#: float32 bytes of one streamed row block (base rows + core rows, float32): bounds the
#: temporaries of a 151936 x 896 embedding to this instead of a whole float32 copy of it
BLOCK_BYTES = 32 << 20


class RefoldUnsupported(Exception):
    """The served runtime cannot be rebuilt tensor by tensor (a backend without the
    ``with_module`` hook, a base tensor stored under a name the model does not use, a base
    changed on disk); the caller builds a whole new engine instead. Not a state problem."""


@dataclass
class RefoldReport:
    """What a refold did. rebuilt / shared: canonical tensor keys built anew / shared by
    reference; *_bytes: their bytes in the serving dtype; base_bytes_read: checkpoint bytes
    streamed (storage dtype)."""

    rebuilt: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    rebuilt_bytes: int = 0
    shared_bytes: int = 0
    base_bytes_read: int = 0

    def summary(self) -> str:
        mib = 2 ** 20
        return (f"rebuilt {len(self.rebuilt)} tensors ({self.rebuilt_bytes / mib:.1f} MiB, "
                f"{self.base_bytes_read / mib:.1f} MiB of base read), shared "
                f"{len(self.shared)} ({self.shared_bytes / mib:.1f} MiB)")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _CoreRows:
    """Row-block reads of the core file (``snapshot.core(lazy=True)``'s file): the core of a big
    embedding is never held whole."""

    def __init__(self, lazy_core):
        self.keys = set(lazy_core.keys())
        self._index = safetensors_index(lazy_core.path) if self.keys else {}
        self._fd = os.open(lazy_core.path, os.O_RDONLY) if self.keys else None

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        shape, dtype, offset, _n = self._index[key]
        if not shape:  # a scalar
            return read_tensor_at(self._fd, offset, _n, shape, dtype)
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        return read_tensor_at(self._fd, offset + start * row, (stop - start) * row,
                              (stop - start, *shape[1:]), dtype)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._index[key][0])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _aliases(index: ParamIndex) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, canon in index.canonical.items():
        out.setdefault(canon, []).append(key)
    return out


def _build_tensor(key: str, live: torch.Tensor, base, base_key: str, core: _CoreRows,
                  core_key: str | None, report: RefoldReport) -> torch.Tensor:
    """``cast(float32(base[base_key]) + float32(core[core_key]))`` in ``live``'s dtype, shape
    and device, streamed in row blocks. ``core_key`` None: the plain base."""
    if tuple(base.shape(base_key)) != tuple(live.shape):
        raise RefoldUnsupported(f"base tensor {base_key!r} has shape {tuple(base.shape(base_key))}"
                                f", the served model's {key!r} is {tuple(live.shape)}")
    if core_key is not None and core.shape(core_key) != tuple(live.shape):
        raise StateError(f"core: tensor {core_key!r} has shape {core.shape(core_key)}, the model "
                         f"parameter is {tuple(live.shape)}")
    out = torch.empty(live.shape, dtype=live.dtype, device=live.device)
    if live.dim() == 0:
        blocks = [(0, 0)]
    else:
        per_row = max(1, math.prod(live.shape[1:]) * 4)
        step = max(1, BLOCK_BYTES // per_row)
        blocks = [(s, min(s + step, live.shape[0])) for s in range(0, live.shape[0], step)]
    for start, stop in blocks:
        if live.dim() == 0:
            w = base.get(base_key)
            c = core.rows(core_key, 0, 0) if core_key is not None else None
            dst = out
        else:
            w = base.get_rows(base_key, start, stop)
            c = core.rows(core_key, start, stop) if core_key is not None else None
            dst = out[start:stop]
        report.base_bytes_read += _nbytes(w)
        # the same float32 arithmetic as fold_core (W32 + C32, then one cast), so the rebuilt
        # weights are bitwise those a fresh start on this version folds
        w = w.to(live.device, torch.float32)
        if c is not None:
            w.add_(c.to(live.device, torch.float32))
        dst.copy_(w)
        del w, c
    return out


def refold(served: PolicyRuntime, snapshot, base, residual_keys: set[str]
           ) -> tuple[nn.Module, set[str], RefoldReport]:
    """The served runtime's module rebuilt for ``snapshot``: -> (module, canonical keys of the new
    core, report).

    served: the runtime serving now (read only: its tensors are shared or left alone, its lock is
    held only while the module's structure is copied). snapshot: the new version (verified by the
    caller). base: a ``CheckpointReader`` of the base the served runtime was loaded from (the
    caller checks its fingerprint). residual_keys: checkpoint keys the new version's residuals
    target. ``StateError`` for a core that does not fit the model; ``RefoldUnsupported`` when the
    base cannot supply a tensor by the model's own names (the caller then builds a whole engine).
    """
    from policy_server.tensors.memory import pin_mmap_threshold

    # the streamed row blocks are freed as they go: keep glibc returning them to the OS instead
    # of growing the heap by the largest block's worth for the server's lifetime
    pin_mmap_threshold()
    index = served.bank.index
    aliases = _aliases(index)
    lazy = snapshot.core(lazy=True)
    core = _CoreRows(lazy)
    try:
        new_core: dict[str, list[str]] = {}
        for k in sorted(core.keys):
            new_core.setdefault(index.resolve(k, "core"), []).append(k)
        targets = {index.resolve(k, "residual") for k in residual_keys}
        rebuild = set(new_core) | set(served.core_keys) | set(served.bank.stacks) | targets
        report = RefoldReport()
        replace: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for key in sorted(rebuild):
                live = index.tensors[key]
                src = next((a for a in aliases[key] if a in base), None)
                if src is None:
                    raise RefoldUnsupported(f"the base checkpoint has no tensor {key!r} (nor an "
                                            f"alias of it)")
                ks = new_core.get(key, [])
                t = _build_tensor(key, live, base, src, core, ks[0] if ks else None, report)
                for other in ks[1:]:  # tied aliases must carry one delta, as fold_core checks
                    if not torch.equal(lazy.get(other).float(), lazy.get(ks[0]).float()):
                        raise StateError(f"core: tied tensors {ks[0]!r} and {other!r} carry "
                                         "different deltas")
                if isinstance(live, nn.Parameter):
                    t = nn.Parameter(t, requires_grad=live.requires_grad)
                replace[id(live)] = t
                report.rebuilt.append(key)
                report.rebuilt_bytes += _nbytes(t)
        for key, t in index.tensors.items():
            if key not in rebuild:
                report.shared.append(key)
                report.shared_bytes += _nbytes(t)
        module = served.copy_module(replace)
        del replace
        return module, set(new_core), report
    finally:
        core.close()
        del lazy


def refold_runtime(served: PolicyRuntime, snapshot, base) -> tuple[PolicyRuntime, RefoldReport]:
    """A new ``PolicyRuntime`` serving ``snapshot`` in ``served``'s mode, device and dtypes, its
    module built by :func:`refold` (unchanged tensors shared with ``served``) and its backend by
    ``served.backend.with_module`` (``RefoldUnsupported`` when the backend has no such hook).
    The caller attaches the snapshot to the new backend (``attach_state``) before this, as
    ``serving.assemble_engine`` does; see :func:`new_backend`."""
    residuals = {n: snapshot.residuals(n) for n in snapshot.skill_names()}
    keys = {k for entries in residuals.values() for k in entries}
    module, core_keys, report = refold(served, snapshot, base, keys)
    backend = new_backend(served, module)
    backend.attach_state(snapshot)
    runtime = PolicyRuntime(backend, _WithResiduals(snapshot, residuals), mode=served.mode,
                            device=served.device, prefolded=core_keys)
    return runtime, report


def new_backend(served: PolicyRuntime, module: nn.Module):
    """``served.backend.with_module(module)``; ``RefoldUnsupported`` when the backend cannot."""
    backend = served.backend.with_module(module)
    if backend is None:
        raise RefoldUnsupported(f"{type(served.backend).__name__} cannot be rebuilt around a "
                                "new module (no PolicyBackend.with_module)")
    return backend


class _WithResiduals:
    """``snapshot`` with its residuals already loaded (they were read once to find their target
    keys; the runtime would otherwise read every skill file a second time)."""

    def __init__(self, snapshot, residuals: dict):
        self._snapshot, self._residuals = snapshot, residuals

    def residuals(self, name: str):
        return self._residuals[name]

    def __getattr__(self, name):
        return getattr(self._snapshot, name)
