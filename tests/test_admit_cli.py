"""``carve admit`` / ``carve merge`` / ``carve state export`` as real subprocesses: exit codes,
messages, and that a refused command leaves the state untouched."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ckpt_utils import write_checkpoint  # noqa: E402
from test_engine import SHAPES, make_family, tree_digest  # noqa: E402

from policy_server.state.store import StateStore  # noqa: E402

# `carve` without relying on the console script being on PATH
CARVE_CMD = [sys.executable, "-c",
             "import sys; from policy_server.cli import main; sys.exit(main(sys.argv[1:]))"]


def carve(*args, timeout=120):
    return subprocess.run([*CARVE_CMD, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def carve_inproc(capsys, *args):
    """Same command through ``policy_server.cli.main`` in this process (cheap: no torch import);
    returns (exit code, stdout, stderr)."""
    from policy_server.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def export_cmd(*args):
    """``carve state export`` when the state group has it hooked up, else the standalone module."""
    from policy_server.cli import build_parser

    try:
        build_parser().parse_args(["state", "export", "--help"])
    except SystemExit as e:
        if e.code == 0:
            return carve("state", "export", *args)
    return subprocess.run([sys.executable, "-m", "policy_server.cli.export", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_admit_cli_flow(tmp_path, capsys):
    bdir, edirs, base, experts = make_family(tmp_path, n=2)
    state = tmp_path / "state"
    r = carve("admit", state, "--base", bdir, "--expert", edirs[0], "--skill", "pick",
              "--instruction", "pick up the cup", "--instruction", "grab the cup",
              "--rank", "4", "--rate", "1/(t+1)", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "admitted skill 'pick' as version" in r.stdout
    snap = StateStore(state).open()
    assert snap.version in r.stdout
    assert snap.manifest["method"]["options"]["rank"] == 4
    assert snap.manifest["method"]["options"]["rate"] == "1/(t+1)"
    assert snap.skill("pick")["instructions"] == ["pick up the cup", "grab the cup"]
    frac = snap.manifest.get("storage", {}).get("fraction_of_bank")
    if frac is not None:
        assert f"{100 * float(frac):.2f}% of the expert bank" in r.stdout
    before = tree_digest(state)

    # option differing from the state's -> state error (3), nothing written
    rc, out, err = carve_inproc(capsys, "admit", state, "--base", bdir, "--expert", edirs[1],
                                "--skill", "place", "--rank", "8", "--no-progress")
    assert rc == 3 and "rank" in err and "differs" in err
    # another method's option -> bad input (2)
    rc, out, err = carve_inproc(capsys, "admit", state, "--base", bdir, "--expert", edirs[1],
                                "--skill", "place", "--lam", "0.5", "--no-progress")
    assert rc == 2 and "--lam is not an option of method 'carve'" in err
    # shape mismatch names the tensor (2)
    bad = dict(experts[1])
    bad["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(24, 23)
    r = carve("admit", state, "--base", bdir, "--expert", write_checkpoint(tmp_path / "bad", bad),
              "--skill", "place", "--no-progress")
    assert r.returncode == 2 and "model.layers.0.self_attn.v_proj.weight" in r.stderr
    # duplicate skill (3)
    r = carve("admit", state, "--base", bdir, "--expert", edirs[1], "--skill", "pick",
              "--no-progress")
    assert r.returncode == 3 and "--replace" in r.stderr
    # one-shot method (2) points to carve merge
    rc, out, err = carve_inproc(capsys, "admit", tmp_path / "s2", "--base", bdir, "--expert",
                                edirs[1], "--skill", "x", "--method", "ties", "--no-progress")
    assert rc == 2 and "carve merge" in err and not (tmp_path / "s2" / "CURRENT").exists()
    assert tree_digest(state) == before

    # a good second admission, JSON report
    rc, out, err = carve_inproc(capsys, "admit", state, "--base", bdir, "--expert", edirs[1],
                                "--skill", "place", "--no-progress", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["skill"] == "place" and rep["t"] == 2 and rep["tensors"]["rank_max"] == 4

    # export through the CLI: full checkpoint equals base + core + residual
    out = tmp_path / "place_full"
    r = export_cmd(state, "--skill", "place", "--out", out, "--base", bdir, "--no-progress")
    assert r.returncode == 0, r.stderr
    snap = StateStore(state).open()
    got = load_file(str(out / "model.safetensors"))
    k = "model.layers.0.mlp.up_proj.weight"
    e = snap.residuals("place")[k]
    assert torch.equal(got[k], base[k] + (snap.core()[k] + e.P @ e.Q))
    from policy_server.cli.export import main as export_main

    capsys.readouterr()
    rc = export_main([str(state), "--skill", "ghost", "--out", str(tmp_path / "g"), "--base",
                      str(bdir)])
    assert rc == 3 and "ghost" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_merge_cli(tmp_path, capsys):
    bdir, edirs, base, experts = make_family(tmp_path, n=2)
    out = tmp_path / "merged"
    r = carve("merge", "--method", "ta", "--base", bdir, "--expert", edirs[0], "--expert",
              edirs[1], "--out", out, "--lam", "1.0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "into checkpoint" in r.stdout
    got = load_file(str(out / "model.safetensors"))
    for k in SHAPES:
        torch.testing.assert_close(got[k], experts[0][k] + experts[1][k] - base[k],
                                   atol=1e-6, rtol=0)
    rc, out, err = carve_inproc(capsys, "merge", "--method", "ta", "--base", bdir, "--expert",
                                edirs[0], "--out", tmp_path / "m2", "--rank", "3", "--no-progress")
    assert rc == 2 and "--rank is not an option of method 'task_arithmetic'" in err
    assert not (tmp_path / "m2").exists()
    rc, out, err = carve_inproc(capsys, "merge", "--method", "tall", "--base", bdir, "--expert",
                                edirs[0], "--expert", edirs[1], "--skill", "a", "--skill", "b",
                                "--out", tmp_path / "tall", "--head-patterns", "model.norm.*",
                                "--no-progress")
    assert rc == 0, err
    assert "into merge state" in out
    snap = StateStore(tmp_path / "tall").open()
    assert snap.skill_names() == ["a", "b"]
    assert snap.manifest["method"]["options"]["head_patterns"] == ["model.norm.*"]
    rc, out, err = carve_inproc(capsys, "merge", "--method", "nosuch", "--base", bdir,
                                "--expert", edirs[0], "--out", tmp_path / "x", "--no-progress")
    assert rc == 2 and "unknown merge method" in err
    rc, out, err = carve_inproc(capsys, "merge", "--method", "ta", "--base", bdir, "--expert",
                                edirs[0], "--skill", "a", "--skill", "b", "--out", tmp_path / "y")
    assert rc == 2 and "one --skill per --expert" in err


def test_allow_base_mismatch_flags(tmp_path, capsys, caplog):
    """admit and state export refuse a base the state did not record (exit 3, one line naming
    the flag); --allow-base-mismatch goes on with a warning."""
    bdir, edirs, base, experts = make_family(tmp_path, n=2)
    other = write_checkpoint(tmp_path / "otherbase", {k: v + 1 if v.is_floating_point() else v
                                                      for k, v in base.items()})
    state = tmp_path / "state"
    rc, _, err = carve_inproc(capsys, "admit", state, "--base", bdir, "--expert", edirs[0],
                              "--skill", "a", "--rank", "4", "--no-progress", "--no-embed")
    assert rc == 0, err
    before = tree_digest(state)
    admit_b = ["admit", state, "--base", other, "--expert", edirs[1], "--skill", "b",
               "--no-progress", "--no-embed"]
    rc, _, err = carve_inproc(capsys, *admit_b)
    assert rc == 3 and "--allow-base-mismatch" in err and "fingerprint" in err
    assert len(err.strip().splitlines()) == 1
    assert tree_digest(state) == before
    with caplog.at_level("WARNING", logger="carve.base_check"):
        rc, _, err = carve_inproc(capsys, *admit_b, "--allow-base-mismatch")
    assert rc == 0, err
    assert any("allow-base-mismatch" in r.getMessage() for r in caplog.records)
    assert StateStore(state).open().skill_names() == ["a", "b"]

    export = ["state", "export", state, "--skill", "a", "--base", other, "--no-progress"]
    rc, _, err = carve_inproc(capsys, *export, "--out", tmp_path / "x1")
    assert rc == 3 and "--allow-base-mismatch" in err and not (tmp_path / "x1").exists()
    rc, _, err = carve_inproc(capsys, *export, "--out", tmp_path / "x2", "--allow-base-mismatch")
    assert rc == 0, err
    assert (tmp_path / "x2" / "model.safetensors").is_file()


def test_shared_option_help_names_each_methods_default(capsys):
    """--mean-patterns belongs to resmerge (default: a keyword list) and tsv (default: empty);
    the help must not state resmerge's default for both."""
    from policy_server.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["admit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.rindex("--mean-patterns GLOB [GLOB ...]")  # the option list, not the usage
    help_ = text[start:text.index("--merge-func", start)]
    assert "[resmerge]" in help_ and "[tsv]" in help_ and "[resmerge, tsv]" not in help_
    assert help_.count("default: the reference's keyword list") == 1
