"""Continual admission (``carve admit``): admit ONE expert into a versioned merge state.

The merge package plans (``merge/plan.py``) and streams (``merge/stream.py``) the admission;
this module wires it to the store: it opens the current version, hands the stream the state's
core/aux (and, only for methods declaring ``needs_residuals``, earlier skills' residuals), and
commits everything in one transaction, open while the expert streams: the new core is spooled
into it tensor by tensor, so peak memory is the aux, the skill's factors and one tensor's working
set (huge tensors, vocabulary embeddings and LM heads, in row blocks: ``merge/stream.py``); the
expert, the base and the old and new cores are never loaded whole. Bad input raises before a
transaction is opened, so it leaves the state directory untouched byte for byte.

Re-admission (``replace=True``) of an existing skill: its old residual entries and router
artifacts are dropped and the new expert is admitted as step ``t`` (the next index) against the
current core. The core is NOT rolled back: whatever the old expert contributed to the shared core
stays there (undoing it exactly would need the old expert, which was discarded). For the bank
method this is an exact replacement; for CARVE the skill's new residual is taken relative to a
core that still contains the old contribution, so the skill itself is served correctly (up to
truncation) while other skills keep the old contribution in their core.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from policy_server.errors import StateError
from policy_server.merge.hooks import collect_artifacts
from policy_server.merge.plan import AdmissionPlan, AdmitRequest, plan_admission
from policy_server.merge.records import summarize_tensors
from policy_server.merge.stream import AdmittedTensor, PriorState, split_aux, stream_admission
from policy_server.merge.task_vectors import open_expert
from policy_server.state.skill_record import skill_record, start_state, utc_now
from policy_server.state.store import DEFAULT_KEEP, StateSnapshot, StateStore, Transaction
from policy_server.tensors.checkpoint import open_checkpoint
from policy_server.tensors.entries import ResidualEntry
from policy_server.tensors.memory import pin_mmap_threshold


@dataclass
class AdmissionOutput:
    """The streamed admission, gathered for the commit; the core goes straight to the open
    transaction (``Transaction.add_core_tensor``), so a whole core is never held in memory."""

    tx: Transaction
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict[str, ResidualEntry] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)
    refits: dict[str, dict[str, tuple[ResidualEntry, dict]]] = field(default_factory=dict)
    unchanged: int = 0

    def add(self, t: AdmittedTensor) -> None:
        """Keep one streamed tensor's outputs."""
        self.unchanged += int(t.unchanged)
        if t.core is not None:
            self.tx.add_core_tensor(t.key, t.core)
        self.aux.update(t.aux)
        if t.entry is not None:
            self.entries[t.key] = t.entry
            self.records[t.key] = t.record
        for s, refit in t.refits.items():
            self.refits.setdefault(s, {})[t.key] = refit


def state_method(state_dir) -> str | None:
    """Name of the method an existing state was created with (None when there is no state)."""
    store = StateStore(state_dir)
    if not store.exists():
        return None
    return (store.open().manifest.get("method") or {}).get("name")


def admit(state_dir, base_dir, expert_dir, skill: str, **options) -> dict:
    """Admit one expert (full checkpoint or PEFT LoRA adapter) into the merge state ``state_dir``.

    ``options`` are the other :class:`AdmitRequest` fields: instructions, description, method
    (default carve; None: the state's), options (method options), replace, allow_pickle,
    allow_dtype_mismatch, allow_base_mismatch, dense_patterns, store_dtype (residual factors;
    default ``"param"``: each tensor's base dtype), core_dtype (default ``"param"``; ``"float32"``
    keeps a float32 core), keep (versions retained after the commit, default
    :data:`DEFAULT_KEEP`; older ones are garbage-collected unless a reader holds them), hooks,
    progress, seed. The first admission creates the state with the method, its options and
    the store dtype; later ones must name the same method, and any option given again must equal
    the stored one. ``replace=True`` re-admits an existing skill (see the module docstring).

    Returns a report dict: version, skill, t, method, replaced, gc (``removed``/``held``
    versions of the retention gc), storage (the store's accounting of the new version), tensors
    (summary of ranks/errors per kind), refit_skills, wall_s.
    Raises InputError (bad input: files, shapes, options, one-shot method) or StateError (method
    mismatch, base mismatch, duplicate skill) before anything is written.
    """
    return admit_request(AdmitRequest(state_dir, base_dir, expert_dir, skill, **options))


def _prior_state(parent: StateSnapshot | None, plan: AdmissionPlan, skill: str) -> PriorState:
    if parent is None:
        return PriorState()
    # Earlier skills' residuals only for methods that re-fit them: they cost memory otherwise.
    others = sorted(plan.existing - {skill}) if plan.method.needs_residuals else []
    # lazy core: one old core tensor in memory at a time (the old core is as large as the new one)
    return PriorState(core=parent.core(lazy=True), aux=split_aux(dict(parent.aux())),
                      residuals={s: dict(parent.residuals(s)) for s in others})


