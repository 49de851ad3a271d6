"""Builds a small but real serving stack on disk for the service/end-to-end tests: a random-weight
demo VLA base, perturbed experts (low-rank + sparse updates, like fine-tunes), admitted with the
real engine into a real CARVE merge state."""

from __future__ import annotations

from pathlib import Path

import torch

from policy_server.state.admission import admit
from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig

SKILLS = {
    "drawer": ["open the top drawer", "pull the drawer open"],
    "button": ["press the red button", "push the button down"],
    "window": ["slide the window closed", "close the window"],
}


def make_stack(root: Path, cameras: dict | None = None, skills: dict | None = None,
               rank: int = 8, seed: int = 0, hooks_for=None, admitted: int | None = None) -> dict:
    """-> {"base", "state", "experts": {skill: dir}, "skills": {skill: instructions}}.
    admitted: admit only the first that many skills (the others' experts are left for the test
    to admit; default: all)."""
    skills = skills or SKILLS
    cfg = DemoVLAConfig(cameras=cameras or {}, chunk_length=4, hidden_dim=64, mlp_dim=128,
                        num_heads=4, vocab_size=512, text_dim=32)
    base = DemoVLABackend(cfg, seed=seed)
    base_dir = base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(seed + 1)
    experts = {}
    for i, (name, _instr) in enumerate(skills.items()):
        expert = DemoVLABackend(cfg, seed=seed)
        with torch.no_grad():
            for pname, p in expert.module.named_parameters():
                if p.ndim == 2 and min(p.shape) >= 4:
                    r = 3
                    a = torch.randn(p.shape[0], r, generator=g) * 0.15
                    b = torch.randn(r, p.shape[1], generator=g) * 0.15
                    sparse = (torch.rand(p.shape, generator=g) < 0.02) * torch.randn(p.shape, generator=g) * 0.05
                    p.add_(a @ b / r + sparse)
                else:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        experts[name] = expert.save_pretrained(root / f"expert-{name}")
    state = root / "state"
    for name, instr in list(skills.items())[:admitted]:
        admit(state, base_dir, experts[name], name, instructions=instr, method="carve",
              options={"rank": rank}, progress=False,
              hooks=hooks_for(name, instr) if hooks_for else ())
    return {"base": Path(base_dir), "state": state, "experts": experts, "skills": skills,
            "config": cfg}


class ServeProcess:
    """``carve serve`` in a subprocess, as users run it: ``args`` are extra CLI arguments.
    ``port`` is parsed from its "listening on" line; ``memory_kb("VmHWM")`` reads the server's
    /proc status (peak / current resident memory); ``terminate()`` sends SIGTERM and returns
    (exit code, seconds to exit, stderr)."""

    def __init__(self, stack: dict, *args: str, ready_timeout: float = 120.0):
        import re
        import subprocess
        import sys
        import threading

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "policy_server.cli", "serve", "--base", str(stack["base"]),
             "--state", str(stack["state"]), "--port", "0", "--router", "exact", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._err: list[str] = []
        # drain stderr continuously so a chatty server never blocks on a full pipe
        self._err_reader = threading.Thread(
            target=lambda: self._err.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        self._err_reader.start()
        line = self.line = self._readline(ready_timeout)  # the "listening on" line
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            self._err_reader.join(10)
            raise RuntimeError(f"carve serve did not start: {line!r} {''.join(self._err)}")
        self.port = int(m.group(1))
        self.target = f"127.0.0.1:{self.port}"

    def _readline(self, timeout: float) -> str:
        import threading

        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        return out[0] if out else ""

    def memory_kb(self, key: str = "VmRSS") -> int:
        """``key`` (VmRSS, VmHWM...) of the server process's /proc status, in kB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def terminate(self, timeout: float = 60.0) -> tuple[int | None, float, str]:
        """SIGTERM; -> (exit code or None if still running after ``timeout``, seconds, stderr)."""
        import signal
        import subprocess
        import time

        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
        self.kill()
        return rc, took, "".join(self._err)

    def kill(self) -> None:
        """SIGKILL if still running (cleanup)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._err_reader.join(10)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
