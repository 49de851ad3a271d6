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
        assert "shutting down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_carve_serve_bad_input_exit_codes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "policy_server.cli", "serve", "--base",
                        str(tmp_path / "missing"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing" in r.stderr
