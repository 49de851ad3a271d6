"""Per-task hybrid routing on real LIBERO first frames (40 skills, one per LIBERO task).

Protocol:
  1. Render (or load from the cache) the first frame of every task of libero_spatial,
     libero_object, libero_goal and libero_10 from its fixed init states (``libero_frames.py``).
  2. Admit one skill per task into a real CARVE merge state (``policy_server.state.admission.admit``
     with a tiny random demo-VLA base and perturbed experts: the policy weights do not matter
     here, the registration path does), with the same admission hooks a deployment uses: the
     ``TextEmbeddingHook`` (the task's LIBERO instruction) and the ``ObservationDescriptorHook``
     (router/descriptor.py) over the frames of the *registration* init states (default 0-4).
  3. Build the routers from the state exactly as the server does (``build_router``): ``text`` and
     ``hybrid`` (observation scorer: the first-frame descriptor).
  4. Route every held-out paraphrase (``heldout_paraphrases.json``, 5 per task, never registered)
     with every frame of the *evaluation* init states (default 5-9, never registered): 40 x 5 x 5
     = 1000 episodes. Out-of-domain requests (``ood_instructions.json``) are routed with one
     evaluation frame of every task (20 x 40 = 800) and must abstain.

Reported: task-level and suite-level accuracy (a decision counts only if not abstained and right;
suite-level: the routed task is in the right suite), abstention rate, per suite and per task, the
same for text alone and for the observation alone (top-1 of the descriptor), out-of-domain
abstention, route latency, and the 40 x 41 confusion matrix as a PNG
(``results/confusion_task_frames.png``); everything in ``results/libero_frames.json``.

Tuning (``--tune``) uses the registration frames only: register init states 0..R-2, query init
state R-1 with paraphrases 0-1 (the text router's dev split), grid over the text weight and the
descriptor temperature; the best setting has the highest dev accuracy, then the highest mean log
pooled confidence of the true skill (dev accuracy saturates at 1.0 for most of the grid). The
defaults were chosen with it (see docs/BENCHMARKS.md).

Usage: python bench/routing/bench_libero_frames.py [--register 0-4] [--evaluate 5-9]
       [--cameras agentview] [--text-weight A] [--obs-temperature T] [--tune] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from bench.routing.bench_routing import (SUITES, load_data, percentile_ms,  # noqa: E402
                                         save_confusion_png)
from bench.routing.libero_frames import (RESOLUTION, SETTLE_STEPS, _parse_range,  # noqa: E402
                                         frame_path, load_frame, missing_frames,
                                         render_in_subprocess)
from router.memory_snapshot import InMemorySnapshot  # noqa: E402

CAMERA_KEYS = {"agentview": "agentview", "wrist": "wrist"}  # served camera name -> npz key


def frame_observation(frame: dict, cameras: list[str]):
    """A cached frame -> the ``ObservationBatch`` (size 1) the server gets from a LIBERO client:
    images rotated by 180 degrees as both client conventions send them (uint8 (1, R, R, 3))."""
    from clients.libero_preprocess import rotate_180
    from policy_server.models.base import ObservationBatch

    return ObservationBatch(state=frame["state"][None].astype(np.float32), instructions=[""],
                            images={c: rotate_180(frame[CAMERA_KEYS[c]])[None] for c in cameras})


class MemoEmbedder:
    """Wraps an Embedder with a per-sentence cache (tuning only: the grid routes the same
    paraphrases many times; one sentence at a time, as the router encodes a query)."""

    def __init__(self, emb):
        self._e, self._c = emb, {}
        self.name, self.fingerprint = emb.name, emb.fingerprint

    def encode(self, texts):
        missing = [t for t in texts if t not in self._c]
        for t in missing:
            self._c[t] = self._e.encode([t])[0]
        import torch

        return torch.stack([self._c[t] for t in texts])


def admit_state(state_dir: Path, skills: dict[str, list[str]], frames: dict[str, list],
                embedder, cameras: list[str], log=print) -> float:
    """Admit one tiny demo-VLA expert per skill with the text and descriptor hooks; -> seconds."""
    import torch

    from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig
    from policy_server.state.admission import admit
    from router.descriptor import ObservationDescriptorHook
    from router.text import TextEmbeddingHook

    root = state_dir.parent
    cfg = DemoVLAConfig(state_dim=8, action_dim=7, chunk_length=4, hidden_dim=32, mlp_dim=64,
                        num_heads=4, vocab_size=256, text_dim=16,
                        action_low=[-1.0] * 7, action_high=[1.0] * 7)
    base_dir = DemoVLABackend(cfg, seed=0).save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for i, (name, instr) in enumerate(skills.items()):
        expert = DemoVLABackend(cfg, seed=0)
        with torch.no_grad():
            for p in expert.module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        edir = expert.save_pretrained(root / "expert")
        admit(state_dir, base_dir, edir, name, instructions=instr, method="carve",
              options={"rank": 4}, progress=False,
              hooks=[TextEmbeddingHook(instr, embedder),
                     ObservationDescriptorHook(frames[name], cameras)])
        if (i + 1) % 10 == 0:
            log(f"  admitted {i + 1}/{len(skills)} skills ({time.perf_counter() - t0:.0f} s)")
    return time.perf_counter() - t0


def evaluate(hybrid, text, scorer, tasks, para, ood, eval_obs: dict, paraphrase_ids=None) -> dict:
    """Route every (task, paraphrase, evaluation frame); see the module docstring for the
    metrics. eval_obs: task -> list of ObservationBatch."""
    suite_of = {t: s for s, t, _ in tasks}
    skills = list(hybrid.skills)
    idx = {s: i for i, s in enumerate(skills)}
    conf = np.zeros((len(skills), len(skills) + 1), dtype=np.int64)   # last column: abstained
    blank = {"n": 0, "correct": 0, "suite_correct": 0, "abstained": 0}
    per_task = {t: dict(blank) for _, t, _ in tasks}
    text_per_task = {t: dict(blank) for _, t, _ in tasks}
    obs_per_task = {t: {"n": 0, "correct": 0, "suite_correct": 0} for _, t, _ in tasks}
    lat, errors, log_truth = [], [], []
    untuned = {"n": 0, "correct": 0}
    for _, task, _ in tasks:
        for ob in eval_obs[task]:
            sc = scorer.scores(ob)
            top = max(sc, key=sc.get)
            o = obs_per_task[task]
            o["n"] += 1
            o["correct"] += top == task
            o["suite_correct"] += suite_of.get(top) == suite_of[task]
        pids = range(len(para[task])) if paraphrase_ids is None else paraphrase_ids
        for pi in pids:
            instr = para[task][pi]
            d_text = text.route(instr)
            tt = text_per_task[task]
            tt["n"] += 1
            tt["abstained"] += d_text.abstained
            tt["correct"] += (not d_text.abstained) and d_text.skill == task
            tt["suite_correct"] += (not d_text.abstained) and suite_of.get(d_text.skill) == \
                suite_of[task]
            for fi, ob in enumerate(eval_obs[task]):
                t0 = time.perf_counter()
                d = hybrid.route(instr, ob)
                lat.append(time.perf_counter() - t0)
                st = per_task[task]
                st["n"] += 1
                ok = (not d.abstained) and d.skill == task
                if d.abstained:
                    st["abstained"] += 1
                    conf[idx[task], -1] += 1
                else:
                    conf[idx[task], idx[d.skill]] += 1
                    st["suite_correct"] += suite_of.get(d.skill) == suite_of[task]
                st["correct"] += ok
                # log pooled confidence of the true skill: a proper score that still ranks
                # settings when accuracy saturates (the tuning objective's tie-break)
                truth_conf = dict(d.candidates).get(task, 0.0)
                log_truth.append(float(np.log(max(truth_conf, 1e-6))))
                if pi >= 2:
                    untuned["n"] += 1
                    untuned["correct"] += ok
                if not ok:
                    errors.append({"instruction": instr, "frame": fi, "truth": task,
                                   "skill": d.skill, "top": d.candidates[0][0],
                                   "confidence": round(d.confidence, 3),
                                   "margin": round(d.margin, 3), "reason": d.reason})
    # out-of-domain: every request with one evaluation frame of every task
    ood_n = ood_acc = 0
    ood_false = []
    for instr in ood:
        for _, task, _ in tasks:
            d = hybrid.route(instr, eval_obs[task][0])
            ood_n += 1
            if d.abstained:
                ood_acc += 1
            else:
                ood_false.append((instr, task, d.skill, round(d.confidence, 3)))
    ood_text = sum(text.route(t).abstained for t in ood) / len(ood)

    def agg(rows, keys):
        n = sum(r["n"] for r in rows)
        return {**{k: sum(r[k] for r in rows) / max(n, 1) for k in keys}, "n": n}

    keys = ("correct", "suite_correct", "abstained")
    res = {
        "hybrid": agg(per_task.values(), keys),
        "text_only": agg(text_per_task.values(), keys),
        "observation_only": agg(obs_per_task.values(), ("correct", "suite_correct")),
        "per_suite": {s: {"hybrid": agg([per_task[t] for s2, t, _ in tasks if s2 == s], keys),
                          "text_only": agg([text_per_task[t] for s2, t, _ in tasks if s2 == s],
                                           keys),
                          "observation_only": agg([obs_per_task[t] for s2, t, _ in tasks
                                                   if s2 == s], ("correct", "suite_correct"))}
                      for s in SUITES},
        "per_task": {t: {"suite": suite_of[t],
                         "hybrid": agg([per_task[t]], keys),
                         "text_only": agg([text_per_task[t]], keys),
                         "observation_only": agg([obs_per_task[t]], ("correct", "suite_correct"))}
                     for _, t, _ in tasks},
        "untuned_paraphrases_accuracy": untuned["correct"] / max(untuned["n"], 1),
        "mean_log_truth_confidence": float(np.mean(log_truth)) if log_truth else 0.0,
        "ood": {"n": ood_n, "abstention_rate": ood_acc / max(ood_n, 1),
                "false_accepts": ood_false[:20], "text_only_abstention_rate": ood_text},
        "latency_ms": ({"p50": percentile_ms(lat, 50), "p99": percentile_ms(lat, 99),
                        "n": len(lat)} if lat else {}),
        "errors": errors,
        "confusion": {"rows": skills, "cols": skills + ["<abstain>"], "matrix": conf.tolist()},
    }
    return res


def tune(tasks, para, ood, frames, embedder, cameras, register, log=print) -> dict:
    """Grid over (text_weight, obs_temperature) on registration frames only (module docstring)."""
    from router.descriptor import observation_descriptor_artifacts
    from router.factory import build_router
    from router.text import text_router_artifacts

    memo = MemoEmbedder(embedder)
    reg, dev = register[:-1], register[-1]
    records = {t: {"instructions": [lang], "description": ""} for _, t, lang in tasks}
    arts = {t: {**text_router_artifacts([lang], embedder),
                **observation_descriptor_artifacts([frames[(t, i)] for i in reg], cameras)}
            for _, t, lang in tasks}
    snap = InMemorySnapshot(records, arts)
    dev_obs = {t: [frames[(t, dev)]] for _, t, _ in tasks}
    grid = []
    text = build_router("text", snap, {"embedder": memo})
    for a in (0.3, 0.4, 0.5, 0.6, 0.7):
        for temp in (0.005, 0.01, 0.02, 0.05, 0.1):
            hyb = build_router("hybrid", snap, {"embedder": memo, "observation": "descriptor",
                                                "text_weight": a, "obs_temperature": temp})
            r = evaluate(hyb, text, hyb.obs, tasks, para, ood[:5], dev_obs, paraphrase_ids=[0, 1])
            row = {"text_weight": a, "obs_temperature": temp,
                   "accuracy": r["hybrid"]["correct"], "suite": r["hybrid"]["suite_correct"],
                   "abstained": r["hybrid"]["abstained"],
                   "mean_log_truth": r["mean_log_truth_confidence"],
                   "ood_abstention": r["ood"]["abstention_rate"]}
            grid.append(row)
            log(f"  tune a={a} T={temp}: task {row['accuracy']:.3f} suite {row['suite']:.3f} "
                f"abstain {row['abstained']:.3f} mean log p(truth) {row['mean_log_truth']:.4f} "
                f"ood-abstain {row['ood_abstention']:.3f}")
    ok = [g for g in grid if g["ood_abstention"] == 1.0] or grid
    # accuracy first; when it saturates, the mean log confidence of the true skill decides
    best = max(ok, key=lambda g: (round(g["accuracy"], 6), g["mean_log_truth"]))
    return {"grid": grid, "best": best, "register": reg, "dev_init": dev,
            "dev_paraphrases": [0, 1]}


SUITE_TAG = {"libero_spatial": "S", "libero_object": "O", "libero_goal": "G", "libero_10": "L"}


def short_labels(tasks) -> list[str]:
    """Tick labels <= 28 characters that keep what tells a suite's tasks apart: the suite
    initial + task index, then the name without the prefix/suffix all the suite's tasks share
    ("pick_up_the_black_bowl_" ... "_and_place_it_on_the_plate" in libero_spatial)."""
    out = []
    for suite in SUITES:
        names = [t for s, t, _ in tasks if s == suite]
        pre = os.path.commonprefix(names)
        suf = os.path.commonprefix([n[::-1] for n in names])[::-1]
        for i, n in enumerate(names):
            mid = n[len(pre):len(n) - len(suf)] if len(names) > 1 else n
            out.append(f"{SUITE_TAG[suite]}{i} {mid}"[:28])
    return out


def print_summary(r: dict, file=sys.stdout) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"{'':<16}{'hybrid task':>12}{'suite':>8}{'abstain':>9}{'text task':>11}{'suite':>8}"
      f"{'abstain':>9}{'obs task':>10}{'suite':>8}{'n':>6}")
    rows = [(s, v) for s, v in r["per_suite"].items()] + [("all", r)]
    for name, v in rows:
        h, t, o = v["hybrid"], v["text_only"], v["observation_only"]
        p(f"{name:<16}{h['correct']:>12.3f}{h['suite_correct']:>8.3f}{h['abstained']:>9.3f}"
          f"{t['correct']:>11.3f}{t['suite_correct']:>8.3f}{t['abstained']:>9.3f}"
          f"{o['correct']:>10.3f}{o['suite_correct']:>8.3f}{h['n']:>6}")
    p(f"hybrid accuracy on the paraphrases not used for tuning (3-5 of 5): "
      f"{r['untuned_paraphrases_accuracy']:.3f}")
    p(f"out-of-domain abstention: hybrid {r['ood']['abstention_rate']:.3f} over "
      f"{r['ood']['n']} (request x frame), text alone {r['ood']['text_only_abstention_rate']:.3f}; "
      f"false accepts: {r['ood']['false_accepts'][:5]}")
    if r["latency_ms"]:
        p(f"hybrid route latency: p50 {r['latency_ms']['p50']:.1f} ms, p99 "
          f"{r['latency_ms']['p99']:.1f} ms (n={r['latency_ms']['n']})")
    worst = sorted(r["per_task"].items(), key=lambda kv: kv[1]["hybrid"]["correct"])[:6]
    p("lowest per-task hybrid accuracy: " + ", ".join(
        f"{t[:40]} {v['hybrid']['correct']:.2f}" for t, v in worst))
    if r["errors"]:
        p(f"errors ({len(r['errors'])}), first 10:")
        for e in r["errors"][:10]:
            p(f"  {e['instruction']!r} frame {e['frame']}: truth {e['truth'][:45]}, got "
              f"{e['skill']} (conf {e['confidence']}, margin {e['margin']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--register", default="0-4", help="init states registered at admission")
    ap.add_argument("--evaluate", default="5-9", help="init states routed (held out)")
    ap.add_argument("--cameras", default="agentview", help="comma list of agentview, wrist")
    ap.add_argument("--resolution", type=int, default=RESOLUTION)
    ap.add_argument("--settle", type=int, default=SETTLE_STEPS,
                    help="settle steps of the frames (cache key); 0 = the frame at episode open")
    ap.add_argument("--text-weight", type=float, default=None)
    ap.add_argument("--obs-temperature", type=float, default=None)
    ap.add_argument("--tune", action="store_true", help="print the tuning grid first")
    ap.add_argument("--state-dir", default=None, help="where to admit (default: a temp dir)")
    ap.add_argument("--router-model", default=None)
    args = ap.parse_args(argv)
    import torch

    from policy_server.state.store import StateStore
    from router.embedder import Embedder
    from router.factory import build_router

    torch.set_num_threads(1)  # shared 2-core machine; routing is single-threaded on the server too
    cameras = [c.strip() for c in args.cameras.split(",") if c.strip()]
    register, evaluate_ids = _parse_range(args.register), _parse_range(args.evaluate)
    if set(register) & set(evaluate_ids):
        raise SystemExit(f"registration and evaluation init states overlap: "
                         f"{sorted(set(register) & set(evaluate_ids))}")
    tasks, para, ood = load_data()
    t0 = time.perf_counter()
    inits = sorted(set(register) | set(evaluate_ids))
    n_tasks = {s: sum(s2 == s for s2, _, _ in tasks) for s in SUITES}
    todo = missing_frames(SUITES, inits, n_tasks, args.resolution, args.settle)
    if todo:
        print(f"rendering {len(todo)} missing frames in a child process (nice 10)", flush=True)
        render_in_subprocess(SUITES, inits, args.resolution, args.settle)
    paths = {(s, t, i): frame_path(s, t, i, args.resolution, args.settle)
             for s in SUITES for t in range(n_tasks[s]) for i in inits}
    render_wall = time.perf_counter() - t0
    names = {t for _, t, _ in tasks}
    frames, render_s, by_key = {}, [], {}
    for (suite, ti, ii), p in paths.items():
        fr = load_frame(p)
        name = fr["meta"]["name"]
        if name not in names:
            raise SystemExit(f"LIBERO task {suite}/{ti} is named {name!r}, not in "
                             f"libero_instructions.json")
        by_key[(name, ii)] = fr
        frames[(name, ii)] = frame_observation(fr, cameras)
        render_s.append(fr["meta"]["render_s"])
    emb = Embedder(args.router_model)
    emb.encode(["load"])
    load = os.getloadavg()[0]
    print(f"{len(paths)} frames ({args.resolution}x{args.resolution}, settle {args.settle}) ready "
          f"in {render_wall:.0f} s; cameras {cameras}; register init states {register}, "
          f"evaluate {evaluate_ids}; load average {load:.1f} on {os.cpu_count()} CPUs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"protocol": {"register": register, "evaluate": evaluate_ids, "cameras": cameras,
                            "resolution": args.resolution, "settle": args.settle,
                            "skills": len(tasks), "paraphrases_per_task": 5},
               "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "load_average_at_start": load},
               "frames": {"n": len(paths), "render_s_mean_when_rendered":
                          float(np.mean(render_s)),
                          "env_build_s_mean": float(np.mean(
                              [f["meta"]["env_build_s"] for f in by_key.values()])),
                          "this_run_wall_s": render_wall}}
    if args.tune:
        results["tuning"] = tune(tasks, para, ood, frames, emb, cameras, register)
        print(f"tuning best: {results['tuning']['best']}")
    config = {"embedder": emb, "observation": "descriptor"}
    if args.text_weight is not None:
        config["text_weight"] = args.text_weight
    if args.obs_temperature is not None:
        config["obs_temperature"] = args.obs_temperature
    skills = {t: [lang] for _, t, lang in tasks}
    reg_frames = {t: [frames[(t, i)] for i in register] for t in skills}
    with tempfile.TemporaryDirectory(prefix="carve-libero-route-") as tmp:
        state_dir = Path(args.state_dir) if args.state_dir else Path(tmp) / "state"
        admit_s = admit_state(state_dir, skills, reg_frames, emb, cameras)
        snap = StateStore(state_dir).open()
        try:
            hybrid = build_router("hybrid", snap, config)
            text = build_router("text", snap, {"embedder": emb})
        finally:
            snap.close()
    print(f"admitted {len(skills)} skills with text + descriptor hooks in {admit_s:.1f} s; "
          f"hybrid: text weight {hybrid.text_weight}, observation {hybrid.obs.name} "
          f"(temperature {hybrid.obs.temperature}, cameras {hybrid.obs.cameras})")
    eval_obs = {t: [frames[(t, i)] for i in evaluate_ids] for t in skills}
    t0 = time.perf_counter()
    r = evaluate(hybrid, text, hybrid.obs, tasks, para, ood, eval_obs)
    r["eval_wall_s"] = time.perf_counter() - t0
    r["admission_s"] = admit_s
    r["options"] = {"text_weight": hybrid.text_weight, "obs_temperature": hybrid.obs.temperature,
                    "min_confidence": hybrid.min_confidence, "min_margin": hybrid.min_margin}
    png = out / "confusion_task_frames.png"
    m = np.asarray(r["confusion"]["matrix"])
    save_confusion_png(m, short_labels(tasks), png, "task, text + first frame")
    r["confusion_png"] = str(png.relative_to(HERE.parents[1]) if png.is_relative_to(
        HERE.parents[1]) else png)
    results.update(r)
    (out / "libero_frames.json").write_text(json.dumps(results, indent=1))
    print_summary(r)
    print(f"confusion PNG: {png}\nresults: {out / 'libero_frames.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
