"""Per-tensor streaming of a merge: one tensor of the base and of each expert in memory at a time.

:func:`stream_admission` admits ONE expert against the state's prior tensors; :func:`stream_merge`
merges N experts at once. Both are generators yielding one result per tensor, in key order, and
write nothing: the caller (``policy_server/state/admission.py``, ``state/oneshot.py``) decides
where the results go, so this package never depends on the state store.

A tensor whose task vector is None or all zero is *unchanged* by the expert: the method is not
called, the prior core is carried over, and the skill gets no entry (it runs with ``base + core``
there). For CARVE this is a choice: calling the method would store ``-C`` so the skill ran with
the plain base tensor; we prefer sharing the core where the expert had nothing to say.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from policy_server.dtypes import PARAM_DTYPE, storage_dtype
from policy_server.errors import StateError
from policy_server.merge.blocks import BLOCK_BUDGET_BYTES, RowBlocks, row_blocks
from policy_server.merge.hooks import AdmissionHook, run_hooks
from policy_server.merge.methods.base import MergeMethod, TensorState, fold_step
from policy_server.merge.plan import AUX_SEP, float_keys, is_unchanged, tensor_context
from policy_server.merge.records import entry_record
from policy_server.merge.task_vectors import ExpertSource
from policy_server.progress import progress
from policy_server.tensors.checkpoint import CheckpointReader
from policy_server.tensors.entries import ResidualEntry


@dataclass
class PriorState:
    """The state an admission streams against.

    core: {key: core tensor}, with ``pop`` (a dict, or a lazy file view so only one old core
    tensor is in memory at a time); aux: {key: {aux key: tensor}}; residuals: earlier skills'
    entries {skill: {key: entry}}, only for methods that declare ``needs_residuals``.
    """

    core: object = field(default_factory=dict)
    aux: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    residuals: dict[str, dict[str, ResidualEntry]] = field(default_factory=dict)


def split_aux(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat ``"<tensor>::<aux key>"`` tensors -> {tensor: {aux key: tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        key, _, sub = name.rpartition(AUX_SEP)
        out.setdefault(key, {})[sub] = tensor
    return out


def flat_aux(key: str, aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{aux key: tensor} of one tensor -> flat ``"<key>::<aux key>"`` names."""
    return {f"{key}{AUX_SEP}{sub}": a for sub, a in aux.items()}


@dataclass
class AdmittedTensor:
    """One tensor of an admission.

    core: the new core tensor in the store dtype (None: no core there); aux: flat aux tensors;
    entry/record: the skill's residual and its manifest record (None: none, the skill runs as
    ``base + core``); refits: earlier skills' re-fitted {skill: (entry, record)}; unchanged: the
    expert left this tensor alone.
    """

    key: str
    core: torch.Tensor | None
    aux: dict[str, torch.Tensor]
    entry: ResidualEntry | None = None
    record: dict | None = None
    refits: dict[str, tuple[ResidualEntry, dict]] = field(default_factory=dict)
    unchanged: bool = False


def stream_admission(method: MergeMethod, t: int, skill: str, base: CheckpointReader,
                     expert: ExpertSource, prior: PriorState, core_dtype: str = PARAM_DTYPE,
                     dense_patterns: Sequence[str] = (), hooks: Sequence[AdmissionHook] = (),
                     show_progress: bool = True) -> Iterator[AdmittedTensor]:
    """Admit ``expert`` as step ``t`` named ``skill``, one floating base tensor at a time.

    Consumes ``prior`` (its core and aux are popped tensor by tensor, so an old core tensor is
    freed once replaced). Task vectors are float32; ``core_dtype`` is the state's core dtype spec
    (``"param"``: each key in its base parameter's dtype, or a dtype name). The method sees it in
    ``TensorContext.core_dtype`` and the yielded core is already cast to it (a bf16 state then
    holds its new core in half the memory of a float32 one).
    """
    keys = float_keys(base)
    for key in progress(keys, show_progress, f"admit {skill}", len(keys)):
        cdt = storage_dtype(core_dtype, base.dtype(key))
        ctx = tensor_context(key, base.shape(key), dense_patterns, cdt)
        if by_rows(method, ctx, expert, hooks, prior):
            yield _admit_by_rows(method, ctx, expert, prior, t, skill)
            continue
        tau = expert.task_vector(key)
        if hooks:
            run_hooks(hooks, base, key, tau)
        core = prior.core.pop(key, None)
        aux = prior.aux.pop(key, {})
        if is_unchanged(tau):
            yield AdmittedTensor(key, core, flat_aux(key, aux), unchanged=True)
            continue
        state = TensorState(core=core.float() if core is not None else None, aux=aux,
                            residuals={s: r[key] for s, r in prior.residuals.items() if key in r})
        res, _ = fold_step(method, ctx, tau, state, t, skill)
        del tau, state
        yield AdmittedTensor(
            key,
            res.core.detach().to(cdt).contiguous() if res.core is not None else None,
            {k: a.detach().contiguous() for k, a in flat_aux(key, res.aux or {}).items()},
            entry=res.entry,
            record=entry_record(res.entry, ctx.shape, res.info) if res.entry is not None else None,
            refits={s: (e, entry_record(e, ctx.shape)) for s, e in res.updated.items()})


