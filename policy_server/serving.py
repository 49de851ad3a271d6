"""Assembles a serving engine from directories: backend + merge state -> runtime -> router.

Shared by ``carve serve``, ``carve demo``, the benchmarks and the end-to-end tests, so they all
serve exactly the same stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from policy_server.errors import InputError, StateError

log = logging.getLogger("carve.serving")


@dataclass
class EngineConfig:
    """How to build the policy engine. router: exact|text|vsubspace|hybrid; abstain:
    refuse|core-only; mode: auto|fused|side (runtime residual application)."""

    base_dir: str
    state_dir: str | None = None
    state_version: str | None = None
    verify: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    mode: str = "auto"
    router: str = "text"
    router_model: str | None = None
    abstain: str = "refuse"
    min_confidence: float | None = None
    min_margin: float | None = None
    max_batch: int = 16
    max_wait_ms: float = 2.0
    router_options: dict = field(default_factory=dict)


def build_engine(cfg: EngineConfig):
    """-> ``policy_server.service.engine_api.RuntimeEngine`` ready to serve."""
    from policy_server.models.registry import load_backend
    from policy_server.runtime import PolicyRuntime
    from policy_server.service.engine_api import RoutingPolicy, RuntimeEngine
    from policy_server.state.store import StateStore
    from router.base import ExactRouter
    from router.factory import build_router

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise InputError(f"--dtype {cfg.dtype!r}: use one of {sorted(dtypes)}")
    backend = load_backend(cfg.base_dir, device=cfg.device, dtype=dtypes[cfg.dtype])
    snapshot = None
    if cfg.state_dir:
        store = StateStore(cfg.state_dir)
        snapshot = store.open(cfg.state_version, verify=cfg.verify)
        _check_base(snapshot, cfg.base_dir)
    runtime = PolicyRuntime(backend, snapshot, mode=cfg.mode, device=cfg.device)
    if snapshot is None or not snapshot.skill_names():
        router = ExactRouter({})
    else:
        rconf = dict(cfg.router_options)
        rconf.update(runtime=runtime, backend=backend)
        for k in ("router_model", "min_confidence", "min_margin"):
            if getattr(cfg, k) is not None:
                rconf[k] = getattr(cfg, k)
        router = build_router(cfg.router, snapshot, rconf)
    return RuntimeEngine(runtime, router, snapshot, RoutingPolicy(cfg.abstain),
                         max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                         backend_name=type(backend).__name__)


def _check_base(snapshot, base_dir: str) -> None:
    """Refuse to serve a state on a base it was not merged from (fingerprints differ)."""
    from policy_server.merge.checkpoint import open_checkpoint

    want = (snapshot.manifest.get("base") or {}).get("fingerprint")
    if not want:
        return
    got = open_checkpoint(base_dir).fingerprint()
    if got != want:
        raise StateError(f"merge state {snapshot.path.parent.parent} (version {snapshot.version}) "
                         f"was built on a different base checkpoint than {Path(base_dir)} "
                         f"(fingerprint {got[:12]} != {want[:12]})")
