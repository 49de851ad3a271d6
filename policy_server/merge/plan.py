"""Validation and planning of a merge, before any tensor is streamed or any byte is written.

Everything that can be checked from headers and the manifest (skill names, store dtype, method and
options, base fingerprint, duplicate skill, the admission index ``t``) is checked here, so bad input
leaves a state directory untouched byte for byte. This module sees a state only as its manifest
(a dict): opening and committing a state is the state package's job.

Conventions shared with the runtime (docs/ARCHITECTURE.md):

* 1-D tensors, tensors that are not 2-D, and keys matching ``dense_patterns`` (fnmatch globs) get
  ``TensorContext.dense=True``: methods must not compress them to low rank.
* Non-floating tensors (integer buffers) are never merged.
* ``t`` (the admission index handed to continual methods) is ``manifest["admissions"] + 1``: it
  counts admissions, including re-admissions, and never decreases.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policy_server.base_check import check_base
from policy_server.dtypes import PARAM_DTYPE, check_store_dtype_spec, dtype_name, state_dtypes
from policy_server.errors import InputError, StateError
from policy_server.merge.hooks import AdmissionHook
from policy_server.merge.methods.base import (
    MergeMethod,
    TensorContext,
    build_options,
    get_method,
)
from policy_server.naming import check_skill_name
from policy_server.tensors.checkpoint import CheckpointReader

#: flat aux keys are ``"<tensor>::<aux key>"``
AUX_SEP = "::"


def json_norm(obj: Any) -> Any:
    """JSON round trip, so options compare the same way they were stored (tuples -> lists)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def check_store_dtype(store_dtype: str | torch.dtype | None, field: str = "store dtype"
                      ) -> str | None:
    """The store dtype's manifest name (``"bfloat16"``, or ``"param"``: each tensor in its base
    parameter's dtype), None when not given; InputError else."""
    return check_store_dtype_spec(store_dtype, field)


def base_record(base: CheckpointReader) -> dict:
    """The manifest's ``base`` entry: fingerprint, parameter count, main dtype, tensor table,
    bytes of its weight files on disk and of its tensors' data."""
    tensors = {k: {"shape": list(base.shape(k)), "dtype": dtype_name(base.dtype(k))}
               for k in base.keys()}
    counts: dict[str, int] = {}
    for k in base.keys():
        name = dtype_name(base.dtype(k))
        counts[name] = counts.get(name, 0) + math.prod(base.shape(k))
    main = max(counts, key=counts.get) if counts else "float32"
    return {"fingerprint": base.fingerprint(), "num_params": base.num_params(), "dtype": main,
            "path": str(Path(base.path).resolve()), "tensors": tensors,
            "file_bytes": base.file_bytes(), "tensor_bytes": base.tensor_bytes()}


def tensor_context(key: str, shape: Sequence[int], dense_patterns: Sequence[str] = (),
                   core_dtype: torch.dtype | None = None) -> TensorContext:
    """Context for one tensor: dense when not 2-D or matching a ``dense_patterns`` glob;
    ``core_dtype`` is the dtype its core will be stored in (None: not stored, e.g. a checkpoint)."""
    dense = len(shape) != 2 or any(fnmatch.fnmatchcase(key, p) for p in dense_patterns)
    return TensorContext(name=key, shape=tuple(int(s) for s in shape), dense=dense,
                         core_dtype=core_dtype)


def float_keys(base: CheckpointReader) -> list[str]:
    """The base's floating tensor keys, sorted: the only tensors a merge touches."""
    return [k for k in base.keys() if base.dtype(k).is_floating_point]


def is_unchanged(tau: torch.Tensor | None) -> bool:
    """True when a task vector says nothing (None or all zero): the method is not called."""
    return tau is None or not bool(torch.any(tau != 0))


def resolve_method(method: str, options: dict | None, manifest: dict | None, state_desc: str
                   ) -> tuple[type[MergeMethod], Any]:
    """Method class + options object; checked against an existing state's manifest.

    A new state (``manifest=None``) takes ``options`` as given. An existing one fixes its method
    and options: another method is a StateError, an option given again must equal the stored one.
    """
    cls = get_method(method)
    given = dict(options or {})
    if manifest is None:
        return cls, build_options(cls, given)
    stored = manifest.get("method") or {}
    if stored.get("name") != cls.name:
        raise StateError(f"state {state_desc} was created with method {stored.get('name')!r}; "
                         f"cannot admit with {cls.name!r} (one state, one method)")
    stored_opts = dict(stored.get("options") or {})
    build_options(cls, given)  # unknown keys / invalid values -> InputError first
    for k, v in given.items():
        if k not in stored_opts:
            raise StateError(f"state {state_desc}: method option {k!r} was not recorded when the "
                             f"state was created (older method version); it cannot be set now")
        if json_norm(v) != json_norm(stored_opts[k]):
            raise StateError(f"state {state_desc}: method option {k}={v!r} differs from the "
                             f"state's {k}={stored_opts[k]!r}; options are fixed when the state "
                             f"is created (omit the option to use the state's value)")
    # Options stored by an older version of the method that no longer exist are dropped.
    fields = {f.name for f in dataclasses.fields(cls.options_cls)}
    return cls, build_options(cls, {k: v for k, v in stored_opts.items() if k in fields})


