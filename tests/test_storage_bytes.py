"""Storage in bytes that matches the disk, and retention that never deletes what a reader holds.

A bf16 base with float32 norms, three bf16 experts admitted with CARVE: the manifest's byte
figures are checked against the files' real sizes (``os.stat`` and ``du``), the bank against the
experts' own files, and the retention gc of ``admit --keep`` against a live reader in another
process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_engine import make_family  # noqa: E402

from policy_server.cli import main as cli_main  # noqa: E402
from policy_server.errors import StateError  # noqa: E402
from policy_server.state.admission import admit  # noqa: E402
from policy_server.state.store import StateStore  # noqa: E402
from policy_server.tensors.safetensors_io import safetensors_index  # noqa: E402


@pytest.fixture
def family(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, dtype=torch.bfloat16)
    return tmp_path, bdir, edirs


def _admit(state, bdir, edir, i, **kw):
    return admit(state, bdir, edir, f"skill{i}", options={"rank": 4}, progress=False, **kw)


def _du_files(path: Path) -> int:
    """``du -sb`` of ``path`` minus its directories' own sizes: the files, hard links once."""
    out = subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True, text=True)
    dirs = sum(os.lstat(os.path.join(r, d)).st_size for r, ds, _ in os.walk(path) for d in ds)
    return int(out.stdout.split()[0]) - dirs - os.lstat(path).st_size


def _tensor_bytes(ckpt: Path) -> int:
    index = safetensors_index(ckpt / "model.safetensors")
    return sum(nbytes for _shape, _dtype, _off, nbytes in index.values())


def test_reported_bytes_match_the_files(family, capsys):
    tmp, bdir, edirs = family
    state = tmp / "s"
    for i, e in enumerate(edirs):
        _admit(state, bdir, e, i, keep=0)
    store = StateStore(state)
    snap = store.open()
    st = snap.manifest["storage"]
    vdir = snap.path
    files = [p for p in vdir.rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert st["version_bytes"] == sum(p.stat().st_size for p in files)
    assert st["base_bytes"] == (bdir / "model.safetensors").stat().st_size
    # the bank: each expert in its own dtype (bf16 matrices, float32 norms), headers aside
    assert st["bank_bytes"] == sum(_tensor_bytes(e) for e in edirs)
    assert st["bytes_fraction_of_bank"] == pytest.approx(st["version_bytes"] / st["bank_bytes"])
    assert st["bytes_fraction_of_bank_with_base"] == pytest.approx(
        (st["version_bytes"] + st["base_bytes"]) / st["bank_bytes"])
    du = store.disk_usage()
    assert du["version_bytes"] == st["version_bytes"] + (vdir / "manifest.json").stat().st_size
    # all three versions, hard links once: what du says, and less than the three summed
    assert du["versions"] == 3 and du["retained_bytes"] == _du_files(state / "versions")
    per_version = sum(store.disk_usage(v)["version_bytes"] for v in ("v000001", "v000002",
                                                                       "v000003"))
    assert du["retained_bytes"] < per_version
    assert cli_main(["state", "show", str(state)]) == 0
    out = capsys.readouterr().out
    assert f"version {st['version_bytes']:,} as stored" in out
    assert f"all 3 retained versions {du['retained_bytes']:,}" in out
    assert f"bank of the same experts {st['bank_bytes']:,}" in out
    assert f"(state + base) / bank {st['bytes_fraction_of_bank_with_base']:.3f}" in out


def test_admit_keep_retains_n_versions_and_never_the_current(family):
    tmp, bdir, edirs = family
    state = tmp / "s"
    reports = [_admit(state, bdir, e, i, keep=2) for i, e in enumerate(edirs)]
    assert reports[-1]["gc"]["removed"] == ["v000001"]
    store = StateStore(state)
    assert [v["id"] for v in store.versions()] == ["v000002", "v000003"]
    store.verify("v000002")  # the parent survives whole: a rollback works
    store.rollback("v000002")
    assert store.open().version == "v000002"
    assert cli_main(["admit", str(state), "--base", str(bdir), "--expert", str(edirs[0]),
                     "--skill", "x", "--keep", "1", "--no-progress", "--no-embed"]) == 2


_READER = """
import sys, time
from policy_server.state.store import StateStore
snap = StateStore(sys.argv[1]).open(sys.argv[2])
print("open", flush=True)
sys.stdin.readline()          # hold the lease until told to go
print(len(snap.core()), flush=True)
"""


def test_gc_skips_a_version_a_live_reader_holds(family):
    tmp, bdir, edirs = family
    state = tmp / "s"
    _admit(state, bdir, edirs[0], 0, keep=0)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(state), "v000001"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        assert reader.stdout.readline().strip() == "open"
        rep = _admit(state, bdir, edirs[1], 1, keep=2)
        rep = _admit(state, bdir, edirs[2], 2, keep=2)
        assert rep["gc"] == {"removed": [], "held": ["v000001"]}
        assert (state / "versions" / "v000001" / "manifest.json").is_file()
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "7"  # it still read its whole core
        assert reader.wait(30) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
    # the lease is gone with the reader: the next gc removes the version
    assert StateStore(state).collect(keep=2) == {"removed": ["v000001"], "held": []}
    with pytest.raises(StateError, match="no version"):
        StateStore(state).open("v000001")


def test_a_snapshot_in_this_process_holds_its_version_until_closed(family):
    tmp, bdir, edirs = family
    state = tmp / "s"
    for i, e in enumerate(edirs[:2]):
        _admit(state, bdir, e, i, keep=0)
    store = StateStore(state)
    with store.open("v000001") as snap:
        assert store.collect(keep=1)["held"] == ["v000001"]
        assert len(snap.core()) == 7
    t0 = time.monotonic()
    assert store.gc(keep=1) == ["v000001"] and time.monotonic() - t0 < 5


def test_cli_core_dtype_is_fixed_by_the_first_admission(family, capsys):
    tmp, bdir, edirs = family
    state = str(tmp / "s")

    def cli(i, *extra):
        return cli_main(["admit", state, "--base", str(bdir), "--expert", str(edirs[i]),
                         "--skill", f"skill{i}", "--rank", "4", "--no-progress", "--no-embed",
                         *extra])

    assert cli(0, "--core-dtype", "float32") == 0
    assert cli_main(["state", "show", state]) == 0
    assert "store dtype param  core dtype float32" in capsys.readouterr().out
    assert {v.dtype for v in StateStore(state).open().core().values()} == {torch.float32}
    assert cli(1, "--core-dtype", "bfloat16") == 3  # a state problem: fixed at creation
    with pytest.raises(SystemExit) as e:  # not a dtype at all: argparse's usage error
        cli(1, "--core-dtype", "float8")
    assert e.value.code == 2
    assert [v["id"] for v in StateStore(state).versions()] == ["v000001"]
