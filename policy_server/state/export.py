"""Export one skill of a merge state as a standalone checkpoint or as a PEFT LoRA adapter.

``format="full"``: a Hugging Face checkpoint of the skill's effective weights
``base + core + residual`` (``Masked`` entries: ``base + mask * core``), in the base's dtypes, with
the base's non-weight files (config, tokenizer, generation config) copied, written tensor by
tensor (the base is never loaded whole) and published atomically.

``format="peft"``: OUT/ holds

* ``adapter_config.json`` + ``adapter_model.safetensors``: the skill's ``LowRank`` residuals as
  LoRA, ``lora_A.weight = Q`` (r, in), ``lora_B.weight = P`` (out, r), float32, with ``r`` = the
  largest rank, ``rank_pattern`` for modules of other ranks and ``lora_alpha``/``alpha_pattern``
  equal to each module's rank so PEFT's ``scaling = alpha / r = 1``. Keys whose module name looks
  like an embedding (``embed``/``wte``/``wpe``) use PEFT's ``lora_embedding_A = P^T``
  (r, num_embeddings) / ``lora_embedding_B = Q^T`` (dim, r). Layout assumption: ``nn.Linear``
  weights are (out, in) (``fan_in_fan_out`` models such as GPT-2 ``Conv1D`` are not handled).
* ``base_with_core/``: the folded ``base + core`` checkpoint; ``base_model_name_or_path`` points
  to it (absolute path), so ``base_with_core + adapter`` is the skill.
* ``carve_export.json``: provenance (state, version, skill, how dense residuals were handled).

Dense residuals (1-D biases/norms, dense-pattern tensors, matrices too small to factor) cannot be
LoRA factors. ``dense=`` decides, before anything is written:

* ``"modules_to_save"`` (default): each is written as a full replacement tensor
  ``base_model.model.<key>`` = ``base + core + D`` (base dtype) and its module listed in
  ``modules_to_save``. PEFT loads only the saved parameters into its module copy, so the other
  parameters of that module keep their ``base_with_core`` values; ``base_with_core`` stays shared
  by every skill.
  A dense bias of a module that is LoRA-targeted is written as PEFT's ``lora_B.bias``
  (``lora_bias=true``) instead, since PEFT cannot wrap one module both ways.
* ``"fold"``: ``D`` is folded into ``base_with_core``, which then belongs to this skill only.
* ``"error"``: refuse, listing the tensors.

``Masked`` entries (TALL / MergeVLA masks) are not a residual added to ``base + core`` and are
refused for peft export (export ``full`` instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from policy_server.base_check import check_base
from policy_server.errors import InputError, StateError
from policy_server.progress import progress as progress_bar
from policy_server.state.store import StateStore
from policy_server.tensors.checkpoint import CheckpointWriter, open_checkpoint
from policy_server.tensors.durable import fsync_file
from policy_server.tensors.entries import Dense, LowRank, Masked, skill_delta

FORMATS = ("full", "peft")
DENSE_MODES = ("modules_to_save", "fold", "error")
_EMBED_RE = re.compile(r"(^|\.)(embed[^.]*|wte|wpe|word_embeddings|embeddings)$")
_PEFT_PREFIX = "base_model.model."


def _open_snapshot(state_dir, version, skill):
    store = StateStore(state_dir)
    if not store.exists():
        raise StateError(f"state {state_dir}: no merge state here (no CURRENT version)")
    snap = store.open(version)
    if skill not in snap.skill_names():
        raise StateError(f"state {state_dir} version {snap.version}: no skill {skill!r} "
                         f"(skills: {', '.join(snap.skill_names()) or 'none'})")
    return snap


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise InputError(f"output {out} already exists (pass overwrite=True / --overwrite)")


def _write_folded(base, core, out: Path, template, dense_extra: dict, progress: bool,
                  desc: str, max_shard_bytes: int, overwrite: bool, residuals=None,
                  metadata=None) -> None:
    """Stream ``base + core (+ residual entry) (+ dense_extra)`` per tensor into ``out``.

    residuals: {key: entry} applied with the runtime's rule (skill_delta); dense_extra: {key:
    float32 tensor} added on top (peft 'fold'). Non-floating tensors are copied through.
    """
    residuals = residuals or {}
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, template_dir=template,
                          overwrite=overwrite, metadata=metadata) as w:
        keys = base.keys()
        for key in progress_bar(keys, progress, desc, len(keys)):
            b = base.get(key)
            if not b.is_floating_point():
                w.add(key, b)
                continue
            c, e, x = core.get(key), residuals.get(key), dense_extra.get(key)
            if c is None and e is None and x is None:
                w.add(key, b)
                continue
            # float32 math, one rounding to the base dtype at the end (the runtime does the same)
            delta = skill_delta(c, e, tuple(b.shape))
            if x is not None:
                delta = delta + x.float()
            w.add(key, (b.float() + delta).to(b.dtype))


def export_skill(state_dir, skill: str, base_dir, out_dir, format: str = "full",
                 version: str | None = None, dense: str = "modules_to_save",
                 allow_pickle: bool = False, overwrite: bool = False, progress: bool = True,
                 max_shard_bytes: int = 5 * 10**9, allow_base_mismatch: bool = False) -> dict:
    """Export ``skill`` of the merge state (``version``, default current); see the module doc.

    Returns a report: out, format, version, skill, tensors (counts), wall_s. All checks (state,
    skill, base fingerprint, output path, entry kinds for peft) happen before anything is written;
    outputs are published atomically (a crash leaves no partial ``out_dir``). A base whose
    fingerprint is not the recorded one (or a state recording none) is a StateError unless
    ``allow_base_mismatch`` (CLI ``--allow-base-mismatch``), which logs a warning instead.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise InputError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    if dense not in DENSE_MODES:
        raise InputError(f"dense residual handling {dense!r}: expected one of "
                         f"{', '.join(DENSE_MODES)}")
    out = Path(out_dir)
    _check_out(out, overwrite)
    snap = _open_snapshot(state_dir, version, skill)
    base = open_checkpoint(base_dir, allow_pickle=allow_pickle)
    check_base(snap.manifest, base.fingerprint(), base_dir,
               f"state {state_dir} version {snap.version}", allow_mismatch=allow_base_mismatch)
    template = Path(base_dir) if Path(base_dir).is_dir() else None
    core = snap.core()
    residuals = snap.residuals(skill)
    for key, e in residuals.items():
        if key not in base:
            raise StateError(f"state {state_dir}: skill {skill!r} has an entry for {key!r}, which "
                             f"is not in base {base_dir}")
    meta = {"carve_state_version": str(snap.version), "carve_skill": skill}
    if format == "full":
        _write_folded(base, core, out, template, {}, progress, f"export {skill}",
                      max_shard_bytes, overwrite, residuals=residuals, metadata=meta)
        kinds: dict[str, int] = {}
        for e in residuals.values():
            kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
        return {"out": str(out), "format": "full", "version": snap.version, "skill": skill,
                "entries": kinds, "wall_s": time.perf_counter() - t0}
    return _export_peft(snap, skill, base, core, residuals, out, template, dense, overwrite,
                        progress, max_shard_bytes, state_dir, meta, t0)


