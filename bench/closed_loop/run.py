"""Closed-loop continual-merging benchmark runner.

For each method and each step t (after admitting expert t of the factory, in order):

1. build what is served (``methods.MethodSpec``: admit into the method's state, or re-merge
   experts 1..t);
2. start the real gRPC ``PolicyServer`` on a free loopback port with ``serving.build_engine``;
3. run every admitted skill's Meta-World tasks through the real ``PolicyClient`` (``run_task``),
   ``episodes`` per task with fixed seeds, once with the oracle skill id and, with the router on,
   once with the instruction only (the server's text router picks the skill);
4. record the success per task and per skill: ``acc[t][i]`` (skill i after step t).

A method whose served model does not depend on the skill (a checkpoint, or a state with a core
and no per-skill entries) is run once with no skill: its "router" numbers are the same
measurement, flagged ``task_agnostic`` in ``results.json``.

Resumable: every finished (method, step) is written to ``OUT/_cache/<method>/step<t>-<key>.json``
(temp file + fsync + rename), keyed by everything that determines it (``step_key``). A rerun, or a
run resumed after SIGKILL, reuses those steps and evaluates only the rest; a continual method's
state is re-admitted up to the first missing step (admission is deterministic and cheap next to
evaluation). An ETA from the measured seconds per episode is printed after every step.

Use ``run_benchmark(...)`` from Python or ``carve bench closed-loop`` (policy_server/cli/bench.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.closed_loop.methods import MethodSpec, resolve
from policy_server.errors import InputError
from policy_server.tensors.durable import write_bytes_durable

SCHEMA = "carve-closed-loop/1"
#: version of what one cached step records and how it is evaluated; bump it when either changes
#: so stale cache entries stop matching (they are then simply ignored, never deleted).
STEP_SCHEMA = "carve-closed-loop-step/2"
DEFAULT_EPISODES = 20  # headline: 20 x >= 20 tasks keeps the pooled 95 % half-width <= 5 points


def step_key(factory_hash: str, spec: MethodSpec, experts: list[dict], episodes: int, seed: int,
             max_steps: int, replan_every: int | None, with_router: bool,
             older_episodes: int | None = None) -> str:
    """Hex key of one (method, step) result: the factory, the method spec (engine method, build,
    options, storage fields; not the free-text description), the admitted experts in order,
    episodes, seed, max_steps, replan_every, the router flag and ``STEP_SCHEMA``.
    older_episodes: episodes per task of the older skills at a non-final step when that differs
    from ``episodes`` (see ``step_episode_counts``); None keys the step as all-``episodes``."""
    payload = {"schema": STEP_SCHEMA, "factory": factory_hash,
               "spec": {k: v for k, v in spec.to_dict().items() if k != "description"},
               "experts": [e["name"] for e in experts], "episodes": int(episodes),
               "seed": int(seed), "max_steps": int(max_steps),
               "replan_every": None if replan_every is None else int(replan_every),
               "with_router": bool(with_router)}
    if older_episodes is not None and int(older_episodes) != int(episodes):
        payload["older_episodes"] = int(older_episodes)
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def write_json_atomic(path: Path, obj) -> None:
    """JSON to ``path`` via temp + fsync + rename: a reader (or a killed run) never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durable(Path(path), json.dumps(obj, indent=1, default=str).encode())


def write_text_atomic(path: Path, text: str) -> None:
    """Text to ``path`` via temp + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durable(Path(path), text.encode())


def _cache_path(out: Path, spec: MethodSpec, t: int, key: str) -> Path:
    return out / "_cache" / spec.name / f"step{t}-{key}.json"


def _load_cached(path: Path) -> dict | None:
    """A cached step, or None if absent or unreadable (an unreadable one is recomputed)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("step_schema") == STEP_SCHEMA else None


def step_episode_counts(t: int, T: int, episodes: int, curve_episodes: int | None) -> list[int]:
    """Episodes per task of each skill 1..t evaluated at step t of a T-step run.

    The headline cells get ``episodes``: every skill at the final step (the final table) and the
    newly admitted skill at its own step (``acc[i][i]``, BWT's reference). The older skills at a
    non-final step (the rest of the per-step curve) get ``curve_episodes`` (default: the same),
    seeded placements 0..curve_episodes-1, i.e. the first ones of the headline cells'."""
    older = episodes if curve_episodes is None else curve_episodes
    return [episodes if (t == T or i == t - 1) else older for i in range(t)]


