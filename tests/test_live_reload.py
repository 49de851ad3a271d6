"""Live version following: a real gRPC server on loopback follows a real merge state while clients
stream episodes; admissions and a rollback land meanwhile. Also the admin Reload RPC's refusals
and a version that fails to verify (the old one keeps being served)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from carve_client import PolicyClient, PolicyError
from carve_client.proto.carve.policy.v1 import policy_pb2 as pb
from carve_client.proto.carve.policy.v1 import policy_pb2_grpc as pb_grpc

from policy_server.models.base import ObservationBatch
from policy_server.service.server import PolicyServer, ServerConfig
from policy_server.serving import EngineConfig, StateSource, build_engine
from policy_server.state.admission import admit
from policy_server.state.store import StateStore
from serving_utils import SKILLS, make_stack

ADMIN = "admin-secret"
LATER = {"lid": ["lift the lid"], "cup": ["grab the cup"], "knob": ["turn the knob"]}
STEPS = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # the first three skills are admitted (v000001..v000003); LATER's experts are admitted live
    return make_stack(tmp_path_factory.mktemp("live"), skills={**SKILLS, **LATER},
                      admitted=len(SKILLS))


def _cfg(state, **kw) -> EngineConfig:
    return EngineConfig(base_dir=str(kw.pop("base")), state_dir=str(state), router="exact", **kw)


def _serve(stack, state=None, version=None, **server_kw):
    cfg = _cfg(state or stack["state"], base=stack["base"], state_version=version)
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(port=0, **server_kw),
                          source=StateSource(cfg))
    port = server.start()
    return server, f"127.0.0.1:{port}"


def _reload(target, version="", token=ADMIN):
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.PolicyServiceStub(ch).Reload(pb.ReloadRequest(version=version),
                                                    metadata=metadata, timeout=60)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def test_reload_refusals_and_bad_versions_keep_the_served_one(stack, tmp_path):
    server, target = _serve(stack, admin_token=ADMIN)
    try:
        for token in (None, "wrong"):
            err = _code(lambda: _reload(target, token=token))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "admin" in err.details()
        err = _code(lambda: _reload(target, "v000099"))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "v000099" in err.details()
        assert _code(lambda: _reload(target, "../x")).code() == grpc.StatusCode.INVALID_ARGUMENT
        r = _reload(target)  # CURRENT is what is served: a no-op
        assert (r.state_version, r.changed) == ("v000003", False)
    finally:
        server.stop(1.0)
    server, target = _serve(stack)  # no admin token configured: admin calls are off
    try:
        assert _code(lambda: _reload(target)).code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(1.0)

    # a copy of the state whose CURRENT (v000003) is corrupted, served from v000002
    state = tmp_path / "state"
    shutil.copytree(stack["state"], state)
    v3 = state / "versions" / "v000003"
    victim = next(p for p in sorted(v3.rglob("*.safetensors")))
    victim.write_bytes(victim.read_bytes()[:-8] + b"corrupt!")
    server, target = _serve(stack, state, "v000002", admin_token=ADMIN, metrics_port=0,
                            follow_interval_s=30.0)
    try:
        err = _code(lambda: _reload(target))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "sha256" in err.details()
        with PolicyClient(target, retries=0) as c:
            info = c.server_info()
            assert info["state_version"] == "v000002" and info["reloads_failed"] == 1
            assert "sha256" in info["last_reload_error"]
            assert server.metrics.reloads.labels("failed")._value.get() == 1
            shutil.rmtree(state)  # the state vanishes: reported once, the old one still served
            server.follower._seen = "v000003"
            server.follower.poll()
            info = c.server_info()
            assert info["reloads_failed"] == 2 and "no CURRENT" in info["last_reload_error"]
            with c.episode("", skill="drawer") as ep:
                assert ep.state_version == "v000002"
                ep.infer(np.zeros(39, np.float32))
    finally:
        server.stop(1.0)


class Load:
    """``n`` client threads streaming episodes of the always-present skills until stopped;
    every episode is recorded as (state_version, skill, states, actions)."""

    def __init__(self, target: str, n: int = 8):
        self.episodes: list[tuple] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(target, i), daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, target: str, i: int) -> None:
        rng = np.random.default_rng(100 + i)
        skills = list(SKILLS)
        with PolicyClient(target, retries=0, timeout=60) as client:
            while not self._stop.is_set():
                skill = skills[rng.integers(len(skills))]
                states = rng.standard_normal((STEPS, 39)).astype(np.float32)
                try:
                    with client.episode("", skill=skill) as ep:
                        acts = [ep.infer(s) for s in states]
                        self.episodes.append((ep.state_version, skill, states, np.stack(acts)))
                except BaseException as e:  # noqa: BLE001 - every error fails the test
                    self.errors.append(e)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _wait_served(server, version: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while server.reloader.served_version() != version:
        assert time.monotonic() < end, f"server never followed to {version}: " \
                                       f"{server.reloader.last_error}"
        time.sleep(0.05)


@contextmanager
def _offline_engine(stack, version: str):
    """``build_engine`` on ``version`` of the state, alone (no server, no batching partners)."""
    engine = build_engine(_cfg(stack["state"], base=stack["base"], state_version=version))
    try:
        yield lambda state, skill: engine.runtime.infer(
            ObservationBatch(state=state[None], instructions=[""]), [skill])[0]
    finally:
        engine.close()


def _check_offline(stack, version: str, episodes) -> None:
    """Every episode of ``version`` against an offline run of that version."""
    with _offline_engine(stack, version) as predict:
        for _v, skill, states, acts in episodes:
            for s, got in zip(states, acts):
                np.testing.assert_allclose(got, predict(s, skill), rtol=1e-4, atol=1e-5)


def test_follow_under_load_no_dropped_episode(stack):
    server, target = _serve(stack, follow_interval_s=0.1, max_workers=32)
    load = Load(target)
    try:
        client = PolicyClient(target, retries=0, timeout=60)
        for i, (name, instr) in enumerate(LATER.items()):
            time.sleep(0.5)
            admit(stack["state"], stack["base"], stack["experts"][name], name,
                  instructions=instr, method="carve", options={"rank": 8}, progress=False,
                  keep=0)
            _wait_served(server, f"v00000{4 + i}")
            with client.episode("", skill=name) as ep:  # a new skill is routable at once
                ep.infer(np.zeros(39, np.float32))
        time.sleep(0.5)
        StateStore(stack["state"]).rollback("v000004")  # what `carve state rollback` runs
        _wait_served(server, "v000004")
        with pytest.raises(PolicyError) as e:  # removed by the rollback: refused, named
            client.episode("", skill="knob")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "knob" in e.value.details
        time.sleep(0.5)
        client.close()
        load.stop()
        assert not server.holder._retired  # each replaced engine closed with its last episode
    finally:
        load.stop()
        server.stop(2.0)
    assert load.errors == []
    assert server.reloader.ok == 4 and server.reloader.failed == 0
    by_version: dict[str, list] = {}
    for ep in load.episodes:
        by_version.setdefault(ep[0], []).append(ep)
    assert {"v000003", "v000004", "v000005", "v000006"} <= set(by_version), \
        {v: len(e) for v, e in by_version.items()}
    for version, episodes in sorted(by_version.items()):
        _check_offline(stack, version, episodes)
    # the versions really act differently (each admission refolds the core), so the check above
    # would notice an episode served by the wrong version
    _v, skill, states, acts = by_version["v000003"][0]
    with _offline_engine(stack, "v000006") as predict:
        assert not np.allclose(predict(states[0], skill), acts[0], atol=1e-4)


# ---- the rebuild beside serving (runtime/refold.py) -------------------------------------------

PARTIAL = {"a": ["stack the blocks"], "b": ["wipe the table"]}


@pytest.fixture(scope="module")
def partial_stack(tmp_path_factory):
    """Experts that fine-tune only the action expert (the text embedding, state encoder, fusion
    trunk and token embedding stay frozen, as an adapter fine-tune leaves them), so a reload has
    tensors to share: v000001 = {a}, v000002 = {a, b} (the core moves at the second admission)."""
    from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig

    root = tmp_path_factory.mktemp("partial")
    cfg = DemoVLAConfig(chunk_length=4, hidden_dim=64, mlp_dim=128, num_heads=4, vocab_size=512,
                        text_dim=32)
    base_dir = DemoVLABackend(cfg, seed=0).save_pretrained(root / "base")
    g = torch.Generator().manual_seed(7)
    state = root / "state"
    for name, instr in PARTIAL.items():
        expert = DemoVLABackend(cfg, seed=0)
        with torch.no_grad():
            for key, p in expert.module.named_parameters():
                if key.startswith("action_expert."):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        admit(state, base_dir, expert.save_pretrained(root / f"expert-{name}"), name,
              instructions=instr, method="carve", options={"rank": 4}, progress=False)
    return {"base": base_dir, "state": state}


def _tensors(engine) -> dict:
    """Canonical key -> live tensor of an engine's model."""
    return dict(engine.runtime.bank.index.tensors)


