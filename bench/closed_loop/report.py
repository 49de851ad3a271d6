"""Closed-loop benchmark report: metrics, ``table.md`` (CARVE Table 2 shape) and PNG plots.

Metrics on the per-step success matrix ``acc[t][i]`` (row t = after admitting expert t, 0-based
here; column i = skill i, defined for i <= t):

* average success after the last step: ``mean_i acc[T-1][i]``;
* backward transfer ``BWT = mean_{i < T-1} (acc[T-1][i] - acc[i][i])`` (Lopez-Paz & Ranzato's
  definition; the last skill's term is zero by construction and is left out); None when T = 1.
"""

from __future__ import annotations

from pathlib import Path

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


def summarize_method(mres: dict, skills: list[str]) -> dict:
    """Per-mode matrix, final average, BWT, final per-skill success, per-step averages,
    routing accuracy, final storage fraction and timings."""
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
                     "average_per_step": [sum(r) / len(r) for r in acc]}
    if steps:
        last = steps[-1]
        out["storage_fraction"] = last["storage_fraction"]["fraction"]
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


def table_markdown(results: dict) -> str:
    """Markdown tables: the Table-2-shaped summary and success after each admission step."""
    cfg = results["config"]
    skills = [e["name"] for e in cfg["experts"]]
    lines = [f"# Closed-loop continual merging: preset `{cfg['preset']}`", "",
             f"{len(skills)} experts admitted in order ({', '.join(skills)}); "
             f"{cfg['episodes']} Meta-World episode(s) per task (seed {cfg['seed']}, "
             f"max {cfg['max_steps']} steps), served over gRPC on CPU. Success in %, "
             "averaged over each suite's tasks, then over suites. Storage: bytes on disk a "
             "server keeps (state + base; one checkpoint for a single merged model) over the "
             "bytes of the expert bank (T full checkpoints). BWT = mean over i<T of "
             "acc[T][i] - acc[i][i] (points). `oracle` = skill id given; `router` = "
             "instruction only (text router). Task-agnostic models (one merged model) marked *.",
             ""]
    head = ["method", "storage/bank", "avg (oracle)", "BWT (oracle)"] + \
        [f"{s} (oracle)" for s in skills]
    if cfg.get("with_router"):
        head += ["avg (router)", "BWT (router)", "routing acc"]
    head += ["build s", "eval s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        s = m.get("summary") or {}
        o, r = s.get("oracle") or {}, s.get("router") or {}
        label = name + ("*" if s.get("task_agnostic") else "")
        if m.get("error"):
            label += f" (FAILED: {m['error'][:60]})"
        elif not s.get("complete"):
            label += " (incomplete)"
        row = [label, _fmt(s.get("storage_fraction"), pct=False),
               _fmt(o.get("average_final")), _signed(o.get("bwt"))]
        row += [_fmt((o.get("final_per_skill") or {}).get(sk)) for sk in skills]
        if cfg.get("with_router"):
            row += [_fmt(r.get("average_final")), _signed(r.get("bwt")),
                    _fmt(s.get("routing_accuracy_final"))]
        row += [f"{s.get('build_s', 0):.0f}", f"{s.get('eval_s', 0):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Average success (oracle) after each admission step", ""]
    head = ["method"] + [f"t={t + 1} (+{sk})" for t, sk in enumerate(skills)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        per = ((m.get("summary") or {}).get("oracle") or {}).get("average_per_step") or []
        lines.append("| " + " | ".join([name] + [_fmt(per[t]) if t < len(per) else "-"
                                                 for t in range(len(skills))]) + " |")
    lines += ["", "## Success matrix acc[t][i] (oracle, %)", ""]
    for name, m in results["methods"].items():
        acc = ((m.get("summary") or {}).get("oracle") or {}).get("acc") or []
        cells = "; ".join(f"t={t + 1}: " + " ".join(_fmt(v) for v in row)
                          for t, row in enumerate(acc))
        lines.append(f"- `{name}`: {cells or '-'}")
    lines += ["", f"Total wall time {results.get('wall_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out: Path) -> list[str]:
    """PNG plots (matplotlib Agg): success per step, storage vs success, CARVE rank vs success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    methods = results["methods"]
    T = len(results["config"]["experts"])

    # One panel per mode (oracle / router), one colour per method (tab20: up to 20 distinct).
    modes = [md for md in MODES if any((m.get("summary") or {}).get(md) for m in methods.values())]
    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, len(modes), figsize=(5.0 * len(modes) + 2.2, 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for k, (name, m) in enumerate(methods.items()):
            per = ((m.get("summary") or {}).get(mode) or {}).get("average_per_step")
            if per:
                ax.plot(range(1, len(per) + 1), [100 * v for v in per], marker="o",
                        color=colors[k % len(colors)], label=name,
                        ls="--" if (m.get("summary") or {}).get("task_agnostic") else "-")
        ax.set_title("task id given (oracle)" if mode == "oracle" else "text router (no task id)",
                     fontsize=9)
        ax.set_xlabel("admission step t")
        ax.set_xticks(range(1, T + 1))
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average success over admitted skills (%)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5),
                       title="dashed: one merged model", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "success_per_step.png", dpi=120)
    plt.close(fig)
    files.append("success_per_step.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # methods landing on the same point share one label
    points: dict[tuple[float, float], list[str]] = {}
    for name, m in methods.items():
        s = m.get("summary") or {}
        avg = (s.get("oracle") or {}).get("average_final")
        if avg is None or s.get("storage_fraction") is None:
            continue
        points.setdefault((round(s["storage_fraction"], 4), round(100 * avg, 2)), []).append(name)
    for (x, y), names in points.items():
        ax.scatter(x, y)
        ax.annotate(", ".join(names), (x, y), fontsize=7, textcoords="offset points",
                    xytext=(4, 3))
    ax.set_xlabel("storage on disk (bytes, fraction of expert bank)")
    ax.set_ylabel("final average success, oracle (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "storage_vs_success.png", dpi=120)
    plt.close(fig)
    files.append("storage_vs_success.png")

    pts = sorted((m["spec"]["rank"], 100 * m["summary"]["oracle"]["average_final"])
                 for m in methods.values()
                 if m["spec"].get("rank") is not None and not m["spec"]["options"].get(
                     "drift_compensation")
                 and ((m.get("summary") or {}).get("oracle") or {}).get("average_final")
                 is not None)
    if pts:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="CARVE (oracle)")
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
        fig.savefig(out / "rank_vs_success.png", dpi=120)
        plt.close(fig)
        files.append("rank_vs_success.png")
    return files


def write_all(results: dict, out) -> dict:
    """Write table.md and the plots into ``out``; -> {"table": ..., "plots": [...]} (names)."""
    out = Path(out)
    (out / "table.md").write_text(table_markdown(results))
    return {"results": "results.json", "table": "table.md", "plots": write_plots(results, out)}
