"""The full base check of ``carve state verify --base``: every byte of the base's weight files.

The base fingerprint that ``carve serve`` checks at load (``CheckpointReader.fingerprint``) covers
the tensor table, each file's name and size, and its first and last MiB: cheap on a 15 GB
checkpoint and enough to catch a different or re-saved base, but a tensor altered in the middle of
a file keeps the fingerprint. This module hashes the whole content (one streamed read of every
weight file) and compares it with a known digest: the manifest's ``base.content_sha256`` when the
state recorded one, or the one the user passes (``--base-sha256``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from policy_server.errors import IntegrityError

_BLOCK = 8 * 1024 * 1024


def content_digest(reader) -> str:
    """sha256 hex of a checkpoint's content: the sorted (key, shape, dtype) table, then each
    weight file (sorted by name) as ``name:size`` followed by all of its bytes, read in 8 MiB
    blocks (memory stays at one block)."""
    h = hashlib.sha256()
    for key in sorted(reader.keys()):
        dtype = str(reader.dtype(key)).removeprefix("torch.")
        h.update(f"{key}|{list(reader.shape(key))}|{dtype}\n".encode())
    for file in sorted(reader.files, key=lambda p: p.name):
        h.update(f"{file.name}:{file.stat().st_size}\n".encode())
        with open(file, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def verify_base(manifest: dict, base_dir: str | Path, state_desc: str, full: bool = True,
                expect_sha256: str | None = None) -> dict:
    """Check ``base_dir`` against a state's ``manifest``: the fingerprint rule (``StateError``
    on a mismatch, see ``base_check.check_base``), then, when ``full``, the content digest
    against ``expect_sha256`` or the manifest's ``base.content_sha256`` (``IntegrityError`` on a
    mismatch). -> {"fingerprint", "content_sha256" (None when not ``full``), "compared_with":
    "--base-sha256" | "manifest" | None (nothing recorded to compare the content with)}."""
    from policy_server.base_check import check_base
    from policy_server.tensors.checkpoint import open_checkpoint

    reader = open_checkpoint(base_dir)
    try:
        fingerprint = reader.fingerprint()
        check_base(manifest, fingerprint, base_dir, state_desc)
        if not full:
            return {"fingerprint": fingerprint, "content_sha256": None, "compared_with": None}
        digest = content_digest(reader)
    finally:
        reader.close()
    recorded = (manifest.get("base") or {}).get("content_sha256")
    want = (expect_sha256 or recorded or "").strip().lower() or None
    source = "--base-sha256" if expect_sha256 else ("manifest" if recorded else None)
    if want is not None and digest != want:
        origin = "given with --base-sha256" if expect_sha256 else f"recorded in {state_desc}"
        raise IntegrityError(f"base {Path(base_dir)}: content sha256 {digest[:16]} differs from "
                             f"{want[:16]} ({origin}); the fingerprint matched, so bytes inside "
                             "a weight file changed")
    return {"fingerprint": fingerprint, "content_sha256": digest, "compared_with": source}
