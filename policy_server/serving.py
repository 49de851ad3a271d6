"""The composition root: backend + merge state -> runtime -> micro-batcher -> router -> engine.

Every way of serving goes through here (``carve serve``, ``carve route`` when it needs the model,
``carve demo``, the benchmarks and the end-to-end tests), so they all run exactly the same stack:
the base fingerprint is checked once, the core is folded once (by the runtime), placement is
decided once (by the runtime), and a router only ever gets a lock-safe feature capture, never the
runtime or the backend.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from policy_server.errors import InputError, StateError
from policy_server.models.base import ObservationBatch, PolicyBackend, PolicySpec
from policy_server.service.engine_api import PolicyEngine, RoutingPolicy

log = logging.getLogger("carve.reload")


@dataclass
class EngineConfig:
    """How to build the policy engine. router: exact|text|vsubspace|hybrid; abstain:
    refuse|core-only; mode: auto|fused|side (runtime residual application); dtype: a name of
    ``policy_server.dtypes.DTYPES`` (the served model dtype, cast after the core is folded);
    allow_base_mismatch: serve a state on a base whose fingerprint differs from (or was not
    recorded in) the state's manifest, with a warning instead of a ``StateError``."""

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
    allow_base_mismatch: bool = False
    backend_options: dict = field(default_factory=dict)  # backend load options, e.g. vlm_dir


class RuntimeEngine(PolicyEngine):
    """The production engine: a ``PolicyRuntime`` behind a ``MicroBatcher``, plus a router.

    runtime: ``policy_server.runtime.PolicyRuntime``; batcher: the ``MicroBatcher`` in front of it
    (its captures feed the router, so routing and inference share one queue); router: any
    ``router.base.Router``; snapshot: the ``StateSnapshot`` being served (skill metadata), or None.
    """

    def __init__(self, runtime, batcher, router, snapshot=None,
                 routing: RoutingPolicy | None = None, backend_name: str = ""):
        self.runtime = runtime
        self.batcher = batcher
        self.router = router
        self.snapshot = snapshot
        self.routing = routing or RoutingPolicy()
        self.backend_name = backend_name
        self.started = time.time()

    @property
    def spec(self) -> PolicySpec:
        return self.runtime.spec

    def skills(self) -> list[dict]:
        if self.snapshot is None:
            return []
        out = []
        for name in self.snapshot.skill_names():
            rec = self.snapshot.skill(name)
            out.append({"name": name, "instructions": list(rec.get("instructions", [])),
                        "description": rec.get("description", ""),
                        "order": int(rec.get("order", 0))})
        return out

    @property
    def resizes_images(self) -> bool:
        return bool(getattr(self.runtime.backend, "resizes_images", False))

    def route(self, instruction: str, observation: ObservationBatch | None = None):
        return self.router.route(instruction, observation)

    def infer(self, observation: ObservationBatch, skill: str | None) -> np.ndarray:
        return np.asarray(self.batcher.submit(observation, skill).result(), dtype=np.float32)

    def end_episode(self, episode_id: str) -> None:
        end = getattr(self.runtime.backend, "end_episode", None)  # duck-typed backends may lack it
        if end is not None:
            end(episode_id)

    def info(self) -> dict:
        return {"backend": self.backend_name, "mode": self.runtime.mode,
                "state_version": self.snapshot.version if self.snapshot is not None else "",
                "router": getattr(self.router, "name", type(self.router).__name__)}

    def attach_metrics(self, recorder) -> None:
        self.batcher.metrics = recorder

    def close(self) -> None:
        self.batcher.close()


def open_state(cfg: EngineConfig):
    """The configured ``StateSnapshot`` (verified unless ``cfg.verify`` is False) with its base
    fingerprint checked against ``cfg.base_dir``; None when no state is configured."""
    if not cfg.state_dir:
        return None
    return _open_state(cfg, base_fingerprint(cfg.base_dir))


def base_fingerprint(base_dir: str) -> str:
    """``CheckpointReader.fingerprint`` of the base directory (cheap: headers, sizes, first and
    last MiB of each weight file)."""
    from policy_server.tensors.checkpoint import open_checkpoint

    with open_checkpoint(base_dir) as reader:
        return reader.fingerprint()