#: tensors with at least this many elements are admitted in row blocks when the method and the
#: expert allow it (128 MiB in float32: vocabulary embeddings and LM heads, not layer matrices)
BLOCKED_MIN_NUMEL = 1 << 25


def by_rows(method: MergeMethod, ctx, expert: ExpertSource, hooks: Sequence[AdmissionHook],
            prior: PriorState, min_numel: int | None = None) -> bool:
    """Whether tensor ``ctx`` is admitted in row blocks: large enough (``min_numel``, default
    :data:`BLOCKED_MIN_NUMEL`), the method supports it for this tensor, the expert can read it by
    rows, no hook wants the whole tensor and the method carries no aux for it."""
    limit = BLOCKED_MIN_NUMEL if min_numel is None else min_numel
    return (math.prod(ctx.shape) >= limit and method.supports_blocks(ctx)
            and expert.supports_rows(ctx.name) and not any(h.wants(ctx.name) for h in hooks)
            and not prior.aux.get(ctx.name))


def _admit_by_rows(method: MergeMethod, ctx, expert: ExpertSource, prior: PriorState, t: int,
                   skill: str) -> AdmittedTensor:
    """One tensor admitted from row blocks (see :meth:`MergeMethod.admit_blocked`)."""
    core = prior.core.pop(ctx.name, None)
    prior.aux.pop(ctx.name, None)
    res = method.admit_blocked(ctx, lambda a, b: expert.task_vector_rows(ctx.name, a, b), core,
                               t, skill)
    if res is None:  # all zero: unchanged, as the whole-tensor path decides
        return AdmittedTensor(ctx.name, core, {}, unchanged=True)
    del core
    return AdmittedTensor(ctx.name, res.core.to(ctx.core_dtype).contiguous(), {},
                          entry=res.entry, record=entry_record(res.entry, ctx.shape, res.info))


@dataclass
class MergedTensor:
    """One tensor of a one-shot merge of N experts.

    floating: False for integer buffers (copied through, never merged); core: float32 shared
    delta (None: the tensor stays the base's); aux: flat aux tensors of a folded continual method;
    entries/records: per expert, in input order (None: that skill runs as ``base + core``).
    """

    key: str
    floating: bool
    core: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: list[ResidualEntry | None] = field(default_factory=list)
    records: list[dict | None] = field(default_factory=list)


def _with_zeros(taus: list, shape) -> list[torch.Tensor]:
    zeros = torch.zeros(shape, dtype=torch.float32)
    return [x if x is not None else zeros for x in taus]


def _observe_pass(method: MergeMethod, base: CheckpointReader, experts: Sequence[ExpertSource],
                  dense_patterns: Sequence[str], show_progress: bool,
                  block_budget: int | None) -> None:
    keys = float_keys(base)
    for key in progress(keys, show_progress, f"observe ({method.name})", len(keys)):
        ctx = tensor_context(key, base.shape(key), dense_patterns)
        blocks = row_blocks(method, ctx, base, experts, block_budget)
        if blocks is not None:
            method.observe_blocked(ctx, blocks)
            continue
        taus = [e.task_vector(key) for e in experts]
        if all(is_unchanged(x) for x in taus):
            continue
        method.observe_tensor(ctx, _with_zeros(taus, base.shape(key)))


