"""The one place a skill's manifest record and a new state's header are built."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from policy_server.merge.methods.base import MergeMethod
from policy_server.merge.plan import method_record
from policy_server.merge.task_vectors import ExpertSource


def utc_now() -> str:
    """The admission timestamp written into skill records (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def skill_record(name: str, order: int, instructions: Sequence[str], description: str,
                 expert_dir, expert: ExpertSource, admitted: str, dense_patterns: Sequence[str],
                 tensors: dict[str, dict]) -> dict:
    """The manifest record of a newly admitted skill (docs/STATE_FORMAT.md, ``skills[]``).

    tensors: {checkpoint key: entry record}; the store completes kind/rank/shape from the entries.
    """
    return {"name": name, "order": int(order), "instructions": [str(s) for s in instructions],
            "description": str(description or ""),
            "source": {"path": str(Path(expert_dir).resolve()), "kind": expert.kind,
                       "fingerprint": expert.fingerprint(), "bank_bytes": expert.bank_bytes()},
            "admitted": admitted, "dense_patterns": list(dense_patterns), "tensors": tensors}


def start_state(manifest: dict, base: dict, method: MergeMethod, store_dtype: str,
                core_dtype: str) -> None:
    """Fill a new state's header in ``manifest``: base entry, method + options, the residual
    store dtype and the core dtype (``"param"`` or a dtype name, docs/STATE_FORMAT.md)."""
    manifest["base"] = base
    manifest["method"] = method_record(method)
    manifest["store_dtype"] = store_dtype
    manifest["core_dtype"] = core_dtype
