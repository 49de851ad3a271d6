"""bench/closed_loop/publish.py: results.json -> the marked blocks of docs/BENCHMARKS.md and README.

The publisher must be deterministic (same results, same bytes), touch nothing outside its
markers, carry the command / machine / wall time of the run, and refuse a results.json of the
wrong schema with exit 2 and one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.closed_loop import publish
from bench.closed_loop.run import SCHEMA

REPO = Path(__file__).resolve().parents[1]


def _results() -> dict:
    """A complete 2-expert results.json as the runner writes it (episodes recorded)."""
    def tr(k, n=5):
        return {"oracle": {"success_rate": k / n,
                           "episodes": [{"episode": j, "success": j < k} for j in range(n)]}}

    def step(t, ks, frac):
        names = ["buttons", "windows"][:t]
        return {"t": t, "admitted": names[-1], "kind": "state", "task_agnostic": False,
                "storage_fraction": {"fraction": frac}, "build_s": 0.5, "eval_s": 3.0,
                "skills": {n: {"tasks": {f"{n}-v3": tr(k)}, "oracle": k / 5}
                           for n, k in zip(names, ks)}}

    methods = {
        "bank": {"spec": {"name": "bank", "rank": None, "options": {}}, "error": None,
                 "steps": [step(1, [5], 1.0), step(2, [5, 4], 1.0)]},
        "carve-r16": {"spec": {"name": "carve-r16", "rank": 16, "options": {"rank": 16}},
                      "error": None, "steps": [step(1, [5], 2.0), step(2, [3, 5], 1.1)]},
    }
    return {"schema": SCHEMA, "created": "2026-12-01T23:00:00+00:00",
            "command": "carve bench closed-loop --preset demo --methods bank,carve-r16 "
                       "--episodes 5 --seed 1000 --out results/x",
            "config": {"preset": "demo", "factory_hash": "abc", "episodes": 5, "seed": 1000,
                       "max_steps": 150, "replan_every": None, "with_router": False,
                       "experts": [{"name": "buttons", "tasks": ["buttons-v3"]},
                                   {"name": "windows", "tasks": ["windows-v3"]}],
                       "host": {"hostname": "box1", "cpu_count": 2, "torch_threads": 1,
                                "loadavg_at_start": [3.5, 2.0, 1.0], "platform": "Linux-x"}},
            "methods": methods, "wall_s": 123.4, "steps_computed": 4, "steps_cached": 0,
            "compute_s": 14.0, "artifacts": {"plots": ["success_per_step.png"]}}


def _docs(tmp_path):
    docs, readme = tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    docs.write_text("# B\n\nbefore\n<!-- closed-loop:begin -->\nold\n<!-- closed-loop:end -->\n"
                    "after, transport section\n")
    readme.write_text("# R\n<!-- closed-loop:begin -->\n<!-- closed-loop:end -->\ntail\n")
    return docs, readme


def _write(tmp_path, res) -> Path:
    p = tmp_path / "results.json"
    p.write_text(json.dumps(res))
    return p


def test_publish_is_deterministic_and_only_touches_the_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs, readme = _docs(tmp_path)
    src = _write(tmp_path, _results())
    argv = [str(src), "--docs", str(docs), "--readme", str(readme)]
    assert publish.main(argv) == 0
    d1, r1 = docs.read_bytes(), readme.read_bytes()
    text = d1.decode()
    assert text.startswith("# B\n\nbefore\n<!-- closed-loop:begin -->\n")
    assert text.endswith("<!-- closed-loop:end -->\nafter, transport section\n")
    assert "old" not in text
    for needle in ("carve bench closed-loop --preset demo --methods bank,carve-r16",
                   "host `box1`", "2 CPUs", "load average 3.50", "wall time 123 s",
                   "Last invocation 2026-12-01T23:00:00+00:00",
                   "**5 episode(s) per task**", "python -m bench.closed_loop.publish results.json",
                   "| carve-r16 | 1.100 | 2.000 / 1.100 |"):
        assert needle in text, needle
    # Wilson interval of bank's pooled 9/10, as the statistics module computes it
    from bench.closed_loop.stats import wilson

    lo, hi = wilson(9, 10)
    assert f"90.0 [{100 * lo:.1f}, {100 * hi:.1f}] (9/10)" in text
    assert "tail\n" in readme.read_text() and "| bank |" in readme.read_text()
    # publishing again changes nothing, byte for byte; --check agrees
    assert publish.main(argv) == 0
    assert docs.read_bytes() == d1 and readme.read_bytes() == r1
    assert publish.main(argv + ["--check"]) == 0
    docs.write_text(d1.decode().replace("| bank |", "| bank (edited) |"))
    assert publish.main(argv + ["--check"]) == 1                 # hand edit detected ...
    assert "(edited)" in docs.read_text()                          # ... and not overwritten
    assert not list(tmp_path.glob(".*.tmp-*"))


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: r.update(schema="carve-closed-loop/0"), "schema 'carve-closed-loop/0'"),
    (lambda r: r.pop("command"), "missing command"),
    (lambda r: r["config"].pop("host"), "missing config.host"),
    (lambda r: r.update(methods={}), "no methods"),
    (lambda r: r["methods"]["bank"].pop("steps"), "no 'steps' list"),
])
def test_wrong_schema_fails_with_exit_2_and_one_line(tmp_path, capsys, mutate, msg):
    docs, readme = _docs(tmp_path)
    before = docs.read_bytes()
    res = _results()
    mutate(res)
    src = _write(tmp_path, res)
    assert publish.main([str(src), "--docs", str(docs), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert docs.read_bytes() == before


def test_bad_files_fail_with_exit_2(tmp_path, capsys):
    docs, readme = _docs(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert publish.main([str(bad), "--docs", str(docs), "--readme", str(readme)]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert publish.main([str(tmp_path / "nope.json"), "--docs", str(docs)]) == 2
    assert "cannot read" in capsys.readouterr().err
    src = _write(tmp_path, _results())
    docs.write_text("no markers here\n")
    assert publish.main([str(src), "--docs", str(docs), "--readme", str(readme)]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_runs_as_a_module(tmp_path):
    docs, readme = _docs(tmp_path)
    src = _write(tmp_path, _results())
    p = subprocess.run([sys.executable, "-m", "bench.closed_loop.publish", str(src), "--docs",
                        str(docs), "--readme", str(readme)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "updated" in p.stdout and "| carve-r16 |" in docs.read_text()


def test_repository_docs_have_the_markers():
    """The checked-in docs carry exactly one block each, so publishing can always run."""
    for f in ("docs/BENCHMARKS.md", "README.md"):
        text = (REPO / f).read_text()
        assert text.count(publish.BEGIN) == 1 and text.count(publish.END) == 1, f


def test_note_and_invocations_are_published(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    docs, readme = _docs(tmp_path)
    res = _results()
    res["invocations"] = [{"wall_s": 100.0}, {"wall_s": 23.4}]   # resumed once
    src = _write(tmp_path, res)
    argv = [str(src), "--docs", str(docs), "--readme", str(readme),
            "--note", "Demo preset on a shared machine."]
    assert publish.main(argv) == 0
    for f in (docs, readme):
        text = f.read_text()
        assert "\nDemo preset on a shared machine.\n" in text
        assert "--note 'Demo preset on a shared machine.'`; do not edit" in text
        assert "2 invocations of this command in all, 123 s wall" in text
    assert publish.main(argv[:-1] + ["two\nlines"]) == 2
    assert "one line" in capsys.readouterr().err


def test_named_block_is_rewritten_alone(tmp_path, monkeypatch, capsys):
    """--block NAME rewrites only its own markers, so one doc can carry several runs."""
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("<!-- closed-loop:begin -->\nmain run\n<!-- closed-loop:end -->\n"
                    "<!-- closed-loop:stream:begin -->\n<!-- closed-loop:stream:end -->\n")
    src = _write(tmp_path, _results())
    assert publish.main([str(src), "--docs", str(docs), "--no-readme", "--block", "stream"]) == 0
    text = docs.read_text()
    assert text.startswith("<!-- closed-loop:begin -->\nmain run\n<!-- closed-loop:end -->\n")
    generated = text.split("<!-- closed-loop:stream:begin -->")[1]
    assert "| carve-r16 |" in generated
    assert "python -m bench.closed_loop.publish results.json --block stream" in generated
    assert publish.main([str(src), "--docs", str(docs), "--no-readme", "--block", "stream",
                         "--check"]) == 0
    # a block the doc does not have, and a malformed name: exit 2, one line, nothing written
    capsys.readouterr()
    assert publish.main([str(src), "--docs", str(docs), "--no-readme", "--block", "other"]) == 2
    assert "closed-loop:other:begin" in capsys.readouterr().err
    assert publish.main([str(src), "--docs", str(docs), "--no-readme", "--block", "a b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--block" in err
    assert docs.read_text() == text