def _step_episodes(experts: list[dict], counts: list[int], task_agnostic: bool,
                   with_router: bool, router_reuse: bool = True) -> int:
    """Episodes one step is expected to run: every admitted task, oracle, plus the routed runs
    for per-skill models (none expected when routed runs reuse the oracle's, see ``_evaluate``)."""
    n = sum(len(e["tasks"]) * c for e, c in zip(experts, counts))
    return n * (2 if with_router and not task_agnostic and not router_reuse else 1)


def host_info() -> dict:
    """Where the run happened (recorded in results.json; published with the tables)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    info = {"hostname": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "loadavg_at_start": load, "torch_threads": 1, "device": "cpu"}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    info["code"] = _code_version()
    return info


def _code_version() -> dict | None:
    """The checkout's commit and whether it had local changes (None outside a git checkout):
    cached steps are keyed by STEP_SCHEMA, not by code, so this is what says what ran."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _served_kind(spec: MethodSpec, built: dict) -> tuple[str, dict | None]:
    """-> ("state"|"checkpoint", storage accounting of a state or None)."""
    if built.get("kind") == "checkpoint":
        return "checkpoint", None
    from policy_server.state.store import StateStore

    snap = StateStore(built["out"]).open()
    return "state", dict(snap.manifest.get("storage") or {})


def per_skill_method(spec: MethodSpec) -> bool:
    """Whether the method stores per-skill entries (else one task-agnostic model is served)."""
    from policy_server.merge.methods import get_method

    return bool(get_method(spec.method).per_skill)


def storage_fraction(kind: str, storage: dict | None, t: int, per_skill: bool = True,
                     method: str = "") -> dict:
    """Storage a deployment keeps on disk, as a fraction of the expert bank's bytes (``t``
    experts as full checkpoints in their own dtypes).

    * the expert bank is the reference: 1.0 by definition (t whole experts);
    * a state with per-skill entries: ``(state + base) / bank`` in bytes from the state
      manifest's ``storage`` (``bytes_fraction_of_bank_with_base``: every file of the version,
      core, residuals, router artifacts and aux included, plus the base's weight files: what this
      server holds). The parameter-count figure ``(P + residual_params) / (t P)`` (base and core
      folded into one checkpoint) is kept as ``param_fraction``;
    * a single model (a checkpoint, or a core-only state, ``theta0 + C``): one checkpoint of the
      experts' dtype, ``1/t``.
    """
    if method == "bank":
        return {"fraction": 1.0, "served_fraction": (storage or {}).get(
            "bytes_fraction_of_bank_with_base"), "source": "reference (t whole experts)"}
    if kind == "state" and storage and per_skill:
        p = int(storage.get("checkpoint_params") or 0)
        frac = storage.get("bytes_fraction_of_bank_with_base")
        if p <= 0 or frac is None:
            raise InputError("state manifest storage lacks checkpoint_params or the byte "
                             "accounting (bytes_fraction_of_bank_with_base)")
        return {"fraction": float(frac), "served_fraction": float(frac),
                "param_fraction": (p + int(storage.get("residual_params", 0))) / (t * p),
                "source": "(state + base) / bank, bytes, state manifest storage"}
    return {"fraction": 1.0 / t, "served_fraction": None,
            "source": "single model: 1 checkpoint / t experts"}