def admit_request(req: AdmitRequest) -> dict:
    """Run the admission ``req`` describes; see :func:`admit`."""
    t0 = time.perf_counter()
    pin_mmap_threshold()  # freed tensors go back to the OS (tensors/memory.py)
    store = StateStore(req.state_dir)
    parent = store.open() if store.exists() else None
    base = open_checkpoint(req.base_dir, allow_pickle=req.allow_pickle)
    plan = plan_admission(req, parent.manifest if parent else None, base)
    expert = open_expert(req.expert_dir, base, allow_pickle=req.allow_pickle,
                         allow_dtype_mismatch=req.allow_dtype_mismatch)
    prior = _prior_state(parent, plan, req.skill)
    verb = "re-admit" if plan.replacing else "admit"
    # The transaction is open while the expert streams: the core is spooled into it tensor by
    # tensor, and no other writer can commit a version this admission was not planned against.
    with store.transaction(f"{verb} {req.skill} ({plan.method.name}, t={plan.t})") as tx:
        _check_parent(tx, parent, req.state_dir)
        if parent is None:  # the header first: it decides the dtype each core tensor streams in
            start_state(tx.manifest, plan.base, plan.method, plan.store_dtype, plan.core_dtype)
        out = AdmissionOutput(tx)
        for tensor in stream_admission(plan.method, plan.t, req.skill, base, expert, prior,
                                       plan.core_dtype, tuple(req.dense_patterns),
                                       req.hooks, req.progress):
            out.add(tensor)
        record = skill_record(req.skill, plan.t, req.instructions, req.description,
                              req.expert_dir, expert, utc_now(), req.dense_patterns, out.records)
        version = _commit(tx, parent, plan, req.skill, record, out, collect_artifacts(req.hooks),
                          prior.residuals)
    summary = summarize_tensors(out.records, out.unchanged)
    refit_skills = sorted(out.refits)
    del prior, out, tx
    if parent is not None:
        parent.close()  # our own lease on the parent must not hold it against the retention gc
    keep = DEFAULT_KEEP if req.keep is None else req.keep
    gc = store.collect(keep) if keep else {"removed": [], "held": []}
    return {"version": version, "skill": req.skill, "t": plan.t, "method": plan.method.name,
            "replaced": plan.replacing, "gc": gc,
            "storage": store.open(version).manifest.get("storage", {}),
            "tensors": summary, "refit_skills": refit_skills, "wall_s": time.perf_counter() - t0}


def _check_parent(tx: Transaction, parent: StateSnapshot | None, state_dir) -> None:
    """The version the admission was planned against must still be current under the lock."""
    now = tx.parent.version if tx.parent is not None else None
    was = parent.version if parent is not None else None
    if now != was:
        raise StateError(f"state {state_dir} changed while this admission was being planned "
                         f"(current version {now}, planned against {was}); run it again")


def _commit(tx: Transaction, parent: StateSnapshot | None, plan: AdmissionPlan, skill: str,
            record: dict, out: AdmissionOutput, artifacts: dict[str, torch.Tensor],
            old_residuals: dict[str, dict[str, ResidualEntry]]) -> str:
    """Finish the transaction: header, aux, the skill, its artifacts, every re-fitted skill
    (the header was set and the core streamed into ``tx`` already)."""
    tx.manifest["admissions"] = plan.t
    if plan.replacing:
        tx.remove_skill(skill)
    tx.write_aux(out.aux)
    tx.write_skill(skill, out.entries, record)
    if artifacts:
        tx.write_artifacts(skill, artifacts)
    for s, refits in out.refits.items():
        _write_refit(tx, parent, s, old_residuals[s], refits, skill, plan.t)
    return tx.commit()


def _write_refit(tx, parent: StateSnapshot, name: str, old: dict[str, ResidualEntry],
                 refits: dict[str, tuple[ResidualEntry, dict]], by: str, t: int) -> None:
    """Rewrite an earlier skill whose residuals the method re-fitted (its artifacts kept)."""
    entries = dict(old)
    entries.update({k: e for k, (e, _) in refits.items()})
    rec = json.loads(json.dumps(parent.skill(name)))
    rec.setdefault("tensors", {}).update({k: r for k, (_, r) in refits.items()})
    rec["refit"] = {"by": by, "t": t, "tensors": len(refits)}
    tx.write_skill(name, entries, rec)
    keep = parent.skill_artifacts(name)
    if keep:
        tx.write_artifacts(name, keep)

