"""Closed-loop continual-merging benchmark (bench/closed_loop): metrics, specs, a real smoke run.

The smoke run trains a tiny 2-expert factory on the real Meta-World simulator (its own cache in
tmp), admits both experts with CARVE, serves each step over gRPC and runs the tasks through the
real client, then checks the written results for consistency.
"""

from __future__ import annotations

import json

import pytest

from bench.closed_loop import report
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


def _fake_results(with_router=True):
    skills = ["a", "b"]

    def step(t, vals, frac, agnostic=False):
        sk = {}
        for name, v in zip(skills[:t], vals):
            tr = {"oracle": {"success_rate": v}}
            if with_router:
                tr["router"] = {"success_rate": v / 2, "routing_accuracy": 0.5}
            sk[name] = {"tasks": {f"{name}-task": tr}, "oracle": v,
                        **({"router": v / 2} if with_router else {})}
        return {"t": t, "skills": sk, "storage_fraction": {"fraction": frac},
                "task_agnostic": agnostic, "build_s": 1.0, "eval_s": 2.0}

    m = {"spec": {"name": "x", "rank": 16, "options": {"rank": 16}},
         "steps": [step(1, [1.0], 1.0), step(2, [0.5, 1.0], 0.6)], "error": None}
    m["summary"] = report.summarize_method(m, skills)
    res = {"config": {"preset": "demo", "episodes": 1, "seed": 0, "max_steps": 10,
                      "with_router": with_router,
                      "experts": [{"name": s} for s in skills]},
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
    art = report.write_all(res, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| carve-r16 | 0.600 | 75.0 | -50.0 | 50.0 | 100.0 | 37.5 |" in table
    for name in art["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rank_vs_success.png" in art["plots"]


def test_incomplete_method_has_no_final_numbers():
    res, m = _fake_results(with_router=False)
    m["steps"] = m["steps"][:1]
    m["error"] = "RuntimeError: boom"
    s = report.summarize_method(m, ["a", "b"])
    assert not s["complete"] and s["oracle"]["average_final"] is None and "router" not in s
    res["methods"]["carve-r16"]["summary"] = s
    assert "FAILED: RuntimeError: boom" in report.table_markdown(res)


# ---------------------------------------------------------------- method specs
def test_method_labels():
    assert parse_label("carve-r8").options == {"rank": 8} and parse_label("carve-r8").rank == 8
    e = parse_label("carve-e0.95-drift")
    assert e.options == {"energy": 0.95, "drift_compensation": True} and e.rank is None
    assert [s.name for s in resolve("bank, ta,bank")] == ["bank", "ta"]
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


# ---------------------------------------------------------------- real closed-loop smoke run
def test_closed_loop_smoke_real_server(tmp_path, monkeypatch):
    """Tiny 2-expert factory, CARVE r4, 1 episode per task, oracle only, real gRPC + Meta-World."""
    pytest.importorskip("metaworld", reason="Meta-World is the optional sim extra")
    import torch

    from bench.closed_loop.run import run_benchmark
    from policy_server.sim.suites import Preset
    from policy_server.training.train import build_factory

    torch.set_num_threads(1)
    monkeypatch.setenv("CARVE_CACHE_DIR", str(tmp_path / "cache"))
    p = Preset(name="tinycl", base_tasks=["reach-v3"],
               suites={"buttons": ["button-press-topdown-v3"], "windows": ["window-open-v3"]},
               episodes_base=2, episodes_expert=2, max_steps=120, base_steps=20, expert_steps=10,
               batch_size=32, model={"hidden_dim": 64, "mlp_dim": 128, "num_expert_blocks": 1})
    factory = build_factory(p, progress=False)
    out = tmp_path / "res"
    res = run_benchmark(methods="carve-r4", episodes=1, out=out, with_router=False,
                        factory=factory, max_steps=40, log=lambda *a: None)
    for name in ("results.json", "table.md", "success_per_step.png", "storage_vs_success.png"):
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
    st = m["steps"][-1]
    ep = st["skills"]["windows"]["tasks"]["window-open-v3"]["oracle"]["episodes"]
    assert len(ep) == 1 and ep[0]["skill"] == "windows"   # the oracle id reached the server
    assert 0.0 < s["storage_fraction"] < 2.0 and st["storage"]["skills"] == 2
    assert "router" not in s and res["config"]["with_router"] is False
