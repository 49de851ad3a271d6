"""Closed-loop continual-merging benchmark (bench/closed_loop): metrics, specs, a real smoke run.

The smoke run trains a tiny 2-expert factory on the real Meta-World simulator (its own cache in
tmp), admits both experts with CARVE, serves each step over gRPC and runs the tasks through the
real client, then checks the written results for consistency.
"""

from __future__ import annotations

import json

import pytest

from bench.closed_loop import report, stats
from bench.closed_loop.methods import REGISTRY, parse_label, resolve  # noqa: E402
from policy_server.errors import InputError  # noqa: E402


# ---------------------------------------------------------------- metrics on hand-made matrices
def test_bwt_and_average_on_hand_made_matrix():
    acc = [[0.9],
           [0.7, 0.8],
           [0.6, 1.0, 0.5]]
    # BWT = mean over i < T of acc[T][i] - acc[i][i] = ((0.6 - 0.9) + (1.0 - 0.8)) / 2
    assert report.bwt(acc) == pytest.approx(-0.05)
    assert report.average_final(acc) == pytest.approx(0.7)
    assert report.bwt([[1.0]]) is None                       # no earlier skill to forget
    assert report.bwt([[1.0], [1.0, 0.0]]) == pytest.approx(0.0)  # last skill's term is excluded
    with pytest.raises(ValueError, match="row 1"):
        report.bwt([[1.0], [1.0]])


def _episodes(rate, n=4):
    k = round(rate * n)
    return [{"episode": j, "success": j < k} for j in range(n)]


def _fake_results(with_router=True):
    skills = ["a", "b"]

    def step(t, vals, frac, agnostic=False):
        sk = {}
        for name, v in zip(skills[:t], vals):
            tr = {"oracle": {"success_rate": v, "episodes": _episodes(v)}}
            if with_router:
                tr["router"] = {"success_rate": v / 2, "routing_accuracy": 0.5,
                                "episodes": _episodes(v / 2)}
            sk[name] = {"tasks": {f"{name}-task": tr}, "oracle": v,
                        **({"router": v / 2} if with_router else {})}
        return {"t": t, "skills": sk, "storage_fraction": {"fraction": frac},
                "task_agnostic": agnostic, "build_s": 1.0, "eval_s": 2.0}

    m = {"spec": {"name": "x", "rank": 16, "options": {"rank": 16}},
         "steps": [step(1, [1.0], 1.0), step(2, [0.5, 1.0], 0.6)], "error": None}
    m["summary"] = report.summarize_method(m, skills, episodes=4)
    res = {"config": {"preset": "demo", "episodes": 4, "seed": 0, "max_steps": 10,
                      "with_router": with_router,
                      "experts": [{"name": s, "tasks": [f"{s}-task"]} for s in skills]},
           "methods": {"carve-r16": m}, "wall_s": 3.0}
    return res, m


def test_summary_table_and_plots(tmp_path):
    res, m = _fake_results()
    s = m["summary"]
    assert s["complete"] and s["oracle"]["acc"] == [[1.0], [0.5, 1.0]]
    assert s["oracle"]["bwt"] == pytest.approx(-0.5)
    assert s["oracle"]["average_final"] == pytest.approx(0.75)
    assert s["router"]["average_final"] == pytest.approx(0.375)
    assert s["routing_accuracy_final"] == pytest.approx(0.5)
    assert s["storage_fraction"] == pytest.approx(0.6)
    assert s["storage_per_step"] == [1.0, 0.6]
    # pooled final episodes: 2/4 + 4/4 = 6/8, its Wilson interval
    pooled = s["oracle"]["pooled_final"]
    assert (pooled["k"], pooled["n"]) == (6, 8)
    assert pooled["ci"] == pytest.approx(list(stats.wilson(6, 8)))
    lo, hi = s["oracle"]["average_final_ci"]
    assert lo <= 0.75 <= hi and hi - lo > 0
    assert s["oracle"]["final_per_skill_ci"]["b"]["ci"] == pytest.approx(list(stats.wilson(4, 4)))
    assert s["oracle"]["final_per_task"]["a-task"]["k"] == 2
    blo, bhi = s["oracle"]["bwt_ci"]
    assert -1.0 <= blo < -0.5 < bhi <= 0.0   # 4/4 -> 2/4 on the same placements: never a gain
    assert len(s["oracle"]["average_per_step_ci"]) == 2
    art = report.write_all(res, tmp_path)
    table = (tmp_path / "table.md").read_text()
    w = stats.wilson(6, 8)
    row = (f"| carve-r16 | 0.600 | 1.000 / 0.600 | 75.0 [{100 * lo:.1f}, {100 * hi:.1f}] | "
           f"75.0 [{100 * w[0]:.1f}, {100 * w[1]:.1f}] (6/8) | -50.0 [{100 * blo:+.1f}, "
           f"{100 * bhi:+.1f}] |")
    assert row in table, table
    for name in art["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"rank_vs_success.png", "storage_vs_experts.png",
            "success_per_step.png"} <= set(art["plots"])
    assert not list(tmp_path.glob(".*.tmp-*"))   # atomic writes leave no temp files behind