def _open_state(cfg: EngineConfig, fingerprint: str):
    if not cfg.state_dir:
        return None
    from policy_server.base_check import check_base
    from policy_server.state.store import StateStore

    snapshot = StateStore(cfg.state_dir).open(cfg.state_version, verify=cfg.verify)
    try:
        check_base(snapshot.manifest, fingerprint, cfg.base_dir,
                   f"merge state {cfg.state_dir} version {snapshot.version}",
                   allow_mismatch=cfg.allow_base_mismatch)
    except BaseException:
        snapshot.close()
        raise
    return snapshot


def make_router(cfg: EngineConfig, snapshot, capture=None):
    """The router ``cfg.router`` for ``snapshot`` (an ``ExactRouter`` with no skills when there is
    no state). capture: the served model's ``capture(observation, keys, skill=None)`` for the
    observation routers, or None when no model is loaded (``carve route`` without ``--base``)."""
    from router.base import ExactRouter
    from router.factory import build_router

    if snapshot is None or not snapshot.skill_names():
        return ExactRouter({})
    rconf = dict(cfg.router_options)
    if capture is not None:
        rconf["capture"] = capture
    for k in ("router_model", "min_confidence", "min_margin"):
        if getattr(cfg, k) is not None:
            rconf[k] = getattr(cfg, k)
    return build_router(cfg.router, snapshot, rconf)


def assemble_engine(backend: PolicyBackend, snapshot, cfg: EngineConfig) -> RuntimeEngine:
    """Engine over an already loaded ``backend`` (as loaded: the runtime places it on
    ``cfg.device``, folds ``snapshot``'s core, casts to ``cfg.dtype``) and a snapshot-like object
    (or None). The seam the in-memory benchmarks use; ``build_engine`` is the directory path."""
    from policy_server.dtypes import parse_dtype
    from policy_server.runtime import MicroBatcher, PolicyRuntime

    dtype = parse_dtype(cfg.dtype, "--dtype")
    backend.attach_state(snapshot)  # per-skill non-weight data (e.g. LeRobot processors)
    runtime = PolicyRuntime(backend, snapshot, mode=cfg.mode, device=cfg.device, dtype=dtype)
    batcher = MicroBatcher(runtime, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms)

    def capture(observation, keys, skill=None):
        # through the batcher: in order with the episodes' inference, under the runtime lock
        return batcher.capture(observation, keys, skill).result()

    try:
        router = make_router(cfg, snapshot, capture)
        return RuntimeEngine(runtime, batcher, router, snapshot, RoutingPolicy(cfg.abstain),
                             backend_name=type(backend).__name__)
    except BaseException:
        batcher.close()
        raise


def build_engine(cfg: EngineConfig) -> RuntimeEngine:
    """-> a ``RuntimeEngine`` ready to serve ``cfg.base_dir`` + ``cfg.state_dir``.

    The backend is loaded in float32 on the CPU; the runtime alone moves it to ``cfg.device`` and
    casts it to ``cfg.dtype`` after folding the core (one rounding, one owner of placement).
    ``InputError`` for a bad option, ``StateError`` for a state that does not fit the base."""
    from policy_server.dtypes import parse_dtype
    from policy_server.models.registry import load_backend

    parse_dtype(cfg.dtype, "--dtype")  # fail on a bad name before anything heavy is loaded
    if not cfg.base_dir:
        raise InputError("--base: the base model directory is required")
    # only a state records a base to check against (and only a state is ever reloaded)
    fingerprint = base_fingerprint(cfg.base_dir) if cfg.state_dir else ""
    snapshot = _open_state(cfg, fingerprint)
    backend = load_backend(cfg.base_dir, **cfg.backend_options)
    engine = assemble_engine(backend, snapshot, cfg)
    engine.base_fingerprint = fingerprint  # what a live reload checks before sharing tensors
    return engine


