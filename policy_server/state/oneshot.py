"""One-shot merge (``carve merge``): merge N experts at once, streaming tensor by tensor.

``per_skill`` methods (masks, bank, CARVE) produce a merge state: one version holding every
skill. The others produce a Hugging Face checkpoint ``base + core`` next to the base's config and
tokenizer files, loadable with ``from_pretrained``. The merge package streams
(``merge/stream.py``); this module decides where the tensors go.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from policy_server.dtypes import PARAM_DTYPE, storage_dtype
from policy_server.errors import InputError
from policy_server.merge.blocks import BLOCK_BUDGET_BYTES, rows_per_block
from policy_server.merge.methods.base import MergeMethod, build_options, get_method
from policy_server.merge.plan import (
    base_record,
    check_store_dtype,
    merge_skill_names,
    per_skill_values,
)
from policy_server.merge.records import summarize_tensors
from policy_server.merge.stream import MergedTensor, stream_merge
from policy_server.merge.task_vectors import ExpertSource, open_expert
from policy_server.state.skill_record import skill_record, start_state, utc_now
from policy_server.state.store import StateStore
from policy_server.tensors.checkpoint import CheckpointReader, CheckpointWriter, open_checkpoint
from policy_server.tensors.memory import pin_mmap_threshold


@dataclass(frozen=True)
class MergeRequest:
    """Everything one one-shot merge takes (see :func:`merge` for the meaning of each field)."""

    method: str
    base_dir: str | Path
    expert_dirs: Sequence[str | Path]
    out_dir: str | Path
    options: dict | None = None
    skills: Sequence[str] | None = None
    instructions: Sequence[Sequence[str]] | dict | None = None
    descriptions: Sequence[str] | dict | None = None
    allow_pickle: bool = False
    allow_dtype_mismatch: bool = False
    dense_patterns: Sequence[str] = ()
    store_dtype: str | None = None
    core_dtype: str | None = None
    overwrite: bool = False
    progress: bool = True
    seed: int = 0
    max_shard_bytes: int = 5 * 10**9
    block_budget: int | None = BLOCK_BUDGET_BYTES


@dataclass(frozen=True)
class _Skill:
    """One expert of the merge as the state records it."""

    name: str
    expert_dir: Path
    expert: ExpertSource
    instructions: list[str]
    description: str


def merge(method: str, base_dir, expert_dirs: Sequence, out_dir, **options) -> dict:
    """One-shot merge of N experts with ``method``, streaming tensor by tensor.

    ``options`` are the other :class:`MergeRequest` fields: options (method options), skills
    (names, default the expert directory names), instructions / descriptions (per skill: a list
    in expert order or a {skill: value} dict), allow_pickle, allow_dtype_mismatch,
    dense_patterns, store_dtype / core_dtype (states only; default ``"param"``: each tensor in
    its base dtype), overwrite (checkpoints only: a state is never overwritten),
    progress, seed, max_shard_bytes, block_budget (bytes of N experts' float32 rows merged
    at once for a method that supports row blocks; None: whole tensors). A method implementing ``merge_tensor`` gets all N task
    vectors of each tensor at once (by row blocks for a huge tensor, so the peak does not grow
    with N); a continual-only one has the experts admitted in order.

    Returns a report: out, kind ("state"|"checkpoint"), method, experts, skills, wall_s, and for a
    state its version, storage and per-skill tensor summaries.
    """
    return merge_request(MergeRequest(method, base_dir, expert_dirs, out_dir, **options))


def _check_out(out: Path, meth: MergeMethod, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite or meth.per_skill:
            raise InputError(f"output {out} already exists and is not empty"
                             + ("" if meth.per_skill else " (pass overwrite=True / --overwrite)"))


def merge_request(req: MergeRequest) -> dict:
    """Run the merge ``req`` describes; see :func:`merge`."""
    t0 = time.perf_counter()
    pin_mmap_threshold()  # freed tensors go back to the OS (tensors/memory.py)
    expert_dirs = [Path(p) for p in req.expert_dirs]
    names = merge_skill_names(expert_dirs, req.skills)
    store_dtype = check_store_dtype(req.store_dtype) or PARAM_DTYPE
    core_dtype = check_store_dtype(req.core_dtype, "core dtype") or PARAM_DTYPE
    cls = get_method(req.method)
    meth = cls(build_options(cls, dict(req.options or {})), seed=req.seed)
    out = Path(req.out_dir)
    _check_out(out, meth, req.overwrite)
    instr = [list(x or []) for x in per_skill_values(req.instructions, names, "instruction lists")]
    descs = [str(x or "") for x in per_skill_values(req.descriptions, names, "descriptions")]
    base = open_checkpoint(req.base_dir, allow_pickle=req.allow_pickle)
    experts = [open_expert(p, base, allow_pickle=req.allow_pickle,
                           allow_dtype_mismatch=req.allow_dtype_mismatch) for p in expert_dirs]
    if not meth.one_shot and not meth.continual:
        raise InputError(f"method {meth.name!r} implements neither merge_tensor nor admit_tensor")
    tensors = stream_merge(meth, base, experts, names, tuple(req.dense_patterns), req.progress,
                           core_dtype if meth.per_skill else None, req.block_budget)
    report = {"out": str(out), "method": meth.name, "experts": len(experts), "skills": names}
    if not meth.per_skill:
        _write_checkpoint(tensors, base, out, req, meth)
        report.update(kind="checkpoint", wall_s=time.perf_counter() - t0)
        return report
    skills = [_Skill(*fields) for fields in zip(names, expert_dirs, experts, instr, descs)]
    version, records = _write_state(tensors, base, out, meth, skills, (store_dtype, core_dtype),
                                    req.dense_patterns)
    report.update(kind="state", version=version,
                  storage=StateStore(out).open(version).manifest.get("storage", {}),
                  tensors={nm: summarize_tensors(records[i]) for i, nm in enumerate(names)},
                  wall_s=time.perf_counter() - t0)
    return report


def _write_checkpoint(tensors, base: CheckpointReader, out: Path, req: MergeRequest,
                      meth: MergeMethod) -> None:
    """``base + core`` per tensor (base dtype) into a HF checkpoint; integer buffers as is."""
    template = Path(req.base_dir) if Path(req.base_dir).is_dir() else None
    with CheckpointWriter(out, max_shard_bytes=req.max_shard_bytes, template_dir=template,
                          overwrite=req.overwrite,
                          metadata={"carve_merge_method": meth.name}) as writer:
        for t in tensors:
            if t.core is None:
                writer.add(t.key, base.get(t.key), owned=True)
            else:
                writer.add(t.key, _fold_core(base, t.key, t.core, req.block_budget), owned=True)
            t.core = None  # the float32 core is not needed once folded


def _fold_core(base: CheckpointReader, key: str, core: torch.Tensor, budget: int | None
               ) -> torch.Tensor:
    """``(base[key].float() + core).to(base dtype)``, by row blocks of about ``budget`` float32
    bytes for a huge tensor (elementwise, so bit-identical), so no float32 copy of the base
    tensor and of the sum exists beside the core."""
    shape, dtype = base.shape(key), base.dtype(key)
    rows = rows_per_block(shape, 1, budget) if budget is not None and shape else None
    if rows is None or rows >= shape[0]:
        return (base.get(key).float() + core).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    for a in range(0, shape[0], rows):
        b = min(a + rows, shape[0])
        out[a:b] = (base.get_rows(key, a, b).float() + core[a:b]).to(dtype)
    return out


def _write_state(tensors: Iterable[MergedTensor], base: CheckpointReader, out: Path,
                 meth: MergeMethod, skills: Sequence[_Skill], dtypes: tuple[str, str],
                 dense_patterns: Sequence[str]) -> tuple[str, list[dict[str, dict]]]:
    """Gather the merged tensors and commit them as one version of a new state at ``out``;
    ``dtypes`` = (residual store dtype, core dtype) specs."""
    core: dict[str, torch.Tensor] = {}
    aux: dict[str, torch.Tensor] = {}
    entries: list[dict] = [{} for _ in skills]
    records: list[dict[str, dict]] = [{} for _ in skills]
    for t in tensors:
        if not t.floating:
            continue
        if t.core is not None:
            # cast as it streams: only the stored-size core is gathered, never a float32 one
            core[t.key] = t.core.detach().to(storage_dtype(dtypes[1],
                                                           base.dtype(t.key))).contiguous()
        aux.update(t.aux)
        for i, (e, rec) in enumerate(zip(t.entries, t.records)):
            if e is not None:
                entries[i][t.key], records[i][t.key] = e, rec
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # the store creates its own directory
    now = utc_now()
    with StateStore(out).transaction(f"merge {len(skills)} experts ({meth.name})") as tx:
        start_state(tx.manifest, base_record(base), meth, *dtypes)
        tx.manifest["admissions"] = len(skills)
        tx.write_core(core)
        tx.write_aux(aux)
        for i, sk in enumerate(skills):
            tx.write_skill(sk.name, entries[i], skill_record(
                sk.name, i + 1, sk.instructions, sk.description, sk.expert_dir, sk.expert, now,
                dense_patterns, records[i]))
        return tx.commit(), records