def _peft_entries(skill: str, base, residuals: dict, dense: str) -> tuple[dict, dict]:
    """The skill's LoRA-able (low-rank) and dense entries; InputError when peft cannot express
    the skill (masks, low-rank entries without a LoRA module, dense entries with dense='error',
    nothing low-rank at all)."""
    masked = sorted(k for k, e in residuals.items() if isinstance(e, Masked))
    if masked:
        raise InputError(f"skill {skill!r} has masked entries (e.g. {masked[0]!r}; {len(masked)} "
                         f"in all): a task mask multiplies the core and is not a LoRA residual; "
                         f"use --format full")
    lowrank = {k: e for k, e in residuals.items() if isinstance(e, LowRank) and e.rank > 0}
    dense_e = {k: e for k, e in residuals.items() if isinstance(e, Dense)}
    for k in lowrank:
        if not k.endswith(".weight") or len(base.shape(k)) != 2:
            raise InputError(f"skill {skill!r}: low-rank entry {k!r} is not a 2-D '.weight' "
                             f"tensor, so it has no LoRA module; use --format full")
    if dense_e and dense == "error":
        ks = sorted(dense_e)
        raise InputError(f"skill {skill!r} has {len(ks)} dense residual(s) that are not LoRA "
                         f"factors (e.g. {ks[:3]}); pass dense='modules_to_save' or 'fold' "
                         f"(CLI --dense modules_to_save|fold), or use --format full")
    if not lowrank and not (dense_e and dense == "modules_to_save"):
        raise InputError(f"skill {skill!r} has no low-rank residuals to export as LoRA "
                         f"(it runs as base + core{' + dense residuals' if dense_e else ''}); "
                         f"use --format full")
    return lowrank, dense_e