class _Builder:
    """Builds the served artifact of one method step by step, in its own work directory."""

    def __init__(self, spec: MethodSpec, factory: dict, work: Path, hooks_for=None,
                 progress: bool = False):
        self.spec, self.factory, self.work = spec, factory, work
        self.hooks_for, self.progress = hooks_for, progress
        self.state_dir = work / "state"
        if work.exists():  # a stale state from an interrupted run would fail "duplicate skill"
            shutil.rmtree(work)
        work.mkdir(parents=True)

    def step(self, t: int) -> dict:
        """Admit expert t (1-based) or re-merge experts 1..t. -> {"kind", "out", ...report}."""
        from policy_server.models.registry import backend_admission_hooks
        from policy_server.state.admission import admit
        from policy_server.state.oneshot import merge

        experts = self.factory["experts"][:t]
        base_dir = self.factory["base"]["dir"]
        if self.spec.build == "continual":
            e = experts[-1]
            # The backend's own hooks too (LeRobot stores each skill's processors), exactly as
            # `carve admit` adds them: without them a LeRobot skill is served with the base's
            # statistics and its architecture check is skipped.
            hooks = [*backend_admission_hooks(base_dir, e["dir"]),
                     *(self.hooks_for(e) if self.hooks_for else ())]
            rep = admit(self.state_dir, base_dir, e["dir"], e["name"],
                        instructions=e["instructions"], description=f"suite {e.get('suite', '')}",
                        method=self.spec.method, options=dict(self.spec.options), hooks=hooks,
                        progress=self.progress, **self.spec.storage)
            return {"kind": "state", "out": str(self.state_dir), "wall_s": rep.get("wall_s")}
        if self.spec.build == "oneshot":
            out = self.work / f"step{t}"
            if t > 1:  # only the latest step is served; keep disk use at one merged model
                shutil.rmtree(self.work / f"step{t - 1}", ignore_errors=True)
            rep = merge(self.spec.method, base_dir, [e["dir"] for e in experts], out,
                        options=dict(self.spec.options), skills=[e["name"] for e in experts],
                        instructions={e["name"]: e["instructions"] for e in experts},
                        descriptions={e["name"]: f"suite {e.get('suite', '')}" for e in experts},
                        progress=self.progress)
            return {"kind": rep["kind"], "out": rep["out"], "wall_s": rep.get("wall_s")}
        raise InputError(f"method spec {self.spec.name!r}: unknown build {self.spec.build!r}")


def _episode_trace(episodes: list[dict]) -> list[tuple]:
    """What a rollout decides, per episode: outcome, length, skill and requests (not wall time)."""
    return [(bool(e["success"]), int(e["steps"]), e["skill"], int(e["requests"]))
            for e in episodes]


def _routed_run(client, e: dict, task: str, instr: str, n: int, oracle: dict, seed: int,
                max_steps: int, replan_every: int | None, reuse: bool, verify: bool,
                log) -> dict:
    """The router-mode record of one task: the server's router picks the skill from the
    instruction alone.

    reuse: ask the router first (the ``Route`` RPC, the same router ``StartEpisode`` uses) and,
    when it picks the oracle's skill, record the oracle's episodes: the served weights, the
    seeded placements and the rollout are then the same, so rerunning them would repeat the
    oracle run episode for episode. Any other decision (another skill, an abstention) runs the
    routed episodes for real. verify: run them for real anyway and fail the step unless the
    trace equals the oracle's (the benchmark checks this on one task per step).
    """
    import grpc

    from carve_client import PolicyError
    from clients.metaworld_client import run_task

    if reuse:
        dec = client.route(instr)
        if not dec.get("abstained") and dec.get("skill") == e["name"]:
            rec = dict(oracle, routing_accuracy=1.0, reused_oracle=True,
                       route={k: dec.get(k) for k in ("skill", "confidence", "margin")})
            rec["episodes"] = [dict(ep, confidence=float(dec.get("confidence") or 0.0))
                               for ep in oracle["episodes"]]
            if verify:
                real = run_task(client, task, n_episodes=n, seed=seed, instruction=instr,
                                skill=None, max_steps=max_steps, replan_every=replan_every)
                got, want = (_episode_trace(real.to_dict()["episodes"]),
                             _episode_trace(oracle["episodes"]))
                if got != want:
                    raise RuntimeError(
                        f"router reuse check failed on {task}: the routed episodes differ from "
                        f"the oracle's although the router chose {e['name']!r}; rerun with "
                        f"--no-router-reuse")
                rec["reuse_verified"] = True
                log(f"      {e['name']:>10s} {task:<26s} router reuse verified "
                    f"({n} routed episodes equal the oracle's)")
            return rec
    try:
        routed = run_task(client, task, n_episodes=n, seed=seed, instruction=instr, skill=None,
                          max_steps=max_steps, replan_every=replan_every)
    except PolicyError as exc:
        # The router refused the instruction (abstained): the robot gets no action, which
        # counts as a failed task, not a broken benchmark.
        if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        return {"task": task, "instruction": instr, "success_rate": 0.0,
                "routing_accuracy": 0.0, "refused": exc.details, "episodes": []}
    rec = routed.to_dict()
    rec["routing_accuracy"] = (sum(ep.skill == e["name"] for ep in routed.episodes)
                               / max(1, len(routed.episodes)))
    return rec


