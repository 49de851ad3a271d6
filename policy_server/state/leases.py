"""Reader leases: a version a live reader has open is never garbage-collected under it.

Each committed version directory holds an empty ``.lease`` file, created in the staging directory
so it exists from the moment the version does (its dot name keeps it out of the manifest's file
list and out of the hard links a child version shares). A reader (``StateStore.open``) holds a
*shared* ``fcntl.flock`` on it for the snapshot's lifetime; ``gc`` tries an *exclusive* lock
without blocking and skips the version when that fails.

Why this is race-free: the reader takes its lock *before* reading the manifest, and gc holds its
exclusive lock from the check until the directory has been renamed away. A reader that opened the
lease file while gc held it waits, then finds no manifest and gets the ordinary "no version"
error; a reader that got its lock first makes gc skip the version. flock locks belong to an open
file description, so one process holding a snapshot also keeps its own gc off that version.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("carve.state")

LEASE_FILE = ".lease"


def create_lease_file(version_dir: Path) -> None:
    """Create the empty lease file of a version being staged (before it is renamed into place)."""
    fd = os.open(version_dir / LEASE_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)


def _open_lease(version_dir: Path) -> int | None:
    """An fd on the version's lease file; None when it cannot exist (read-only state of a format
    before leases: such a reader is unprotected, as every reader was before)."""
    path = version_dir / LEASE_FILE
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        pass
    try:  # a version committed before leases existed: add its lease file now
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        return None


def acquire_shared(version_dir: Path) -> int | None:
    """Take a reader's shared lease on ``version_dir`` (blocks only while a gc is deleting it).

    Returns the fd to pass to :func:`release` (None: no lease could be taken). The caller must
    check that the version still exists *after* this returns.

    Works on a read-only mount (a fleet's replicas mount the state read-only): the lease file is
    opened O_RDONLY and a shared flock needs no write. Where the file is missing and cannot be
    created (EROFS/EACCES) or the filesystem refuses locks (ENOLCK), the reader goes on without a
    lease instead of failing: it is then unprotected from a gc, as readers were before leases."""
    fd = _open_lease(version_dir)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:  # e.g. ENOLCK on an NFS mount without a lock service: serve unleased
            os.close(fd)
            return None
    return fd


def try_exclusive(version_dir: Path) -> int | None:
    """gc's probe: an fd holding an exclusive lease, or None when a live reader holds the version
    (or its lease file cannot be opened, which gc also treats as "in use").

    A filesystem that refuses locks (ENOLCK: NFS without a lock service; any other OSError of
    flock alike) cannot tell gc whether a reader holds the version, and its readers go unleased
    (:func:`acquire_shared`): gc must then assume one does and keep the version, with a warning
    naming it, rather than fail the whole gc or delete files a live server may still read."""
    fd = _open_lease(version_dir)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        log.warning("gc: cannot lock %s (%s: %s); a reader may hold it, so it is kept; delete it "
                    "by hand once no server serves it", version_dir / LEASE_FILE,
                    errno.errorcode.get(e.errno, e.errno), e.strerror or e)
        return None
    return fd


def release(fd: int | None) -> None:
    """Drop a lease taken by :func:`acquire_shared` or :func:`try_exclusive` (None: nothing)."""
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
