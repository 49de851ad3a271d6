"""Publish a closed-loop ``results.json`` into docs/BENCHMARKS.md and README.md (by script).

    python -m bench.closed_loop.publish results/closed-loop/results.json [--check]

Each file holds one generated block between ``<!-- closed-loop:begin -->`` and
``<!-- closed-loop:end -->`` (``--block NAME``: ``<!-- closed-loop:NAME:begin -->`` ... so one doc
can carry several runs, e.g. the demo run and a stream pilot); only that block is rewritten (temp file + rename), the rest of the
file is left byte for byte. The block is a pure function of results.json: summaries and their
95 % intervals are recomputed from the recorded episodes with a fixed bootstrap seed, and no
clock or host of the publishing machine enters it, so publishing the same results twice gives the
same bytes. ``--check`` writes nothing and exits 1 if a file is not up to date (for CI).

Exit codes: 0 written / up to date, 1 ``--check`` found a stale file, 2 bad input (wrong schema,
missing keys, missing or duplicated markers), with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from bench.closed_loop import report
from bench.closed_loop.run import SCHEMA, write_text_atomic

BEGIN = "<!-- closed-loop:begin -->"
END = "<!-- closed-loop:end -->"


def markers(block: str | None = None) -> tuple[str, str]:
    """(begin, end) marker lines of the named generated block (None: the default one)."""
    if not block:
        return BEGIN, END
    if not block.replace("-", "").replace("_", "").isalnum():
        raise PublishError(f"--block: {block!r} must be letters, digits, '-' or '_'")
    return f"<!-- closed-loop:{block}:begin -->", f"<!-- closed-loop:{block}:end -->"


class PublishError(Exception):
    """Bad input to the publisher (exit 2)."""


def load_results(path: Path) -> dict:
    """Read and validate a results.json; recompute every method's summary from its steps."""
    try:
        with open(path) as f:
            res = json.load(f)
    except OSError as e:
        raise PublishError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise PublishError(f"{path} is not JSON: {e}") from None
    if not isinstance(res, dict) or res.get("schema") != SCHEMA:
        got = res.get("schema") if isinstance(res, dict) else type(res).__name__
        raise PublishError(f"{path}: schema {got!r}, expected {SCHEMA!r} "
                           "(a `carve bench closed-loop` results.json)")
    cfg = res.get("config")
    missing = [k for k in ("command", "wall_s", "config", "methods", "created") if k not in res]
    if isinstance(cfg, dict):
        missing += [f"config.{k}" for k in ("preset", "episodes", "seed", "max_steps", "experts",
                                            "host", "with_router") if k not in cfg]
    if missing:
        raise PublishError(f"{path}: missing {', '.join(missing)} (written by an older runner? "
                           "rerun the benchmark; cached steps are reused)")
    if not isinstance(res["methods"], dict) or not res["methods"]:
        raise PublishError(f"{path}: no methods recorded")
    skills = [e["name"] for e in cfg["experts"]]
    for name, m in res["methods"].items():
        if not isinstance(m, dict) or not isinstance(m.get("steps"), list):
            raise PublishError(f"{path}: method {name!r} has no 'steps' list")
        m["summary"] = report.summarize_method(m, skills, episodes=cfg["episodes"])
    return res


def _display_path(path: Path) -> str:
    """The results path as a reader would type it: relative to the working directory."""
    rel = os.path.relpath(Path(path).resolve(), Path.cwd().resolve())
    return str(path) if rel.startswith("..") else rel


def _expert_kinds(cfg: dict) -> str:
    """What the experts are: full fine-tunes, LoRA adapters, or both."""
    names = {"full": "full fine-tunes", "lora": "LoRA adapters"}
    kinds = sorted({e.get("kind") or "full" for e in cfg["experts"]})
    return " and ".join(names.get(k, k) for k in kinds)