def _evaluate(base_dir: str, kind: str, served_dir: str, experts: list[dict], task_agnostic: bool,
              counts: list[int], seed: int, max_steps: int, replan_every: int | None,
              with_router: bool, log, router_reuse: bool = True,
              verify_reuse: bool = False) -> dict:
    """Serve one built model over gRPC and run every admitted skill's tasks through the client.

    counts: episodes per task of each expert (``step_episode_counts``); router_reuse /
    verify_reuse: see ``_routed_run`` (verified on the first task the reuse applies to)."""

    from carve_client import PolicyClient
    from clients.metaworld_client import run_task
    from policy_server.service.server import PolicyServer, ServerConfig
    from policy_server.serving import EngineConfig, build_engine

    # A task-agnostic model is run with no skill id: the server must fall back to the core
    # (abstain="core-only") instead of refusing an instruction no skill is registered for.
    abstain = "core-only" if task_agnostic else "refuse"
    if kind == "checkpoint":
        cfg = EngineConfig(base_dir=served_dir, state_dir=None, router="exact", abstain=abstain)
    else:
        use_text = with_router and not task_agnostic
        cfg = EngineConfig(base_dir=base_dir, state_dir=served_dir,
                           router="text" if use_text else "exact", abstain=abstain)
    server = PolicyServer(lambda: build_engine(cfg), ServerConfig(host="127.0.0.1", port=0))
    t0 = time.perf_counter()
    port = server.start()
    load_s = time.perf_counter() - t0
    out: dict = {"skills": {}, "server_load_s": load_s}
    try:
        client = PolicyClient(f"127.0.0.1:{port}")
        client.wait_ready(60)
        try:
            verify = verify_reuse and router_reuse
            for e, n in zip(experts, counts):
                rec = {"suite": e.get("suite", e["name"]), "tasks": {}, "episodes": n}
                for task, instr in zip(e["tasks"], e["instructions"]):
                    # Oracle: the skill id names the residual; a task-agnostic model gets none.
                    oracle = run_task(client, task, n_episodes=n, seed=seed,
                                      instruction=instr,
                                      skill=None if task_agnostic else e["name"],
                                      max_steps=max_steps, replan_every=replan_every)
                    trec = {"instruction": instr, "oracle": oracle.to_dict()}
                    if with_router and not task_agnostic:
                        trec["router"] = _routed_run(client, e, task, instr, n, trec["oracle"],
                                                     seed, max_steps, replan_every,
                                                     router_reuse, verify, log)
                        verify = verify and not trec["router"].get("reuse_verified")
                    elif with_router:
                        trec["router"] = dict(trec["oracle"], task_agnostic=True)
                    rec["tasks"][task] = trec
                    log(f"      {e['name']:>10s} {task:<26s} oracle "
                        f"{oracle.success_rate:.2f}" + (
                            f"  router {trec['router']['success_rate']:.2f}"
                            if "router" in trec else ""))
                for mode in ("oracle", "router"):
                    vals = [tr[mode]["success_rate"] for tr in rec["tasks"].values() if mode in tr]
                    if vals:
                        rec[mode] = sum(vals) / len(vals)
                out["skills"][e["name"]] = rec
        finally:
            client.close()
    finally:
        server.stop(grace=2.0)
    out["eval_s"] = time.perf_counter() - t0
    return out


