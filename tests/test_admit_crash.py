"""Crash safety of ``carve admit``: SIGKILL a real admission subprocess while it stages the new
version; the previous version must still verify and load, and re-running the admission succeeds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ckpt_utils import write_checkpoint  # noqa: E402
from test_engine import tree_digest  # noqa: E402

from policy_server.state.admission import admit  # noqa: E402
from policy_server.state.store import StateStore  # noqa: E402

# `carve` without relying on the console script being on PATH
CARVE_CMD = [sys.executable, "-c",
             "import sys; from policy_server.cli import main; sys.exit(main(sys.argv[1:]))"]

# ~12 MiB per float32 checkpoint: big enough that staging the new core/skill files (written and
# fsynced) takes a window a 1 ms poll catches, small enough for a ~10 s test.
N_MATS, M, N = 8, 768, 512


def _family(tmp):
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w.weight": torch.randn(M, N, generator=g) * 0.05 for i in range(N_MATS)}
    base.update({f"layers.{i}.norm.weight": torch.ones(N) for i in range(N_MATS)})
    experts = []
    for j in range(2):
        e = {}
        for k, v in base.items():
            if v.ndim == 2:
                e[k] = v + torch.randn(M, 4, generator=g) @ torch.randn(4, N, generator=g) * 0.01
            else:
                e[k] = v + torch.randn(v.shape, generator=g) * 0.01
        experts.append(write_checkpoint(tmp / f"e{j}", e))
    return write_checkpoint(tmp / "base", base), experts


def _staging_started(state, known_versions: set[str]) -> bool:
    vdir = state / "versions"
    try:
        names = os.listdir(vdir)
    except FileNotFoundError:
        return False
    return any(n.startswith(".") or n not in known_versions for n in names)


def _kill_during_staging(cmd, state, known, env) -> int | None:
    """Start ``cmd``; SIGKILL it as soon as a new entry appears under versions/. Returns the
    child's return code (-9 when killed), None if it finished before staging was seen."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if _staging_started(state, known):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.returncode
        time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise AssertionError("admission subprocess did not finish in 120 s")
    return None


def _check_survived(state, pristine, v1, before, cmd_tail):
    """After a SIGKILL: v1 is current, verifies and loads unchanged; a re-run commits."""
    store = StateStore(state)
    assert store.current_version() == v1
    store.verify()  # raises IntegrityError on any bad file of v1
    snap = store.open(verify=True)
    assert snap.version == v1 and snap.skill_names() == ["a"]
    ref = StateStore(pristine).open()
    core = snap.core()
    for k, t in ref.core().items():
        assert torch.equal(core[k], t), k
    # v1's files are untouched; only staging leftovers (never read) may have appeared
    after = tree_digest(state)
    for path, digest in before.items():
        if path not in ("LOCK",):
            assert after.get(path) == digest, path
    r = subprocess.run([*CARVE_CMD, "admit", str(state), *cmd_tail],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    snap = StateStore(state).open(verify=True)
    assert sorted(snap.skill_names()) == ["a", "b"] and snap.version != v1


@pytest.mark.slow
def test_sigkill_mid_admission_keeps_previous_version(tmp_path):
    bdir, (e0, e1) = _family(tmp_path)
    pristine = tmp_path / "state0"
    v1 = admit(pristine, bdir, e0, "a", options={"rank": 8, "svd": "randomized"},
                      progress=False)["version"]
    cmd_tail = ["--base", str(bdir), "--expert", str(e1), "--skill", "b", "--no-progress"]
    env0 = {k: v for k, v in os.environ.items() if not k.startswith("CARVE_TEST_PAUSE")}

    # 1) deterministic: the store's test hook parks the admission at a stage, we SIGKILL it there
    for stage in ("files-written", "before-current"):
        state = tmp_path / f"state-{stage}"
        shutil.copytree(pristine, state, symlinks=True)
        before = tree_digest(state)
        marker = tmp_path / f"marker-{stage}"
        env = dict(env0, CARVE_TEST_PAUSE_AT=stage, CARVE_TEST_PAUSE_MARKER=str(marker),
                   CARVE_TEST_PAUSE_SECONDS="120")
        proc = subprocess.Popen([*CARVE_CMD, "admit", str(state), *cmd_tail], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "admission never reached " + stage
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert marker.read_text() == stage
        _check_survived(state, pristine, v1, before, cmd_tail)

    # 2) no hook: kill as soon as anything new appears under versions/ (a staging directory)
    killed = None
    for attempt in range(3):  # the natural staging window is short; a fresh copy per attempt
        state = tmp_path / f"state-natural{attempt}"
        shutil.copytree(pristine, state, symlinks=True)
        before = tree_digest(state)
        known = set(os.listdir(state / "versions"))
        cmd = [*CARVE_CMD, "admit", str(state), *cmd_tail]
        rc = _kill_during_staging(cmd, state, known, env0)
        if rc is not None:
            killed = state
            break
    assert killed is not None, "never caught the admission while it was staging"
    assert rc == -signal.SIGKILL
    _check_survived(killed, pristine, v1, before, cmd_tail)
