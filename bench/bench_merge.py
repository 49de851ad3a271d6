#!/usr/bin/env python
"""Merge benchmark: CARVE admission of 4 experts into a Qwen2-0.5B-shaped model.

Builds a random-weight base checkpoint with the tensor shapes of transformers' ``Qwen2Config`` for
Qwen2-0.5B (``--small``: a 4-layer, hidden-256 model for a quick run), and N experts as perturbed
copies: per matrix a shared low-rank update (common to all experts, so CARVE's core has something
to share), a per-expert low-rank update and a sparse update; small dense noise on 1-D tensors.
Then it admits the experts one by one with ``carve admit`` in a subprocess and prints:

* admission wall time per expert;
* peak RSS of each admission (the child's VmHWM, minus the bare interpreter's) relative to
  one checkpoint's size on disk: streaming admission should stay near ``state + a few tensors``;
* storage of the state as a fraction of the expert bank after each admission;
* exact (``torch.linalg.svd``) vs randomized (``torch.svd_lowrank``) truncated-SVD time and
  relative error on matrices of the model's shapes.

``--oneshot``: instead, one-shot TIES merges (``carve merge``) of the first N experts for each N of
``--experts`` (e.g. ``--experts 2 4``), each in a child process, printing peak RSS per N; with
``--mergekit PYTHON`` (a venv's interpreter where mergekit is installed, beside the project, for
the benchmark only) mergekit's ``mergekit-yaml`` runs the equivalent TIES merge (sign by mass,
normalised mean, lambda 1, same density) on the same checkpoints, side by side.

Usage: ``python bench/bench_merge.py --small`` (seconds to a minute) or
``python bench/bench_merge.py`` (Qwen2-0.5B shapes, ~2 GB per bf16 checkpoint on disk: minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policy_server.dtypes import DTYPE_NAMES, STORE_DTYPE_NAMES  # noqa: E402
from policy_server.progress import progress  # noqa: E402
from policy_server.tensors.checkpoint import CheckpointWriter  # noqa: E402
from policy_server.merge.lowrank import truncated_svd  # noqa: E402
from policy_server.state.store import StateStore  # noqa: E402

# `carve` run by this interpreter (no dependence on the console script being on PATH), reporting the process's own peak RSS (VmHWM of its post-exec address space) on stderr.
# ru_maxrss from wait4 is not usable: Linux carries the forked parent's high-water mark across
# exec, so every child would report at least this (large) benchmark process's RSS.
HWM_CMD = [sys.executable, "-c",
           "import sys\n"
           "from policy_server.cli import main\n"
           "rc = main(sys.argv[1:])\n"
           "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
           "print('BENCH_' + hwm[0].strip(), file=sys.stderr)\n"
           "sys.exit(rc)"]

CONFIGS = {
    # Qwen2-0.5B (Qwen/Qwen2-0.5B config.json)
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=32768, tie_word_embeddings=True),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True),
}


def model_shapes(cfg_kwargs: dict) -> tuple[dict[str, tuple[int, ...]], dict]:
    """State-dict shapes of a Qwen2ForCausalLM built on the meta device (no memory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**cfg_kwargs)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # save_pretrained drops the tied copy as well
    # mergekit (--oneshot --mergekit) picks its architecture definition from this field
    return {k: tuple(v.shape) for k, v in sd.items()}, {**cfg.to_dict(),
                                                        "architectures": ["Qwen2ForCausalLM"]}


def _rand(shape, gen, scale):
    return torch.randn(shape, generator=gen) * scale