def rebuild_engine(cfg: EngineConfig, served: RuntimeEngine) -> RuntimeEngine:
    """-> a ``RuntimeEngine`` for ``cfg.state_version`` built beside ``served`` (the engine in
    service, built from the same ``cfg`` but another version) without loading the backend again:
    the folded ``base + core`` is rebuilt tensor by tensor, streamed from the base checkpoint
    (``runtime.refold``); tensors no core or residual touches, buffers, the backend's tokenizer /
    config and the text router's embedding model are shared with ``served``. The state is opened
    and checked exactly as by ``build_engine`` (``cfg.verify``, base fingerprint).
    ``RefoldUnsupported`` when this engine or backend cannot be rebuilt that way (the caller
    builds a whole engine); any other error is the version's and nothing is served from it."""
    from policy_server.runtime import MicroBatcher
    from policy_server.runtime.refold import RefoldUnsupported, refold_runtime
    from policy_server.tensors.checkpoint import open_checkpoint

    runtime = getattr(served, "runtime", None)
    if not isinstance(served, RuntimeEngine) or runtime is None:
        raise RefoldUnsupported(f"the served engine is a {type(served).__name__}, not a "
                                "RuntimeEngine")
    if served.snapshot is None or not cfg.state_dir:
        raise RefoldUnsupported("the served engine serves no merge state")
    known = getattr(served, "base_fingerprint", "")
    if not known:  # assembled in memory (benchmarks): nothing says where its tensors came from
        raise RefoldUnsupported("the served engine was not built from a base directory "
                                "(build_engine)")
    with open_checkpoint(cfg.base_dir) as base:
        fingerprint = base.fingerprint()
        if fingerprint != known:  # the served tensors came from another base: share nothing
            raise RefoldUnsupported(f"the base checkpoint {cfg.base_dir} changed on disk since "
                                    "the served engine was loaded")
        snapshot = _open_state(cfg, fingerprint)
        try:
            new_runtime, report = refold_runtime(runtime, snapshot, base)
        except BaseException:
            snapshot.close()
            raise
    batcher = MicroBatcher(new_runtime, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms)

    def capture(observation, keys, skill=None):
        return batcher.capture(observation, keys, skill).result()

    try:
        router = make_router(cfg, snapshot, capture)
        engine = RuntimeEngine(new_runtime, batcher, router, snapshot, RoutingPolicy(cfg.abstain),
                               backend_name=served.backend_name)
    except BaseException:
        batcher.close()
        snapshot.close()
        raise
    engine.base_fingerprint = fingerprint
    engine.refold_report = report
    return engine


class UnknownVersion(StateError):
    """A reload named a version the merge state does not hold (gRPC NOT_FOUND)."""


class StateSource:
    """The versions of ``cfg.state_dir`` a running server can switch to (``carve serve
    --follow`` and the admin ``Reload`` RPC): what ``CURRENT`` names now, and a new engine for
    any committed version: rebuilt beside the served engine tensor by tensor
    (``rebuild_engine``), or a whole new engine built exactly as at startup when that is not
    possible."""

    def __init__(self, cfg: EngineConfig):
        if not cfg.state_dir:
            raise InputError("--follow / Reload need a merge state (--state)")
        self.cfg = cfg

    @property
    def store(self):
        from policy_server.state.store import StateStore

        return StateStore(self.cfg.state_dir)

    def current(self) -> str:
        """The version ``CURRENT`` names; ``StateError`` when the state directory vanished or
        holds no ``CURRENT`` (nothing to switch to: the caller keeps what it serves)."""
        version = self.store.current_version()
        if version is None:
            raise StateError(f"merge state {self.cfg.state_dir}: no CURRENT file (the state "
                             "directory vanished or is not a merge state)")
        return version

    def check(self, version: str) -> None:
        """``UnknownVersion`` (naming the versions there are) unless ``version`` is committed."""
        from policy_server.state.store import check_version_id

        check_version_id(version)  # InputError for "../x" before touching the file system
        known = [v["id"] for v in self.store.versions()]
        if version not in known:
            raise UnknownVersion(f"merge state {self.cfg.state_dir}: no version {version!r} "
                                 f"(versions: {', '.join(known) or 'none'})")

    def build(self, version: str, beside: RuntimeEngine | None = None) -> RuntimeEngine:
        """A new engine serving ``version``, its files always verified against their sha256
        (a reload must never switch to a half-written or corrupted version). beside: the engine
        in service (the caller keeps it pinned meanwhile): the new one is rebuilt next to it,
        sharing what does not change (``rebuild_engine``); None, or an engine that cannot be
        rebuilt that way (logged), builds a whole new engine (``build_engine``)."""
        from dataclasses import replace

        from policy_server.runtime.refold import RefoldUnsupported

        cfg = replace(self.cfg, state_version=version, verify=True)
        if beside is not None:
            try:
                engine = rebuild_engine(cfg, beside)
            except RefoldUnsupported as e:
                log.warning("reload to %s: %s; loading a whole new engine instead", version, e)
            else:
                log.info("reload to %s: %s", version, engine.refold_report.summary())
                return engine
        return build_engine(cfg)
