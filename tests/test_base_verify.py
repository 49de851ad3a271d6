"""Base integrity: the load-time fingerprint does not see a tensor altered in the middle of a
weight file (documented in `carve serve --help`); `carve state verify --base` hashes the whole
content by default and catches it. A real demo-VLA base (10 MB file) and a real CARVE state."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from policy_server.errors import IntegrityError, StateError
from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig
from policy_server.state.admission import admit
from policy_server.state.base_verify import content_digest, verify_base
from policy_server.state.store import StateStore
from policy_server.tensors.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigbase")
    cfg = DemoVLAConfig(chunk_length=4, hidden_dim=256, mlp_dim=512, num_heads=4,
                        vocab_size=512, text_dim=32)
    base = DemoVLABackend(cfg, seed=0).save_pretrained(root / "base")
    expert = DemoVLABackend(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in expert.module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    expert_dir = expert.save_pretrained(root / "expert")
    admit(root / "state", base, expert_dir, "drawer", instructions=["open the drawer"],
          method="carve", options={"rank": 4}, progress=False)
    return {"base": base, "state": root / "state", "config": cfg, "root": root}


def _verify(*args):
    return subprocess.run([sys.executable, "-m", "policy_server.cli", "state", "verify", *args],
                          capture_output=True, text=True, timeout=120)


def _alter_middle(src, dst):
    """A copy of base ``src`` with one byte flipped in the middle of its weight file."""
    import shutil

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = bytearray(f.read_bytes())
    assert len(data) > 4 * 1024 * 1024  # the byte is outside the fingerprint's first/last MiB
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    return dst


def test_fingerprint_misses_a_middle_change_and_the_full_check_catches_it(stack, tmp_path):
    good = open_checkpoint(stack["base"])
    digest = content_digest(good)
    altered = _alter_middle(stack["base"], tmp_path / "altered")
    bad = open_checkpoint(altered)
    assert bad.fingerprint() == good.fingerprint()  # the documented gap of the fast check
    assert content_digest(bad) != digest

    r = _verify(str(stack["state"]), "--base", str(stack["base"]))
    assert r.returncode == 0, r.stderr
    assert digest in r.stdout and "records no content hash" in r.stdout
    r = _verify(str(stack["state"]), "--base", str(stack["base"]), "--base-sha256", digest)
    assert r.returncode == 0 and "ok (matches the given hash)" in r.stdout, r.stdout + r.stderr

    r = _verify(str(stack["state"]), "--base", str(altered), "--base-sha256", digest)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "bytes inside a weight file changed" in r.stderr and "Traceback" not in r.stderr
    r = _verify(str(stack["state"]), "--base", str(altered), "--fast")
    assert r.returncode == 0 and "fast check" in r.stdout  # what the fast check cannot see


def test_verify_base_against_a_recorded_content_hash_and_another_base(stack, tmp_path):
    manifest = dict(StateStore(stack["state"]).open().manifest)
    manifest["base"] = {**manifest["base"],
                        "content_sha256": content_digest(open_checkpoint(stack["base"]))}
    rep = verify_base(manifest, stack["base"], "state S")
    assert rep["compared_with"] == "manifest"
    altered = _alter_middle(stack["base"], tmp_path / "altered")
    with pytest.raises(IntegrityError, match="recorded in state S"):
        verify_base(manifest, altered, "state S")
    other = DemoVLABackend(stack["config"], seed=5).save_pretrained(tmp_path / "other")
    with pytest.raises(StateError, match="is not the base of state S"):
        verify_base(manifest, other, "state S")
    r = _verify(str(stack["state"]), "--fast")
    assert r.returncode == 2 and "need --base" in r.stderr


def test_serve_help_says_what_the_fingerprint_does_not_cover():
    r = subprocess.run([sys.executable, "-m", "policy_server.cli", "serve", "--help"],
                       capture_output=True, text=True, timeout=60)
    text = " ".join(r.stdout.split())
    assert "does NOT cover bytes in the middle of a file" in text
    assert "carve state verify STATE --base BASE" in text
