"""The client package stands alone: ``carve_client`` and the simulator / robot clients import
neither ``policy_server`` nor torch, and a fresh virtualenv holding only ``carve-client`` runs a
full episode against a real ``carve serve --demo`` subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT_PKG = ROOT / "clients" / "carve_client"
SERVER_ONLY = ("policy_server", "router", "torch")

_NO_SERVER_IMPORTS = textwrap.dedent(f"""
    import sys
    import carve_client, carve_client.codec, carve_client.aio
    import clients.metaworld_client, clients.so101_client, clients.libero_client
    import clients.sim.metaworld_env, clients.sim.metaworld_tasks
    bad = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_ONLY!r})
    print(",".join(bad))
""")


def test_client_modules_import_neither_server_nor_torch():
    # A subprocess: this test process has long imported torch and policy_server.
    r = subprocess.run([sys.executable, "-c", _NO_SERVER_IMPORTS], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"client modules imported server-side modules: {r.stdout}"


def test_server_uses_the_client_package_types_and_codec():
    """One definition each: the server's spec, route-decision and codec names are carve_client's."""
    import carve_client
    import carve_client.codec as codec
    from policy_server.models import base
    from policy_server.service import servicer, validation
    from router import base as router_base

    assert base.PolicySpec is carve_client.PolicySpec and base.ImageSpec is carve_client.ImageSpec
    assert router_base.RouteDecision is carve_client.RouteDecision
    # the server encodes with the client's codec and decodes observations with it
    assert servicer.fill_tensor is codec.fill_tensor and servicer.pb is codec.pb
    assert validation.decode_tensor is codec.decode_tensor
    assert validation.decode_image is codec.decode_image


_EPISODE = textwrap.dedent("""
    import json, sys
    import numpy as np
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    from carve_client import PolicyClient

    with PolicyClient(sys.argv[1], timeout=30.0) as client:
        client.wait_ready(60)
        skill = client.list_skills()[0]
        with client.episode(skill["instructions"][0]) as ep:
            spec = ep.spec
            images = {k: np.zeros((v.height, v.width, v.channels), np.uint8)
                      for k, v in spec.images.items()}
            shapes = [list(ep.infer(np.zeros(spec.state_dim, np.float32), images).shape)
                      for _ in range(3)]
            routed = ep.skill
    print(json.dumps({"has_torch": has_torch, "expected": skill["name"], "skill": routed,
                      "announced": [spec.chunk_length, spec.action_dim], "shapes": shapes,
                      "modules": sorted({m.split(".")[0] for m in sys.modules})}))
""")


def _start_demo_server(log: Path) -> subprocess.Popen:
    carve = Path(sys.executable).with_name("carve")
    cmd = [str(carve)] if carve.exists() else [sys.executable, "-m", "policy_server.cli"]
    # stderr to a file: a first run trains the demo and logs more than a pipe buffer holds.
    return subprocess.Popen(cmd + ["serve", "--demo", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)


def _wait_listening(proc: subprocess.Popen, log: Path) -> str:
    for line in proc.stdout:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            return f"127.0.0.1:{m.group(1)}"
    raise AssertionError(f"carve serve --demo never listened: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_fresh_venv_without_torch_runs_an_episode(tmp_path):
    log = tmp_path / "serve.log"
    proc = _start_demo_server(log)  # builds the demo on first use while the venv is made
    try:
        venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        py = venv / "bin" / "python"
        # The child venv must not see the project's packages: no PYTHONPATH, no inherited venv.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        # Installed from a copy: a non-editable build writes build/ next to the sources.
        src = tmp_path / "carve_client_src"
        shutil.copytree(CLIENT_PKG, src, ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "__pycache__"))
        pip = subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], env=env,
                             capture_output=True, text=True, timeout=900)
        assert pip.returncode == 0, pip.stderr[-3000:]
        target = _wait_listening(proc, log)
        r = subprocess.run([str(py), "-c", _EPISODE, target], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert out["has_torch"] is False
    assert not set(out["modules"]) & set(SERVER_ONLY + ("clients",)), out["modules"]
    assert out["skill"] == out["expected"]
    assert out["shapes"] == [out["announced"]] * 3 and out["announced"][0] > 0


def test_token_reader_file_env_and_server_wrapping(tmp_path, monkeypatch):
    from carve_client import TOKEN_ENV, TokenError, read_token, read_token_file

    from policy_server.errors import InputError
    from policy_server.service.auth import read_token_file as server_read_token_file

    (tmp_path / "tok").write_text("  s3cret\n")
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(tmp_path / "tok") == "s3cret"  # the file wins over the environment
    assert read_token(None) == "from-env"
    monkeypatch.delenv(TOKEN_ENV)
    assert read_token(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenError, match="empty"):
        read_token_file(tmp_path / "empty")
    with pytest.raises(TokenError, match="cannot read auth token file .*missing"):
        read_token(tmp_path / "missing")
    with pytest.raises(InputError, match="is empty"):
        server_read_token_file(tmp_path / "empty")
    assert server_read_token_file(tmp_path / "tok") == "s3cret"


def test_codec_round_trips_spec_and_decision():
    import numpy as np
    from carve_client import ImageSpec, PolicySpec, RouteDecision
    from carve_client.codec import (WireError, decision_from_proto, decision_to_proto,
                                    decode_tensor, encode_tensor, spec_from_proto, spec_to_proto)

    spec = PolicySpec(state_dim=6, action_dim=3, chunk_length=4, action_low=[-1.0] * 3,
                      action_high=[1.0] * 3, images={"front": ImageSpec(16, 8)},
                      normalization={"state_mean": [0.5] * 6}, name="m")
    assert spec_from_proto(spec_to_proto(spec)) == spec
    d = RouteDecision("pick", 0.75, [("pick", 0.75), ("place", 0.25)], margin=0.5, reason="r",
                      router="text")
    assert decision_from_proto(decision_to_proto(d)) == d
    abstained = decision_from_proto(decision_to_proto(RouteDecision(None, 0.0, abstained=True)))
    assert abstained.skill is None and abstained.abstained
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(x), "x"), x)
    bad = encode_tensor(x)
    bad.shape[:] = [5, 4]
    with pytest.raises(WireError, match=r"^x: .*bytes do not match shape \[5, 4\]"):
        decode_tensor(bad, "x")
