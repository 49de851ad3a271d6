"""The versioned merge-state store: round trips, atomicity, integrity, history and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from policy_server.cli import main as cli_main
from policy_server.errors import IntegrityError, StateError
from policy_server.tensors.entries import Dense, LowRank, Masked
from policy_server.state.store import StateStore
from policy_server.state.entry_codec import pack_mask, unpack_mask


def _entries(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": LowRank(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g), 0.25),
        "b": Dense(torch.randn(6, generator=g)),
        "m": Masked(torch.rand(3, 7, generator=g) > 0.5),  # 21 bits: exercises packing padding
    }


def _commit(store, name, seed=0, core=None):
    with store.transaction(f"add {name}") as tx:
        tx.manifest["base"] = {"num_params": 1000, "fingerprint": "f"}
        tx.write_core(core if core is not None else {"w": torch.ones(6, 5)})
        tx.write_skill(name, _entries(seed), {"instructions": [f"do {name}"]})
    return store.current_version()


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "LOCK"}


def test_round_trip_every_entry_kind(tmp_path):
    store = StateStore(tmp_path / "s")
    v = _commit(store, "a")
    snap = store.open(verify=True)
    assert snap.version == v == "v000001"
    got, want = snap.residuals("a"), _entries(0)
    assert torch.equal(got["w"].P, want["w"].P) and torch.equal(got["w"].Q, want["w"].Q)
    assert got["w"].rel_error == pytest.approx(0.25)
    assert torch.equal(got["b"].D, want["b"].D)
    assert torch.equal(got["m"].mask, want["m"].mask)
    assert torch.equal(snap.core()["w"], torch.ones(6, 5))
    assert snap.skill("a")["instructions"] == ["do a"]
    with pytest.raises(StateError, match="no skill 'zz'"):
        snap.skill("zz")


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65])
def test_mask_packing_is_exact(n):
    mask = torch.rand(n) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_mask(packed, (n,)), mask)


def test_storage_accounting_by_hand(tmp_path):
    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    _commit(store, "b", seed=1)
    st = store.open().manifest["storage"]
    # core 6*5=30; per skill: P 18 + Q 15 + D 6 + mask ceil(21/32)=1 -> 40
    assert st["core_params"] == 30
    assert st["residual_params"] == 80
    assert st["stored_params"] == 110
    assert st["bank_params"] == 2000
    assert st["fraction_of_bank"] == pytest.approx(110 / 2000)
    assert st["fraction_of_bank_with_base"] == pytest.approx(1110 / 2000)


def test_failed_transaction_changes_nothing(tmp_path):
    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    before = _tree(store.path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction("doomed") as tx:
            tx.write_core({"w": torch.zeros(6, 5)})
            tx.write_skill("b", _entries(1), {})
            raise RuntimeError("boom")
    assert _tree(store.path) == before
    assert store.current_version() == "v000001"


def test_unchanged_files_are_hard_links_and_parents_never_modified(tmp_path):
    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    v1_skill = store.path / "versions/v000001/skills/a.safetensors"
    data = v1_skill.read_bytes()
    with store.transaction("replace a") as tx:
        tx.write_skill("a", _entries(5), {})
    # the rewrite went to a new inode: v1 still holds the old bytes and verifies
    assert v1_skill.read_bytes() == data
    store.verify("v000001")
    _commit(store, "b", seed=2)
    assert (store.path / "versions/v000003/skills/a.safetensors").stat().st_ino == \
        (store.path / "versions/v000002/skills/a.safetensors").stat().st_ino


def test_corruption_is_detected_and_named(tmp_path):
    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    f = store.path / "versions/v000001/skills/a.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="skills/a.safetensors"):
        store.verify()
    with pytest.raises(IntegrityError):
        store.open(verify=True)
    assert cli_main(["state", "verify", str(store.path)]) == IntegrityError.exit_code


def test_newer_format_and_bad_manifest_refused(tmp_path):
    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    mf = store.path / "versions/v000001/manifest.json"
    m = json.loads(mf.read_text())
    m["format_version"] = 99
    mf.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="newer"):
        store.open()
    mf.write_text("{not json")
    with pytest.raises(IntegrityError, match="unreadable manifest"):
        store.open()


def test_rollback_and_gc(tmp_path):
    store = StateStore(tmp_path / "s")
    for i, name in enumerate("abcd"):
        _commit(store, name, seed=i)
    store.rollback("v000002")
    assert store.open().skill_names() == ["a", "b"]
    removed = store.gc(keep=1)
    assert "v000002" not in removed and store.current_version() == "v000002"
    assert [v["id"] for v in store.versions()] == ["v000002", "v000004"]
    for v in ("v000002", "v000004"):
        store.verify(v)  # hard-linked files survive the deletion of the versions that made them
    # the next commit builds on the current version, not on the newest one
    _commit(store, "e", seed=9)
    assert store.open().skill_names() == ["a", "b", "e"]
    with pytest.raises(StateError, match="no version"):
        store.rollback("v000003")


def test_concurrent_writer_gets_a_clear_error(tmp_path):
    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    with store.transaction("first") as tx:
        tx.write_skill("b", _entries(1), {})
        with pytest.raises(StateError, match="locked by another writer"):
            with store.transaction("second"):
                pass
    assert store.open().skill_names() == ["a", "b"]


def test_invalid_skill_name(tmp_path):
    from policy_server.errors import InputError

    store = StateStore(tmp_path / "s")
    with pytest.raises(InputError, match="invalid skill name"):
        with store.transaction("x") as tx:
            tx.write_skill("../evil", _entries(), {})
    assert not store.exists()


def test_cli_subprocess_exit_codes_and_messages(tmp_path):
    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    carve = [sys.executable, "-m", "policy_server.cli"]
    ok = subprocess.run([*carve, "state", "show", str(store.path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "a:" in ok.stdout and "of a 1-expert bank" in ok.stdout
    missing = subprocess.run([*carve, "state", "show", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == StateError.exit_code
    assert "not a merge state" in missing.stderr
    bad = subprocess.run([*carve, "state", "rollback", str(store.path), "v000042"],
                         capture_output=True, text=True)
    assert bad.returncode == StateError.exit_code and "no version 'v000042'" in bad.stderr


def _with_base(tx):
    tx.manifest["base"] = {"num_params": 1000, "fingerprint": "f",
                           "tensors": {"w": {"shape": [6, 5]}, "b": {"shape": [6]},
                                       "m": {"shape": [3, 7]}}}


@pytest.mark.parametrize("bad,msg", [
    ({"w": LowRank(torch.randn(6, 3), torch.randn(2, 5))}, "do not chain"),
    ({"w": LowRank(torch.randn(5, 3), torch.randn(3, 5))}, r"entry shape \[5, 5\] != base shape"),
    ({"b": Dense(torch.tensor([1.0, float("nan"), 0, 0, 0, 0]))}, "NaN or inf"),
    ({"m": Masked(torch.ones(3, 7))}, "must be a bool tensor"),
    ({"zz": Dense(torch.ones(2))}, "not in the base checkpoint"),
])
def test_bad_entries_are_refused_and_nothing_is_stored(tmp_path, bad, msg):
    from policy_server.errors import InputError

    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    before = _tree(store.path)
    with pytest.raises(InputError, match=msg):
        with store.transaction("bad") as tx:
            _with_base(tx)
            tx.write_skill("b", bad, {})
    assert _tree(store.path) == before


def test_store_dtype_and_order_kept_on_replace(tmp_path):
    store = StateStore(tmp_path / "s")
    with store.transaction("half") as tx:
        tx.manifest["store_dtype"] = "bfloat16"
        tx.write_core({"w": torch.full((6, 5), 1 / 3)})
        tx.write_skill("a", _entries(0), {})
        tx.write_skill("b", _entries(1), {})
    with store.transaction("replace a") as tx:
        tx.write_skill("a", _entries(2), {"instructions": ["new"]})
    snap = store.open(verify=True)
    assert snap.skill_names() == ["a", "b"] and snap.skill("a")["order"] == 1
    assert snap.core()["w"].dtype == torch.bfloat16
    res = snap.residuals("a")
    assert res["w"].P.dtype == torch.bfloat16 and res["m"].mask.dtype == torch.bool
    assert torch.equal(res["w"].P, _entries(2)["w"].P.to(torch.bfloat16))
    # bf16: 2 bytes per stored float, packed mask ceil(21/8) = 3 bytes
    assert snap.skill("a")["stored_bytes"] == (18 + 15 + 6) * 2 + 3


def test_write_outside_transaction_and_after_commit(tmp_path):
    store = StateStore(tmp_path / "s")
    tx = store.transaction("never entered")
    with pytest.raises(StateError, match="outside"):
        tx.write_core({"w": torch.ones(1)})
    with store.transaction("x") as tx:
        tx.write_skill("a", _entries(), {})
        tx.commit()
        with pytest.raises(StateError, match="already committed"):
            tx.write_skill("b", _entries(), {})
    assert store.open().skill_names() == ["a"]


def test_missing_or_damaged_files_never_read_as_empty(tmp_path):
    from safetensors.torch import load_file

    from policy_server.tensors.safetensors_io import save_tensors_durable

    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    f = store.path / "versions/v000001/skills/a.safetensors"
    good = store.open().residuals("a")
    # a mask cut short would unpack as zero-padded "False" bits: must be an IntegrityError
    flat = load_file(str(f))
    flat["m::mask"] = flat["m::mask"][:-1]
    save_tensors_durable(flat, f)
    with pytest.raises(IntegrityError, match="packed mask"):
        store.open().residuals("a")
    f.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.open().residuals("a")
    with pytest.raises(IntegrityError, match="missing file skills/a.safetensors"):
        store.verify()
    assert good["w"].rank == 3


def test_copied_version_dir_and_bad_version_ids(tmp_path):
    import shutil

    from policy_server.errors import InputError

    store = StateStore(tmp_path / "s")
    _commit(store, "a")
    shutil.copytree(store.path / "versions/v000001", store.path / "versions/v000007")
    with pytest.raises(IntegrityError, match="manifest says version 'v000001'"):
        store.open("v000007")
    for bad in ("../v000001", "v1", "current"):
        with pytest.raises(InputError, match="invalid version id"):
            store.open(bad)


def test_gc_cleans_leftovers_of_killed_writers_and_gcs(tmp_path):
    store = StateStore(tmp_path / "s")
    for i, name in enumerate("abc"):
        _commit(store, name, seed=i)
    vdir = store.path / "versions"
    (vdir / ".staging-v000009-1234/skills").mkdir(parents=True)
    (vdir / ".trash-v000000").mkdir()  # a gc killed between rename and rmtree
    (store.path / ".CURRENT.tmp-999").write_text("v000002\n")
    removed = store.gc(keep=2)
    assert removed == ["v000001", ".staging-v000009-1234", ".CURRENT.tmp-999"]
    assert sorted(os.listdir(vdir)) == ["v000002", "v000003"]
    assert store.current_version() == "v000003"
    for v in ("v000002", "v000003"):
        store.verify(v)


def test_streaming_writer_matches_safetensors_format(tmp_path):
    """The store's one-tensor-at-a-time writer produces files safetensors reads back exactly, for
    every dtype the store writes (incl. bf16, bool, empty, 0-d and non-contiguous tensors)."""
    from safetensors.torch import load_file

    from policy_server.tensors.safetensors_io import LazyTensors, write_safetensors_streaming

    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
          "c": torch.tensor([True, False, True]), "d": torch.zeros(0, 4),
          "e": torch.arange(10, dtype=torch.int64)[::2], "f": torch.tensor(3.5),
          "g": torch.randn(4, 6).t(), "h": torch.randint(0, 255, (9,), dtype=torch.uint8)}
    path = tmp_path / "x.safetensors"
    write_safetensors_streaming(ts, path)
    back = load_file(str(path))
    assert set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v.contiguous()), k
    lazy = LazyTensors(path)
    assert torch.equal(lazy.pop("a"), ts["a"]) and "a" not in lazy and lazy.pop("a") is None
    assert len(lazy) == len(ts) - 1
