"""Crash safety of the state store on its own: SIGKILL a real writer subprocess mid-transaction.

The child (this file run as a script) commits versions whose content is a pure function of the
version's position in the history, so after any kill the test can recompute exactly what the
current version must hold. Deterministic kills use the store's ``CARVE_TEST_PAUSE_AT`` hook (the
child parks at a named stage and writes a marker); a second test kills a writer looping over
commits at fixed delays, wherever it happens to be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from policy_server.tensors.entries import Dense, LowRank, Masked
from policy_server.state.store import StateStore

# 3 x (384 x 512) float32 core = 2.25 MiB plus ~1 MiB of residuals per version: writes and fsyncs
# take long enough that the timed kills land inside a transaction, small enough for < 30 s.
CORE_SHAPE = (384, 512)
N_CORE = 3
BASE_NUM_PARAMS = N_CORE * CORE_SHAPE[0] * CORE_SHAPE[1]


def payload(n: int):
    """Everything version number ``n`` (n skills) holds: core, aux, and skill ``s<n-1>``'s data."""
    core = {f"l{i}.weight": torch.full(CORE_SHAPE, float(n) + i / 10) for i in range(N_CORE)}
    g = torch.Generator().manual_seed(n)
    m, k = CORE_SHAPE
    entries = {
        "l0.weight": LowRank(torch.randn(m, 64, generator=g), torch.randn(64, k, generator=g), 0.1),
        "l1.weight": Dense(torch.randn(m, k, generator=g)),
        "l2.weight": Masked(torch.rand(m, k, generator=g) > 0.3),
    }
    aux = {"count": torch.tensor([n], dtype=torch.int64)}
    arts = {"router::proto": torch.randn(8, 16, generator=g)}
    return core, aux, entries, arts


def commit_next(state: Path) -> str:
    """Commit the next version of the deterministic history (one more skill)."""
    store = StateStore(state)
    with store.transaction("crash-test step") as tx:
        n = len(tx.manifest.get("skills", [])) + 1
        tx.manifest["base"] = {"fingerprint": "crash-test", "num_params": BASE_NUM_PARAMS,
                               "dtype": "float32",
                               "tensors": {f"l{i}.weight": {"shape": list(CORE_SHAPE),
                                                            "dtype": "float32"}
                                           for i in range(N_CORE)}}
        tx.manifest["method"] = {"name": "crash-test", "options": {}}
        core, aux, entries, arts = payload(n)
        tx.write_core(core)
        tx.write_aux(aux)
        tx.write_skill(f"s{n - 1}", entries, {"instructions": [f"task {n - 1}"]})
        tx.write_artifacts(f"s{n - 1}", arts)
        return tx.commit()


def check_consistent(state: Path) -> int:
    """The current version verifies, opens and holds exactly what the history says. Returns n."""
    store = StateStore(state)
    store.verify()
    snap = store.open(verify=True)
    n = len(snap.skill_names())
    assert snap.skill_names() == [f"s{i}" for i in range(n)]
    core, aux, _, _ = payload(n)
    got = snap.core()
    assert set(got) == set(core)
    for key, t in core.items():
        assert torch.equal(got[key], t), key
    assert torch.equal(snap.aux()["count"], aux["count"])
    for i in range(n):  # every skill's residual is the one written when it was admitted
        _, _, entries, arts = payload(i + 1)
        res = snap.residuals(f"s{i}")
        assert torch.equal(res["l0.weight"].P, entries["l0.weight"].P)
        assert torch.equal(res["l1.weight"].D, entries["l1.weight"].D)
        assert torch.equal(res["l2.weight"].mask, entries["l2.weight"].mask)
        assert torch.equal(snap.skill_artifacts(f"s{i}")["router::proto"], arts["router::proto"])
    return n


def _digest(state: Path, version: str) -> dict[str, tuple[int, bytes]]:
    root = state / "versions" / version
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _loop(state: Path, ready: Path) -> None:
    """Child body of the timed test: announce that imports are done, then commit forever."""
    ready.write_text("ready")
    while True:
        commit_next(state)


