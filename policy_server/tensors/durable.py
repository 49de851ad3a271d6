"""The one durable-write rule: write aside, fsync, rename, fsync the directory.

A reader (or a process restarted after a power loss) must never see a half-written file: every
write goes to a temporary name, is fsynced, then renamed over the final name, and the directory
holding the rename is fsynced so the rename itself survives. Also home of the crash-safety test
hook :func:`test_pause`, which the writers call at the moments a kill must be survivable.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

_PAUSE_HITS: dict[str, int] = {}


def test_pause(stage: str) -> None:
    """Crash-safety test hook: park the process at a named stage so a SIGKILL lands there.

    Inert unless ``CARVE_TEST_PAUSE_AT=<stage>``. ``CARVE_TEST_PAUSE_SKIP=k`` lets the first ``k``
    hits of the stage pass (e.g. pause while writing the third file); ``CARVE_TEST_PAUSE_MARKER``
    names a file written (aside + rename, so a watcher never reads it half-written) when the pause
    starts; ``CARVE_TEST_PAUSE_SECONDS`` (default 60) bounds the sleep. Stages: ``file-aside``
    (a tensor file written to its temp name, not yet renamed), ``files-written`` (all data files
    staged, manifest not yet written), ``manifest-written`` (staging complete, not yet renamed to
    versions/<id>), ``before-current`` (version directory final, CURRENT not yet switched).
    """
    if os.environ.get("CARVE_TEST_PAUSE_AT") != stage:
        return
    hits = _PAUSE_HITS.get(stage, 0)
    _PAUSE_HITS[stage] = hits + 1
    if hits < int(os.environ.get("CARVE_TEST_PAUSE_SKIP", "0")):
        return
    marker = os.environ.get("CARVE_TEST_PAUSE_MARKER")
    if marker:
        tmp = Path(f"{marker}.tmp")
        tmp.write_text(stage)
        os.replace(tmp, marker)
    time.sleep(float(os.environ.get("CARVE_TEST_PAUSE_SECONDS", "60")))


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file's data (written and flushed by its writer).

    Opened read-only: fsync flushes the file, not the descriptor, and a file copied from a
    read-only template (mode 0444) must still be fsyncable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def aside_path(path: Path) -> Path:
    """The temporary sibling a durable write goes to before its rename (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def publish(tmp: Path, path: Path) -> None:
    """Rename the fsynced ``tmp`` over ``path`` and fsync the directory (the durable commit)."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename (+ fsync of the directory)."""
    tmp = aside_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
