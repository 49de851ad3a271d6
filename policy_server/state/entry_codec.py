"""The on-disk encoding of residual entries in a merge state's skill files.

Residual entries of one skill live in one safetensors file under keys ``<tensor>::P``,
``<tensor>::Q`` (LowRank), ``<tensor>::D`` (Dense) and ``<tensor>::mask`` (Masked, bit-packed
uint8, 1 bit per coordinate; the tensor's shape lives in the manifest record because packing loses
it). See docs/STATE_FORMAT.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from policy_server.errors import IntegrityError
from policy_server.tensors.entries import Dense, LowRank, Masked, ResidualEntry

SEP = "::"


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


def encode_entries(entries: dict[str, ResidualEntry],
                   dtype: torch.dtype | Callable[[str], torch.dtype]) -> dict[str, torch.Tensor]:
    """Residual entries -> flat safetensors dict (float tensors cast to the store dtype:
    ``dtype``, or ``dtype(key)`` per checkpoint key when it is a function)."""
    out: dict[str, torch.Tensor] = {}
    for name, e in entries.items():
        dt = dtype(name) if callable(dtype) else dtype
        if isinstance(e, LowRank):
            out[f"{name}{SEP}P"] = e.P.detach().to(dt).cpu()
            out[f"{name}{SEP}Q"] = e.Q.detach().to(dt).cpu()
        elif isinstance(e, Dense):
            out[f"{name}{SEP}D"] = e.D.detach().to(dt).cpu()
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