def _merged(method: MergeMethod, ctx, res, n: int) -> MergedTensor:
    """A one-shot method's result for one tensor, checked (one entry per expert)."""
    if len(res.entries) != n:
        raise StateError(f"method {method.name!r} returned {len(res.entries)} entries for "
                         f"{n} experts at tensor {ctx.name!r}")
    records = [entry_record(e, ctx.shape, res.info) if e is not None else None
               for e in res.entries]
    return MergedTensor(ctx.name, True, res.core, {}, list(res.entries), records)


def _unchanged(key: str, n: int) -> MergedTensor:
    return MergedTensor(key, True, None, {}, [None] * n, [None] * n)


def _merge_at_once(method: MergeMethod, ctx, experts: Sequence[ExpertSource]) -> MergedTensor:
    """A one-shot method given all N whole task vectors of one tensor."""
    taus = [e.task_vector(ctx.name) for e in experts]
    if all(is_unchanged(x) for x in taus):
        return _unchanged(ctx.name, len(experts))
    return _merged(method, ctx, method.merge_tensor(ctx, _with_zeros(taus, ctx.shape)),
                   len(experts))


def _merge_blocked(method: MergeMethod, ctx, blocks: RowBlocks) -> MergedTensor:
    """A one-shot method merging one tensor from row blocks of all N experts."""
    res = method.merge_blocked(ctx, blocks)
    if not blocks.any_nonzero:  # no expert changed it: the base's, as on the whole path
        return _unchanged(ctx.name, blocks.n)
    return _merged(method, ctx, res, blocks.n)


def _merge_by_folding(method: MergeMethod, ctx, experts: Sequence[ExpertSource],
                      names: Sequence[str]) -> MergedTensor:
    """A continual method merged at once: the experts admitted in order, for this tensor, each
    task vector read only when its turn comes (one in memory, not N)."""
    state = TensorState()
    records: dict[str, dict] = {}
    for i, expert in enumerate(experts):
        tau = expert.task_vector(ctx.name)
        if is_unchanged(tau):
            continue
        res, state = fold_step(method, ctx, tau, state, i + 1, names[i])
        del tau
        if res.entry is not None:
            records[names[i]] = entry_record(res.entry, ctx.shape, res.info)
        for s, e in res.updated.items():
            records[s] = entry_record(e, ctx.shape)
    return MergedTensor(ctx.name, True, state.core, flat_aux(ctx.name, state.aux),
                        [state.residuals.get(nm) for nm in names],
                        [records.get(nm) if nm in state.residuals else None for nm in names])


def stream_merge(method: MergeMethod, base: CheckpointReader, experts: Sequence[ExpertSource],
                 names: Sequence[str], dense_patterns: Sequence[str] = (),
                 show_progress: bool = True, core_dtype: str | None = None,
                 block_budget: int | None = BLOCK_BUDGET_BYTES) -> Iterator[MergedTensor]:
    """Merge ``experts`` (named ``names``) tensor by tensor over every base key, in key order.

    ``core_dtype``: the core dtype spec of the state the merge is written to (None: a
    checkpoint, where the core is folded into the base in float32); methods see it in
    ``TensorContext.core_dtype``.

    A ``one_shot`` method gets every task vector of a tensor at once (missing/None ones as
    zeros): whole tensors (N + 1 in RAM, float32) unless the N exceed ``block_budget`` bytes
    and the method supports row blocks (``merge/blocks.py``; None: never blocked), so its
    working set does not grow with N. A continual one has the experts folded in order, one task
    vector in memory at a time. ``needs_observe_pass`` methods first see every tensor.
    """
    if method.needs_observe_pass and method.one_shot:
        _observe_pass(method, base, experts, dense_patterns, show_progress, block_budget)
    floating = set(float_keys(base))
    keys = base.keys()
    for key in progress(keys, show_progress, f"merge ({method.name})", len(keys)):
        if key not in floating:
            yield MergedTensor(key, False)
            continue
        cdt = storage_dtype(core_dtype, base.dtype(key)) if core_dtype is not None else None
        ctx = tensor_context(key, base.shape(key), dense_patterns, cdt)
        if not method.one_shot:
            yield _merge_by_folding(method, ctx, experts, names)
            continue
        blocks = row_blocks(method, ctx, base, experts, block_budget)
        yield (_merge_blocked(method, ctx, blocks) if blocks is not None
               else _merge_at_once(method, ctx, experts))
