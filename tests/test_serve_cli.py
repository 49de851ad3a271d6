"""`carve serve` as users run it: a real subprocess, token auth, a client episode, SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from carve_client import PolicyClient, PolicyError

from serving_utils import make_stack


def test_carve_serve_subprocess(tmp_path):
    stack = make_stack(tmp_path / "stack")
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "policy_server.cli", "serve", "--base", str(stack["base"]),
         "--state", str(stack["state"]), "--port", "0", "--router", "exact",
         "--auth-token-file", str(token)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, line + proc.stderr.read()
        assert "3 skill(s)" in line and "token auth" in line
        target = f"127.0.0.1:{m.group(1)}"
        with pytest.raises(PolicyError):
            PolicyClient(target, retries=0).list_skills()
        client = PolicyClient(target, token="t0ken", retries=0)
        with client.episode("press the red button") as ep:
            assert ep.skill == "button"
            assert ep.infer(np.zeros(39, np.float32)).shape == (4, 4)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "shutting down" in err and "stopped in" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_carve_serve_bad_input_exit_codes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "policy_server.cli", "serve", "--base",
                        str(tmp_path / "missing"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing" in r.stderr


def _serve(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "policy_server.cli", "serve", "--port", "0",
                           *args], capture_output=True, text=True, timeout=timeout)


def test_tls_cert_without_key_exits_2_with_one_line(tmp_path):
    """Used to exit 1 with a Python traceback (a ValueError from the server)."""
    crt = tmp_path / "crt.pem"
    crt.write_text("not really a certificate\n")
    r = _serve("--base", str(tmp_path), "--tls-cert", str(crt))
    assert r.returncode == 2, r.stderr
    assert "--tls-cert and --tls-key must be given together" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _serve("--base", str(tmp_path), "--max-episodes", "100")
    assert r.returncode == 2 and "--max-episodes" in r.stderr and "Traceback" not in r.stderr


def test_startup_state_errors_are_one_line_and_the_traceback_needs_v(tmp_path):
    """A wrong base and a corrupted state: the clear message alone (exit 3 / 4), without the
    logged traceback that used to come before it; -v adds the traceback."""
    import shutil

    from policy_server.models.demo_vla import DemoVLABackend

    stack = make_stack(tmp_path / "stack")
    other = DemoVLABackend(stack["config"], seed=9).save_pretrained(tmp_path / "other")
    r = _serve("--base", str(other), "--state", str(stack["state"]), "--router", "exact")
    assert r.returncode == 3, r.stderr
    assert "is not the base of" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _serve("--base", str(other), "--state", str(stack["state"]), "--router", "exact", "-v")
    assert r.returncode == 3 and "Traceback" in r.stderr
    bad = tmp_path / "bad-state"
    shutil.copytree(stack["state"], bad)
    blob = bad / "versions" / (bad / "CURRENT").read_text().strip() / "core.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = _serve("--base", str(stack["base"]), "--state", str(bad), "--router", "exact")
    assert r.returncode == 4, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_hybrid_router_flags_reach_the_router_options(tmp_path, capsys):
    """--route-observation / --text-weight / --obs-temperature become the hybrid router's
    options (the first-frame descriptor route is selectable from the CLI); with another router,
    or out of range, they are refused with exit 2 and one line before anything loads."""
    from policy_server.cli import build_parser, main
    from policy_server.cli.serve import engine_config_from_args

    base = ["serve", "--base", str(tmp_path), "--port", "0"]
    args = build_parser().parse_args(base + ["--router", "hybrid", "--route-observation",
                                             "descriptor", "--text-weight", "0.3"])
    cfg = engine_config_from_args(args)
    assert cfg.router == "hybrid"
    assert cfg.router_options == {"observation": "descriptor", "text_weight": 0.3}
    assert engine_config_from_args(build_parser().parse_args(base)).router_options == {}
    for extra, needle in ((["--route-observation", "descriptor"], "only for --router hybrid"),
                          (["--router", "hybrid", "--text-weight", "2"], "--text-weight: 2.0"),
                          (["--router", "hybrid", "--obs-temperature", "0"],
                           "--obs-temperature: 0.0")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
