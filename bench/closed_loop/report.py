"""Closed-loop benchmark report: metrics, ``table.md`` (CARVE Table 2 shape) and PNG plots.

Metrics on the per-step success matrix ``acc[t][i]`` (row t = after admitting expert t, 0-based
here; column i = skill i, defined for i <= t):

* average success after the last step: ``mean_i acc[T-1][i]``;
* backward transfer ``BWT = mean_{i < T-1} (acc[T-1][i] - acc[i][i])`` (Lopez-Paz & Ranzato's
  definition; the last skill's term is zero by construction and is left out); None when T = 1.

95 % intervals (``bench.closed_loop.stats``): Wilson for every rate that counts episodes (a task,
a suite's pooled episodes, a method's pooled final episodes), percentile bootstrap over tasks
(and episodes within them) for the suite-weighted averages, the per-step average curve and BWT.
"""

from __future__ import annotations

from pathlib import Path

from bench.closed_loop import stats

MODES = ("oracle", "router")


def average_final(acc: list[list[float]]) -> float | None:
    """Mean success over all skills after the last step (None for an empty matrix)."""
    if not acc or not acc[-1]:
        return None
    return sum(acc[-1]) / len(acc[-1])


def bwt(acc: list[list[float]]) -> float | None:
    """Backward transfer of a lower-triangular success matrix ``acc[t][i]`` (i <= t)."""
    T = len(acc)
    for t, row in enumerate(acc):
        if len(row) != t + 1:
            raise ValueError(f"acc row {t} has {len(row)} entries, expected {t + 1} "
                             f"(row t holds skills 0..t)")
    if T < 2:
        return None
    return sum(acc[T - 1][i] - acc[i][i] for i in range(T - 1)) / (T - 1)


def success_matrix(mres: dict, skills: list[str], mode: str) -> list[list[float]] | None:
    """acc[t][i] for one method and mode from its recorded steps (None if a value is missing)."""
    acc = []
    for st in mres.get("steps", []):
        row = []
        for name in skills[:st["t"]]:
            v = (st["skills"].get(name) or {}).get(mode)
            if v is None:
                return None
            row.append(float(v))
        acc.append(row)
    return acc or None


def task_outcomes(trec: dict, episodes: int | None = None) -> list[int]:
    """0/1 episode outcomes of one task in one mode. A router refusal (no episode ran) counts as
    ``episodes`` failures; results without episode records give [] (no interval)."""
    eps = trec.get("episodes")
    if eps:
        return [int(bool(e["success"])) for e in eps]
    if trec.get("refused") is not None and episodes:
        return [0] * int(episodes)
    return []


def step_outcomes(step: dict, skills: list[str], mode: str,
                  episodes: int | None = None) -> list[list[list[int]]]:
    """Per admitted suite (in order), per task, the 0/1 outcomes of one step in one mode."""
    out = []
    for name in skills[:step["t"]]:
        tasks = ((step["skills"].get(name) or {}).get("tasks") or {}).values()
        out.append([task_outcomes(tr[mode], episodes) for tr in tasks if mode in tr])
    return out


def _ci(pair) -> list[float] | None:
    return None if pair is None else [float(pair[0]), float(pair[1])]


def _wilson_rec(outcomes: list[int]) -> dict | None:
    if not outcomes:
        return None
    k, n = sum(outcomes), len(outcomes)
    return {"k": k, "n": n, "rate": k / n, "ci": _ci(stats.wilson(k, n))}


def _intervals(steps: list[dict], skills: list[str], mode: str, episodes: int | None,
               complete: bool) -> dict:
    """Wilson and bootstrap intervals of one method and mode (see the module docstring)."""
    out: dict = {"average_per_step_ci": [
        _ci(stats.bootstrap_average(step_outcomes(st, skills, mode, episodes))) for st in steps]}
    if not complete:
        return out
    last = steps[-1]
    final = step_outcomes(last, skills, mode, episodes)
    out["average_final_ci"] = out["average_per_step_ci"][-1]
    out["pooled_final"] = _wilson_rec([o for suite in final for task in suite for o in task])
    out["final_per_skill_ci"] = {
        name: _wilson_rec([o for task in suite for o in task])
        for name, suite in zip(skills, final)}
    per_task = {}
    for name in skills[:last["t"]]:
        for task, tr in ((last["skills"].get(name) or {}).get("tasks") or {}).items():
            if mode in tr:
                rec = _wilson_rec(task_outcomes(tr[mode], episodes))
                per_task[task] = dict(rec or {"rate": tr[mode].get("success_rate")}, suite=name)
    out["final_per_task"] = per_task
    pairs = []
    for i in range(len(skills) - 1):
        own = step_outcomes(steps[i], skills, mode, episodes)[i]
        fin = final[i]
        pairs.append([(a, c) for a, c in zip(own, fin) if len(a) == len(c)])
    out["bwt_ci"] = _ci(stats.bootstrap_bwt(pairs)) if len(skills) > 1 else None
    return out