@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_reload_rebuilds_beside_serving_shares_unchanged_tensors_and_pins(partial_stack, mode,
                                                                          monkeypatch):
    from policy_server.tensors.checkpoint import CheckpointReader, open_checkpoint

    st = partial_stack
    cfg = _cfg(st["state"], base=st["base"], state_version="v000001", mode=mode)
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(port=0, admin_token=ADMIN),
                          source=StateSource(cfg))
    target = f"127.0.0.1:{server.start()}"
    reads: list[str] = []  # base tensors the reload streams from the checkpoint
    for name in ("get", "get_rows"):
        real = getattr(CheckpointReader, name)
        monkeypatch.setattr(CheckpointReader, name,
                            lambda self, key, *a, _real=real: (reads.append(key),
                                                               _real(self, key, *a))[1])
    states = np.random.default_rng(3).standard_normal((4, 39)).astype(np.float32)
    try:
        with PolicyClient(target, retries=0, timeout=60) as c:
            with c.episode("", skill="a") as pinned:
                assert pinned.state_version == "v000001"
                pinned_acts = [pinned.infer(s) for s in states[:2]]  # skill a merged (fused)
                old = server.holder.engine
                old_tensors = _tensors(old)
                reads.clear()
                r = _reload(target, "v000002")
                assert (r.state_version, r.changed) == ("v000002", True)
                new = server.holder.engine
                report = new.refold_report
                new_tensors = _tensors(new)
                # unchanged tensors are the served ones (same storage); the rest are new
                frozen = {k for k in new_tensors if not k.startswith("action_expert.")}
                assert frozen and set(report.shared) == frozen
                assert set(report.rebuilt) == set(new_tensors) - frozen
                for k in report.shared:
                    assert new_tensors[k].data_ptr() == old_tensors[k].data_ptr(), k
                for k in report.rebuilt:
                    assert new_tensors[k].data_ptr() != old_tensors[k].data_ptr(), k
                # only the rebuilt tensors were read from the base, never the frozen ones
                assert set(reads) == set(report.rebuilt)
                with open_checkpoint(st["base"]) as base:
                    assert report.base_bytes_read == base.tensor_bytes(report.rebuilt)
                    assert report.base_bytes_read < base.tensor_bytes()
                # the rebuilt fold is bitwise the fold of a fresh start on v000002
                fresh = build_engine(replace(cfg, state_version="v000002"))
                try:
                    for k, t in _tensors(fresh).items():
                        assert torch.equal(new_tensors[k], t), k
                finally:
                    fresh.close()
                assert server.holder._retired  # the old engine lives on for the pinned episode
                new_eps = {}
                for skill in ("a", "b"):
                    with c.episode("", skill=skill) as ep:
                        assert ep.state_version == "v000002"
                        new_eps[skill] = [ep.infer(s) for s in states]
                pinned_acts += [pinned.infer(s) for s in states[2:]]
            assert not server.holder._retired  # closed with its last episode
    finally:
        server.stop(1.0)
    with _offline_engine(st, "v000001") as predict:
        for s, got in zip(states, pinned_acts):
            np.testing.assert_allclose(got, predict(s, "a"), rtol=1e-5, atol=1e-6)
        assert not np.allclose(predict(states[0], "a"), new_eps["a"][0], atol=1e-4)
    with _offline_engine(st, "v000002") as predict:
        for skill, acts in new_eps.items():
            for s, got in zip(states, acts):
                np.testing.assert_allclose(got, predict(s, skill), rtol=1e-5, atol=1e-6)


