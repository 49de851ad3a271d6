"""gc on a filesystem that refuses locks (ENOLCK, e.g. NFS without a lock service): a version
whose reader lease cannot be probed is kept, with a warning naming it; the rest of gc still runs.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

import torch

from policy_server.state import leases
from policy_server.state.store import StateStore
from policy_server.tensors.entries import LowRank


def _commit(store: StateStore, name: str, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    with store.transaction(f"add {name}") as tx:
        tx.manifest["base"] = {"num_params": 30, "fingerprint": "f"}
        tx.write_core({"w": torch.randn(6, 5, generator=g)})
        tx.write_skill(name, {"w": LowRank(torch.randn(6, 2, generator=g),
                                           torch.randn(2, 5, generator=g), 0.1)},
                       {"instructions": [f"do {name}"]})
    return store.current_version()


def _no_lease_locks(monkeypatch, refuse: set[str] | None = None):
    """flock raises OSError(ENOLCK) on lease files (of the versions in ``refuse``; all when None),
    as on an NFS mount without lock support; the state's writer LOCK keeps working, so gc reaches
    its per-version probe."""
    real = fcntl.flock

    def flock(fd, op):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith("/" + leases.LEASE_FILE) and (
                refuse is None or os.path.basename(os.path.dirname(path)) in refuse):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_try_exclusive_treats_enolck_as_in_use(tmp_path, monkeypatch, caplog):
    store = StateStore(tmp_path / "s")
    v = _commit(store, "a", 0)
    vdir = store.versions_dir / v
    _no_lease_locks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="carve.state"):
        assert leases.try_exclusive(vdir) is None
    assert "cannot lock" in caplog.text and v in caplog.text and "ENOLCK" in caplog.text
    # and the reader side on the same filesystem serves unleased instead of failing
    assert leases.acquire_shared(vdir) is None
    with store.open(v, verify=True) as snap:
        assert snap.skill_names() == ["a"]


def test_gc_keeps_unlockable_versions_and_removes_the_rest(tmp_path, monkeypatch, caplog):
    store = StateStore(tmp_path / "s")
    for i, name in enumerate("abcd"):
        _commit(store, name, i)  # v000001 .. v000004
    _no_lease_locks(monkeypatch, refuse={"v000002"})
    with caplog.at_level(logging.WARNING, logger="carve.state"):
        report = store.collect(keep=1)
    # v000002's lease could not be probed: kept (reported as held), the others due went
    assert report["held"] == ["v000002"]
    assert sorted(report["removed"]) == ["v000001", "v000003"]
    assert sorted(p.name for p in store.versions_dir.iterdir()
                  if not p.name.startswith(".")) == ["v000002", "v000004"]
    assert "v000002" in caplog.text and "ENOLCK" in caplog.text
    store.verify("v000002")  # kept whole, not half-deleted
    monkeypatch.undo()  # locks work again: the next gc deletes it
    assert store.collect(keep=1)["removed"] == ["v000002"]


def test_writer_lock_refused_with_a_clear_error_when_the_filesystem_cannot_lock(tmp_path,
                                                                             monkeypatch):
    """The writer LOCK is what stops two admissions from committing one version id, so a
    filesystem that cannot lock is refused for writing with a StateError naming the cause, and
    the committed state is left as it was."""
    import pytest

    from policy_server.errors import StateError

    store = StateStore(tmp_path / "s")
    v = _commit(store, "a", 0)
    real = fcntl.flock

    def flock(fd, op):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/LOCK"):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(StateError, match="cannot take the writer lock.*No locks available"):
        _commit(store, "b", 1)
    monkeypatch.setattr(fcntl, "flock", real)
    assert store.current_version() == v
    with store.open(verify=True) as snap:
        assert snap.skill_names() == ["a"]
