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
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from policy_server.errors import InputError, IntegrityError, StateError
from policy_server.merge.entries import ResidualEntry
from policy_server.state import tensor_io as tio
from policy_server.state.format import (
    FORMAT_VERSION,
    check_manifest,
    new_manifest,
    storage_accounting,
)

SKILL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
VERSION_RE = re.compile(r"^v(\d{6,})$")
CORE_FILE = "core.safetensors"
AUX_FILE = "state_aux.safetensors"
MANIFEST = "manifest.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _test_pause(stage: str) -> None:
    """Crash-safety tests set CARVE_TEST_PAUSE_AT=<stage> so a SIGKILL lands at a known point."""
    if os.environ.get("CARVE_TEST_PAUSE_AT") == stage:
        marker = os.environ.get("CARVE_TEST_PAUSE_MARKER")
        if marker:  # written aside and renamed: a watcher never sees an empty marker
            tmp = Path(f"{marker}.tmp")
            tmp.write_text(stage)
            os.replace(tmp, marker)
        time.sleep(float(os.environ.get("CARVE_TEST_PAUSE_SECONDS", "60")))


def check_skill_name(name: str) -> str:
    if not isinstance(name, str) or not SKILL_NAME_RE.match(name):
        raise InputError(f"invalid skill name {name!r}: use letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit, at most 128 characters)")
    return name