def summarize_method(mres: dict, skills: list[str], episodes: int | None = None) -> dict:
    """Per-mode matrix, final average, BWT, final per-skill success, per-step averages, their
    95 % intervals, routing accuracy, storage fraction (final and per step) and timings.
    episodes: per task, to count a router refusal as that many failed episodes."""
    steps = mres.get("steps", [])
    complete = len(steps) == len(skills) and not mres.get("error")
    out: dict = {"complete": complete, "steps_done": len(steps)}
    for mode in MODES:
        acc = success_matrix(mres, skills, mode)
        if acc is None:
            continue
        out[mode] = {"acc": acc, "average_final": average_final(acc) if complete else None,
                     "bwt": bwt(acc) if complete else None,
                     "final_per_skill": dict(zip(skills, acc[-1])) if complete else None,
                     "average_per_step": [sum(r) / len(r) for r in acc],
                     **_intervals(steps, skills, mode, episodes, complete)}
    if steps:
        last = steps[-1]
        out["storage_fraction"] = last["storage_fraction"]["fraction"]
        out["storage_per_step"] = [st["storage_fraction"]["fraction"] for st in steps]
        out["task_agnostic"] = bool(last.get("task_agnostic"))
        ra = [tr["router"]["routing_accuracy"] for sk in last["skills"].values()
              for tr in sk["tasks"].values() if "routing_accuracy" in tr.get("router", {})]
        out["routing_accuracy_final"] = sum(ra) / len(ra) if ra else None
        out["build_s"] = sum(s["build_s"] for s in steps)
        out["eval_s"] = sum(s["eval_s"] for s in steps)
    return out