def test_router_refusal_counts_as_failed_episodes():
    assert report.task_outcomes({"refused": "no skill", "episodes": []}, episodes=3) == [0, 0, 0]
    assert report.task_outcomes({"success_rate": 1.0}) == []          # legacy: no interval
    assert report.task_outcomes({"episodes": _episodes(0.5)}) == [1, 1, 0, 0]


# ---------------------------------------------------------------- interval statistics
def test_wilson_reference_values():
    # Wilson (1927) score interval, 95 %: standard published values
    assert stats.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert stats.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert stats.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert stats.wilson(10, 10)[1] == 1.0 and stats.wilson(0, 10)[0] == 0.0
    with pytest.raises(ValueError):
        stats.wilson(11, 10)


def test_default_episodes_give_five_point_half_width():
    from bench.closed_loop.run import DEFAULT_EPISODES

    # 20 tasks x the default: the worst case (p = 0.5) pooled interval is within +-5 points
    assert stats.episodes_for_halfwidth(20) == DEFAULT_EPISODES == 20
    n = 20 * DEFAULT_EPISODES
    lo, hi = stats.wilson(n // 2, n)
    assert (hi - lo) / 2 <= 0.05
    # ... and 10 episodes would not be enough
    lo, hi = stats.wilson(100, 200)
    assert (hi - lo) / 2 > 0.05


def test_bootstrap_intervals():
    import numpy as np

    rng = np.random.default_rng(0)
    outcomes = [[rng.random(20) < p for p in (0.9, 0.6, 0.3)], [rng.random(20) < 0.8]]
    point = np.mean([np.mean([o.mean() for o in s]) for s in outcomes])
    ci = stats.bootstrap_average(outcomes)
    assert ci[0] < point < ci[1]
    assert stats.bootstrap_average(outcomes) == ci               # seeded: reproducible
    assert stats.bootstrap_average(outcomes, seed=1) != ci
    few = stats.bootstrap_average([[o[:4] for o in s] for s in outcomes])
    assert few[1] - few[0] > ci[1] - ci[0]                        # fewer episodes, wider
    assert stats.bootstrap_average([[np.ones(5)], [np.ones(3)]]) == (1.0, 1.0)
    assert stats.bootstrap_average([[[]]]) is None
    same = [[(np.r_[1, 0, 1, 1], np.r_[1, 0, 1, 1])]]
    assert stats.bootstrap_bwt(same) == (0.0, 0.0)                # paired: no change, no noise
    drop = stats.bootstrap_bwt([[(np.ones(10), np.zeros(10))]])
    assert drop == (-1.0, -1.0)
    with pytest.raises(ValueError, match="length"):
        stats.bootstrap_bwt([[(np.ones(3), np.ones(4))]])


def test_incomplete_method_has_no_final_numbers():
    res, m = _fake_results(with_router=False)
    m["steps"] = m["steps"][:1]
    m["error"] = "RuntimeError: boom"
    s = report.summarize_method(m, ["a", "b"])
    assert not s["complete"] and s["oracle"]["average_final"] is None and "router" not in s
    res["methods"]["carve-r16"]["summary"] = s
    assert "FAILED: RuntimeError: boom" in report.table_markdown(res)


def test_report_of_a_method_that_failed_before_any_step(tmp_path):
    res, m = _fake_results(with_router=False)
    m["steps"], m["error"] = [], "RuntimeError: server did not start"
    m["summary"] = report.summarize_method(m, ["a", "b"])
    art = report.write_all(res, tmp_path)      # tables and plots still written
    assert "success_per_step.png" in art["plots"]
    assert "FAILED: RuntimeError: server did not start" in (tmp_path / "table.md").read_text()


# ---------------------------------------------------------------- method specs
def test_method_labels():
    assert parse_label("carve-r8").options == {"rank": 8} and parse_label("carve-r8").rank == 8
    e = parse_label("carve-e0.95-drift")
    assert e.options == {"energy": 0.95, "drift_compensation": True} and e.rank is None
    assert [s.name for s in resolve("bank, ta,bank")] == ["bank", "ta"]
    every = resolve("all")
    assert [s.name for s in every] == list(REGISTRY)
    assert [s.name for s in resolve("ta,all")][:2] == ["ta", "bank"]
    assert {"carve-e0.95", "carve-r16-rate-t1", "carve-r16-rate-count", "iso_c", "iso_cts",
            "tall_mask-heads"} <= set(REGISTRY)
    assert REGISTRY["tall_mask"].build == "oneshot" and REGISTRY["opcm"].build == "continual"
    with pytest.raises(InputError, match="unknown benchmark method"):
        parse_label("nope")
    with pytest.raises(InputError, match="no benchmark methods"):
        resolve(" , ")


def test_every_registered_spec_names_a_real_method():
    from policy_server.merge.methods import get_method

    for spec in REGISTRY.values():
        cls = get_method(spec.method)
        if spec.build == "continual":
            assert cls.continual, spec.name
        if cls.options_cls is not None:   # the engine accepts every option the spec passes
            cls.options_cls(**spec.options)


def test_expert_head_pattern_names_demo_vla_keys():
    """tall_mask-heads must select real keys of the benchmark's model, or it is plain TALL."""
    from fnmatch import fnmatch

    from policy_server.models.demo_vla import DemoVLAConfig, DemoVLAModule

    keys = list(DemoVLAModule(DemoVLAConfig()).state_dict())
    pats = REGISTRY["tall_mask-heads"].options["head_patterns"]
    heads = [k for k in keys if any(fnmatch(k, p) for p in pats)]
    assert heads and len(heads) < len(keys)
    assert all(k.startswith("action_expert.head.") for k in heads)


def test_step_key_covers_what_determines_a_step():
    from bench.closed_loop.run import step_key

    ex = [{"name": "a"}, {"name": "b"}]
    base = dict(factory_hash="f1", spec=REGISTRY["carve-r16"], experts=ex, episodes=5, seed=1,
                max_steps=100, replan_every=None, with_router=True)
    k0 = step_key(**base)
    assert step_key(**base) == k0
    for change in (dict(factory_hash="f2"), dict(spec=REGISTRY["carve-r4"]),
                   dict(spec=REGISTRY["carve-r16-rate-t1"]), dict(experts=ex[:1]),
                   dict(experts=ex[::-1]), dict(episodes=6), dict(seed=2), dict(max_steps=99),
                   dict(replan_every=4), dict(with_router=False)):
        assert step_key(**dict(base, **change)) != k0, change
    # fewer episodes for the older skills is another step; the same count is the same step
    assert step_key(**base, older_episodes=2) != k0
    assert step_key(**base, older_episodes=5) == step_key(**base, older_episodes=None) == k0


def test_step_episode_counts_keep_headline_cells_full():
    from bench.closed_loop.run import step_episode_counts

    # non-final step: the new skill (its acc[i][i]) gets the full count, older skills fewer
    assert step_episode_counts(3, 5, 20, 5) == [5, 5, 20]
    assert step_episode_counts(5, 5, 20, 5) == [20] * 5          # final step: the table
    assert step_episode_counts(1, 5, 20, 5) == [20]
    assert step_episode_counts(3, 5, 20, None) == [20, 20, 20]


def test_mixed_episode_counts_summarise_with_paired_bwt():
    """Older cells at fewer episodes: the curve's band uses them as they are, and BWT pairs the
    full-count diagonal with the full-count final step (episode j = placement j in both)."""
    def step(t, per_skill):
        return {"t": t, "storage_fraction": {"fraction": 1.0}, "build_s": 0.0, "eval_s": 1.0,
                "skills": {
            name: {"oracle": sum(o) / len(o), "tasks": {f"{name}-task": {"oracle": {
                "success_rate": sum(o) / len(o),
                "episodes": [{"success": bool(x)} for x in o]}}}}
            for name, o in per_skill.items()}}

    steps = [step(1, {"a": [1, 1, 1, 1]}),
             step(2, {"a": [1], "b": [1, 0, 1, 1]}),           # older skill a: 1 episode
             step(3, {"a": [0, 1, 1, 1], "b": [1, 0, 0, 1], "c": [1, 1, 1, 1]})]
    summary = report.summarize_method({"steps": steps}, ["a", "b", "c"])
    assert summary["complete"]
    s = summary["oracle"]
    assert s["acc"][1] == [1.0, 0.75]
    assert s["bwt"] == pytest.approx(((0.75 - 1.0) + (0.5 - 0.75)) / 2)
    assert all(ci is not None for ci in s["average_per_step_ci"]) and s["bwt_ci"] is not None


def test_storage_fraction_rules():
    from bench.closed_loop.run import storage_fraction

    st = {"checkpoint_params": 100, "residual_params": 50, "fraction_of_bank_with_base": 0.9,
          "bytes_fraction_of_bank_with_base": 0.95}
    frac = storage_fraction("state", st, 2)
    # the column is the byte figure (state + base over the bank); parameters kept beside it
    assert frac["fraction"] == pytest.approx(0.95) and frac["param_fraction"] == pytest.approx(0.75)
    assert storage_fraction("state", st, 2, method="bank")["fraction"] == 1.0
    with pytest.raises(InputError, match="byte"):
        storage_fraction("state", {"checkpoint_params": 100, "residual_params": 50}, 2)
    assert storage_fraction("checkpoint", None, 4)["fraction"] == pytest.approx(0.25)
    assert storage_fraction("state", st, 4, per_skill=False)["fraction"] == pytest.approx(0.25)


def test_cli_parses():
    from policy_server.cli import build_parser

    a = build_parser().parse_args(["bench", "closed-loop", "--quick", "--oracle-only"])
    assert a.quick and a.with_router is False and a.func.__name__ == "run_closed_loop"
    a = build_parser().parse_args(["bench", "closed-loop", "--methods", "all", "--fresh"])
    assert a.methods == "all" and a.fresh and a.episodes is None


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "nope"], "unknown preset"),
    (["--methods", "bank,nope"], "unknown benchmark method"),
    (["--episodes", "0"], "episodes must be >= 1"),
    (["--episodes", "4", "--curve-episodes", "5"], "curve_episodes must be in 1..episodes"),
    (["--jobs", "0"], "jobs must be >= 1"),
    (["--lora-rank", "4"], "--lora-rank needs --lora"),
    (["--lora", "--family", "act"], "the act family has no LoRA experts"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, msg, tmp_path, capsys):
    from policy_server.cli import main

    assert main(["bench", "closed-loop", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


# ---------------------------------------------------------------- real closed-loop runs
@pytest.fixture(scope="module")
def tiny_factory(tmp_path_factory):
    """A 2-expert factory trained on the real simulator into its own cache (shared by tests)."""
    pytest.importorskip("metaworld", reason="Meta-World is the optional sim extra")
    import torch

    from policy_server.sim.suites import Preset
    from policy_server.training.train import build_factory

    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("closed-loop-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARVE_CACHE_DIR", str(cache))
        p = Preset(name="tinycl", base_tasks=["reach-v3"],
                   suites={"buttons": ["button-press-topdown-v3"], "windows": ["window-open-v3"]},
                   episodes_base=2, episodes_expert=2, max_steps=120, base_steps=20,
                   expert_steps=10, batch_size=32,
                   model={"hidden_dim": 64, "mlp_dim": 128, "num_expert_blocks": 1})
        yield build_factory(p, progress=False), cache


def test_closed_loop_smoke_real_server(tiny_factory, tmp_path):
    """Tiny 2-expert factory, CARVE r4, 1 episode per task, oracle only, real gRPC + Meta-World."""
    from bench.closed_loop.run import run_benchmark

    factory, _ = tiny_factory
    out = tmp_path / "res"
    res = run_benchmark(methods="carve-r4", episodes=1, out=out, with_router=False,
                        factory=factory, max_steps=40, log=lambda *a: None)
    for name in ("results.json", "table.md", "success_per_step.png", "storage_vs_success.png",
                 "storage_vs_experts.png"):
        assert (out / name).is_file(), name
    assert not (out / "_work").exists()
    disk = json.loads((out / "results.json").read_text())
    m = disk["methods"]["carve-r4"]
    assert m["error"] is None, m["error"]
    s = m["summary"]
    assert s["complete"] and [len(r) for r in s["oracle"]["acc"]] == [1, 2]
    assert all(0.0 <= v <= 1.0 for row in s["oracle"]["acc"] for v in row)
    acc = s["oracle"]["acc"]
    assert s["oracle"]["bwt"] == pytest.approx(acc[1][0] - acc[0][0])
    assert s["oracle"]["average_final"] == pytest.approx(sum(acc[1]) / 2)
    assert s["oracle"]["pooled_final"]["n"] == 2 and len(s["storage_per_step"]) == 2
    st = m["steps"][-1]
    ep = st["skills"]["windows"]["tasks"]["window-open-v3"]["oracle"]["episodes"]
    assert len(ep) == 1 and ep[0]["skill"] == "windows"   # the oracle id reached the server
    assert 0.0 < s["storage_fraction"] < 2.0 and st["storage"]["skills"] == 2
    assert "router" not in s and res["config"]["with_router"] is False
    assert disk["steps_computed"] == 2 and disk["steps_cached"] == 0 and disk["command"]


def _outcomes(res):
    """Per method, per step, per task: the episode successes (what a resumed run must keep)."""
    return {name: [{task: [e["success"] for e in tr["oracle"]["episodes"]]
                    for sk in st["skills"].values() for task, tr in sk["tasks"].items()}
                   for st in m["steps"]] for name, m in res["methods"].items()}


def test_resume_after_sigkill_reuses_cached_steps(tiny_factory, tmp_path, monkeypatch):
    """SIGKILL a run after its first cached step; the rerun evaluates only the missing steps,
    a third run evaluates nothing and reproduces the results; a corrupt cache entry is redone."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import bench.closed_loop.run as run_mod

    factory, cache = tiny_factory
    out = tmp_path / "res"
    fjson = tmp_path / "factory.json"
    fjson.write_text(json.dumps(factory))
    kw = dict(methods="carve-r4,ta", episodes=1, with_router=False, max_steps=40)
    code = ("import json, sys; from bench.closed_loop.run import run_benchmark; "
            "run_benchmark(factory=json.load(open(sys.argv[1])), out=sys.argv[2], "
            f"log=lambda *a: None, **{kw!r})")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code, str(fjson), str(out)], cwd=repo,
                            env=dict(os.environ, CARVE_CACHE_DIR=str(cache)))
    try:
        deadline = time.time() + 300
        while not list(out.glob("_cache/*/step*.json")):
            assert proc.poll() is None, "the benchmark exited before caching a step"
            assert time.time() < deadline, "no step cached within 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_with = sorted(out.glob("_cache/*/step*.json"))
    assert 1 <= len(killed_with) < 4 and not (out / "results.json").exists()

    calls = []
    real = run_mod._evaluate
    monkeypatch.setattr(run_mod, "_evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    r1 = run_mod.run_benchmark(factory=factory, out=out, log=lambda *a: None, **kw)
    assert len(calls) == 4 - len(killed_with)
    assert r1["steps_cached"] == len(killed_with) and r1["steps_computed"] == len(calls)
    assert all(m["error"] is None and m["summary"]["complete"] for m in r1["methods"].values())
    for f in killed_with:  # what the killed run cached is what the resumed run reports
        rec = json.loads(f.read_text())
        assert r1["methods"][rec["method"]]["steps"][rec["t"] - 1] == rec["step"]

    calls.clear()
    r2 = run_mod.run_benchmark(factory=factory, out=out, log=lambda *a: None, **kw)
    assert calls == [] and r2["steps_cached"] == 4
    # the killed run wrote no results.json: r1 and r2 are the recorded invocations
    assert [i["steps_computed"] for i in r2["invocations"]] == [4 - len(killed_with), 0]
    assert json.loads(json.dumps(r2["methods"], default=str)) == \
        json.loads(json.dumps(r1["methods"], default=str))

    # a half-written entry (not possible via the atomic writer, but a disk can lie) is redone
    victim = sorted(out.glob("_cache/carve-r4/step2-*.json"))[0]
    victim.write_text(victim.read_text()[:50])
    calls.clear()
    r3 = run_mod.run_benchmark(factory=factory, out=out, log=lambda *a: None, **kw)
    assert len(calls) == 1 and r3["steps_computed"] == 1
    assert _outcomes(r3) == _outcomes(r1)     # deterministic: the redone step agrees
    assert not list(out.rglob(".*.tmp-*"))

    # a different episode count is a different key: nothing is reused
    calls.clear()
    r4 = run_mod.run_benchmark(factory=factory, out=out, log=lambda *a: None,
                               **dict(kw, methods="ta", episodes=2))
    assert len(calls) == 2 and r4["steps_cached"] == 0
    assert len(r4["invocations"]) == 1        # another configuration: a new run, not a resume


@pytest.mark.slow
def test_quick_cli_end_to_end(tmp_path, capsys):
    """`carve bench closed-loop --quick` as CI runs it: the real CLI in a subprocess, the demo
    factory (trained once, then cached), router on. Its wall time is printed for the CI log
    (the 5-minute budget is a figure to watch there, not a timed assertion that flakes on a
    loaded host)."""
    pytest.importorskip("metaworld", reason="Meta-World is the optional sim extra")
    import subprocess
    import sys
    from pathlib import Path

    from policy_server.training.train import build_factory

    build_factory("demo", progress=False)  # outside the budget: cached across CI runs
    out = tmp_path / "quick"
    p = subprocess.run([sys.executable, "-m", "policy_server.cli", "bench", "closed-loop",
                        "--quick", "--out", str(out)], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    with capsys.disabled():  # into the CI log, where the budget is watched
        print(f"\ncarve bench closed-loop --quick: {res['wall_s']:.0f} s wall (budget 300 s)")
    assert set(res["methods"]) == {"carve-r16", "ta"} and res["config"]["episodes"] == 1
    for m in res["methods"].values():
        assert m["error"] is None and m["summary"]["complete"] and "router" in m["summary"]
    assert "--quick" not in res["command"] and "--episodes 1" in res["command"]
    assert "ETA" in p.stdout and "half-width" in p.stdout


def _traces(res, mode):
    """Per method, per step, per task: what each episode decided in ``mode`` (not wall time)."""
    from bench.closed_loop.run import _episode_trace

    return {name: [{task: _episode_trace(tr[mode]["episodes"])
                    for sk in st["skills"].values() for task, tr in sk["tasks"].items()}
                   for st in m["steps"]] for name, m in res["methods"].items()}


def test_router_reuse_equals_real_routed_runs(tiny_factory, tmp_path, monkeypatch):
    """Routed runs that reuse the oracle's episodes record exactly what real routed runs do
    (every step checks one task for real), and run fewer episodes."""
    import bench.closed_loop.run as run_mod
    import clients.metaworld_client as mw

    factory, _ = tiny_factory
    kw = dict(methods="carve-r4", episodes=2, with_router=True, max_steps=40, factory=factory,
              log=lambda *a: None)
    calls = []
    real_run_task = mw.run_task
    monkeypatch.setattr(mw, "run_task",
                        lambda *a, **k: calls.append(k.get("skill")) or real_run_task(*a, **k))
    slow = run_mod.run_benchmark(out=tmp_path / "real", router_reuse=False, **kw)
    n_real = len(calls)
    calls.clear()
    fast = run_mod.run_benchmark(out=tmp_path / "reuse", router_reuse=True, **kw)
    assert len(calls) < n_real
    assert _traces(fast, "router") == _traces(slow, "router")
    assert _traces(fast, "oracle") == _traces(slow, "oracle")
    for st in fast["methods"]["carve-r4"]["steps"]:
        recs = [tr["router"] for sk in st["skills"].values() for tr in sk["tasks"].values()]
        assert all(r.get("reused_oracle") and r["routing_accuracy"] == 1.0 for r in recs)
        assert sum(bool(r.get("reuse_verified")) for r in recs) == 1   # one real check a step
    s_fast = fast["methods"]["carve-r4"]["summary"]["router"]
    assert s_fast["acc"] == slow["methods"]["carve-r4"]["summary"]["router"]["acc"]


def test_router_reuse_check_failure_fails_the_method(tiny_factory, tmp_path, monkeypatch):
    """If a real routed rollout ever differed from the oracle's, the method fails with a
    message saying how to rerun, instead of publishing reused numbers."""
    import bench.closed_loop.run as run_mod

    factory, _ = tiny_factory
    seen = iter(range(10**6))
    monkeypatch.setattr(run_mod, "_episode_trace", lambda eps: [next(seen)])
    res = run_mod.run_benchmark(methods="carve-r4", episodes=1, with_router=True, max_steps=40,
                                factory=factory, out=tmp_path / "o", log=lambda *a: None)
    err = res["methods"]["carve-r4"]["error"]
    assert "router reuse check failed" in err and "--no-router-reuse" in err


def test_parallel_jobs_match_serial_and_keep_other_work(tiny_factory, tmp_path):
    """Two methods in two spawned worker processes give the serial run's episodes; the end of
    the run removes only its own methods' work directories (another run may share OUT)."""
    from bench.closed_loop.run import run_benchmark

    factory, _ = tiny_factory
    kw = dict(methods="carve-r4,ta", episodes=1, with_router=False, max_steps=40,
              factory=factory, log=lambda *a: None)
    serial = run_benchmark(out=tmp_path / "serial", **kw)
    other = tmp_path / "par" / "_work" / "someone-else"
    other.mkdir(parents=True)
    lines = []
    par = run_benchmark(out=tmp_path / "par", jobs=2, **dict(kw, log=lines.append))
    assert any("in 2 worker processes" in ln for ln in lines)
    assert all(m["error"] is None and m["summary"]["complete"] for m in par["methods"].values())
    assert _traces(par, "oracle") == _traces(serial, "oracle")
    assert list(par["methods"]) == ["carve-r4", "ta"]   # as asked, whichever finished first
    assert other.is_dir() and not (tmp_path / "par" / "_work" / "ta").exists()


def test_step_retried_after_a_transport_timeout(tiny_factory, tmp_path, monkeypatch):
    """A starved loopback server missing the client's deadline retries the step (a loaded host
    is not a failed method); any other error is not retried."""
    import grpc

    import bench.closed_loop.run as run_mod
    from carve_client import PolicyError

    factory, _ = tiny_factory
    real = run_mod._evaluate
    failures = iter([PolicyError(grpc.StatusCode.DEADLINE_EXCEEDED, "no EpisodeStarted")])

    def flaky(*a, **k):
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "_evaluate", flaky)
    lines = []
    res = run_mod.run_benchmark(methods="ta", episodes=1, with_router=False, max_steps=40,
                                factory=factory, out=tmp_path / "o", log=lines.append)
    assert res["methods"]["ta"]["error"] is None
    assert any("retrying the step (attempt 2/3)" in ln for ln in lines)

    def broken(*a, **k):
        raise PolicyError(grpc.StatusCode.INVALID_ARGUMENT, "bad")

    monkeypatch.setattr(run_mod, "_evaluate", broken)
    lines.clear()
    res = run_mod.run_benchmark(methods="ta", episodes=1, with_router=False, max_steps=40,
                                factory=factory, out=tmp_path / "o2", log=lines.append)
    assert "INVALID_ARGUMENT" in res["methods"]["ta"]["error"]
    assert not any("retrying" in ln for ln in lines)


def test_lora_experts_through_the_benchmark(tmp_path, monkeypatch):
    """The factory's LoRA variant (PEFT adapters) goes through the same protocol: CARVE admits
    the adapters, the bank serves them, and the published provenance says what the experts are."""
    pytest.importorskip("metaworld", reason="Meta-World is the optional sim extra")
    from bench.closed_loop import publish
    from bench.closed_loop.run import run_benchmark
    from policy_server.sim.suites import Preset
    from policy_server.training.train import build_factory

    monkeypatch.setenv("CARVE_CACHE_DIR", str(tmp_path / "cache"))
    p = Preset(name="tinylora", base_tasks=["reach-v3"],
               suites={"buttons": ["button-press-topdown-v3"], "windows": ["window-open-v3"]},
               episodes_base=2, episodes_expert=2, max_steps=120, base_steps=20,
               expert_steps=10, batch_size=32, lora_rank=4,
               model={"hidden_dim": 64, "mlp_dim": 128, "num_expert_blocks": 1})
    factory = build_factory(p, lora=True, progress=False)
    assert {e["kind"] for e in factory["experts"]} == {"lora"}
    res = run_benchmark(methods="bank,carve-r4", episodes=1, with_router=False, max_steps=40,
                        factory=factory, out=tmp_path / "o", log=lambda *a: None)
    for name, m in res["methods"].items():
        assert m["error"] is None and m["summary"]["complete"], (name, m["error"])
    block = publish.docs_block(publish.load_results(tmp_path / "o" / "results.json"), "r.json")
    assert "2 experts (LoRA adapters) admitted in order" in block