class StateSnapshot:
    """Read-only view of one committed version. Tensors are loaded on demand."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.version: str = manifest["version"]

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

    def core(self) -> dict[str, torch.Tensor]:
        """Dense core delta per checkpoint key, in the store dtype."""
        return tio.load_tensors(self.path / CORE_FILE)

    def aux(self) -> dict[str, torch.Tensor]:
        """Method state carried between admissions (e.g. per-coordinate counts)."""
        return tio.load_tensors(self.path / AUX_FILE)

    def residuals(self, name: str) -> dict[str, ResidualEntry]:
        """The skill's residual entries by checkpoint key (LowRank / Dense / Masked)."""
        rec = self.skill(name)
        path = self.path / "skills" / f"{name}.safetensors"
        flat = tio.load_tensors(path)
        return tio.decode_entries(flat, rec.get("tensors", {}), str(path))

    def skill_artifacts(self, name: str) -> dict[str, torch.Tensor]:
        """Router data stored with the skill (empty dict when none)."""
        self.skill(name)
        return tio.load_tensors(self.path / "artifacts" / f"{name}.safetensors")


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
            self.staging.mkdir(parents=True)
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
    def _dtype(self) -> torch.dtype:
        name = self.manifest.get("store_dtype", "float32")
        if name not in tio.DTYPES:
            raise InputError(f"unsupported store dtype {name!r}; use one of {sorted(tio.DTYPES)}")
        return tio.DTYPES[name]

    def write_core(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the whole core (checkpoint key -> dense delta)."""
        dt = self._dtype()
        tio.save_tensors_durable({k: v.detach().to(dt).cpu() for k, v in tensors.items()},
                                 self.staging / CORE_FILE)
        self._rewritten.add(CORE_FILE)

    def write_aux(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the method's carried state (stored as given: counts stay integers)."""
        tio.save_tensors_durable({k: v.detach().cpu() for k, v in tensors.items()},
                                 self.staging / AUX_FILE)
        self._rewritten.add(AUX_FILE)

    def write_skill(self, name: str, entries: dict[str, ResidualEntry], record: dict) -> None:
        """Write (or replace) one skill: its residual file and its manifest record.

        ``record`` is the manifest record (name, order, instructions, ...); its ``tensors`` map is
        completed from ``entries`` so the file can always be decoded.
        """
        check_skill_name(name)
        dt = self._dtype()
        rel = f"skills/{name}.safetensors"
        tio.save_tensors_durable(tio.encode_entries(entries, dt), self.staging / rel)
        self._rewritten.add(rel)
        rec = copy.deepcopy(record)
        rec["name"] = name
        tensors = rec.setdefault("tensors", {})
        for key, e in entries.items():
            r = tensors.setdefault(key, {})
            r["kind"] = tio.entry_kind(e)
            r["rank"] = e.rank if hasattr(e, "rank") else None
            r.setdefault("rel_error", float(getattr(e, "rel_error", 0.0)))
            if "shape" not in r:
                if hasattr(e, "P"):
                    r["shape"] = [int(e.P.shape[0]), int(e.Q.shape[1])]
                else:
                    r["shape"] = list((e.D if hasattr(e, "D") else e.mask).shape)
        for key in list(tensors):
            if key not in entries:
                del tensors[key]
        rec["stored_params"] = int(sum(e.numel() for e in entries.values()))
        rec["stored_bytes"] = int(sum(tio.entry_bytes(e, dt) for e in entries.values()))
        skills = [s for s in self.manifest.setdefault("skills", []) if s["name"] != name]
        rec.setdefault("order", max([s.get("order", 0) for s in skills], default=0) + 1)
        skills.append(rec)
        skills.sort(key=lambda s: s.get("order", 0))
        self.manifest["skills"] = skills

    def write_artifacts(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Router data for skill ``name`` (replaces any earlier artifacts of that skill)."""
        check_skill_name(name)
        rel = f"artifacts/{name}.safetensors"
        tio.save_tensors_durable({k: v.detach().cpu() for k, v in tensors.items()},
                                 self.staging / rel)
        self._rewritten.add(rel)

    def remove_skill(self, name: str) -> None:
        """Drop a skill's record, residual file and artifacts from the new version."""
        before = len(self.manifest.get("skills", []))
        self.manifest["skills"] = [s for s in self.manifest.get("skills", [])
                                   if s["name"] != name]
        if len(self.manifest["skills"]) == before:
            raise StateError(f"cannot remove skill {name!r}: not in the state")
        for rel in (f"skills/{name}.safetensors", f"artifacts/{name}.safetensors"):
            p = self.staging / rel
            if p.exists():
                p.unlink()

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
                files[rel] = {"sha256": tio.sha256_file(p), "bytes": st.st_size}
        return files

    def commit(self) -> str:
        """Finish the version and make it current. Returns its id (e.g. ``"v000004"``)."""
        if self._done:
            raise StateError("transaction already committed")
        if self._lock_fd is None:
            raise StateError("commit() outside `with store.transaction(...)`")
        if not (self.staging / CORE_FILE).exists():
            tio.save_tensors_durable({}, self.staging / CORE_FILE)
        m = self.manifest
        m["format_version"] = FORMAT_VERSION
        m["version"] = self.version_id
        m["parent"] = self.parent.version if self.parent else None
        m["created"] = _now()
        m["message"] = self.message
        _test_pause("files-written")
        m["files"] = self._hash_files()
        m["storage"] = storage_accounting(m, self.staging)
        check_manifest(m, source=f"staged version {self.version_id}")
        tio.write_bytes_durable(self.staging / MANIFEST,
                                json.dumps(m, indent=1, sort_keys=True).encode())
        tio.fsync_dir(self.staging)
        final = self.store.versions_dir / self.version_id
        os.rename(self.staging, final)
        tio.fsync_dir(self.store.versions_dir)
        _test_pause("before-current")
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
        path = self.versions_dir / version / MANIFEST
        if not path.is_file():
            known = ", ".join(self._committed()) or "none"
            raise StateError(f"state {self.path}: no version {version!r} (versions: {known})")
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise IntegrityError(f"{path}: unreadable manifest ({e})") from None
        check_manifest(m, source=str(path))
        return m

    def open(self, version: str | None = None, verify: bool = False) -> StateSnapshot:
        """A read-only snapshot of ``version`` (default: the current one)."""
        if version is None:
            version = self.current_version()
            if version is None:
                raise StateError(f"{self.path} is not a merge state (no CURRENT file); "
                                 "create one with `carve admit`")
        if verify:
            self.verify(version)
        return StateSnapshot(self.versions_dir / version, self._read_manifest(version))

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

    def verify(self, version: str | None = None, progress: bool = False) -> dict:
        """Recheck every file's sha256 against the manifest. IntegrityError names a bad file."""
        version = version or self.current_version()
        if version is None:
            raise StateError(f"{self.path} is not a merge state (no CURRENT file)")
        m = self._read_manifest(version)
        root = self.versions_dir / version
        items = sorted(m.get("files", {}).items())
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc=f"verify {version}", unit="file")
        total = 0
        for rel, meta in items:
            p = root / rel
            if not p.is_file():
                raise IntegrityError(f"state {self.path} version {version}: missing file {rel}")
            if p.stat().st_size != meta["bytes"] or tio.sha256_file(p) != meta["sha256"]:
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
        return fd

    def _next_version_id(self) -> str:
        nums = [int(VERSION_RE.match(v).group(1)) for v in self._committed()]
        return f"v{(max(nums, default=0) + 1):06d}"

    def _write_current(self, version: str) -> None:
        tio.write_bytes_durable(self.path / "CURRENT", f"{version}\n".encode())

    def transaction(self, message: str) -> Transaction:
        """``with store.transaction("admit x") as tx: ...`` stages and commits a new version."""
        return Transaction(self, message)

    def rollback(self, version: str) -> None:
        """Make ``version`` current again (it is verified first; later versions are kept)."""
        fd = self._acquire_lock()
        try:
            self.verify(version)
            self._write_current(version)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def gc(self, keep: int = 3) -> list[str]:
        """Delete all but the ``keep`` newest versions (never the current one) and stale staging
        directories. Files shared by hard links stay alive through the versions that keep them."""
        if keep < 1:
            raise InputError(f"--keep must be >= 1, got {keep}")
        fd = self._acquire_lock()
        try:
            cur = self.current_version()
            committed = self._committed()
            keep_set = set(committed[-keep:]) | {cur}
            removed = []
            for v in committed:
                if v not in keep_set:
                    shutil.rmtree(self.versions_dir / v)
                    removed.append(v)
            for p in self.versions_dir.iterdir():
                if p.name.startswith(".staging-"):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
            tio.fsync_dir(self.versions_dir)
            return removed
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
