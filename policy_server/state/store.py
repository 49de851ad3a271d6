"""The versioned merge-state store: every admission is a new, atomically committed version.

Layout (see docs/STATE_FORMAT.md)::

    STATE_DIR/CURRENT                 "v000003\\n", switched with os.replace after fsync
    STATE_DIR/LOCK                    fcntl lock held by the one writer
    STATE_DIR/versions/v000003/       manifest.json, core.safetensors, state_aux.safetensors,
                                      skills/<skill>.safetensors, artifacts/<skill>.safetensors
    STATE_DIR/versions/.staging-*/    a version being written; never read, removed by gc

Crash safety: a transaction builds the new version in a staging directory (files of the parent
that it does not rewrite are hard-linked, never modified in place: every write goes to a new inode
through write-aside + rename), fsyncs everything, renames the staging directory to its final name
and only then switches CURRENT. A kill at any point leaves CURRENT naming the last complete version.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import re
import shutil
import stat
import weakref
from datetime import datetime, timezone
from pathlib import Path

import torch

from policy_server.dtypes import manifest_tensor_dtype
from policy_server.errors import InputError, IntegrityError, StateError
from policy_server.naming import check_skill_name
from policy_server.progress import progress as progress_bar
from policy_server.state import entry_codec, leases
from policy_server.state.format import (
    FORMAT_VERSION,
    check_manifest,
    new_manifest,
    storage_accounting,
)
from policy_server.tensors import durable
from policy_server.tensors.entries import Dense, LowRank, Masked, ResidualEntry
from policy_server.tensors.safetensors_io import (
    LazyTensors,
    SpooledTensorWriter,
    load_tensors,
    save_tensors_durable,
)

VERSION_RE = re.compile(r"^v(\d{6,})$")
CORE_FILE = "core.safetensors"
AUX_FILE = "state_aux.safetensors"
MANIFEST = "manifest.json"
#: versions an admission keeps by default (>= 2, so a rollback to the parent always works)
DEFAULT_KEEP = 3


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_version_id(version: str) -> str:
    """A version id is ``v`` + at least 6 digits; anything else (``../x``) is refused early."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise InputError(f"invalid version id {version!r}: expected e.g. 'v000003'")
    return version


class StateSnapshot:
    """Read-only view of one committed version. Tensors are loaded on demand.

    A snapshot from :meth:`StateStore.open` holds a reader lease on its version (see
    ``state/leases.py``) until :meth:`close`, the end of a ``with`` block or garbage collection,
    so ``gc`` never deletes files it may still read."""

    def __init__(self, path: Path, manifest: dict, lease_fd: int | None = None):
        self.path = path
        self.manifest = manifest
        self.version: str = manifest["version"]
        self._lease = weakref.finalize(self, leases.release, lease_fd)

    def close(self) -> None:
        """Release the reader lease (the snapshot's manifest stays usable; files may go)."""
        self._lease()

    def __enter__(self) -> "StateSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def skill_names(self) -> list[str]:
        """Skill names in admission order."""
        return [s["name"] for s in sorted(self.manifest.get("skills", []),
                                          key=lambda s: s.get("order", 0))]

    def skill(self, name: str) -> dict:
        for s in self.manifest.get("skills", []):
            if s["name"] == name:
                return s
        raise StateError(f"state version {self.version} has no skill {name!r} "
                         f"(skills: {', '.join(self.skill_names()) or 'none'})")

    def _load(self, rel: str) -> dict[str, torch.Tensor]:
        # a file the manifest lists must exist; one it does not list reads as empty
        return load_tensors(self.path / rel, required=rel in self.manifest.get("files", {}))

    def core(self, lazy: bool = False):
        """Dense core delta per checkpoint key: tensor of the base's shape, store dtype.
        ``lazy=True`` returns a ``tensors.safetensors_io.LazyTensors`` that loads one tensor per ``pop``/``get``
        (for callers that walk a large core tensor by tensor)."""
        if lazy:
            if CORE_FILE in self.manifest.get("files", {}) and not (self.path / CORE_FILE).exists():
                raise IntegrityError(f"{self.path / CORE_FILE}: listed in the manifest but missing")
            return LazyTensors(self.path / CORE_FILE)
        return self._load(CORE_FILE)

    def aux(self) -> dict[str, torch.Tensor]:
        """Method state carried between admissions (e.g. per-coordinate counts), dtype as written."""
        return self._load(AUX_FILE)

    def residuals(self, name: str) -> dict[str, ResidualEntry]:
        """The skill's residual entries by checkpoint key (LowRank / Dense / Masked)."""
        rec = self.skill(name)
        rel = f"skills/{name}.safetensors"
        tensors = rec.get("tensors", {})
        # a skill with entries must have its file: never silently serve it as core-only
        flat = load_tensors(self.path / rel,
                                required=bool(tensors) or rel in self.manifest.get("files", {}))
        return entry_codec.decode_entries(flat, tensors, str(self.path / rel))

    def skill_artifacts(self, name: str) -> dict[str, torch.Tensor]:
        """Router data stored with the skill (empty dict when none)."""
        self.skill(name)
        return self._load(f"artifacts/{name}.safetensors")