def _invocations(prev_path: Path, results: dict) -> list[dict]:
    """The finished invocations that built these results: the previous results.json's list
    (only if it ran the same command and configuration, i.e. this run resumed or repeated it)
    plus this one. A run killed before writing results.json is missing here; its steps' seconds
    still count in compute_s."""
    this = {k: results.get(k) for k in ("created", "wall_s", "steps_computed", "steps_cached")}
    this["loadavg_at_start"] = results["config"]["host"].get("loadavg_at_start")
    try:
        with open(prev_path) as f:
            prev = json.load(f)
    except (OSError, ValueError):
        prev = None
    def same(cfg):  # the host differs between invocations; everything else must not
        return json.dumps({k: v for k, v in (cfg or {}).items() if k != "host"},
                          sort_keys=True, default=str)

    if (not isinstance(prev, dict) or prev.get("command") != results["command"]
            or same(prev.get("config")) != same(results["config"])):
        return [this]
    earlier = prev.get("invocations") or [dict(
        {k: prev.get(k) for k in ("created", "wall_s", "steps_computed", "steps_cached")},
        loadavg_at_start=((prev.get("config") or {}).get("host") or {}).get("loadavg_at_start"))]
    return [*earlier, this]


def _fmt_s(sec: float) -> str:
    sec = int(round(sec))
    if sec >= 3600:
        return f"{sec // 3600}h{sec % 3600 // 60:02d}m"
    return f"{sec // 60}m{sec % 60:02d}s"


class _Eta:
    """ETA from measured seconds per episode (evaluation) plus mean build time per step."""

    def __init__(self, remaining_episodes: int, remaining_steps: int):
        self.left_ep, self.left_steps = remaining_episodes, remaining_steps
        self.ep_s = self.ep_n = self.build_s = self.build_n = 0.0

    def done(self, episodes: int, eval_s: float, build_s: float) -> None:
        self.left_ep -= episodes
        self.left_steps -= 1
        self.ep_s += eval_s
        self.ep_n += episodes
        self.build_s += build_s
        self.build_n += 1

    def line(self) -> str:
        if self.left_steps <= 0:
            return "nothing left to evaluate"
        if not self.ep_n:
            return f"{self.left_steps} step(s), {self.left_ep} episodes left (ETA after one step)"
        per = self.ep_s / self.ep_n
        eta = self.left_ep * per + self.left_steps * self.build_s / max(1, self.build_n)
        return (f"{self.left_steps} step(s), {self.left_ep} episodes left at {per:.2f} s/episode: "
                f"ETA {_fmt_s(eta)}")


def _hooks_for(with_router: bool):
    """Admission hooks per expert: the text router's instruction embeddings (router on)."""
    if not with_router:
        return None
    from router.embedder import shared_embedder
    from router.text import TextEmbeddingHook

    emb = shared_embedder()
    return lambda e: [TextEmbeddingHook(e["instructions"], emb, f"suite {e.get('suite', '')}")]


#: transient transport failures a step is retried on (a starved loopback server on a loaded
#: host misses the client's deadline); anything else is a real failure of the method
_RETRY_CODES = ("DEADLINE_EXCEEDED", "UNAVAILABLE")
STEP_ATTEMPTS = 3