def _provenance(res: dict, src: str, note: str | None = None,
                block: str | None = None) -> list[str]:
    cfg, host = res["config"], res["config"]["host"] or {}
    skills = [e["name"] for e in cfg["experts"]]
    n_tasks = sum(len(e.get("tasks") or []) for e in cfg["experts"])
    load = host.get("loadavg_at_start")
    machine = ", ".join(x for x in (
        host.get("hostname") and f"host `{host['hostname']}`",
        host.get("cpu_count") and f"{host['cpu_count']} CPUs",
        f"torch {host['torch']}" if host.get("torch") else None,
        f"{host.get('torch_threads', 1)} torch thread",
        host.get("code") and (f"commit {host['code']['commit'][:10]}"
                              + (" with local changes" if host["code"].get("dirty") else "")),
        f"load average {load[0]:.2f} at the start of the last invocation" if load else None,
        host.get("platform")) if x)
    computed = res.get("steps_computed")
    steps = ("" if computed is None else
             f" ({computed} step(s) evaluated in that invocation, {res.get('steps_cached', 0)} "
             f"reused from the cache; {res.get('compute_s', 0):.0f} s of build + evaluation "
             "recorded over all steps)")
    invs = res.get("invocations") or []
    if len(invs) > 1:
        steps += (f"; {len(invs)} invocations of this command in all, "
                  f"{sum(i.get('wall_s') or 0 for i in invs):.0f} s wall")
    note_arg = ("" if not block else f" --block {block}") + (
        "" if not note else " --note " + shlex.quote(note))
    return [
        f"<!-- generated by `python -m bench.closed_loop.publish {src}{note_arg}`; "
        "do not edit by hand -->",
        "",
        *([note, ""] if note else []),
        f"Command: `{res['command']}`",
        "",
        f"Preset `{cfg['preset']}` (factory `{cfg.get('factory_hash')}`): {len(skills)} experts "
        f"({_expert_kinds(cfg)}) admitted in order ({', '.join(skills)}), {n_tasks} Meta-World tasks, "
        f"**{cfg['episodes']} episode(s) per task** (seed {cfg['seed']}, same placements for "
        f"every method), max {cfg['max_steps']} steps, "
        + ("oracle skill id and text router" if cfg.get("with_router") else "oracle skill id only")
        + report.curve_clause(cfg)
        + f". Machine: {machine or 'unrecorded'}. Last invocation {res['created']}, wall time "
        f"{res['wall_s']:.0f} s{steps}. Source: `{src}` (plots beside it: "
        + ", ".join(f"`{p}`" for p in (res.get("artifacts") or {}).get("plots", []))
        + "; `results/` is not committed).",
    ]


def _halfwidth_line(res: dict) -> str:
    hw = report.halfwidths(res)
    boot = sorted(v["bootstrap"] for v in hw.values() if v["bootstrap"] is not None)
    wil = sorted(v["wilson_pooled"] for v in hw.values() if v["wilson_pooled"] is not None)
    if not boot or not wil:
        return "No intervals: the results carry no episode records."
    return (f"Achieved 95 % half-widths of the final average (oracle): bootstrap over tasks "
            f"{boot[0]:.1f}-{boot[-1]:.1f} points (median {boot[len(boot) // 2]:.1f}), pooled "
            f"Wilson {wil[0]:.1f}-{wil[-1]:.1f} points. A bootstrap interval collapses to the "
            "point when every resampled episode has the same outcome (e.g. 100 %); the Wilson "
            "interval of the pooled count is the one to read there.")


