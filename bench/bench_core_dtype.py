#!/usr/bin/env python
"""Rounding error of a bf16-stored CARVE core over a stream of admissions, against float64.

Writes a bf16 base (Qwen2-0.5B-shaped layer tensors: 896x896 attention, 4864x896 MLP, a 896
norm, all bf16) and N experts as ``bench_merge.py`` builds them (a shared low-rank update, a
per-expert one, sparse spikes), admits them one by one with the real ``admit`` into two states --
the default (core and factors in the parameter's dtype: bf16) and ``core_dtype="float32"`` --
and folds the same task vectors through ``CarveMethod`` in float64 with no rounding at all (the
reference; exact SVD everywhere). Prints, after every admission, the core's relative Frobenius
error against the reference, and at the end each skill's effective delta ``C_T + P_i Q_i``
against the reference's, relative to ``|tau_i|`` (beside the reference's own truncation error,
the error CARVE has by design) and the worst-case bound of docs/CARVE.md section 4.

Usage: ``python bench/bench_core_dtype.py [--experts 10] [--rank 64] [--json-out F]`` (about a
minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_merge import write_family  # noqa: E402
from policy_server.merge.methods.base import TensorState, fold_step  # noqa: E402
from policy_server.merge.methods.carve import CarveMethod, CarveOptions  # noqa: E402
from policy_server.merge.plan import tensor_context  # noqa: E402
from policy_server.state.admission import admit  # noqa: E402
from policy_server.state.store import StateStore  # noqa: E402
from policy_server.tensors.checkpoint import open_checkpoint  # noqa: E402

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (896, 896),
          "model.layers.0.mlp.up_proj.weight": (4864, 896),
          "model.layers.0.input_layernorm.weight": (896,)}
#: unit roundoff of bf16 round-to-nearest (8 significand bits)
U_BF16 = 2.0 ** -9


def _delta64(core: torch.Tensor, entry) -> torch.Tensor:
    """A skill's effective delta in float64 (``entry``: None, LowRank or Dense)."""
    if entry is None:
        return core.double()
    part = entry.P.double() @ entry.Q.double() if hasattr(entry, "P") else entry.D.double()
    return core.double() + part


def reference_stream(base_dir: Path, expert_dirs: list[Path], options: CarveOptions):
    """Fold every expert through CARVE in float64 (core, residual and SVD), nothing rounded.

    Returns (the core after each step [{key: f64}], every skill's final effective delta
    {skill: {key: f64}}, the task vectors {skill: {key: f64}})."""
    base = open_checkpoint(base_dir)
    experts = [open_checkpoint(d) for d in expert_dirs]
    names = [f"skill{i}" for i in range(len(experts))]
    meth = CarveMethod(options)
    cores: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    finals: dict[str, dict] = {s: {} for s in names}
    taus: dict[str, dict[str, torch.Tensor]] = {s: {} for s in names}
    for key in SHAPES:
        ctx = tensor_context(key, base.shape(key))
        state = TensorState()
        b = base.get(key).double()
        for i, (name, ex) in enumerate(zip(names, experts)):
            taus[name][key] = ex.get(key).double() - b
            _, state = fold_step(meth, ctx, taus[name][key], state, i + 1, name)
            cores[i][key] = state.core
        for name in names:
            finals[name][key] = _delta64(state.core, state.residuals.get(name))
    return cores, finals, taus


def rel(a: dict, b: dict) -> float:
    """|a - b|_F / |b|_F over every key of ``b`` (float64)."""
    return diff_over(a, b, b)


def diff_over(a: dict, b: dict, scale: dict) -> float:
    """|a - b|_F / |scale|_F over every key of ``b``."""
    num = sum(float((a[k].double() - b[k]).pow(2).sum()) for k in b)
    den = sum(float(scale[k].pow(2).sum()) for k in b)
    return math.sqrt(num / den) if den else 0.0


def state_deltas(state: Path) -> tuple[dict, dict]:
    """(core {key: f64}, {skill: {key: effective delta f64}}) of a state's current version."""
    snap = StateStore(state).open()
    core = {k: v.double() for k, v in snap.core().items()}
    out = {}
    for skill in snap.skill_names():
        res = snap.residuals(skill)
        out[skill] = {k: core[k] + (res[k].materialize().double() if k in res else 0.0)
                      for k in SHAPES}
    return core, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="carve-dtype-"))
    try:
        dirs = write_family(work, SHAPES, {"model_type": "qwen2"}, args.experts, torch.bfloat16,
                            shared_rank=16, task_rank=16, sparse=0.01)
        # exact SVD in both: a randomized sketch drawn in float64 differs from the float32 one,
        # which would measure the sketch, not the core's dtype
        opts = CarveOptions(rank=args.rank, svd="exact")
        cores_ref, finals_ref, taus = reference_stream(dirs[0], dirs[1:], opts)
        states = {"bf16 core": work / "s_bf16", "float32 core": work / "s_f32"}
        rows = []
        print(f"{args.experts} experts, rank {args.rank}, bf16 checkpoints; core error "
              f"|C_t - C_t(f64)| / |C_t(f64)| after each admission")
        print(f"{'t':>3} {'bf16 core':>11} {'float32 core':>13} {'bound u(t+1)/2':>15}")
        for t, edir in enumerate(dirs[1:], start=1):
            row = {"t": t}
            for name, st in states.items():
                admit(st, dirs[0], edir, f"skill{t - 1}",
                      options={"rank": args.rank, "svd": "exact"},
                      core_dtype="float32" if "float32" in name else None, keep=2,
                      progress=False)
                row[name] = rel(state_deltas(st)[0], cores_ref[t - 1])
            rows.append(row)
            print(f"{t:>3} {row['bf16 core']:11.2e} {row['float32 core']:13.2e} "
                  f"{U_BF16 * (t + 1) / 2:15.2e}")
        skills = {}
        print("\nper skill after the last admission: |delta - delta(f64)| / |tau| "
              "(effective delta C_T + P_i Q_i), and the f64 reference's own |delta - tau|/|tau|")
        for name, st in states.items():
            _, deltas = state_deltas(st)
            skills[name] = {s: diff_over(deltas[s], finals_ref[s], taus[s]) for s in deltas}
        trunc = {s: rel(finals_ref[s], taus[s]) for s in taus}
        print(f"{'skill':<8} {'bf16 core':>10} {'float32 core':>13} {'f64 truncation':>15}")
        for s in sorted(trunc, key=lambda x: int(x[5:])):
            print(f"{s:<8} {skills['bf16 core'][s]:10.2e} {skills['float32 core'][s]:13.2e} "
                  f"{trunc[s]:15.3f}")
        worst = max(skills["bf16 core"].values())
        print(f"\nworst skill, bf16 core: {worst:.2e} of |tau| (float32 core "
              f"{max(skills['float32 core'].values()):.2e}; both store bf16 factors); the "
              f"reference's truncation error is {min(trunc.values()):.3f}-"
              f"{max(trunc.values()):.3f}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(
                {"experts": args.experts, "rank": args.rank, "core_error": rows,
                 "skill_error": skills, "truncation": trunc}, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