def _run_method(spec: MethodSpec, ctx: dict, keys: dict, cached: dict, hooks_for, eta,
                log) -> dict:
    """Build and evaluate every step of one method (cached steps reused) -> its results entry
    (``spec``, ``steps``, ``error``; the summary is added by the caller)."""
    out, factory, T = Path(ctx["out"]), ctx["factory"], ctx["T"]
    experts = factory["experts"]
    log(f"[bench] method {spec.name} ({spec.description})")
    mres: dict = {"spec": spec.to_dict(), "steps": [], "error": None}
    builder = None
    built_upto = 0  # continual: experts admitted into this run's state so far
    try:
        for t in range(1, T + 1):
            rec = cached.get((spec.name, t))
            if rec is not None:
                mres["steps"].append(rec["step"])
                name = _cache_path(out, spec, t, keys[(spec.name, t)]).name
                log(f"  step {t}/{T}: cached ({name})")
                continue
            if builder is None:
                builder = _Builder(spec, factory, out / "_work" / spec.name,
                                   hooks_for=hooks_for if spec.build == "continual" else None,
                                   progress=ctx["progress"])
            tb = time.perf_counter()
            if spec.build == "continual":
                # the state must hold experts 1..t-1 first: re-admit the cached ones
                while built_upto < t - 1:
                    builder.step(built_upto + 1)
                    built_upto += 1
            built = builder.step(t)
            built_upto = t
            build_s = time.perf_counter() - tb
            kind, storage = _served_kind(spec, built)
            task_agnostic = kind == "checkpoint" or not per_skill_method(spec)
            frac = storage_fraction(kind, storage, t, per_skill=not task_agnostic,
                                    method=spec.method)
            counts = step_episode_counts(t, T, ctx["episodes"], ctx["curve_episodes"])
            log(f"  step {t}/{T}: built {kind} in {build_s:.1f}s "
                f"(storage {frac['fraction']:.3f} of bank); evaluating")
            for attempt in range(1, STEP_ATTEMPTS + 1):
                try:
                    ev = _evaluate(factory["base"]["dir"], kind, built["out"], experts[:t],
                                   task_agnostic, counts, ctx["seed"], ctx["max_steps"],
                                   ctx["replan_every"], ctx["with_router"], log,
                                   router_reuse=ctx["router_reuse"], verify_reuse=True)
                    break
                except Exception as exc:  # noqa: BLE001 - only transport timeouts are retried
                    code = getattr(getattr(exc, "code", None), "name", None)
                    if code not in _RETRY_CODES or attempt == STEP_ATTEMPTS:
                        raise
                    log(f"  step {t}/{T}: {type(exc).__name__}: {exc}; retrying the step "
                        f"(attempt {attempt + 1}/{STEP_ATTEMPTS})")
            step = {"t": t, "admitted": experts[t - 1]["name"], "kind": kind,
                    "task_agnostic": task_agnostic, "storage": storage,
                    "storage_fraction": frac, "build_s": build_s, "episode_counts": counts,
                    **ev}
            write_json_atomic(_cache_path(out, spec, t, keys[(spec.name, t)]),
                              {"step_schema": STEP_SCHEMA, "key": keys[(spec.name, t)],
                               "method": spec.name, "t": t, "step": step})
            mres["steps"].append(step)
            eta.done(_step_episodes(experts[:t], counts, task_agnostic, ctx["with_router"],
                                    ctx["router_reuse"]), ev["eval_s"], build_s)
            log(f"  step {t}/{T}: oracle acc "
                + " ".join(f"{k}={v.get('oracle', 0):.2f}" for k, v in ev["skills"].items())
                + f" ({ev['eval_s']:.0f}s); {eta.line()}")
    except Exception as exc:  # noqa: BLE001 - one broken method must not sink the benchmark
        mres["error"] = f"{type(exc).__name__}: {exc}"
        log(f"[bench] method {spec.name} FAILED at step {len(mres['steps']) + 1}: "
            f"{mres['error']}")
    return mres


def _method_worker(spec: MethodSpec, ctx: dict, keys: dict, cached: dict, eta_args: tuple):
    """One method in a worker process (``jobs > 1``): its own torch threads, router embedder and
    ETA (over its own steps); lines are prefixed with the method's name."""
    import torch

    torch.set_num_threads(1)

    def log(line: str) -> None:
        print(f"[{spec.name}] {line}", flush=True)

    return _run_method(spec, ctx, keys, cached, _hooks_for(ctx["with_router"]),
                       _Eta(*eta_args), log)


def _left_to_evaluate(spec: MethodSpec, ctx: dict, cached: dict) -> tuple[int, int]:
    """(episodes, steps) of one method that are not cached yet."""
    T, experts = ctx["T"], ctx["factory"]["experts"]
    left = [t for t in range(1, T + 1) if (spec.name, t) not in cached]
    return sum(_step_episodes(experts[:t], step_episode_counts(
        t, T, ctx["episodes"], ctx["curve_episodes"]), not per_skill_method(spec),
        ctx["with_router"], ctx["router_reuse"]) for t in left), len(left)