class Transaction:
    """Stages a new version; commits atomically (explicitly or on a clean ``with`` exit)."""

    def __init__(self, store: "StateStore", message: str):
        self.store = store
        self.message = message
        self.parent: StateSnapshot | None = store.open() if store.exists() else None
        self.manifest: dict = (copy.deepcopy(self.parent.manifest) if self.parent
                               else new_manifest())
        self.version_id = store._next_version_id()
        self.staging = store.versions_dir / f".staging-{self.version_id}-{os.getpid()}"
        self._lock_fd: int | None = None
        self._done = False
        self._rewritten: set[str] = set()
        self._core_spool: SpooledTensorWriter | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "Transaction":
        self._lock_fd = self.store._acquire_lock()
        try:
            # Re-read under the lock: another writer may have committed since __init__.
            self.parent = self.store.open() if self.store.exists() else None
            self.manifest = (copy.deepcopy(self.parent.manifest) if self.parent
                             else new_manifest())
            self.version_id = self.store._next_version_id()
            self.staging = (self.store.versions_dir
                            / f".staging-{self.version_id}-{os.getpid()}")
            if self.staging.exists():  # left by a killed writer whose pid we now reuse
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True)
            leases.create_lease_file(self.staging)
            (self.staging / "skills").mkdir()
            (self.staging / "artifacts").mkdir()
            if self.parent is not None:
                self._link_parent_files()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None and not self._done:
                self.commit()
        finally:
            if not self._done:
                if self._core_spool is not None:
                    self._core_spool.abort()
                shutil.rmtree(self.staging, ignore_errors=True)
            self._release()
        return False

    def _release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _link_parent_files(self) -> None:
        for rel in self.parent.manifest.get("files", {}):
            src = self.parent.path / rel
            dst = self.staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)

    # -- writes -----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._done:
            raise StateError("transaction already committed; start a new one")
        if self._lock_fd is None:
            raise StateError("write outside `with store.transaction(...) as tx:`")

    def _base_shape(self, key: str, what: str) -> list[int] | None:
        """The base tensor's shape when the manifest has a base table; InputError for a key the
        base does not have (a residual for it could never be applied)."""
        table = (self.manifest.get("base") or {}).get("tensors")
        if not table:
            return None
        if key not in table:
            raise InputError(f"{what}: tensor {key!r} is not in the base checkpoint")
        return [int(x) for x in table[key].get("shape", [])]

    @staticmethod
    def _check_finite(t: torch.Tensor, what: str) -> None:
        # a NaN/inf would poison every later admission (the core is shared): refuse it here
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{what}: contains NaN or inf values")

    def _validate_entry(self, skill: str, key: str, e: ResidualEntry) -> list[int]:
        """Check one residual entry and return the full tensor shape it applies to."""
        what = f"skill {skill!r} tensor {key!r}"
        if isinstance(e, LowRank):
            if e.P.ndim != 2 or e.Q.ndim != 2 or e.P.shape[1] != e.Q.shape[0]:
                raise InputError(f"{what}: low-rank factors P {list(e.P.shape)} and Q "
                                 f"{list(e.Q.shape)} do not chain (need (m, r) and (r, n))")
            self._check_finite(e.P, what + " P")
            self._check_finite(e.Q, what + " Q")
            if not math.isfinite(float(e.rel_error)):
                raise InputError(f"{what}: rel_error {e.rel_error!r} is not finite")
            shape = [int(e.P.shape[0]), int(e.Q.shape[1])]
        elif isinstance(e, Dense):
            self._check_finite(e.D, what + " D")
            shape = [int(x) for x in e.D.shape]
        elif isinstance(e, Masked):
            if e.mask.dtype != torch.bool:
                raise InputError(f"{what}: mask must be a bool tensor, got {e.mask.dtype}")
            shape = [int(x) for x in e.mask.shape]
        else:
            raise InputError(f"{what}: not a residual entry ({type(e).__name__})")
        want = self._base_shape(key, f"skill {skill!r}")
        if want is not None and shape != want:
            raise InputError(f"{what}: entry shape {shape} != base shape {want}")
        return shape

    def _dtype(self, key: str, core: bool = False) -> torch.dtype:
        """Dtype of ``key``'s core / residual factors in this state (docs/STATE_FORMAT.md)."""
        return manifest_tensor_dtype(self.manifest, key, core=core)

    def _check_core_tensor(self, k: str, v: torch.Tensor) -> None:
        want = self._base_shape(k, "core")
        if want is not None and [int(x) for x in v.shape] != want:
            raise InputError(f"core tensor {k!r}: shape {list(v.shape)} != base shape {want}")
        self._check_finite(v, f"core tensor {k!r}")

    def add_core_tensor(self, key: str, tensor: torch.Tensor) -> None:
        """Stream the new core one tensor at a time (instead of :meth:`write_core`), so an
        admission never holds a whole core: each tensor is checked, cast to its core dtype and
        spooled to disk at once (``SpooledTensorWriter``); the file is published at commit.
        Every call replaces the parent's core file as a whole: pass every key the version keeps."""
        self._check_open()
        self._check_core_tensor(key, tensor)
        if self._core_spool is None:
            self._core_spool = SpooledTensorWriter(self.staging / CORE_FILE)
        self._core_spool.add(key, tensor.detach().to(self._dtype(key, core=True)).cpu())
        self._rewritten.add(CORE_FILE)

    def write_core(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the whole core: checkpoint key -> dense delta of the base tensor's shape (any
        float dtype in, cast to the state's core dtype for that key on disk: ``core_dtype``, by
        default ``"param"`` = the base parameter's dtype)."""
        self._check_open()
        if self._core_spool is not None:
            raise StateError("write_core after add_core_tensor: use one or the other")
        for k, v in tensors.items():
            self._check_core_tensor(k, v)
        save_tensors_durable({k: v.detach().to(self._dtype(k, core=True)).cpu()
                              for k, v in tensors.items()}, self.staging / CORE_FILE)
        self._rewritten.add(CORE_FILE)

    def write_aux(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the method's carried state (stored as given: counts stay integers)."""
        self._check_open()
        save_tensors_durable({k: v.detach().cpu() for k, v in tensors.items()},
                                 self.staging / AUX_FILE)
        self._rewritten.add(AUX_FILE)

    def write_skill(self, name: str, entries: dict[str, ResidualEntry], record: dict) -> None:
        """Write (or replace) one skill: its residual file and its manifest record.

        ``record`` is the manifest record (name, order, instructions, ...); its ``tensors`` map is
        completed from ``entries`` so the file can always be decoded: ``kind``, ``rank`` and
        ``shape`` are always taken from the entry (the shape is what unpacks a bit-packed mask).
        Replacing an existing skill keeps its admission ``order`` unless ``record`` sets one.
        Floats are cast to the store dtype of their key (``store_dtype``; ``"param"``: the base
        parameter's dtype); masks are stored as packed uint8 (1 bit/coordinate).
        """
        self._check_open()
        check_skill_name(name)
        shapes = {key: self._validate_entry(name, key, e) for key, e in entries.items()}
        rel = f"skills/{name}.safetensors"
        save_tensors_durable(entry_codec.encode_entries(entries, self._dtype),
                             self.staging / rel)
        self._rewritten.add(rel)
        rec = copy.deepcopy(record)
        rec["name"] = name
        tensors = rec.setdefault("tensors", {})
        for key, e in entries.items():
            r = tensors.setdefault(key, {})
            r["kind"] = entry_codec.entry_kind(e)
            r["rank"] = e.rank if isinstance(e, LowRank) else None
            r.setdefault("rel_error", float(getattr(e, "rel_error", 0.0)))
            r["shape"] = shapes[key]
        for key in list(tensors):
            if key not in entries:
                del tensors[key]
        rec["stored_params"] = int(sum(e.numel() for e in entries.values()))
        rec["stored_bytes"] = int(sum(entry_codec.entry_bytes(e, self._dtype(key))
                                      for key, e in entries.items()))
        old = [s for s in self.manifest.setdefault("skills", []) if s["name"] == name]
        skills = [s for s in self.manifest["skills"] if s["name"] != name]
        if "order" not in rec:
            rec["order"] = (old[0].get("order") if old else
                            max([s.get("order", 0) for s in skills], default=0) + 1)
        rec.setdefault("instructions", [])
        rec.setdefault("description", "")
        skills.append(rec)
        skills.sort(key=lambda s: s.get("order", 0))
        self.manifest["skills"] = skills

    def write_artifacts(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Router data for skill ``name`` (replaces any earlier artifacts of that skill); tensors
        are stored as given (dtype kept: embeddings float32, digests uint8)."""
        self._check_open()
        check_skill_name(name)
        rel = f"artifacts/{name}.safetensors"
        save_tensors_durable({k: v.detach().cpu() for k, v in tensors.items()},
                                 self.staging / rel)
        self._rewritten.add(rel)

    def remove_skill(self, name: str) -> None:
        """Drop a skill's record, residual file and artifacts from the new version (only the
        staged hard links go: the parent's files are untouched)."""
        self._check_open()
        before = len(self.manifest.get("skills", []))
        self.manifest["skills"] = [s for s in self.manifest.get("skills", [])
                                   if s["name"] != name]
        if len(self.manifest["skills"]) == before:
            raise StateError(f"cannot remove skill {name!r}: not in the state")
        for rel in (f"skills/{name}.safetensors", f"artifacts/{name}.safetensors"):
            p = self.staging / rel
            if p.exists():
                p.unlink()
            self._rewritten.discard(rel)

    # -- commit -----------------------------------------------------------------------------------
    def _hash_files(self) -> dict[str, dict]:
        """sha256 of every file in staging; hard-linked parent files reuse the parent's hash."""
        parent_files = self.parent.manifest.get("files", {}) if self.parent else {}
        files: dict[str, dict] = {}
        for p in sorted(self.staging.rglob("*")):
            if not p.is_file() or p.name == MANIFEST or p.name.startswith("."):
                continue
            rel = p.relative_to(self.staging).as_posix()
            st = p.stat()
            old = parent_files.get(rel)
            if (old and rel not in self._rewritten and self.parent is not None
                    and (self.parent.path / rel).exists()
                    and os.path.samefile(p, self.parent.path / rel)):
                files[rel] = dict(old)
            else:
                files[rel] = {"sha256": durable.sha256_file(p), "bytes": st.st_size}
        return files

    def commit(self) -> str:
        """Finish the version and make it current. Returns its id (e.g. ``"v000004"``)."""
        self._check_open()
        if self._core_spool is not None:
            self._core_spool.finish()
            self._core_spool = None
        if not (self.staging / CORE_FILE).exists():
            save_tensors_durable({}, self.staging / CORE_FILE)
        m = self.manifest
        m["format_version"] = FORMAT_VERSION
        m["version"] = self.version_id
        m["parent"] = self.parent.version if self.parent else None
        m["created"] = _now()
        m["message"] = self.message
        for rec in m.get("skills", []):
            if rec.get("tensors") and not (self.staging / "skills"
                                           / f"{rec['name']}.safetensors").is_file():
                raise StateError(f"skill {rec['name']!r} has tensor records but no residual file "
                                 "(set manifest records only through write_skill)")
        names = {rec["name"] for rec in m.get("skills", [])}
        for p in (self.staging / "artifacts").glob("*.safetensors"):
            if p.stem not in names:  # router data nobody could route to: a caller bug
                raise StateError(f"artifacts written for {p.stem!r}, which has no skill record")
        durable.test_pause("files-written")
        m["files"] = self._hash_files()
        m["storage"] = storage_accounting(m, self.staging)
        check_manifest(m, source=f"staged version {self.version_id}")
        durable.write_bytes_durable(self.staging / MANIFEST,
                                json.dumps(m, indent=1, sort_keys=True).encode())
        durable.fsync_dir(self.staging)
        durable.test_pause("manifest-written")
        final = self.store.versions_dir / self.version_id
        os.rename(self.staging, final)
        durable.fsync_dir(self.store.versions_dir)
        durable.test_pause("before-current")
        self.store._write_current(self.version_id)
        self._done = True
        return self.version_id


class StateStore:
    """A merge-state directory. Cheap to construct; reads nothing until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.versions_dir = self.path / "versions"

    # -- reading ----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "CURRENT").is_file()

    def current_version(self) -> str | None:
        try:
            v = (self.path / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        if not VERSION_RE.match(v):
            raise IntegrityError(f"{self.path / 'CURRENT'}: malformed version id {v!r}")
        return v

    def _committed(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if VERSION_RE.match(p.name))

    def _read_manifest(self, version: str) -> dict:
        check_version_id(version)
        path = self.versions_dir / version / MANIFEST
        if not path.is_file():
            known = ", ".join(self._committed()) or "none"
            raise StateError(f"state {self.path}: no version {version!r} (versions: {known})")
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise IntegrityError(f"{path}: unreadable manifest ({e})") from None
        check_manifest(m, source=str(path))
        if m.get("version") != version:
            # a directory copied or renamed by hand: its files may belong to another version
            raise IntegrityError(f"{path}: manifest says version {m.get('version')!r}, "
                                 f"but it lives in {version}")
        return m

    def open(self, version: str | None = None, verify: bool = False) -> StateSnapshot:
        """A read-only snapshot of ``version`` (default: the current one)."""
        if version is None:
            version = self.current_version()
            if version is None:
                raise StateError(f"{self.path} is not a merge state (no CURRENT file); "
                                 "create one with `carve admit`")
        check_version_id(version)
        # lease first, then read: a gc that wins the race leaves no manifest to read
        fd = leases.acquire_shared(self.versions_dir / version)
        try:
            if verify:
                self.verify(version)
            return StateSnapshot(self.versions_dir / version, self._read_manifest(version), fd)
        except BaseException:
            leases.release(fd)
            raise

    def versions(self) -> list[dict]:
        """Every committed version, oldest first."""
        cur = self.current_version()
        out = []
        for v in self._committed():
            try:
                m = self._read_manifest(v)
            except StateError as e:
                out.append({"id": v, "error": str(e), "is_current": v == cur})
                continue
            out.append({"id": v, "parent": m.get("parent"), "created": m.get("created"),
                        "message": m.get("message", ""),
                        "skills": [s["name"] for s in m.get("skills", [])],
                        "bytes": sum(f["bytes"] for f in m.get("files", {}).values()),
                        "is_current": v == cur})
        return out

    def disk_usage(self, version: str | None = None) -> dict:
        """What the state takes on disk now, measured from the files (not the manifest).

        version_bytes: every regular file of ``version``'s directory (default current), manifest
        included; retained_bytes: every regular file under ``versions/`` (all retained versions
        plus any staging/trash leftovers) with hard links counted once, the figure ``du`` gives
        for the files; versions: how many committed versions are retained."""
        version = version or self.current_version()
        if version is None:
            raise StateError(f"{self.path} is not a merge state (no CURRENT file)")
        seen: set[tuple[int, int]] = set()
        retained = 0
        for root, _dirs, files in os.walk(self.versions_dir):
            for f in files:
                st = os.lstat(os.path.join(root, f))
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    retained += st.st_size
        vdir = self.versions_dir / check_version_id(version)
        current = sum(p.lstat().st_size for p in vdir.rglob("*") if p.is_file())
        return {"version": version, "version_bytes": current, "retained_bytes": retained,
                "versions": len(self._committed())}

    def verify(self, version: str | None = None, progress: bool = False) -> dict:
        """Recheck every file's sha256 against the manifest. IntegrityError names a bad file."""
        version = version or self.current_version()
        if version is None:
            raise StateError(f"{self.path} is not a merge state (no CURRENT file)")
        m = self._read_manifest(version)
        files = m.get("files", {})
        for rec in m.get("skills", []):
            rel = f"skills/{rec['name']}.safetensors"
            if rec.get("tensors") and rel not in files:
                raise IntegrityError(f"state {self.path} version {version}: skill "
                                     f"{rec['name']!r} has entries but {rel} is not recorded")
        root = self.versions_dir / version
        items = sorted(m.get("files", {}).items())
        items = progress_bar(items, progress, f"verify {version}", len(items), unit="file")
        total = 0
        for rel, meta in items:
            p = root / rel
            if not p.is_file():
                raise IntegrityError(f"state {self.path} version {version}: missing file {rel}")
            if p.stat().st_size != meta["bytes"] or durable.sha256_file(p) != meta["sha256"]:
                raise IntegrityError(f"state {self.path} version {version}: {rel} does not match "
                                     "its recorded sha256 (corrupted or modified)")
            total += meta["bytes"]
        return {"version": version, "files": len(m.get("files", {})), "bytes": total, "ok": True}

    # -- writing ----------------------------------------------------------------------------------
    def _acquire_lock(self) -> int:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"state {self.path} is locked by another writer "
                             "(an admission in progress?); try again when it finishes") from None
        except OSError as e:
            os.close(fd)
            # Without the writer lock two admissions could commit the same version id, so a
            # filesystem that cannot lock is refused for writing (readers never need this lock).
            raise StateError(f"state {self.path}: cannot take the writer lock "
                             f"({os.strerror(e.errno) if e.errno else e}); write the state on a "
                             "filesystem with flock support (local disk, or NFS/CephFS with "
                             "locking) and share it read-only with the servers") from None
        return fd

    def _next_version_id(self) -> str:
        nums = [int(VERSION_RE.match(v).group(1)) for v in self._committed()]
        return f"v{(max(nums, default=0) + 1):06d}"

    def _write_current(self, version: str) -> None:
        durable.write_bytes_durable(self.path / "CURRENT", f"{version}\n".encode())

    def transaction(self, message: str) -> Transaction:
        """``with store.transaction("admit x") as tx: ...`` stages and commits a new version."""
        return Transaction(self, message)

    def rollback(self, version: str) -> None:
        """Make ``version`` current again (it is verified first; later versions are kept, and the
        next transaction builds on ``version``). Holds the writer lock, so it cannot interleave
        with an admission."""
        check_version_id(version)
        fd = self._acquire_lock()
        try:
            self.verify(version)
            self._write_current(version)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def gc(self, keep: int = DEFAULT_KEEP) -> list[str]:
        """Delete all but the ``keep`` newest versions (never the current one, never one a live
        reader holds: see :meth:`collect`), stale staging directories and temp files of killed
        writers. Returns what was removed."""
        return self.collect(keep)["removed"]

    def collect(self, keep: int = DEFAULT_KEEP) -> dict[str, list[str]]:
        """:meth:`gc` with its full report: ``removed`` (versions and leftovers deleted) and
        ``held`` (versions due for deletion that a live reader's lease kept; a later gc retries).

        Files shared by hard links stay alive through the versions that keep them (unlinking a
        directory entry never touches another link's data). A version is first renamed to a
        ``.trash-*`` name (atomic) while gc holds its exclusive lease, so a gc killed half-way
        never leaves a half-deleted directory that still looks like a version; the next gc
        finishes the job."""
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise InputError(f"--keep must be an integer >= 1, got {keep!r}")
        if not self.versions_dir.is_dir():
            raise StateError(f"{self.path} is not a merge state (no versions/ directory)")
        fd = self._acquire_lock()
        try:
            cur = self.current_version()
            committed = self._committed()
            keep_set = set(committed[-keep:]) | ({cur} if cur else set())
            removed, held = [], []
            for v in committed:
                if v not in keep_set:
                    (removed if self._trash_unless_leased(v) else held).append(v)
            durable.fsync_dir(self.versions_dir)
            removed += self._remove_leftovers()
            durable.fsync_dir(self.versions_dir)
            return {"removed": removed, "held": held}
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _trash_unless_leased(self, version: str) -> bool:
        """Rename ``version`` to ``.trash-<id>`` unless a reader holds it; True when renamed."""
        lease = leases.try_exclusive(self.versions_dir / version)
        if lease is None:
            return False
        try:
            os.rename(self.versions_dir / version, self.versions_dir / f".trash-{version}")
        finally:
            leases.release(lease)
        return True

    def _remove_leftovers(self) -> list[str]:
        """Trash, staging directories and CURRENT temp files; only under the writer lock, where
        no writer is live, so every staging directory belongs to a dead one."""
        removed = []
        for p in self.versions_dir.iterdir():
            if p.name.startswith((".staging-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                if p.name.startswith(".staging-"):
                    removed.append(p.name)
        for p in self.path.glob(".CURRENT.tmp-*"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed
