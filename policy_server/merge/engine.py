"""The merge engine: drives a :class:`MergeMethod` over task vectors streamed tensor by tensor.

Two entry points:

* :func:`admit` (continual, ``carve admit``): admit ONE expert into a versioned merge state. Per
  tensor it reads the expert's task vector, the state's core/aux for that tensor (and, only for
  methods that re-fit earlier skills, their residuals), calls ``method.admit_tensor`` and keeps the
  outputs; one transaction commits the new version atomically. Peak memory is the state (core +
  aux, float32) plus a few tensors: the expert and the base are never loaded whole.
* :func:`merge` (one-shot, ``carve merge``): merge N experts. Each step reads one tensor from the
  base and every expert. Methods with per-skill parts (``per_skill``: masks, bank, CARVE) produce a
  merge state; the others a Hugging Face checkpoint ``base + core`` next to the base's config and
  tokenizer files, loadable with ``from_pretrained``.

Everything that can be checked from headers and the manifest (keys, shapes, dtypes, base
fingerprint, method and options, duplicate skill, pickle opt-in) is checked BEFORE a transaction
is opened, so bad input leaves the state directory untouched byte for byte.

Conventions shared with the runtime (ARCHITECTURE.md sections 2-3):

* A tensor whose task vector is None or all zero is *unchanged* by the expert: the method is not
  called, the core is carried over, and the skill gets no entry (it runs with ``base + core``
  there). For CARVE this is a choice: calling the method would store ``-C`` so the skill ran with
  the plain base tensor; we prefer sharing the core where the expert had nothing to say.
* 1-D tensors, tensors that are not 2-D, and keys matching ``dense_patterns`` (fnmatch globs) get
  ``TensorContext.dense=True``: methods must not compress them to low rank.
* Non-floating tensors (integer buffers) are never merged.
* Aux tensors are stored flat in the state as ``"<tensor>::<aux key>"``.
* ``t`` (the admission index handed to continual methods) is ``manifest["admissions"] + 1``: it
  counts admissions, including re-admissions, and never decreases.

Re-admission (``replace=True``) of an existing skill under a continual method: the skill's old
residual entries and router artifacts are dropped and the new expert is admitted as step ``t``
(the next index) against the current core. The core is NOT rolled back: whatever the old expert
contributed to the shared core stays there (undoing it exactly would need the old expert, which
was discarded). For the bank method this is an exact replacement; for CARVE the skill's new
residual is taken relative to a core that still contains the old contribution, so the skill itself
is served correctly (up to truncation) while other skills keep the old contribution in their core.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from policy_server.errors import InputError, StateError
from policy_server.merge.checkpoint import CheckpointReader, CheckpointWriter, open_checkpoint
from policy_server.merge.entries import Dense, LowRank, Masked, ResidualEntry
from policy_server.merge.hooks import AdmissionHook
from policy_server.merge.methods.base import (
    MergeMethod,
    TensorContext,
    TensorState,
    build_options,
    get_method,
)
from policy_server.merge.task_vectors import ExpertSource, open_expert

SKILL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUX_SEP = "::"


# ------------------------------------------------------------------------------------------------
# small helpers

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_skill_name(skill: str) -> None:
    if not isinstance(skill, str) or not SKILL_NAME_RE.match(skill):
        raise InputError(f"skill name {skill!r} is invalid: use 1-128 characters from "
                         f"[A-Za-z0-9_.-], starting with a letter or digit (it becomes a file name)")


def _check_store_dtype(store_dtype: str | None) -> str | None:
    if store_dtype is None:
        return None
    name = str(store_dtype).removeprefix("torch.")
    if name not in STORE_DTYPES:
        raise InputError(f"store dtype {store_dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
    return name


def _json_norm(obj: Any) -> Any:
    """JSON round trip, so options compare the same way they were stored (tuples -> lists)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def base_record(base: CheckpointReader) -> dict:
    """The manifest's ``base`` entry: fingerprint, parameter count, main dtype, tensor table."""
    tensors = {k: {"shape": list(base.shape(k)), "dtype": _dtype_name(base.dtype(k))}
               for k in base.keys()}
    counts: dict[str, int] = {}
    for k in base.keys():
        n = math.prod(base.shape(k))
        counts[_dtype_name(base.dtype(k))] = counts.get(_dtype_name(base.dtype(k)), 0) + n
    main = max(counts, key=counts.get) if counts else "float32"
    return {"fingerprint": base.fingerprint(), "num_params": base.num_params(), "dtype": main,
            "path": str(Path(base.path).resolve()), "tensors": tensors}