def _run_methods_parallel(specs: list[MethodSpec], ctx: dict, keys: dict, cached: dict,
                          jobs: int, log) -> dict:
    """Run methods in ``jobs`` worker processes (spawned: no forked torch or gRPC state), the
    most expensive first so the last one to start is a short one. -> {name: results entry}."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    left = {spec.name: _left_to_evaluate(spec, ctx, cached) for spec in specs}
    # task-agnostic methods are mostly the weak ones, whose failed episodes run to max_steps
    weight = {spec.name: left[spec.name][0] * (1 if per_skill_method(spec) else 2)
              for spec in specs}
    order = sorted(specs, key=lambda spec: weight[spec.name], reverse=True)
    out: dict = {}
    left_ep = sum(weight.values())
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = {}
        for spec in order:
            mine = {k: v for k, v in cached.items() if k[0] == spec.name}
            futs[pool.submit(_method_worker, spec, ctx, keys, mine, left[spec.name])] = spec
        log(f"[bench] {len(futs)} method(s) in {jobs} worker processes")
        for i, fut in enumerate(as_completed(futs), 1):
            spec = futs[fut]
            try:
                out[spec.name] = fut.result()
            except Exception as exc:  # noqa: BLE001 - a dead worker fails its method only
                out[spec.name] = {"spec": spec.to_dict(), "steps": [],
                                  "error": f"worker: {type(exc).__name__}: {exc}"}
            done_s = time.perf_counter() - t0
            left_ep -= weight[spec.name]
            done = sum(weight.values()) - left_ep
            # the finished methods' pace per (weighted) episode; the methods still running are
            # counted as not started, so this errs long
            eta = f", ETA {_fmt_s(done_s * left_ep / done)}" if done and left_ep else ""
            log(f"[bench] {i}/{len(futs)} method(s) done ({spec.name}"
                + (f", FAILED: {out[spec.name]['error']}" if out[spec.name].get("error") else "")
                + f"), {_fmt_s(done_s)} elapsed{eta}")
    return out


def run_benchmark(preset: str = "demo", methods="bank,carve-r16,ta",
                  episodes: int = DEFAULT_EPISODES, out="results/closed-loop",
                  with_router: bool = True, seed: int = 1000,
                  max_steps: int | None = None, replan_every: int | None = None,
                  max_experts: int | None = None, factory: dict | None = None,
                  keep_work: bool = False, progress: bool = False, log=print,
                  command: str | None = None, use_cache: bool = True,
                  curve_episodes: int | None = None, jobs: int = 1,
                  router_reuse: bool = True) -> dict:
    """Run the closed-loop benchmark and write ``results.json``, ``table.md`` and plots to ``out``.

    methods: labels (``bench.closed_loop.methods``, ``"all"`` for every registered one);
    episodes: per task, seeds ``seed + i``-placed via ``run_task``; max_steps/replan_every:
    default to the preset's; max_experts: use only the first N experts of the factory;
    factory: a ``build_factory`` result to reuse; command: the command line recorded in
    results.json (default ``sys.argv``); use_cache: reuse finished steps from ``out/_cache``
    (and write new ones; off = recompute everything, still writing the cache);
    curve_episodes: episodes per task of the older skills at non-final steps (the per-step
    curve's other cells; default ``episodes``, see ``step_episode_counts``); jobs: methods run
    in this many worker processes (1: in this process); router_reuse: routed runs reuse the
    oracle's episodes where the router picks the oracle's skill (see ``_routed_run``).
    A method that fails to build or serve is recorded with its error and the others still run.
    Returns the results dict (also written to ``out/results.json``).
    """
    import torch

    from bench.closed_loop import report
    from policy_server.training.train import build_factory

    torch.set_num_threads(1)  # the simulator and the server share few cores; threads only thrash
    if episodes < 1:
        raise InputError(f"episodes must be >= 1, got {episodes}")
    if curve_episodes is not None and not 1 <= curve_episodes <= episodes:
        raise InputError(f"curve_episodes must be in 1..episodes ({episodes}), "
                         f"got {curve_episodes}")
    if jobs < 1:
        raise InputError(f"jobs must be >= 1, got {jobs}")
    specs = resolve(methods)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if factory is None:
        log(f"[bench] building/reusing the {preset!r} expert factory")
        factory = build_factory(preset, progress=progress)
    experts = list(factory["experts"])
    if max_experts is not None:
        if max_experts < 1:
            raise InputError(f"max_experts must be >= 1, got {max_experts}")
        experts = experts[:max_experts]
    factory = dict(factory, experts=experts)
    if not factory.get("hash"):
        raise InputError("factory has no 'hash': cannot key cached benchmark steps")
    fcfg = factory.get("config") or {}
    max_steps = int(max_steps or fcfg.get("max_steps") or 150)
    replan_every = replan_every if replan_every is not None else fcfg.get("replan_every")
    T = len(experts)

    hooks_for = _hooks_for(with_router) if jobs <= 1 else None

    results: dict = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "config": {"preset": factory.get("preset", preset), "family": factory.get("family", "demo"),
                   "factory_hash": factory.get("hash"),
                   "factory_dir": factory.get("out"), "episodes": episodes,
                   "curve_episodes": curve_episodes if curve_episodes is not None else episodes,
                   "router_reuse": router_reuse, "seed": seed,
                   "max_steps": max_steps, "replan_every": replan_every,
                   "with_router": with_router, "methods": [s.to_dict() for s in specs],
                   "experts": [{k: e.get(k) for k in ("name", "kind", "suite", "tasks",
                                                       "instructions")} for e in experts],
                   "bwt_definition": "mean over i<T of acc[T][i] - acc[i][i] (skills, 1-based)",
                   "host": host_info()},
        "methods": {},
    }

    # Plan: which (method, step) results are already cached under their key.
    keys = {(s.name, t): step_key(factory["hash"], s, experts[:t], episodes, seed, max_steps,
                                  replan_every, with_router,
                                  older_episodes=curve_episodes if t < T else None)
            for s in specs for t in range(1, T + 1)}
    cached = {}
    if use_cache:
        for s in specs:
            for t in range(1, T + 1):
                rec = _load_cached(_cache_path(out, s, t, keys[(s.name, t)]))
                if rec is not None:
                    cached[(s.name, t)] = rec
    todo = [(s, t) for s in specs for t in range(1, T + 1) if (s.name, t) not in cached]
    eta = _Eta(sum(_step_episodes(experts[:t], step_episode_counts(t, T, episodes, curve_episodes),
                                  not per_skill_method(s), with_router, router_reuse)
                   for s, t in todo), len(todo))
    log(f"[bench] {len(specs)} method(s) x {T} step(s): {len(cached)} cached, "
        f"{len(todo)} to evaluate; {eta.line()}")

    work_root = out / "_work"
    ctx = {"out": str(out), "factory": factory, "T": T, "episodes": episodes,
           "curve_episodes": curve_episodes, "seed": seed, "max_steps": max_steps,
           "replan_every": replan_every, "with_router": with_router,
           "router_reuse": router_reuse, "progress": progress}
    if jobs <= 1 or len([s for s in specs if any((s.name, t) not in cached
                                                 for t in range(1, T + 1))]) <= 1:
        for spec in specs:
            results["methods"][spec.name] = _run_method(
                spec, ctx, keys, cached, hooks_for, eta, log)
    else:
        done = _run_methods_parallel(specs, ctx, keys, cached, jobs, log)
        for spec in specs:  # tables list methods in the order asked for, not finishing order
            results["methods"][spec.name] = done[spec.name]
    for spec in specs:
        results["methods"][spec.name]["summary"] = report.summarize_method(
            results["methods"][spec.name], [e["name"] for e in experts], episodes=episodes)
    results["wall_s"] = time.perf_counter() - t_start
    n_steps = sum(len(m["steps"]) for m in results["methods"].values())
    results["steps_cached"] = sum(1 for k in cached if k[0] in results["methods"])
    results["steps_computed"] = n_steps - results["steps_cached"]
    # seconds the recorded steps cost when they were computed (over every session that made them)
    results["compute_s"] = sum(st.get("build_s", 0) + st.get("eval_s", 0)
                               for m in results["methods"].values() for st in m["steps"])
    results["invocations"] = _invocations(out / "results.json", results)
    if not keep_work:  # only this run's methods: a parallel run may share ``out``
        for spec in specs:
            shutil.rmtree(work_root / spec.name, ignore_errors=True)
        try:
            work_root.rmdir()
        except OSError:
            pass
    results["artifacts"] = report.write_all(results, out)
    write_json_atomic(out / "results.json", results)
    log(f"[bench] done in {results['wall_s']:.0f}s ({results['steps_computed']} step(s) "
        f"evaluated, {results['steps_cached']} reused from cache): {out / 'table.md'}")
    for line in report.interval_lines(results):
        log(f"[bench] {line}")
    return results