def write_family(work: Path, shapes: dict, cfg: dict, n_experts: int, dtype: torch.dtype,
                 shared_rank: int, task_rank: int, sparse: float, seed: int = 0) -> list[Path]:
    """Write base/ and expert{i}/ checkpoints, streaming tensor by tensor (one tensor + its
    N perturbations in RAM)."""
    dirs = [work / "base"] + [work / f"expert{i}" for i in range(n_experts)]
    cfg_dir = work / "_cfg"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    writers = [CheckpointWriter(d, max_shard_bytes=1 << 30, template_dir=cfg_dir, overwrite=True)
               for d in dirs]
    g = torch.Generator().manual_seed(seed)
    try:
        for key in progress(sorted(shapes), True, "write checkpoints", len(shapes)):
            shape = shapes[key]
            fan = shape[-1] if len(shape) > 1 else 1
            w = _rand(shape, g, 1.0 / math.sqrt(fan)) if len(shape) > 1 else 1.0 + _rand(shape, g, 0.02)
            writers[0].add(key, w.to(dtype))
            if len(shape) == 2:
                m, n = shape
                scale = 0.02 / math.sqrt(fan)
                shared = _rand((m, shared_rank), g, scale) @ _rand((shared_rank, n), g, 1.0)
            for i in range(n_experts):
                if len(shape) == 2:
                    d = shared + _rand((m, task_rank), g, scale) @ _rand((task_rank, n), g, 1.0)
                    mask = torch.rand(shape, generator=g) < sparse
                    d += mask * _rand(shape, g, 5 * scale)
                else:
                    d = _rand(shape, g, 0.005)
                writers[i + 1].add(key, (w + d).to(dtype))
        for wr in writers:
            wr.close()
    except BaseException:
        for wr in writers:
            wr.abort()
        raise
    return dirs


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def run_admission(cmd: list[str]) -> tuple[dict, float, int, int]:
    """Run one ``carve ... --json`` child (``HWM_CMD``); see :func:`run_child`."""
    out, wall, hwm, sampled = run_child(cmd)
    return json.loads(out), wall, hwm, sampled


