"""Manifest facts about residual entries: one record per entry, one summary per skill."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from policy_server.tensors.entries import Dense, LowRank, Masked, ResidualEntry


def entry_record(entry: ResidualEntry, shape: Sequence[int], info: dict | None = None) -> dict:
    """The manifest record of one skill entry: {kind, rank, rel_error, shape} (+ method facts)."""
    rec: dict[str, Any] = {}
    for k, v in (info or {}).items():  # method facts first: the structural fields below win
        if isinstance(v, (int, float, str, bool)) or v is None:
            rec[k] = v
    if isinstance(entry, LowRank):
        rec.update(kind="lowrank", rank=entry.rank, rel_error=float(entry.rel_error))
    elif isinstance(entry, Dense):
        rec.update(kind="dense", rank=None, rel_error=0.0)
    elif isinstance(entry, Masked):
        rec.update(kind="masked", rank=None, rel_error=0.0,
                   density=float(entry.mask.float().mean()) if entry.mask.numel() else 0.0)
    else:
        raise TypeError(f"unknown residual entry type {type(entry).__name__}")
    rec["shape"] = [int(s) for s in shape]
    return rec


def summarize_tensors(records: dict[str, dict], unchanged: int = 0) -> dict:
    """Per-skill summary of entry records: counts per kind, rank and rel_error statistics."""
    kinds: dict[str, int] = {}
    ranks, errs = [], []
    for rec in records.values():
        kinds[rec["kind"]] = kinds.get(rec["kind"], 0) + 1
        if rec["kind"] == "lowrank":
            ranks.append(int(rec["rank"]))
            errs.append(float(rec["rel_error"]))
    out: dict[str, Any] = {"entries": len(records), "unchanged": unchanged, "kinds": kinds}
    if ranks:
        out.update(rank_mean=sum(ranks) / len(ranks), rank_max=max(ranks), rank_min=min(ranks),
                   rel_error_mean=sum(errs) / len(errs), rel_error_max=max(errs))
    return out