def _fmt(v, pct=True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _signed(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def _with_ci(v, ci, signed=False) -> str:
    """``75.0 [60.1, 85.3]`` (percent); the bare value when there is no interval."""
    f = _signed if signed else _fmt
    if v is None:
        return "-"
    if not ci:
        return f(v)
    return f"{f(v)} [{f(ci[0])}, {f(ci[1])}]"


def _wilson_cell(rec) -> str:
    if not rec:
        return "-"
    lo, hi = rec["ci"]
    return f"{_fmt(rec['rate'])} [{_fmt(lo)}, {_fmt(hi)}] ({rec['k']}/{rec['n']})"


def _label(name: str, m: dict) -> str:
    s = m.get("summary") or {}
    label = name + ("*" if s.get("task_agnostic") else "")
    if m.get("error"):
        label += f" (FAILED: {m['error'][:60]})"
    elif not s.get("complete"):
        label += " (incomplete)"
    return label


def storage_by_step(s: dict) -> str:
    """``1.000 / 0.710 / 0.650``: storage over the bank after each admission step."""
    per = s.get("storage_per_step") or []
    return " / ".join(f"{v:.3f}" for v in per) if per else "-"


def summary_table(results: dict, per_suite: bool = True, timings: bool = True) -> list[str]:
    """The Table-2-shaped summary rows (Markdown lines) with 95 % intervals."""
    cfg = results["config"]
    skills = [e["name"] for e in cfg["experts"]]
    router = cfg.get("with_router")
    head = ["method", "storage/bank", "storage/bank by t", "avg (oracle) [95% CI]",
            "pooled (oracle, Wilson)", "BWT (oracle) [95% CI]"]
    if per_suite:
        head += [f"{s} (oracle, Wilson)" for s in skills]
    if router:
        head += ["avg (router) [95% CI]", "BWT (router) [95% CI]", "routing acc"]
    if timings:
        head += ["build s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        s = m.get("summary") or {}
        o, r = s.get("oracle") or {}, s.get("router") or {}
        row = [_label(name, m), _fmt(s.get("storage_fraction"), pct=False), storage_by_step(s),
               _with_ci(o.get("average_final"), o.get("average_final_ci")),
               _wilson_cell(o.get("pooled_final")),
               _with_ci(o.get("bwt"), o.get("bwt_ci"), signed=True)]
        if per_suite:
            cis = o.get("final_per_skill_ci") or {}
            row += [_wilson_cell(cis.get(sk)) if cis.get(sk)
                    else _fmt((o.get("final_per_skill") or {}).get(sk)) for sk in skills]
        if router:
            row += [_with_ci(r.get("average_final"), r.get("average_final_ci")),
                    _with_ci(r.get("bwt"), r.get("bwt_ci"), signed=True),
                    _fmt(s.get("routing_accuracy_final"))]
        if timings:
            row += [f"{s.get('build_s', 0):.0f}", f"{s.get('eval_s', 0):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def per_step_table(results: dict, mode: str = "oracle") -> list[str]:
    """Average success after each admission step with its bootstrap 95 % interval."""
    skills = [e["name"] for e in results["config"]["experts"]]
    head = ["method"] + [f"t={t + 1} (+{sk})" for t, sk in enumerate(skills)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        o = (m.get("summary") or {}).get(mode) or {}
        per, cis = o.get("average_per_step") or [], o.get("average_per_step_ci") or []
        cells = [_with_ci(per[t], cis[t] if t < len(cis) else None) if t < len(per) else "-"
                 for t in range(len(skills))]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return lines


def halfwidths(results: dict, mode: str = "oracle") -> dict:
    """Per complete method: half-widths (points) of the bootstrap average interval and of the
    pooled Wilson interval after the last step."""
    out = {}
    for name, m in results["methods"].items():
        o = (m.get("summary") or {}).get(mode) or {}
        ci, pooled = o.get("average_final_ci"), o.get("pooled_final")
        if ci or pooled:
            out[name] = {"bootstrap": None if not ci else 50 * (ci[1] - ci[0]),
                         "wilson_pooled": None if not pooled else
                         50 * (pooled["ci"][1] - pooled["ci"][0])}
    return out


def interval_lines(results: dict) -> list[str]:
    """Human-readable summary of the achieved 95 % half-widths (printed after a run)."""
    hw = halfwidths(results)
    if not hw:
        return ["no intervals (no episode records)"]
    n_tasks = sum(len(e.get("tasks") or []) for e in results["config"]["experts"])
    boot = [v["bootstrap"] for v in hw.values() if v["bootstrap"] is not None]
    wil = [v["wilson_pooled"] for v in hw.values() if v["wilson_pooled"] is not None]
    lines = [f"95% half-width of the final average (oracle), {n_tasks} tasks x "
             f"{results['config']['episodes']} episodes: bootstrap over tasks max "
             f"+-{max(boot):.1f} points (median {sorted(boot)[len(boot) // 2]:.1f}); "
             f"pooled Wilson max +-{max(wil):.1f}" if boot and wil else
             "95% half-widths: incomplete"]
    for name, v in hw.items():
        lines.append(f"  {name}: bootstrap +-{v['bootstrap'] or 0:.1f}, "
                     f"Wilson (pooled) +-{v['wilson_pooled'] or 0:.1f}")
    return lines


def curve_clause(cfg: dict) -> str:
    """How the run's cells were measured, where that differs from 'every cell, every episode'."""
    parts = []
    ce = cfg.get("curve_episodes")
    if ce is not None and ce != cfg["episodes"]:
        parts.append(f"; the older skills at a non-final step (the rest of the per-step curve) "
                     f"{ce} episode(s) per task, placements 0..{ce - 1} (the final step and each "
                     f"skill at its own admission step get all {cfg['episodes']})")
    if cfg.get("with_router") and cfg.get("router_reuse"):
        parts.append("; a routed task whose instruction the router sends to the oracle's skill "
                     "reuses the oracle's episodes (same weights, same placements: the same "
                     "rollout; checked for real on one task per step), any other decision is "
                     "run for real")
    return "".join(parts)


def table_markdown(results: dict) -> str:
    """Markdown: the Table-2-shaped summary with intervals, average success (and its interval)
    after each admission step, storage after each step, per-task Wilson intervals, matrices."""
    cfg = results["config"]
    skills = [e["name"] for e in cfg["experts"]]
    lines = [f"# Closed-loop continual merging: preset `{cfg['preset']}`", "",
             f"{len(skills)} experts admitted in order ({', '.join(skills)}); "
             f"{cfg['episodes']} Meta-World episode(s) per task (seed {cfg['seed']}, "
             f"max {cfg['max_steps']} steps){curve_clause(cfg)}, served over gRPC on CPU. "
             "Success in %, "
             "averaged over each suite's tasks, then over suites. Storage: bytes on disk a "
             "server keeps (state + base; one checkpoint for a single merged model) over the "
             "bytes of the expert bank (t full checkpoints), after the last step and after each "
             "step t. BWT = mean over i<T of acc[T][i] - acc[i][i] (points). `oracle` = skill id "
             "given; `router` = instruction only (text router). Task-agnostic models (one merged "
             "model) marked *. Intervals are 95 %: [bootstrap over tasks and their episodes, "
             f"{stats.N_BOOT} resamples, seed {stats.BOOT_SEED}] for averages and BWT; Wilson for "
             "pooled episode counts (k/n).", ""]
    lines += summary_table(results)
    lines += ["", "## Average success (oracle) after each admission step [95% CI]", ""]
    lines += per_step_table(results, "oracle")
    if cfg.get("with_router"):
        lines += ["", "## Average success (router) after each admission step [95% CI]", ""]
        lines += per_step_table(results, "router")
    lines += ["", "## Final per-task success (oracle, Wilson 95% CI, k/n)", ""]
    for name, m in results["methods"].items():
        pt = (((m.get("summary") or {}).get("oracle") or {}).get("final_per_task")) or {}
        cells = "; ".join(f"{task} {_wilson_cell(rec) if rec.get('ci') else _fmt(rec.get('rate'))}"
                          for task, rec in pt.items())
        lines.append(f"- `{name}`: {cells or '-'}")
    lines += ["", "## Success matrix acc[t][i] (oracle, %)", ""]
    for name, m in results["methods"].items():
        acc = ((m.get("summary") or {}).get("oracle") or {}).get("acc") or []
        cells = "; ".join(f"t={t + 1}: " + " ".join(_fmt(v) for v in row)
                          for t, row in enumerate(acc))
        lines.append(f"- `{name}`: {cells or '-'}")
    lines += ["", f"Total wall time {results.get('wall_s', 0):.0f} s"
              + (f" ({results.get('steps_computed', 0)} step(s) evaluated, "
                 f"{results.get('steps_cached', 0)} reused from the cache; "
                 f"{results.get('compute_s', 0):.0f} s of build + evaluation recorded over all "
                 "steps)." if "steps_computed" in results else ".")]
    return "\n".join(lines) + "\n"


def _savefig(fig, path: Path) -> None:
    """Save a figure via a temp file + rename, so an interrupted run never leaves half a PNG."""
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def write_plots(results: dict, out: Path) -> list[str]:
    """PNG plots (matplotlib Agg): success per step, storage vs success, CARVE rank vs success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    methods = results["methods"]
    T = len(results["config"]["experts"])

    # One panel per mode (oracle / router), one colour per method (tab20: up to 20 distinct).
    # every method may have failed before its first step: still draw one (empty) panel
    modes = [md for md in MODES
             if any((m.get("summary") or {}).get(md) for m in methods.values())] or ["oracle"]
    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, len(modes), figsize=(5.0 * len(modes) + 2.2, 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for k, (name, m) in enumerate(methods.items()):
            o = (m.get("summary") or {}).get(mode) or {}
            per = o.get("average_per_step")
            if per:
                xs = range(1, len(per) + 1)
                ax.plot(xs, [100 * v for v in per], marker="o",
                        color=colors[k % len(colors)], label=name,
                        ls="--" if (m.get("summary") or {}).get("task_agnostic") else "-")
                cis = o.get("average_per_step_ci") or []
                if cis and all(cis):  # the bootstrap 95 % band of the per-step average
                    ax.fill_between(xs, [100 * c[0] for c in cis], [100 * c[1] for c in cis],
                                    color=colors[k % len(colors)], alpha=0.12, lw=0)
        ax.set_title("task id given (oracle)" if mode == "oracle" else "text router (no task id)",
                     fontsize=9)
        ax.set_xlabel("admission step t")
        ax.set_xticks(range(1, T + 1))
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average success over admitted skills (%, 95% band)")
    if axes[0][-1].get_legend_handles_labels()[0]:  # nothing to label if every method failed
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5),
                           title="dashed: one merged model", title_fontsize=7)
    fig.tight_layout()
    _savefig(fig, out / "success_per_step.png")
    plt.close(fig)
    files.append("success_per_step.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # methods landing on the same point share one label
    points: dict[tuple[float, float], list[str]] = {}
    errs: dict[tuple[float, float], list[float] | None] = {}
    for name, m in methods.items():
        s = m.get("summary") or {}
        o = s.get("oracle") or {}
        avg = o.get("average_final")
        if avg is None or s.get("storage_fraction") is None:
            continue
        key = (round(s["storage_fraction"], 4), round(100 * avg, 2))
        points.setdefault(key, []).append(name)
        errs[key] = o.get("average_final_ci")
    for (x, y), names in points.items():
        ci = errs.get((x, y))
        yerr = None if not ci else [[max(0.0, y - 100 * ci[0])], [max(0.0, 100 * ci[1] - y)]]
        ax.errorbar(x, y, yerr=yerr, fmt="o", capsize=3, ms=4)
        ax.annotate(", ".join(names), (x, y), fontsize=7, textcoords="offset points",
                    xytext=(4, 3))
    ax.set_xlabel("storage on disk (bytes, fraction of expert bank)")
    ax.set_ylabel("final average success, oracle (%, 95% CI)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, out / "storage_vs_success.png")
    plt.close(fig)
    files.append("storage_vs_success.png")

    # Storage vs number of admitted experts: the widening (or not) of the gap to the bank.
    fig, ax = plt.subplots(figsize=(7.4, 4.2))
    for k, (name, m) in enumerate(methods.items()):
        s = m.get("summary") or {}
        per = s.get("storage_per_step")
        if per:
            ax.plot(range(1, len(per) + 1), per, marker="o", color=colors[k % len(colors)],
                    label=name, ls="--" if s.get("task_agnostic") else "-")
    ax.set_xlabel("experts admitted t")
    ax.set_ylabel("storage on disk / expert bank of t experts (bytes)")
    ax.set_xticks(range(1, T + 1))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5),
                  title="dashed: one merged model (1/t)", title_fontsize=7)
    fig.tight_layout()
    _savefig(fig, out / "storage_vs_experts.png")
    plt.close(fig)
    files.append("storage_vs_experts.png")

    pts = sorted((m["spec"]["rank"], 100 * m["summary"]["oracle"]["average_final"],
                  m["summary"]["oracle"].get("average_final_ci"))
                 for m in methods.values()
                 if m["spec"].get("rank") is not None and not m["spec"]["options"].get(
                     "drift_compensation")
                 and ((m.get("summary") or {}).get("oracle") or {}).get("average_final")
                 is not None)
    if pts:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        yerr = None
        if all(p[2] for p in pts):
            yerr = [[max(0.0, p[1] - 100 * p[2][0]) for p in pts],
                    [max(0.0, 100 * p[2][1] - p[1]) for p in pts]]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=yerr, marker="o", capsize=3,
                    label="CARVE (oracle, 95% CI)")
        bank = ((methods.get("bank") or {}).get("summary") or {}).get("oracle") or {}
        if bank.get("average_final") is not None:
            ax.axhline(100 * bank["average_final"], ls=":", color="k", label="bank")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("residual rank r")
        ax.set_ylabel("final average success (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _savefig(fig, out / "rank_vs_success.png")
        plt.close(fig)
        files.append("rank_vs_success.png")
    return files


def write_all(results: dict, out) -> dict:
    """Write table.md and the plots into ``out``; -> {"table": ..., "plots": [...]} (names)."""
    from bench.closed_loop.run import write_text_atomic

    out = Path(out)
    write_text_atomic(out / "table.md", table_markdown(results))
    return {"results": "results.json", "table": "table.md", "plots": write_plots(results, out)}