def run_child(cmd: list[str]) -> tuple[str, float, int, int]:
    """Run one child that prints ``BENCH_VmHWM`` on stderr; returns (stdout, wall s, peak RSS
    bytes from the child's VmHWM, peak RSS sampled by psutil every 50 ms, bytes)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        try:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                peak[0] = max(peak[0], p.memory_info().rss)
                time.sleep(0.05)
        except psutil.Error:
            pass

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_chunks, err_chunks = [], []
    # read pipes in threads so a chatty child cannot block on a full pipe before we wait4 it
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    for r in readers:
        r.join()
    if proc.returncode != 0:
        raise SystemExit(f"admission failed (rc {proc.returncode}):\n{''.join(err_chunks)[-4000:]}")
    hwm = [ln for ln in "".join(err_chunks).splitlines() if ln.startswith("BENCH_VmHWM")]
    hwm_bytes = int(hwm[-1].split()[1]) * 1024 if hwm else peak[0]  # "VmHWM: 123 kB"
    return "".join(out_chunks), wall, hwm_bytes, peak[0]


#: mergekit's ``mergekit-yaml`` run by a venv's interpreter, reporting its VmHWM as HWM_CMD does
MERGEKIT_HWM = ("import sys\n"
                "from mergekit.scripts.run_yaml import main\n"
                "try:\n"
                "    main(sys.argv[1:], standalone_mode=False)\n"
                "    rc = 0\n"
                "except SystemExit as e:\n"
                "    rc = e.code or 0\n"
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
                "print('BENCH_' + hwm[0].strip(), file=sys.stderr)\n"
                "sys.exit(rc)")


def mergekit_problem(python: str | None) -> str | None:
    """Why mergekit cannot run with interpreter ``python`` (None: it can)."""
    if not python:
        return "no --mergekit PYTHON given (a venv interpreter with mergekit installed)"
    try:
        r = subprocess.run([python, "-c", "import mergekit, torch; print(torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {python}: {e}"
    if r.returncode != 0:
        return f"{python} cannot import mergekit: {r.stderr.strip().splitlines()[-1:]}"
    return None


def mergekit_ties_config(base: Path, experts: list[Path], density: float) -> dict:
    """mergekit TIES equivalent to ``carve merge --method ties --density D`` (sign by mass,
    mean of the agreeing values, lambda 1), computed in float32 and written in bfloat16."""
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": density}}
                       for e in experts],
            "parameters": {"normalize": True, "lambda": 1.0},
            "dtype": "float32", "out_dtype": "bfloat16"}


def oneshot_bench(args, work: Path, dirs: list[Path], ck_bytes: int) -> list[dict]:
    """One-shot TIES merges of the first N experts, carve then mergekit, for each N."""
    problem = mergekit_problem(args.mergekit)
    if problem:
        print(f"mergekit: not run ({problem})")
    rows = []
    for n in args.experts:
        experts = dirs[1:1 + n]
        out = work / f"merged-carve-{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*HWM_CMD, "merge", "--method", "ties", "--base", str(dirs[0]),
               *[a for e in experts for a in ("--expert", str(e))], "--out", str(out),
               "--density", str(args.density), "--json", "--no-progress"]
        _, wall, rss, _ = run_child(cmd)
        row = {"experts": n, "carve": {"wall_s": wall, "peak_rss_bytes": rss}}
        shutil.rmtree(out, ignore_errors=True)
        if not problem:
            mk_out = work / f"merged-mergekit-{n}"
            shutil.rmtree(mk_out, ignore_errors=True)
            cfg = work / f"mergekit-ties-{n}.yml"
            cfg.write_text(json.dumps(mergekit_ties_config(dirs[0], experts, args.density)))
            _, mk_wall, mk_rss, _ = run_child([args.mergekit, "-c", MERGEKIT_HWM, str(cfg),
                                              str(mk_out), "--no-copy-tokenizer"])
            row["mergekit"] = {"wall_s": mk_wall, "peak_rss_bytes": mk_rss}
            shutil.rmtree(mk_out, ignore_errors=True)
        rows.append(row)
    print(f"\none-shot TIES (density {args.density}), peak RSS (VmHWM) of the whole merge "
          f"process; one checkpoint = {ck_bytes / 2**20:.0f} MiB")
    print(f"{'N':>3} {'carve s':>8} {'carve MiB':>10} {'x ckpt':>7} {'mergekit s':>11} "
          f"{'mergekit MiB':>13} {'x ckpt':>7} {'carve/mk RSS':>13}")
    for r in rows:
        c, m = r["carve"], r.get("mergekit")
        mk = (f"{m['wall_s']:11.1f} {m['peak_rss_bytes'] / 2**20:13.0f} "
              f"{m['peak_rss_bytes'] / ck_bytes:7.2f} "
              f"{c['peak_rss_bytes'] / m['peak_rss_bytes']:13.2f}") if m else f"{'n/a':>11}"
        print(f"{r['experts']:>3} {c['wall_s']:8.1f} {c['peak_rss_bytes'] / 2**20:10.0f} "
              f"{c['peak_rss_bytes'] / ck_bytes:7.2f} {mk}")
    return rows


def svd_bench(shapes: dict, rank: int, reps: int, seed: int = 0) -> list[dict]:
    """Exact vs randomized rank-``rank`` SVD on residual-like matrices of the model's shapes."""
    g = torch.Generator().manual_seed(seed)
    picks = {}
    for k, s in shapes.items():
        if len(s) == 2 and "embed" not in k:
            picks.setdefault(s, k)
    rows = []
    for shape, key in sorted(picks.items(), key=lambda kv: kv[0][0] * kv[0][1]):
        m, n = shape
        # residual-like: decaying spectrum (low-rank part) + sparse spikes + small noise
        R = (torch.randn(m, 32, generator=g) @ torch.randn(32, n, generator=g) * 0.1
             + (torch.rand(m, n, generator=g) < 0.02) * torch.randn(m, n, generator=g) * 0.5
             + torch.randn(m, n, generator=g) * 0.01)
        row = {"tensor": key, "shape": list(shape)}
        for method in ("exact", "randomized"):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                lr = truncated_svd(R, rank=rank, method=method)
                times.append(time.perf_counter() - t0)
            err = float(torch.linalg.vector_norm(R - lr.P @ lr.Q) / torch.linalg.vector_norm(R))
            row[method] = {"s": min(times), "rel_error": err}
        rows.append(row)
    return rows


