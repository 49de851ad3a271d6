"""The deployment files in deploy/ use only flags and ports that `carve serve` really has.

Parses every YAML under deploy/ (the Kubernetes manifests and the compose file), the Dockerfile's
ENTRYPOINT (which container args are appended to) and the systemd unit's ExecStart; collects every
`carve serve` / `carve admit` argument and checks it against the command's --help (run as a
subprocess of .venv/bin/carve), checks that every probe, container port, Service target and
Prometheus annotation matches --port / --metrics-port, that the fleet replicas follow a read-only
state, and that the stop timeouts exceed --grace. Also: reader leases on a read-only state.
"""

from __future__ import annotations

import errno
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from policy_server.state import leases

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CARVE = Path(sys.executable).parent / "carve"
STUCK_MARGIN_S = 10.0  # run_serve exits by itself at most --grace + 10 s after SIGTERM
DEFAULT_GRACE_S = 10.0
DEFAULT_PORT = 50051


# -- helpers ---------------------------------------------------------------------------------------
_HELP: dict[str, set[str]] = {}


def _help_flags(cmd: str) -> set[str]:
    if cmd not in _HELP:
        exe = [str(CARVE)] if CARVE.exists() else [sys.executable, "-m", "policy_server.cli"]
        out = subprocess.run(exe + [cmd, "--help"], capture_output=True, text=True, timeout=120,
                             env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        _HELP[cmd] = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))
    return _HELP[cmd]


def _entrypoint() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert m, "deploy/Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(m.group(1))


def _subcommand(argv: list[str]) -> tuple[str | None, list[str]]:
    """('serve', its args) for [.../carve, serve, ...]; (None, argv) for anything else."""
    for i, tok in enumerate(argv[:-1]):
        if Path(tok).name == "carve":
            return argv[i + 1], argv[i + 2:]
    return None, argv