def method_record(meth: MergeMethod) -> dict:
    """The manifest's ``method`` entry: name and JSON-normalised options."""
    return {"name": meth.name, "options": json_norm(meth.options_dict())}


@dataclass(frozen=True)
class AdmitRequest:
    """Everything one admission takes (``policy_server.state.admission.admit`` documents each
    field); plain data, so it is planned here and committed by the state package."""

    state_dir: str | Path
    base_dir: str | Path
    expert_dir: str | Path
    skill: str
    instructions: Sequence[str] = ()
    description: str = ""
    method: str | None = "carve"
    options: dict | None = None
    replace: bool = False
    allow_pickle: bool = False
    allow_dtype_mismatch: bool = False
    allow_base_mismatch: bool = False
    dense_patterns: Sequence[str] = ()
    store_dtype: str | None = None
    core_dtype: str | None = None
    keep: int | None = None
    hooks: Sequence[AdmissionHook] = ()
    progress: bool = True
    seed: int = 0


@dataclass(frozen=True)
class AdmissionPlan:
    """What one admission will do, decided before streaming.

    method: the instantiated method; t: its admission index; store_dtype / core_dtype: the
    state's residual and core dtype specs (``"param"`` or a dtype name); existing: skill names
    already in the state; replacing: the skill is re-admitted; base: the manifest ``base`` entry
    of the base checkpoint.
    """

    method: MergeMethod
    t: int
    store_dtype: str
    core_dtype: str
    existing: frozenset[str]
    replacing: bool
    base: dict


def _admission_index(manifest: dict | None) -> int:
    if manifest is None:
        return 1
    if "admissions" in manifest:
        return int(manifest["admissions"]) + 1
    # states written before the counter existed: one past the highest admission order
    return max([int(s.get("order", 0)) for s in manifest.get("skills", [])] + [0]) + 1


def plan_admission(req: AdmitRequest, manifest: dict | None, base: CheckpointReader
                   ) -> AdmissionPlan:
    """Validate the admission ``req`` against the state's ``manifest`` (None: a new state).

    Raises InputError (bad name, dtype, options, a one-shot method) or StateError (method or
    option mismatch, base mismatch, store dtype mismatch, duplicate skill without ``replace``).
    """
    skill, state_desc = req.skill, str(req.state_dir)
    check_skill_name(skill)
    check_keep(req.keep)
    store_dtype = check_store_dtype(req.store_dtype)
    core_dtype = check_store_dtype(req.core_dtype, "core dtype")
    method = req.method
    if method is None:  # the state's method, or CARVE for a new state
        method = ((manifest or {}).get("method") or {}).get("name") or "carve"
    method_cls, opts = resolve_method(method, req.options, manifest, state_desc)
    if not method_cls.continual:
        raise InputError(f"method {method_cls.name!r} is one-shot: it merges all experts at once; "
                         f"use `carve merge --method {method_cls.name} ...` instead of admit")
    brec = base_record(base)
    existing: set[str] = set()
    if manifest is not None:
        check_base(manifest, brec["fingerprint"], base.path, f"state {state_desc}",
                   allow_mismatch=req.allow_base_mismatch)
        store_dtype, core_dtype = (_fixed_dtype(state_desc, what, given, stored)
                                   for what, given, stored in
                                   zip(("store dtype", "core dtype"), (store_dtype, core_dtype),
                                       state_dtypes(manifest)))
        existing = {s["name"] for s in manifest.get("skills", [])}
        if skill in existing and not req.replace:
            raise StateError(f"skill {skill!r} is already in state {state_desc} (version "
                             f"{manifest.get('version')}); pass replace=True / --replace to "
                             f"re-admit it")
    return AdmissionPlan(method=method_cls(opts, seed=req.seed), t=_admission_index(manifest),
                         store_dtype=store_dtype or PARAM_DTYPE,
                         core_dtype=core_dtype or PARAM_DTYPE, existing=frozenset(existing),
                         replacing=skill in existing, base=brec)


def check_keep(keep: int | None) -> None:
    """Retention of an admission: None (the default), 0 (keep every version) or an int >= 2 (the
    current version and its parent at least, so a rollback always has somewhere to go)."""
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0 or keep == 1:
        raise InputError(f"--keep {keep!r}: use 0 (keep every version) or an integer >= 2 "
                         f"(the current version and its parent at least, so rollback works)")


def _fixed_dtype(state_desc: str, what: str, given: str | None, stored: str) -> str:
    """A state's dtype is fixed at creation: a different one given again is a StateError."""
    if given is not None and given != stored:
        raise StateError(f"state {state_desc} stores {what} {stored}; cannot admit with "
                         f"{what} {given} (fixed when the state was created)")
    return stored


def merge_skill_names(expert_dirs: Sequence[Path], skills: Sequence[str] | None) -> list[str]:
    """The skill name of each expert of a one-shot merge (default: the directory names)."""
    if not expert_dirs:
        raise InputError("merge needs at least one expert")
    names = list(skills) if skills else [Path(p).name for p in expert_dirs]
    if len(names) != len(expert_dirs):
        raise InputError(f"{len(names)} skill name(s) for {len(expert_dirs)} expert(s)")
    if len(set(names)) != len(names):
        raise InputError(f"skill names must be unique, got {names}")
    for n in names:
        check_skill_name(n)
    return names


def per_skill_values(value, names: Sequence[str], what: str) -> list:
    """One value per skill from None, a {skill: value} dict or a list in expert order."""
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
