#!/usr/bin/env python
"""Reload benchmark: the transient peak memory of a live version switch (``carve serve --follow``
or the admin ``Reload`` RPC), rebuilt beside serving vs the former whole second engine.

For each model a child process serves the state's previous version (one forward done, one
episode pinned to it, as a robot mid-episode would), resets its peak RSS
(``/proc/self/clear_refs``), switches to the last version and prints resident memory before, the
peak during the switch, after it (the pinned episode still holding the old engine) and after the
pin is released. Two ways of switching, each in its own fresh child:

* ``rebuild``: what ``Reloader.reload`` does now (``serving.rebuild_engine``: base + core rebuilt
  tensor by tensor from the base checkpoint, unchanged tensors shared with the served engine);
* ``whole``: the former path, a whole second engine (``serving.build_engine``: backend loaded
  again, whole core loaded, folded, cast).

Models:

* ``demo``: the cached demo state (``carve serve --demo``: float32, 0.9 M parameters);
* ``0.5b``: a demo VLA at Qwen2-0.5B widths (hidden 896, MLP 4864, 14 heads, a 151936 x 896
  text embedding, 26 action blocks: 0.49 B parameters), bf16 checkpoint, served in bfloat16,
  with two CARVE admissions (rank 8) of random experts: ``full`` (every tensor fine-tuned) and
  ``frozen-embed`` (the text embedding left frozen, as adapter fine-tunes leave it). Built once
  into ``--work`` (about 2 GB per variant; minutes on 2 cores).

Usage: ``nice python bench/bench_reload.py [--models demo,0.5b-full] [--work DIR] [--threads 2]``
(on the shared 2-core host building a 0.5B family took 5-32 min with the load of other jobs,
its measurement 2-7 min; ``0.5b`` measures both variants),
or ``--state DIR --base DIR`` for a state of your own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

QWEN_WIDTHS = dict(hidden_dim=896, mlp_dim=4864, num_heads=14, num_expert_blocks=26,
                   vocab_size=151936, text_dim=896, chunk_length=8, action_dim=7, state_dim=8)


def _kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))


def _weight_bytes(engine) -> int:
    module = engine.runtime.backend.module
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# ---- the child: one switch, measured ------------------------------------------------------------

def child(args) -> None:
    import gc

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from policy_server.models.base import ObservationBatch
    from policy_server.service.metrics import NO_METRICS
    from policy_server.service.reload import Reloader
    from policy_server.service.servicer import EngineHolder
    from policy_server.serving import EngineConfig, StateSource, build_engine
    from policy_server.state.store import StateStore
    from policy_server.tensors.memory import pin_mmap_threshold

    pin_mmap_threshold()  # both ways alike: freed buffers go back to the OS (RSS is comparable)
    versions = [v["id"] for v in StateStore(args.state).versions()]
    if len(versions) < 2:
        raise SystemExit(f"{args.state}: needs two versions to switch between")
    old_v, new_v = versions[-2], versions[-1]
    cfg = EngineConfig(base_dir=str(args.base), state_dir=str(args.state), state_version=old_v,
                       router="exact", dtype=args.dtype)
    holder = EngineHolder()
    holder.swap(build_engine(cfg))
    spec = holder.engine.spec
    obs = ObservationBatch(state=np.zeros((1, spec.state_dim), np.float32), instructions=[""],
                           images={k: np.zeros((1, s.height, s.width, 3), np.uint8)
                                   for k, s in spec.images.items()})
    skill = holder.engine.runtime.skill_names[0]
    holder.engine.infer(obs, skill)  # a served, warmed engine (skill merged in the fused mode)
    weights = _weight_bytes(holder.engine)
    gc.collect()
    pin = holder.pinned()
    pinned = pin.__enter__()  # a robot mid-episode on the old version
    before = _kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    if args.approach == "rebuild":
        Reloader(holder, StateSource(cfg), NO_METRICS).reload(new_v)
    else:  # the former path: a whole second engine, then the same swap
        holder.swap(StateSource(cfg).build(new_v))
    wall = time.perf_counter() - t0
    peak = _kb("VmHWM")
    holder.engine.infer(obs, skill)
    after = _kb("VmRSS")
    report = getattr(holder.engine, "refold_report", None)
    pinned.infer(obs, skill)  # the pinned episode still runs on the old version
    pin.__exit__(None, None, None)
    del pinned
    gc.collect()
    released = _kb("VmRSS")
    out = {"switch": f"{old_v} -> {new_v}", "approach": args.approach,
           "weights_mib": weights / 2**20, "before": before / 1024, "peak": peak / 1024,
           "after": after / 1024, "released": released / 1024, "wall_s": wall,
           "rebuilt_mib": report.rebuilt_bytes / 2**20 if report else None,
           "shared_mib": report.shared_bytes / 2**20 if report else None,
           "base_read_mib": report.base_bytes_read / 2**20 if report else None}
    holder.close()
    print("RESULT " + json.dumps(out), flush=True)


# ---- building the 0.5B-shaped family ------------------------------------------------------------

def _random_tensor(key: str, shape, gen):
    import torch

    if key.split(".")[-1] == "weight" and len(shape) == 1:  # LayerNorm scales
        return torch.ones(shape)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return torch.randn(shape, generator=gen) * (0.02 if len(shape) == 1 else 1 / math.sqrt(fan_in))


def build_family(work: Path, variant: str) -> tuple[Path, Path]:
    """base (bf16) + a state with two admissions for ``variant`` ("full" | "frozen-embed");
    cached in ``work``."""
    import torch

    from policy_server.models.demo_vla import DemoVLAConfig, DemoVLAModule
    from policy_server.state.admission import admit
    from policy_server.tensors.checkpoint import CheckpointWriter, open_checkpoint

    torch.set_num_threads(2)
    cfg = DemoVLAConfig(name="demo-vla-qwen0.5b", action_low=[-1.0] * 7, action_high=[1.0] * 7,
                        **QWEN_WIDTHS)
    base = work / "base"
    if not (base / "model.safetensors").is_file():
        with torch.device("meta"):
            shapes = {k: tuple(t.shape) for k, t in DemoVLAModule(cfg).state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        with CheckpointWriter(base, max_shard_bytes=10**12, overwrite=True) as w:
            for key in sorted(shapes):
                w.add(key, _random_tensor(key, shapes[key], gen).to(torch.bfloat16), owned=True)
        (base / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=1) + "\n")
    state = work / f"state-{variant}"
    if (state / "CURRENT").is_file():
        return base, state
    frozen = ("text_embed.",) if variant == "frozen-embed" else ()
    for i, name in enumerate(("pick", "place")):
        expert = work / f"expert-{variant}-{name}"
        if not (expert / "model.safetensors").is_file():
            gen = torch.Generator().manual_seed(100 + i)
            with open_checkpoint(base) as reader, \
                    CheckpointWriter(expert, max_shard_bytes=10**12, overwrite=True) as w:
                for key in reader.keys():
                    t = reader.get(key).float()
                    if not key.startswith(frozen):
                        # a fine-tune: a rank-4 update plus small dense noise on every matrix
                        if t.dim() == 2:
                            r = 4
                            a = torch.randn(t.shape[0], r, generator=gen) * 0.02
                            b = torch.randn(r, t.shape[1], generator=gen) * 0.02
                            t += a @ b + torch.randn(t.shape, generator=gen) * 1e-3
                        else:
                            t += torch.randn(t.shape, generator=gen) * 1e-3
                    w.add(key, t.to(torch.bfloat16), owned=True)
            (expert / "config.json").write_text((base / "config.json").read_text())
        t0 = time.perf_counter()
        admit(state, base, expert, name, instructions=[f"{name} the object"], method="carve",
              options={"rank": 8}, progress=False, keep=2)
        print(f"  admitted {name} into {state.name} in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return base, state


# ---- the parent ---------------------------------------------------------------------------------

def run_child(args, state, base, approach: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--state", str(state), "--base", str(base),
           "--approach", approach, "--threads", str(args.threads), "--dtype", dtype]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def report(label: str, rows: list[dict]) -> None:
    print(f"\n{label}: served weights {rows[0]['weights_mib']:.1f} MiB, switch "
          f"{rows[0]['switch']}")
    print(f"{'approach':<9} {'RSS before':>11} {'peak':>9} {'peak-before':>12} {'after':>9} "
          f"{'released':>9} {'wall s':>7}  rebuilt / shared / base read (MiB)")
    for r in rows:
        extra = (f"{r['rebuilt_mib']:.1f} / {r['shared_mib']:.1f} / {r['base_read_mib']:.1f}"
                 if r["rebuilt_mib"] is not None else "(whole engine)")
        print(f"{r['approach']:<9} {r['before']:>9.1f}Mi {r['peak']:>7.1f}Mi "
              f"{r['peak'] - r['before']:>+10.1f}Mi {r['after']:>7.1f}Mi {r['released']:>7.1f}Mi "
              f"{r['wall_s']:>7.2f}  {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state")
    ap.add_argument("--base")
    ap.add_argument("--models", default="demo,0.5b-full",
                    help="comma list of demo, 0.5b-full, 0.5b-frozen-embed, 0.5b (both variants)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "carve-serve" / "bench-reload"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--approaches", default="rebuild,whole")
    ap.add_argument("--dtype", default=None, help="served dtype (default: float32 demo, "
                                                  "bfloat16 0.5B)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--approach", default="rebuild", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    approaches = args.approaches.split(",")
    targets: list[tuple[str, Path, Path, str]] = []
    if args.state:
        targets.append((f"state {args.state}", Path(args.state), Path(args.base),
                        args.dtype or "float32"))
    else:
        models = args.models.split(",")
        if "demo" in models:
            from policy_server.demo import ensure_demo_state

            d = ensure_demo_state(progress=False, log=lambda *_: None)
            targets.append(("demo model (carve serve --demo, float32)", Path(d["state_dir"]),
                            Path(d["base_dir"]), args.dtype or "float32"))
        variants = [v for v in ("full", "frozen-embed")
                    if "0.5b" in models or f"0.5b-{v}" in models]
        for v in variants:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
            base, state = build_family(work, v)
            targets.append((f"0.5B-shaped demo VLA, {v} experts (bf16 served)", state, base,
                            args.dtype or "bfloat16"))
    print(f"threads {args.threads}; each row a fresh child process; peak = VmHWM during the "
          "switch (reset just before it); after = with the pinned episode still on the old "
          "version; released = after its last pin is gone")
    for label, state, base, dtype in targets:
        report(label, [run_child(args, state, base, a, dtype) for a in approaches])


if __name__ == "__main__":
    main()