def _flags(args: list[str]) -> dict[str, str | None]:
    """{'--flag': value or None}: the value is the next token when it is not a flag."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        tok = str(args[i])
        if tok.startswith("--"):
            if "=" in tok:
                k, v = tok.split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                out[tok] = str(args[i + 1])
                i += 1
            else:
                out[tok] = None
        i += 1
    return out


def _yaml_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def _pod_specs() -> list[tuple[Path, dict, dict]]:
    """(file, workload doc, pod spec) for every Deployment / Job / Pod-like manifest."""
    out = []
    for path, doc in _yaml_docs():
        kind = doc.get("kind")
        if kind == "Pod":
            out.append((path, doc, doc["spec"]))
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            out.append((path, doc, doc["spec"]["template"]["spec"]))
        elif kind == "CronJob":
            out.append((path, doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def _argv(container: dict) -> list[str]:
    """The container's effective command: its command (or the image's ENTRYPOINT) + args."""
    cmd = container.get("command") or _entrypoint()
    return [str(x) for x in cmd] + [str(x) for x in container.get("args", [])]


def _serve_containers():
    for path, doc, spec in _pod_specs():
        for c in spec.get("containers", []):
            sub, args = _subcommand(_argv(c))
            if sub == "serve":
                yield path, doc, spec, c, _flags(args)


def _port_flags(flags: dict) -> tuple[int, int | None]:
    port = int(flags.get("--port") or DEFAULT_PORT)
    metrics = flags.get("--metrics-port")
    return port, (int(metrics) if metrics is not None else None)


def _resolve(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"named port {port!r} not among the container's ports {named}"
    return named[port]


# -- tests -----------------------------------------------------------------------------------------
def test_every_yaml_parses_and_k8s_has_a_fleet():
    docs = _yaml_docs()
    kinds = {d.get("kind") for _, d in docs}
    assert {"Deployment", "Service", "Job", "PersistentVolumeClaim", "Secret"} <= kinds, kinds
    serving = list(_serve_containers())
    assert serving, "no manifest runs `carve serve`"
    for path, doc, *_ in serving:
        if doc["kind"] == "Deployment":
            assert doc["spec"]["replicas"] >= 2, f"{path}: a fleet needs N > 1 replicas"


def test_every_carve_flag_exists_in_help():
    seen = 0
    argvs = []
    for path, _, spec in _pod_specs():
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            argvs.append((path, _argv(c)))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        cmd = svc.get("command", [])
        cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(x) for x in cmd]
        argvs.append((DEPLOY / f"compose.yaml:{name}", _entrypoint() + cmd))
    argvs.append((DEPLOY / "carve-serve.service", _systemd_exec()))
    for where, argv in argvs:
        sub, args = _subcommand(argv)
        if sub is None:
            continue
        known = _help_flags(sub)
        for flag in _flags(args):
            assert flag in known, f"{where}: `carve {sub}` has no {flag} (see carve {sub} --help)"
            seen += 1
    assert seen >= 10


def test_serve_argv_parses():
    """Every `carve serve` command line parses with the real parser (values of the right type)."""
    from policy_server.cli import build_parser

    parser = build_parser()
    for path, _, _, c, _ in _serve_containers():
        sub, args = _subcommand(_argv(c))
        ns = parser.parse_args(["serve", *args])
        assert ns.follow, f"{path}: fleet replicas must --follow the shared state"
    sub, args = _subcommand(_systemd_exec())
    ns = parser.parse_args([sub, *args])
    assert ns.port == DEFAULT_PORT
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for svc in compose["services"].values():
        sub, args = _subcommand(_entrypoint() + [str(x) for x in svc.get("command", [])])
        parser.parse_args([sub, *args])


def test_probe_and_ports_match_serve_flags():
    for path, doc, spec, c, flags in _serve_containers():
        port, metrics = _port_flags(flags)
        assert metrics is not None, f"{path}: no --metrics-port"
        declared = {p["containerPort"] for p in c.get("ports", [])}
        assert declared <= {port, metrics}, f"{path}: container ports {declared} vs {port}/{metrics}"
        assert port in declared
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                assert "grpc" in c[probe], f"{path}: {probe} should be a native gRPC probe"
                assert _resolve(c, c[probe]["grpc"]["port"]) == port, f"{path}: {probe} port"
        assert "grpc" in c.get("readinessProbe", {}) and "grpc" in c.get("livenessProbe", {})
        ann = doc["spec"]["template"]["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true"
        assert int(ann["prometheus.io/port"]) == metrics
        grace = float(flags.get("--grace") or DEFAULT_GRACE_S)
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        assert tgps > grace + STUCK_MARGIN_S, f"{path}: terminationGracePeriodSeconds {tgps}"
        # Services in front of these pods target the serving / metrics ports
        labels = doc["spec"]["template"]["metadata"]["labels"]
        services = [d for _, d in _yaml_docs() if d.get("kind") == "Service"
                    and d["spec"].get("selector", {}).items() <= labels.items()]
        assert services, f"{path}: no Service selects the replicas"
        for svc in services:
            for sp in svc["spec"]["ports"]:
                assert _resolve(c, sp.get("targetPort", sp["port"])) in {port, metrics}


def test_state_is_shared_read_only_and_admission_writes_it():
    claims = {}
    for path, doc, spec, c, flags in _serve_containers():
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        state_dir = flags.get("--state") or "/state"
        base_dir = flags.get("--base")
        for d in (state_dir, base_dir):
            assert d in mounts and mounts[d].get("readOnly") is True, f"{path}: {d} not read-only"
            pvc = vols[mounts[d]["name"]]["persistentVolumeClaim"]
            claims[d] = pvc["claimName"]
        for flag in ("--auth-token-file", "--admin-token-file"):
            f = flags.get(flag)
            assert f, f"{path}: {flag} missing"
            mount = max((m for m in mounts if f.startswith(m.rstrip("/") + "/")), key=len)
            assert "secret" in vols[mounts[mount]["name"]], f"{path}: {flag} is not from a Secret"
    admits = []
    for path, doc, spec in _pod_specs():
        for c in spec.get("containers", []):
            sub, args = _subcommand(_argv(c))
            if sub == "admit":
                admits.append((doc, spec, c, args))
    assert admits, "no admission Job"
    for doc, spec, c, args in admits:
        assert doc["kind"] == "Job"
        state_arg = args[-1]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        assert not mounts[state_arg].get("readOnly"), "admission must write the state"
        assert vols[mounts[state_arg]["name"]]["persistentVolumeClaim"]["claimName"] == \
            claims["/state"]
    pvcs = {d["metadata"]["name"]: d for _, d in _yaml_docs() if d.get("kind") ==
            "PersistentVolumeClaim"}
    modes = set(pvcs[claims["/state"]]["spec"]["accessModes"])
    assert {"ReadWriteMany", "ReadOnlyMany"} & modes and "ReadWriteOnce" not in modes


def test_compose_and_systemd_ports_and_timeouts():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for svc in compose["services"].values():
        flags = _flags(_subcommand(_entrypoint() + [str(x) for x in svc.get("command", [])])[1])
        port, metrics = _port_flags(flags)
        for mapping in svc.get("ports", []):
            assert int(str(mapping).split(":")[-1].split("/")[0]) in {port, metrics}
        grace = float(flags.get("--grace") or DEFAULT_GRACE_S)
        assert float(svc["stop_grace_period"].rstrip("s")) > grace + STUCK_MARGIN_S
    unit = (DEPLOY / "carve-serve.service").read_text()
    flags = _flags(_subcommand(_systemd_exec())[1])
    grace = float(flags.get("--grace") or DEFAULT_GRACE_S)
    stop = float(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))
    assert stop > grace + STUCK_MARGIN_S


def _systemd_exec() -> list[str]:
    unit = (DEPLOY / "carve-serve.service").read_text().replace("\\\n", " ")
    m = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert m
    return shlex.split(m.group(1))


def test_dockerfile_installs_like_setup_sh():
    text = (DEPLOY / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    torch_pin = re.search(r"torch==([\d.]+) torchvision==([\d.]+)", setup).groups()
    assert f"torch=={torch_pin[0]} torchvision=={torch_pin[1]}" in text
    for needle in ("requirements-lerobot.txt", "requirements-openvla.txt",
                   "-e clients/carve_client", "--no-deps lerobot=="):
        assert needle in text, needle
    assert _entrypoint()[:2] == ["carve", "serve"]


# -- reader leases on a read-only state -----------------------------------------------------------
def test_lease_degrades_on_read_only_state(tmp_path, monkeypatch):
    bare, leased = tmp_path / "v000001", tmp_path / "v000002"
    bare.mkdir()
    leased.mkdir()
    (leased / leases.LEASE_FILE).touch()
    real_open = leases.os.open

    def ro_open(path, flags, *a):
        if flags & leases.os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(leases.os, "open", ro_open)
    assert leases.acquire_shared(bare) is None      # no lease file, cannot create: unleased
    fd = leases.acquire_shared(leased)              # existing lease: O_RDONLY + LOCK_SH, no write
    assert fd is not None
    leases.release(fd)


def test_state_store_opens_on_a_real_read_only_bind(tmp_path):
    """StateStore.open (with verify) on a read-only bind mount of a state, when one can be made."""
    import torch

    from policy_server.state.store import StateStore
    from policy_server.tensors.entries import Dense

    src, ro = tmp_path / "src", tmp_path / "ro"
    ro.mkdir()
    store = StateStore(src / "state")
    with store.transaction("add a") as tx:
        tx.manifest["base"] = {"num_params": 1000, "fingerprint": "f"}
        tx.write_core({"w": torch.ones(2, 2)})
        tx.write_skill("a", {"b": Dense(torch.ones(2))}, {"instructions": ["do a"]})
    (src / "state" / "versions" / "v000001" / leases.LEASE_FILE).unlink()  # pre-lease format
    with store.transaction("add b") as tx:
        tx.write_skill("b", {"b": Dense(torch.zeros(2))}, {"instructions": ["do b"]})
    if subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)],
                          capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        with pytest.raises(OSError):
            (ro / "probe").touch()
        rs = StateStore(ro / "state")
        with rs.open(verify=True) as snap:
            assert snap.manifest["version"] == "v000002"
        with rs.open("v000001", verify=True) as snap:   # no lease file, none creatable: served
            assert snap.manifest["version"] == "v000001"
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_lease_degrades_when_locks_are_refused(tmp_path, monkeypatch):
    vdir = tmp_path / "v000001"
    vdir.mkdir()
    (vdir / leases.LEASE_FILE).touch()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(leases.fcntl, "flock", no_locks)
    assert leases.acquire_shared(vdir) is None
