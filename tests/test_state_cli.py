"""``carve state ...``: every sub-command through ``policy_server.cli.main`` on a real state, and
the installed ``carve`` console script as a subprocess (exit codes and messages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from policy_server.cli import main as cli_main
from policy_server.errors import InputError, IntegrityError, StateError
from policy_server.tensors.entries import Dense, LowRank, Masked
from policy_server.state.store import StateStore

CARVE = Path(sys.executable).parent / "carve"


def _entries(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"w": LowRank(torch.randn(10, 4, generator=g), torch.randn(4, 6, generator=g), 0.125),
            "b": Dense(torch.randn(10, generator=g)),
            "m": Masked(torch.rand(10, 6, generator=g) > 0.5)}


def _make_state(path: Path, skills=("pick", "place", "push")) -> StateStore:
    """One version per skill; base of 100 params (10x6 + 10 + 10x3), core on w."""
    store = StateStore(path)
    for i, name in enumerate(skills):
        with store.transaction(f"admit {name}") as tx:
            tx.manifest["base"] = {"fingerprint": "ab" * 32, "num_params": 100, "dtype": "float32",
                                   "tensors": {"w": {"shape": [10, 6], "dtype": "float32"},
                                               "b": {"shape": [10], "dtype": "float32"},
                                               "m": {"shape": [10, 6], "dtype": "float32"}}}
            tx.manifest["method"] = {"name": "carve", "options": {"rank": 4}}
            tx.write_core({"w": torch.full((10, 6), float(i))})
            tx.write_skill(name, _entries(i), {"instructions": [f"{name} the block"],
                                               "description": f"{name} skill"})
    return store


def test_show_text_and_json(tmp_path, capsys):
    store = _make_state(tmp_path / "s")
    assert cli_main(["state", "show", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "version v000003" in out and "method carve" in out and '"rank": 4' in out
    assert "base fingerprint abababababababab" in out
    # skills in admission order with their instructions and rank summary
    assert out.index("1. pick") < out.index("2. place") < out.index("3. push")
    assert "- push the block" in out and "rank mean 4.0 max 4" in out
    # storage: core 60 + 3 skills x (P 40 + Q 24 + D 10 + mask ceil(60/32)=2) = 288 stored
    # of a 3 x 100 = 300-param bank; with the base (100 + 288) / 300
    assert "288 params" in out and "96.0% of a 3-expert bank" in out
    assert "129.3% counting the base" in out and "76 params" in out

    assert cli_main(["state", "show", str(store.path), "--json", "--version", "v000001"]) == 0
    m = json.loads(capsys.readouterr().out)
    disk = m.pop("disk")  # measured from the files, beside the manifest
    assert disk["version"] == "v000001" and disk["versions"] == 3
    assert m == store.open("v000001").manifest
    assert [s["name"] for s in m["skills"]] == ["pick"]
    assert m["storage"]["stored_params"] == 60 + 76


def test_versions_verify_and_verify_all(tmp_path, capsys):
    store = _make_state(tmp_path / "s")
    assert cli_main(["state", "versions", str(store.path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("* v000003") and "admit push" in lines[2]
    assert not lines[0].startswith("*")

    assert cli_main(["state", "verify", str(store.path)]) == 0
    assert "v000003: ok" in capsys.readouterr().out

    # corrupt a file only v000001 holds (its core; later versions rewrote the core)
    core1 = store.path / "versions/v000001/core.safetensors"
    raw = bytearray(core1.read_bytes())
    raw[-3] ^= 0x01
    core1.write_bytes(bytes(raw))
    assert cli_main(["state", "verify", str(store.path)]) == 0  # current is fine
    capsys.readouterr()
    rc = cli_main(["state", "verify", str(store.path), "--all"])
    out, err = capsys.readouterr()
    assert rc == IntegrityError.exit_code
    assert "v000001: FAILED" in out and "core.safetensors" in out
    assert "v000002: ok" in out and "v000003: ok" in out  # kept going after the bad one
    assert "1 of 3 versions failed verification: v000001" in err
    assert cli_main(["state", "verify", str(store.path), "--version", "v000001"]) == 4


def test_rollback_and_gc(tmp_path, capsys):
    store = _make_state(tmp_path / "s")
    assert cli_main(["state", "rollback", str(store.path), "v000001"]) == 0
    assert "current version: v000001 (was v000003)" in capsys.readouterr().out
    assert store.open().skill_names() == ["pick"]
    # a malformed id is bad input; a well-formed unknown one is a state problem
    assert cli_main(["state", "rollback", str(store.path), "../v1"]) == InputError.exit_code
    assert "invalid version id" in capsys.readouterr().err
    assert cli_main(["state", "rollback", str(store.path), "v000009"]) == StateError.exit_code
    assert "no version 'v000009'" in capsys.readouterr().err
    assert store.current_version() == "v000001"

    assert cli_main(["state", "gc", str(store.path), "--keep", "0"]) == InputError.exit_code
    assert cli_main(["state", "gc", str(store.path), "--keep", "1"]) == 0
    assert "removed 1: v000002" in capsys.readouterr().out
    # the current (older) version and the newest one survive and verify
    assert [v["id"] for v in store.versions()] == ["v000001", "v000003"]
    assert cli_main(["state", "verify", str(store.path), "--all"]) == 0


def test_skills_edit_makes_manifest_only_version(tmp_path, capsys):
    store = _make_state(tmp_path / "s", skills=("pick", "place"))
    rc = cli_main(["state", "skills", str(store.path), "--no-embed",
                   "--add-instruction", "pick", "grab the red block",
                   "--add-instruction", "place", "put it down",
                   "--remove-instruction", "pick", "pick the block",
                   "--set-description", "place", "puts things on the shelf"])
    assert rc == 0, capsys.readouterr().err
    assert "new version v000003: updated pick, place" in capsys.readouterr().out
    snap = store.open()
    assert snap.manifest["parent"] == "v000002"
    assert snap.skill("pick")["instructions"] == ["grab the red block"]
    assert snap.skill("place")["instructions"] == ["place the block", "put it down"]
    assert snap.skill("place")["description"] == "puts things on the shelf"
    assert snap.skill_names() == ["pick", "place"]
    # only the manifest changed: every data file is the parent's inode
    v2, v3 = store.path / "versions/v000002", store.path / "versions/v000003"
    for rel in snap.manifest["files"]:
        assert (v3 / rel).stat().st_ino == (v2 / rel).stat().st_ino, rel
    assert torch.equal(snap.residuals("pick")["m"].mask, _entries(0)["m"].mask)

    assert cli_main(["state", "skills", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "place: puts things on the shelf" in out and "  - grab the red block" in out


@pytest.mark.parametrize("argv,code,msg", [
    (["--add-instruction", "nope", "x"], InputError.exit_code, "no skill 'nope'"),
    (["--remove-instruction", "pick", "never registered"], InputError.exit_code,
     "has no instruction 'never registered'"),
    (["--add-instruction", "pick", "  "], InputError.exit_code, "empty instruction"),
])
def test_skills_bad_edits_store_nothing(tmp_path, capsys, argv, code, msg):
    store = _make_state(tmp_path / "s", skills=("pick",))
    before = sorted(os.listdir(store.path / "versions"))
    assert cli_main(["state", "skills", str(store.path), "--no-embed", *argv]) == code
    assert msg in capsys.readouterr().err
    assert sorted(os.listdir(store.path / "versions")) == before  # no staging left behind
    assert store.current_version() == "v000001"


def test_edit_while_another_writer_holds_the_lock(tmp_path, capsys):
    store = _make_state(tmp_path / "s", skills=("pick",))
    with store.transaction("long admission"):
        rc = cli_main(["state", "skills", str(store.path), "--no-embed",
                       "--add-instruction", "pick", "x"])
        assert rc == StateError.exit_code
        assert "locked by another writer" in capsys.readouterr().err
        assert cli_main(["state", "gc", str(store.path)]) == StateError.exit_code
    assert store.open().skill("pick")["instructions"] == ["pick the block"]


def test_console_script_subprocess(tmp_path):
    assert CARVE.is_file(), f"console script not installed at {CARVE}"
    store = _make_state(tmp_path / "s", skills=("pick",))

    r = subprocess.run([str(CARVE), "state", "versions", str(store.path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("* v000001")

    f = store.path / "versions/v000001/skills/pick.safetensors"
    f.write_bytes(f.read_bytes()[:-1])  # truncated by a bad copy
    r = subprocess.run([str(CARVE), "state", "verify", str(store.path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == IntegrityError.exit_code
    assert "carve: error:" in r.stderr and "skills/pick.safetensors" in r.stderr

    r = subprocess.run([str(CARVE), "state", "show", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == StateError.exit_code and "not a merge state" in r.stderr