def test_reload_failing_mid_rebuild_keeps_the_served_one(partial_stack, monkeypatch):
    """A read error half-way through the rebuild (the disk under the base fails): the reload is
    refused and reported, the served engine is untouched, nothing half-built is served; once the
    disk is back, the same reload succeeds."""
    import errno

    from policy_server.tensors import checkpoint

    st = partial_stack
    cfg = _cfg(st["state"], base=st["base"], state_version="v000001")
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(port=0, admin_token=ADMIN),
                          source=StateSource(cfg))
    target = f"127.0.0.1:{server.start()}"
    real, calls = checkpoint.read_tensor_at, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(*a, **kw)

    state = np.random.default_rng(4).standard_normal(39).astype(np.float32)
    try:
        with PolicyClient(target, retries=0, timeout=60) as c:
            with c.episode("", skill="a") as ep:
                before = ep.infer(state)
            served = server.holder.engine
            monkeypatch.setattr(checkpoint, "read_tensor_at", failing)
            err = _code(lambda: _reload(target, "v000002"))
            assert "Input/output error" in err.details(), err.details()
            assert len(calls) > 5  # it failed in the middle of the rebuild, not before
            monkeypatch.undo()
            assert server.holder.engine is served and not server.holder._retired
            info = c.server_info()
            assert info["state_version"] == "v000001" and info["reloads_failed"] == 1
            assert "Input/output error" in info["last_reload_error"]
            with c.episode("", skill="a") as ep:
                assert ep.state_version == "v000001"
                np.testing.assert_array_equal(ep.infer(state), before)
            assert _reload(target, "v000002").changed
            with c.episode("", skill="b") as ep:
                assert ep.state_version == "v000002"
    finally:
        server.stop(1.0)