def _adapter_tensors(base, core, lowrank: dict, dense_e: dict, dense: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int], bool, set[str]]:
    """PEFT adapter state dict -> (tensors, {module: rank}, lora_bias used, modules_to_save)."""
    sd: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for k in sorted(lowrank):
        e = lowrank[k]
        mod = k[: -len(".weight")]
        ranks[mod] = e.rank
        P, Q = e.P.float().contiguous(), e.Q.float().contiguous()
        if _EMBED_RE.search(mod):
            # PEFT embedding LoRA: delta = (B @ A)^T with A (r, vocab), B (dim, r)
            sd[f"{_PEFT_PREFIX}{mod}.lora_embedding_A"] = P.T.contiguous()
            sd[f"{_PEFT_PREFIX}{mod}.lora_embedding_B"] = Q.T.contiguous()
        else:
            sd[f"{_PEFT_PREFIX}{mod}.lora_A.weight"] = Q
            sd[f"{_PEFT_PREFIX}{mod}.lora_B.weight"] = P
    # A dense bias residual of a LoRA-targeted Linear is exactly PEFT's ``lora_bias``
    # (``lora_B.bias``, added times scaling = 1 to the base bias); it must not go through
    # modules_to_save, since PEFT cannot wrap one module both ways.
    lora_bias = {} if dense != "modules_to_save" else {
        k[: -len(".bias")]: e.D for k, e in dense_e.items()
        if k.endswith(".bias") and k[: -len(".bias")] in ranks
        and not _EMBED_RE.search(k[: -len(".bias")])}
    for mod, D in lora_bias.items():
        sd[f"{_PEFT_PREFIX}{mod}.lora_B.bias"] = D.float().contiguous()
    saved_modules: set[str] = set()
    if dense == "modules_to_save":
        for k in sorted(dense_e):
            if k.endswith(".bias") and k[: -len(".bias")] in lora_bias:
                continue
            b = base.get(k)
            full = skill_delta(core.get(k), dense_e[k], tuple(b.shape))
            sd[f"{_PEFT_PREFIX}{k}"] = (b.float() + full).to(b.dtype).contiguous()
            saved_modules.add(k.rsplit(".", 1)[0])
    return sd, ranks, bool(lora_bias), saved_modules


def _adapter_config(final_base: Path, ranks: dict[str, int], lora_bias: bool,
                    saved_modules: set[str]) -> dict:
    """adapter_config.json: r = the largest rank, alpha = r per module, so PEFT's scaling is 1."""
    r = max(ranks.values()) if ranks else 1
    pattern = {m: rk for m, rk in ranks.items() if rk != r}
    return {
        "peft_type": "LORA", "task_type": None,
        "base_model_name_or_path": str(final_base),
        "r": r, "lora_alpha": r,  # alpha = r (and alpha_pattern = rank_pattern): scaling 1
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "lora_bias": lora_bias,
        "modules_to_save": sorted(saved_modules) or None,
    }


def _export_peft(snap, skill, base, core, residuals, out: Path, template, dense, overwrite,
                 progress, max_shard_bytes, state_dir, meta, t0) -> dict:
    lowrank, dense_e = _peft_entries(skill, base, residuals, dense)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fold = {k: e.D for k, e in dense_e.items()} if dense == "fold" else {}
        _write_folded(base, core, staging / "base_with_core", template, fold, progress,
                      f"base+core ({skill})" if fold else "base+core", max_shard_bytes, False,
                      metadata=meta)
        sd, ranks, lora_bias, saved_modules = _adapter_tensors(base, core, lowrank, dense_e, dense)
        from safetensors.torch import save_file

        save_file(sd, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = _adapter_config(out.resolve() / "base_with_core", ranks, lora_bias, saved_modules)
        (staging / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        info = {"state": str(Path(state_dir).resolve()), "version": snap.version, "skill": skill,
                "dense": dense, "lowrank_modules": len(ranks),
                "dense_tensors": sorted(dense_e), "base_with_core_is_shared": not fold,
                "skill_record": snap.skill(skill)}
        (staging / "carve_export.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        for f in (staging / "adapter_model.safetensors", staging / "adapter_config.json"):
            fsync_file(f)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out": str(out), "format": "peft", "version": snap.version, "skill": skill,
            "lora_modules": len(ranks), "r": cfg["r"],
            "dense": {"mode": dense, "tensors": len(dense_e)},
            "wall_s": time.perf_counter() - t0}