def tensor_context(key: str, shape: Sequence[int], dense_patterns: Sequence[str] = ()
                   ) -> TensorContext:
    """Context for one tensor: dense when not 2-D or matching a ``dense_patterns`` glob."""
    dense = len(shape) != 2 or any(fnmatch.fnmatchcase(key, p) for p in dense_patterns)
    return TensorContext(name=key, shape=tuple(int(s) for s in shape), dense=dense)


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


def _is_unchanged(tau: torch.Tensor | None) -> bool:
    return tau is None or not bool(torch.any(tau != 0))


def _float_keys(base: CheckpointReader) -> list[str]:
    return [k for k in base.keys() if base.dtype(k).is_floating_point]


def _progress(it: Iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit="tensor", dynamic_ncols=True)


def _open_store(state_dir):
    from policy_server.state.store import StateStore  # lazy: the store imports this package

    return StateStore(state_dir)


def _run_hooks(hooks: Sequence[AdmissionHook], base: CheckpointReader, key: str,
               tau: torch.Tensor | None) -> None:
    wanting = [h for h in hooks if h.wants(key)]
    if not wanting:
        return
    expert = base.get(key).float()
    if tau is not None:
        expert = expert + tau
    for h in wanting:
        h.on_tensor(key, expert, tau)


def _collect_artifacts(hooks: Sequence[AdmissionHook]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for h in hooks:
        for name, t in h.artifacts().items():
            if name in out:
                raise InputError(f"admission hooks produce artifact {name!r} twice "
                                 f"(second time from hook {h.name!r})")
            out[name] = t.detach().to("cpu").contiguous()
    return out


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


# ------------------------------------------------------------------------------------------------
# admission

def state_method(state_dir) -> str | None:
    """Name of the method an existing state was created with (None when there is no state)."""
    store = _open_store(state_dir)
    if not store.exists():
        return None
    return (store.open().manifest.get("method") or {}).get("name")


def _resolve_method(method: str, options: dict | None, manifest: dict | None, state_dir
                    ) -> tuple[type[MergeMethod], Any]:
    """Method class + options object; checks against an existing state's manifest."""
    cls = get_method(method)
    given = dict(options or {})
    if manifest is None:
        return cls, build_options(cls, given)
    stored = manifest.get("method") or {}
    if stored.get("name") != cls.name:
        raise StateError(f"state {state_dir} was created with method {stored.get('name')!r}; "
                         f"cannot admit with {cls.name!r} (one state, one method)")
    stored_opts = dict(stored.get("options") or {})
    build_options(cls, given)  # unknown keys / invalid values -> InputError first
    for k, v in given.items():
        if k not in stored_opts:
            raise StateError(f"state {state_dir}: method option {k!r} was not recorded when the "
                             f"state was created (older method version); it cannot be set now")
        if _json_norm(v) != _json_norm(stored_opts[k]):
            raise StateError(f"state {state_dir}: method option {k}={v!r} differs from the "
                             f"state's {k}={stored_opts[k]!r}; options are fixed when the state "
                             f"is created (omit the option to use the state's value)")
    # Options stored by an older version of the method that no longer exist are dropped.
    fields = {f.name for f in dataclasses.fields(cls.options_cls)}
    return cls, build_options(cls, {k: v for k, v in stored_opts.items() if k in fields})


def admit(state_dir, base_dir, expert_dir, skill: str, instructions: Sequence[str] = (),
          description: str = "", method: str | None = "carve", options: dict | None = None,
          replace: bool = False, allow_pickle: bool = False, allow_dtype_mismatch: bool = False,
          dense_patterns: Sequence[str] = (), store_dtype: str | None = None,
          hooks: Sequence[AdmissionHook] = (), progress: bool = True, seed: int = 0) -> dict:
    """Admit one expert (full checkpoint or PEFT LoRA adapter) into the merge state ``state_dir``.

    The first admission creates the state with ``method`` + ``options`` (and ``store_dtype``,
    default float32); later ones must name the same method (``method=None``: the state's), and
    any option given again must equal the stored one. ``replace=True`` re-admits an existing skill (see the module docstring: the
    core keeps the old contribution). Returns a report dict: version, skill, t, method, storage
    (the store's accounting of the new version), tensors (summary of ranks/errors per kind),
    wall_s.

    Raises InputError (bad input: files, shapes, options, one-shot method) or StateError (method
    mismatch, base mismatch, duplicate skill) before anything is written.
    """
    t0 = time.perf_counter()
    _check_skill_name(skill)
    store_dtype = _check_store_dtype(store_dtype)
    instructions = [str(s) for s in instructions]
    dense_patterns = tuple(dense_patterns)

    # ---- validate everything before staging -------------------------------------------------
    store = _open_store(state_dir)
    parent = store.open() if store.exists() else None
    manifest = parent.manifest if parent is not None else None
    if method is None:  # the state's method, or CARVE for a new state
        method = ((manifest or {}).get("method") or {}).get("name") or "carve"
    method_cls, opts = _resolve_method(method, options, manifest, state_dir)
    if not method_cls.continual:
        raise InputError(f"method {method_cls.name!r} is one-shot: it merges all experts at once; "
                         f"use `carve merge --method {method_cls.name} ...` instead of admit")
    base = open_checkpoint(base_dir, allow_pickle=allow_pickle)
    brec = base_record(base)
    if manifest is not None:
        want = (manifest.get("base") or {}).get("fingerprint")
        if want != brec["fingerprint"]:
            raise StateError(f"base {base_dir} (fingerprint {brec['fingerprint'][:12]}) is not the "
                             f"base of state {state_dir} (fingerprint {str(want)[:12]}, recorded "
                             f"from {(manifest.get('base') or {}).get('path')})")
        stored_dtype = manifest.get("store_dtype", "float32")
        if store_dtype is not None and store_dtype != stored_dtype:
            raise StateError(f"state {state_dir} stores {stored_dtype}; cannot admit with "
                             f"store dtype {store_dtype}")
        store_dtype = stored_dtype
        existing = set(parent.skill_names())
        if skill in existing and not replace:
            raise StateError(f"skill {skill!r} is already in state {state_dir} (version "
                             f"{parent.version}); pass replace=True / --replace to re-admit it")
    else:
        store_dtype = store_dtype or "float32"
        existing = set()
    expert: ExpertSource = open_expert(expert_dir, base, allow_pickle=allow_pickle,
                                       allow_dtype_mismatch=allow_dtype_mismatch)
    meth = method_cls(opts, seed=seed)
    t = int((manifest or {}).get("admissions", 0)) + 1
    if manifest is not None and "admissions" not in manifest:
        t = max([int(parent.skill(s).get("order", 0)) for s in existing] + [0]) + 1

    # Earlier skills' residuals are only loaded for methods that re-fit them (drift compensation):
    # for the others they would cost memory for nothing.
    uses_residuals = bool(getattr(meth, "uses_residuals", False)
                          or getattr(opts, "drift_compensation", False))
    others = sorted(existing - {skill})
    old_res: dict[str, dict[str, ResidualEntry]] = {}
    if uses_residuals and parent is not None:
        old_res = {s: dict(parent.residuals(s)) for s in others}

    # ---- stream ------------------------------------------------------------------------------
    # lazy: one core tensor in memory at a time (the old core is as large as the new one)
    old_core = parent.core(lazy=True) if parent is not None else {}
    old_aux_flat = dict(parent.aux()) if parent is not None else {}
    old_aux: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in old_aux_flat.items():
        key, _, sub = name.rpartition(AUX_SEP)
        old_aux.setdefault(key, {})[sub] = tensor
    del old_aux_flat

    core_dtype = STORE_DTYPES[store_dtype]
    new_core: dict[str, torch.Tensor] = {}
    new_aux: dict[str, torch.Tensor] = {}
    entries: dict[str, ResidualEntry] = {}
    records: dict[str, dict] = {}
    updated: dict[str, dict[str, ResidualEntry]] = {}
    updated_info: dict[str, dict[str, dict]] = {}
    unchanged = 0
    keys = _float_keys(base)
    tdesc = f"admit {skill}"
    for key in _progress(keys, progress, tdesc, len(keys)):
        tau = expert.task_vector(key)
        if hooks:
            _run_hooks(hooks, base, key, tau)
        core = old_core.pop(key, None)  # pop: the old core tensor is freed once replaced
        aux = old_aux.pop(key, {})
        if _is_unchanged(tau):
            unchanged += 1
            if core is not None:
                new_core[key] = core
            for sub, a in aux.items():
                new_aux[f"{key}{AUX_SEP}{sub}"] = a
            continue
        ctx = tensor_context(key, base.shape(key), dense_patterns)
        state = TensorState(core=core.float() if core is not None else None, aux=aux,
                            residuals={s: r[key] for s, r in old_res.items() if key in r})
        res = meth.admit_tensor(ctx, tau, state, t, skill)
        del tau, state
        if res.core is not None:
            # cast to the storage dtype right away: the store would do it on write anyway, and a
            # bf16 state then holds its new core in half the memory of a float32 one
            new_core[key] = res.core.detach().to(core_dtype).contiguous()
        for sub, a in (res.aux or {}).items():
            new_aux[f"{key}{AUX_SEP}{sub}"] = a.detach().contiguous()
        if res.entry is not None:
            entries[key] = res.entry
            records[key] = entry_record(res.entry, ctx.shape, res.info)
        for s, e in (res.updated or {}).items():
            if s not in old_res:
                raise StateError(f"method {meth.name!r} re-fitted unknown skill {s!r} at {key!r}")
            updated.setdefault(s, {})[key] = e
            updated_info.setdefault(s, {})[key] = entry_record(e, ctx.shape)
    artifacts = _collect_artifacts(hooks)

    # ---- commit --------------------------------------------------------------------------------
    source = {"path": str(Path(expert_dir).resolve()), "kind": expert.kind,
              "fingerprint": expert.fingerprint()}
    record = {"name": skill, "order": t, "instructions": instructions,
              "description": str(description), "source": source,
              "admitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dense_patterns": list(dense_patterns), "tensors": records}
    message = f"{'re-admit' if skill in existing else 'admit'} {skill} ({meth.name}, t={t})"
    with store.transaction(message) as tx:
        m = tx.manifest
        if parent is None:
            m["base"] = brec
            m["method"] = {"name": meth.name, "options": _json_norm(meth.options_dict())}
            m["store_dtype"] = store_dtype
        m["admissions"] = t
        if skill in existing:
            tx.remove_skill(skill)
        tx.write_core(new_core)
        tx.write_aux(new_aux)
        tx.write_skill(skill, entries, record)
        if artifacts:
            tx.write_artifacts(skill, artifacts)
        for s, ups in updated.items():
            merged = dict(old_res[s])
            merged.update(ups)
            rec = json.loads(json.dumps(parent.skill(s)))
            rec.setdefault("tensors", {}).update(updated_info[s])
            rec["refit"] = {"by": skill, "t": t, "tensors": len(ups)}
            tx.write_skill(s, merged, rec)
            keep = parent.skill_artifacts(s)
            if keep:
                tx.write_artifacts(s, keep)
        version = tx.commit()
    snap = store.open(version)
    return {"version": version, "skill": skill, "t": t, "method": meth.name,
            "replaced": skill in existing, "storage": snap.manifest.get("storage", {}),
            "tensors": summarize_tensors(records, unchanged),
            "refit_skills": sorted(updated), "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# one-shot merge

def _implements(meth: MergeMethod, name: str) -> bool:
    return getattr(type(meth), name) is not getattr(MergeMethod, name)


def merge(method: str, base_dir, expert_dirs: Sequence, out_dir, options: dict | None = None,
          skills: Sequence[str] | None = None,
          instructions: Sequence[Sequence[str]] | dict | None = None,
          descriptions: Sequence[str] | dict | None = None, allow_pickle: bool = False,
          allow_dtype_mismatch: bool = False, dense_patterns: Sequence[str] = (),
          store_dtype: str | None = None, overwrite: bool = False, progress: bool = True,
          seed: int = 0, max_shard_bytes: int = 5 * 10**9) -> dict:
    """One-shot merge of N experts, streaming tensor by tensor.

    Every step reads one tensor from the base and from each expert (N + 1 tensors in RAM, float32).
    A method that implements ``merge_tensor`` is called once per tensor with all N task vectors
    (missing/None ones as zeros); a continual-only method has the experts admitted in the given
    order, per tensor. ``needs_observe_pass`` methods first get ``observe_tensor`` over every
    tensor (a second read of all experts).

    Output: ``per_skill`` methods write a merge state to ``out_dir`` (one version holding every
    skill; ``skills`` names them, default the expert directory names); others write a HF-layout
    checkpoint ``base + core`` (base dtype) with the base's non-weight files (config, tokenizer).
    Returns a report: out, kind ("state"|"checkpoint"), version (state only), method, wall_s.
    """
    t0 = time.perf_counter()
    expert_dirs = [Path(p) for p in expert_dirs]
    if not expert_dirs:
        raise InputError("merge needs at least one expert")
    names = list(skills) if skills else [p.name for p in expert_dirs]
    if len(names) != len(expert_dirs):
        raise InputError(f"{len(names)} skill name(s) for {len(expert_dirs)} expert(s)")
    if len(set(names)) != len(names):
        raise InputError(f"skill names must be unique, got {names}")
    for n in names:
        _check_skill_name(n)
    store_dtype = _check_store_dtype(store_dtype) or "float32"
    cls = get_method(method)
    meth = cls(build_options(cls, dict(options or {})), seed=seed)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite or meth.per_skill:
            raise InputError(f"output {out} already exists and is not empty"
                             + ("" if meth.per_skill else " (pass overwrite=True / --overwrite)"))

    def per_skill(value, what) -> list:
        if value is None:
            return [None] * len(names)
        if isinstance(value, dict):
            unknown = set(value) - set(names)
            if unknown:
                raise InputError(f"{what} given for unknown skill(s) {sorted(unknown)}")
            return [value.get(n) for n in names]
        value = list(value)
        if len(value) != len(names):
            raise InputError(f"{len(value)} {what} for {len(names)} expert(s)")
        return value

    instr = [list(x or []) for x in per_skill(instructions, "instruction lists")]
    descs = [str(x or "") for x in per_skill(descriptions, "descriptions")]

    base = open_checkpoint(base_dir, allow_pickle=allow_pickle)
    experts = [open_expert(p, base, allow_pickle=allow_pickle,
                           allow_dtype_mismatch=allow_dtype_mismatch) for p in expert_dirs]
    one_shot = _implements(meth, "merge_tensor")
    if not one_shot and not meth.continual:
        raise InputError(f"method {meth.name!r} implements neither merge_tensor nor admit_tensor")
    keys = _float_keys(base)
    n = len(experts)

    def taus_of(key):
        return [e.task_vector(key) for e in experts]

    if getattr(meth, "needs_observe_pass", False) and one_shot:
        for key in _progress(keys, progress, f"observe ({meth.name})", len(keys)):
            taus = taus_of(key)
            if all(_is_unchanged(x) for x in taus):
                continue
            zeros = torch.zeros(base.shape(key), dtype=torch.float32)
            meth.observe_tensor(tensor_context(key, base.shape(key), dense_patterns),
                                [x if x is not None else zeros for x in taus])

    core: dict[str, torch.Tensor] = {}
    aux: dict[str, torch.Tensor] = {}
    entries: list[dict[str, ResidualEntry]] = [{} for _ in range(n)]
    records: list[dict[str, dict]] = [{} for _ in range(n)]
    writer = None
    if not meth.per_skill:
        writer = CheckpointWriter(out, max_shard_bytes=max_shard_bytes, template_dir=Path(base_dir)
                                  if Path(base_dir).is_dir() else None, overwrite=overwrite,
                                  metadata={"carve_merge_method": meth.name})
    try:
        for key in _progress(base.keys(), progress, f"merge ({meth.name})", len(base.keys())):
            if key not in keys:  # integer buffers: copied through untouched
                if writer is not None:
                    writer.add(key, base.get(key))
                continue
            taus = taus_of(key)
            ctx = tensor_context(key, base.shape(key), dense_patterns)
            c = None
            if all(_is_unchanged(x) for x in taus):
                pass
            elif one_shot:
                zeros = torch.zeros(ctx.shape, dtype=torch.float32)
                res = meth.merge_tensor(ctx, [x if x is not None else zeros for x in taus])
                if len(res.entries) != n:
                    raise StateError(f"method {meth.name!r} returned {len(res.entries)} entries for "
                                     f"{n} experts at tensor {key!r}")
                c = res.core
                for i, e in enumerate(res.entries):
                    if e is not None:
                        entries[i][key] = e
                        records[i][key] = entry_record(e, ctx.shape, res.info)
            else:
                st = TensorState()
                for i, tau in enumerate(taus):
                    if _is_unchanged(tau):
                        continue
                    res = meth.admit_tensor(ctx, tau, st, i + 1, names[i])
                    if res.entry is not None:
                        entries[i][key] = res.entry
                        records[i][key] = entry_record(res.entry, ctx.shape, res.info)
                    for s, e in (res.updated or {}).items():
                        j = names.index(s)
                        entries[j][key] = e
                        records[j][key] = entry_record(e, ctx.shape)
                    st = TensorState(core=res.core, aux=res.aux,
                                     residuals={names[j]: entries[j][key] for j in range(n)
                                                if key in entries[j]})
                c = st.core
                for sub, a in st.aux.items():
                    aux[f"{key}{AUX_SEP}{sub}"] = a
            del taus
            if writer is not None:
                b = base.get(key)
                writer.add(key, b if c is None else (b.float() + c).to(b.dtype))
            elif c is not None:
                core[key] = c.detach().to(STORE_DTYPES[store_dtype]).contiguous()
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    report: dict[str, Any] = {"out": str(out), "method": meth.name, "experts": n,
                              "skills": names}
    if writer is not None:
        report.update(kind="checkpoint", wall_s=time.perf_counter() - t0)
        return report

    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # the store creates its own directory
    store = _open_store(out)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with store.transaction(f"merge {n} experts ({meth.name})") as tx:
        tx.manifest["base"] = base_record(base)
        tx.manifest["method"] = {"name": meth.name, "options": _json_norm(meth.options_dict())}
        tx.manifest["store_dtype"] = store_dtype
        tx.manifest["admissions"] = n
        tx.write_core(core)
        tx.write_aux(aux)
        for i, name in enumerate(names):
            e = experts[i]
            tx.write_skill(name, entries[i], {
                "name": name, "order": i + 1, "instructions": instr[i], "description": descs[i],
                "source": {"path": str(expert_dirs[i].resolve()), "kind": e.kind,
                           "fingerprint": e.fingerprint()},
                "admitted": now, "dense_patterns": list(dense_patterns), "tensors": records[i]})
        version = tx.commit()
    snap = store.open(version)
    report.update(kind="state", version=version, storage=snap.manifest.get("storage", {}),
                  tensors={nm: summarize_tensors(records[i]) for i, nm in enumerate(names)},
                  wall_s=time.perf_counter() - t0)
    return report