def admission_bench(args, dirs: list[Path], work: Path, ck_bytes: int, base_rss: int,
                    shapes: dict, results: dict) -> None:
    """Admit the experts one by one (``carve admit`` children), then the SVD comparison."""
    state = work / "state"
    print(f"\n{'skill':<8} {'wall s':>8} {'peak RSS MiB':>13} {'RSS/ckpt':>9} "
          f"{'(RSS-base)/ckpt':>16} {'params/bank':>11} {'bytes/bank':>10} "
          f"{'+base/bank':>10} {'retained MiB':>12} {'rank':>6} {'rel_err':>8}")
    for i, edir in enumerate(dirs[1:]):
        cmd = [*HWM_CMD, "admit", str(state), "--base",
               str(dirs[0]), "--expert", str(edir), "--skill", f"skill{i}", "--json",
               "--no-progress", "--store-dtype", args.store_dtype,
               "--core-dtype", args.core_dtype, "--keep", "2"]
        if i == 0:  # method options are fixed by the first admission
            cmd += ["--rank", str(args.rank), "--svd", args.svd]
        rep, wall, rss, sampled = run_admission(cmd)
        frac = rep.get("storage", {}).get("fraction_of_bank")
        s = rep["tensors"]
        row = {"skill": rep["skill"], "wall_s": wall, "engine_wall_s": rep["wall_s"],
               "peak_rss_bytes": rss, "rss_over_ckpt": rss / ck_bytes,
               "sampled_rss_bytes": sampled, "fraction_of_bank": frac,
               "rank_mean": s.get("rank_mean"), "rel_error_mean": s.get("rel_error_mean"),
               "version": rep["version"], "storage": rep.get("storage")}
        results["experts"].append(row)
        row["rss_above_baseline_over_ckpt"] = (rss - base_rss) / ck_bytes
        st = rep.get("storage", {})
        row["disk"] = StateStore(state).disk_usage()
        print(f"{rep['skill']:<8} {wall:8.1f} {rss / 2**20:13.0f} {rss / ck_bytes:9.2f} "
              f"{(rss - base_rss) / ck_bytes:16.2f} "
              f"{(f'{frac:.3f}' if frac is not None else 'n/a'):>11} "
              f"{st.get('bytes_fraction_of_bank', float('nan')):10.3f} "
              f"{st.get('bytes_fraction_of_bank_with_base', float('nan')):10.3f} "
              f"{row['disk']['retained_bytes'] / 2**20:12.0f} "
              f"{(s.get('rank_mean') or 0):6.1f} {(s.get('rel_error_mean') or 0):8.4f}")

    print(f"\nrank-{args.rank} truncated SVD, exact vs randomized (best of {args.svd_reps}):")
    print(f"{'shape':>12} {'exact s':>8} {'err':>7} {'rand s':>8} {'err':>7} {'speedup':>8}")
    for row in svd_bench(shapes, args.rank, args.svd_reps):
        results["svd"].append(row)
        e, r = row["exact"], row["randomized"]
        print(f"{'x'.join(map(str, row['shape'])):>12} {e['s']:8.3f} {e['rel_error']:7.4f} "
              f"{r['s']:8.3f} {r['rel_error']:7.4f} {e['s'] / max(r['s'], 1e-9):8.1f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="qwen2-0.5b")
    ap.add_argument("--small", action="store_true", help="shorthand for --config small")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the number of layers (same per-layer shapes, faster)")
    ap.add_argument("--experts", type=int, nargs="+", default=[4],
                    help="experts to admit (the largest given); with --oneshot: each N to merge")
    ap.add_argument("--oneshot", action="store_true",
                    help="benchmark one-shot TIES merges (carve merge) instead of admissions")
    ap.add_argument("--mergekit", default=None, metavar="PYTHON",
                    help="with --oneshot: interpreter of a venv with mergekit, run side by side")
    ap.add_argument("--density", type=float, default=0.2, help="TIES density for --oneshot")
    ap.add_argument("--rank", type=int, default=64, help="CARVE residual rank")
    ap.add_argument("--svd", default="auto", choices=("auto", "exact", "randomized"))
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    ap.add_argument("--store-dtype", default="param", choices=STORE_DTYPE_NAMES,
                    help="residual factors' dtype (default param: the checkpoint's)")
    ap.add_argument("--core-dtype", default="param", choices=STORE_DTYPE_NAMES,
                    help="core dtype (default param: the checkpoint's; float32 to compare)")
    ap.add_argument("--shared-rank", type=int, default=16)
    ap.add_argument("--task-rank", type=int, default=16)
    ap.add_argument("--sparse", type=float, default=0.01, help="fraction of sparse updates")
    ap.add_argument("--svd-reps", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to write checkpoints (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse base/expert checkpoints already in --workdir (same options)")
    ap.add_argument("--json-out", default=None, help="also write all figures to this JSON file")
    args = ap.parse_args(argv)
    name = "small" if args.small else args.config
    cfg_kwargs = dict(CONFIGS[name])
    if args.layers:
        cfg_kwargs["num_hidden_layers"] = args.layers
    shapes, cfg = model_shapes(cfg_kwargs)
    n_params = sum(math.prod(s) for s in shapes.values())
    print(f"config {name}: {len(shapes)} tensors, {n_params / 1e6:.1f}M params, "
          f"{max(args.experts)} experts, rank {args.rank}, checkpoint dtype {args.dtype}, "
          f"torch threads {torch.get_num_threads()}")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="carve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": name, "params": n_params, "experts": [], "svd": []}
    try:
        t0 = time.perf_counter()
        n_max = max(args.experts)
        dirs = [work / "base"] + [work / f"expert{i}" for i in range(n_max)]
        if args.reuse and all((d / "config.json").is_file() for d in dirs):
            print(f"reusing checkpoints in {work}")
        else:
            dirs = write_family(work, shapes, cfg, n_max, getattr(torch, args.dtype),
                                args.shared_rank, args.task_rank, args.sparse)
        shutil.rmtree(work / "state", ignore_errors=True)  # every run admits into a fresh state
        ck_bytes = dir_bytes(dirs[0])
        results["checkpoint_bytes"] = ck_bytes
        print(f"wrote base + {n_max} experts in {time.perf_counter() - t0:.1f}s; one "
              f"checkpoint = {ck_bytes / 2**20:.1f} MiB")

        # interpreter + torch + carve imports: subtracted so RSS/ckpt shows what admission adds
        _, _, base_rss, _ = run_admission(
            [sys.executable, "-c", "import json, sys, policy_server.state.admission, "
             "policy_server.state.store; from policy_server.cli import build_parser; "
             "build_parser(); print(json.dumps({})); print('BENCH_' + [l for l in "
             "open('/proc/self/status') if l.startswith('VmHWM')][0].strip(), file=sys.stderr)"])
        results["baseline_rss_bytes"] = base_rss
        print(f"interpreter baseline RSS (python + carve CLI imports, no work): "
              f"{base_rss / 2**20:.0f} MiB")
        if args.oneshot:
            results["oneshot"] = oneshot_bench(args, work, dirs, ck_bytes)
        else:
            admission_bench(args, dirs, work, ck_bytes, base_rss, shapes, results)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