def _child(state: Path, stage: str | None, marker: Path | None, skip: int = 0,
           ready: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARVE_TEST_PAUSE")}
    if stage:
        env.update(CARVE_TEST_PAUSE_AT=stage, CARVE_TEST_PAUSE_MARKER=str(marker),
                   CARVE_TEST_PAUSE_SKIP=str(skip), CARVE_TEST_PAUSE_SECONDS="120")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_crash_safety as t; from pathlib import Path; "
            + (f"t._loop(Path(sys.argv[1]), Path({str(ready)!r}))" if ready
               else "t.commit_next(Path(sys.argv[1]))"))
    return subprocess.Popen([sys.executable, "-c", code, str(state)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_at(proc, marker: Path, stage: str) -> None:
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited ({proc.returncode}) before reaching {stage}: "
                                 + proc.stderr.read().decode()[-2000:])
        assert time.monotonic() < deadline, f"writer never reached stage {stage}"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert marker.read_text() == stage


# (stage, hits skipped): the first tensor file written aside, the third one (skill residuals,
# after core and aux), everything staged without a manifest, staged with a manifest, and the
# version directory final but CURRENT not yet switched.
STAGES = [("file-aside", 0), ("file-aside", 2), ("files-written", 0), ("manifest-written", 0),
          ("before-current", 0)]


@pytest.mark.parametrize("stage,skip", STAGES, ids=[f"{s}-{k}" for s, k in STAGES])
def test_sigkill_at_stage_keeps_previous_version(tmp_path, stage, skip):
    state = tmp_path / "state"
    assert commit_next(state) == "v000001"
    assert commit_next(state) == "v000002"
    before = _digest(state, "v000002")
    marker = tmp_path / "marker"

    _kill_at(_child(state, stage, marker, skip), marker, stage)

    store = StateStore(state)
    assert store.current_version() == "v000002"
    assert check_consistent(state) == 2
    # the killed writer shared v2's files by hard link but never wrote through them
    assert _digest(state, "v000002") == before
    leftovers = sorted(p.name for p in (state / "versions").iterdir())
    if stage == "before-current":
        # the complete v3 directory exists but was never made current: harmless history
        assert leftovers == ["v000001", "v000002", "v000003"]
        store.verify("v000003")
    else:
        assert leftovers[1:] == ["v000001", "v000002"]
        assert leftovers[0].startswith(".staging-v000003-")

    # the lock died with the writer: a new transaction commits on top of the current version
    new = commit_next(state)
    assert new == ("v000004" if stage == "before-current" else "v000003")
    assert store.open().manifest["parent"] == "v000002"
    assert check_consistent(state) == 3
    removed = store.gc(keep=10)
    assert not any(n.startswith(".staging-") for n in os.listdir(state / "versions"))
    assert (stage == "before-current") or any(r.startswith(".staging-") for r in removed)
    assert check_consistent(state) == 3


@pytest.mark.slow
def test_sigkill_at_arbitrary_points_of_a_commit_loop(tmp_path):
    """A writer commits in a loop; it is killed after fixed delays wherever it is. After every
    kill the current version is complete and matches the history, and the next writer proceeds."""
    state = tmp_path / "state"
    commit_next(state)
    committed_before = 1
    progressed = 0
    for i, delay in enumerate((0.05, 0.3, 0.6, 1.0)):
        ready = tmp_path / f"ready{i}"
        proc = _child(state, None, None, ready=ready)
        deadline = time.monotonic() + 60
        while not ready.exists():  # time the kill from the end of the imports, not the spawn
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(delay)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        n = check_consistent(state)
        assert n >= committed_before  # never goes back
        progressed += n > committed_before
        committed_before = n
    StateStore(state).gc(keep=2)
    assert check_consistent(state) == committed_before
    assert commit_next(state)
    assert check_consistent(state) == committed_before + 1
    assert progressed >= 1  # the loop did commit between kills: kills hit a live writer