def docs_block(res: dict, src: str, note: str | None = None, block: str | None = None) -> str:
    """The generated docs/BENCHMARKS.md block (without the markers)."""
    lines = _provenance(res, src, note, block) + ["", _halfwidth_line(res), ""]
    lines += report.summary_table(res)
    lines += ["", "Average success (oracle, %) after each admission step [bootstrap 95 % CI]:",
              ""]
    lines += report.per_step_table(res, "oracle")
    if res["config"].get("with_router"):
        lines += ["", "Average success (router, %) after each admission step [bootstrap 95 % CI]:",
                  ""]
        lines += report.per_step_table(res, "router")
    lines += ["", "`*` = one task-agnostic merged model (stored as 1/t of the bank). Storage/bank "
              "by t = bytes a server keeps after admitting t experts over the bytes of t whole "
              "experts. Per-task Wilson intervals and the success matrices are in `table.md` "
              "beside the results."]
    return "\n".join(lines)


def readme_block(res: dict, src: str, note: str | None = None,
                 block: str | None = None) -> str:
    """The generated README.md block (compact: no per-suite columns, no timings)."""
    lines = _provenance(res, src, note, block) + ["", _halfwidth_line(res), ""]
    lines += report.summary_table(res, per_suite=False, timings=False)
    lines += ["", "Full tables, protocol and reading: `docs/BENCHMARKS.md` (closed-loop section)."]
    return "\n".join(lines)


def splice(text: str, block: str, where: str, name: str | None = None) -> str:
    """Replace what is between the begin/end markers (of block ``name``) of ``text`` with
    ``block``."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise PublishError(f"{where}: needs exactly one {begin} and one {end} marker line "
                           f"(found {text.count(begin)} and {text.count(end)})")
    i, j = text.index(begin) + len(begin), text.index(end)
    if j < i:
        raise PublishError(f"{where}: {end} comes before {begin}")
    return text[:i] + "\n" + block + "\n" + text[j:]


def publish(results_path, docs="docs/BENCHMARKS.md", readme="README.md",
            check: bool = False, note: str | None = None,
            block: str | None = None) -> list[str]:
    """Regenerate the marked blocks; -> the files that changed (or, with check, would change).
    note: one sentence of context printed above the tables (what the run is, e.g. its caveats);
    it is part of the regenerating command written into the block. block: the name of the
    marked block to rewrite (None: the default one)."""
    markers(block)  # a bad name is refused before anything is read
    res = load_results(Path(results_path))
    src = _display_path(Path(results_path))

    changed = []
    for path, text in ((docs, docs_block(res, src, note, block)),
                       (readme, readme_block(res, src, note, block))):
        if path is None:
            continue
        path = Path(path)
        try:
            old = path.read_text()
        except OSError as e:
            raise PublishError(f"cannot read {path}: {e.strerror or e}") from None
        new = splice(old, text, str(path), block)
        if new != old:
            changed.append(str(path))
            if not check:
                write_text_atomic(path, new)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.closed_loop.publish",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="results.json written by `carve bench closed-loop`")
    ap.add_argument("--docs", default="docs/BENCHMARKS.md", help="benchmarks doc to update")
    ap.add_argument("--readme", default="README.md", help="README to update")
    ap.add_argument("--no-readme", action="store_true", help="update the docs only")
    ap.add_argument("--block", default=None, metavar="NAME",
                    help="rewrite the block marked <!-- closed-loop:NAME:begin/end --> instead "
                         "of the default one")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a file is not up to date")
    ap.add_argument("--note", default=None,
                    help="one sentence of context shown above the tables (e.g. 'demo preset, "
                         "shared machine')")
    a = ap.parse_args(argv)
    if a.note is not None and ("\n" in a.note or "-->" in a.note):
        print("publish: error: --note must be one line without '-->'", file=sys.stderr)
        return 2
    try:
        changed = publish(a.results, a.docs, None if a.no_readme else a.readme, check=a.check,
                          note=a.note, block=a.block)
    except PublishError as e:
        print(f"publish: error: {e}", file=sys.stderr)
        return 2
    if a.check:
        if changed:
            print(f"publish: out of date: {', '.join(changed)}", file=sys.stderr)
            return 1
        print("publish: up to date")
        return 0
    print(f"publish: updated {', '.join(changed)}" if changed else "publish: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
