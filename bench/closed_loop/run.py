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

Use ``run_benchmark(...)`` from Python or ``carve bench closed-loop`` (policy_server/cli/bench.py).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.closed_loop.methods import MethodSpec, resolve
from policy_server.errors import InputError

SCHEMA = "carve-closed-loop/1"


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
        from policy_server.state.admission import admit
        from policy_server.state.oneshot import merge

        experts = self.factory["experts"][:t]
        base_dir = self.factory["base"]["dir"]
        if self.spec.build == "continual":
            e = experts[-1]
            hooks = self.hooks_for(e) if self.hooks_for else ()
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


def _evaluate(base_dir: str, kind: str, served_dir: str, experts: list[dict], task_agnostic: bool,
              episodes: int, seed: int, max_steps: int, replan_every: int | None,
              with_router: bool, log) -> dict:
    """Serve one built model over gRPC and run every admitted skill's tasks through the client."""
    import grpc

    from carve_client import PolicyClient, PolicyError
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
            for e in experts:
                rec = {"suite": e.get("suite", e["name"]), "tasks": {}}
                for task, instr in zip(e["tasks"], e["instructions"]):
                    # Oracle: the skill id names the residual; a task-agnostic model gets none.
                    oracle = run_task(client, task, n_episodes=episodes, seed=seed,
                                      instruction=instr,
                                      skill=None if task_agnostic else e["name"],
                                      max_steps=max_steps, replan_every=replan_every)
                    trec = {"instruction": instr, "oracle": oracle.to_dict()}
                    if with_router and not task_agnostic:
                        try:
                            routed = run_task(client, task, n_episodes=episodes, seed=seed,
                                              instruction=instr, skill=None,
                                              max_steps=max_steps, replan_every=replan_every)
                            trec["router"] = routed.to_dict()
                            trec["router"]["routing_accuracy"] = (
                                sum(ep.skill == e["name"] for ep in routed.episodes)
                                / max(1, len(routed.episodes)))
                        except PolicyError as exc:
                            # The router refused the instruction (abstained): the robot gets no
                            # action, which counts as a failed task, not a broken benchmark.
                            if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                                raise
                            trec["router"] = {"task": task, "instruction": instr,
                                              "success_rate": 0.0, "routing_accuracy": 0.0,
                                              "refused": exc.details, "episodes": []}
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


def run_benchmark(preset: str = "demo", methods="bank,carve-r16,ta", episodes: int = 2,
                  out="results/closed-loop", with_router: bool = True, seed: int = 1000,
                  max_steps: int | None = None, replan_every: int | None = None,
                  max_experts: int | None = None, factory: dict | None = None,
                  keep_work: bool = False, progress: bool = False, log=print) -> dict:
    """Run the closed-loop benchmark and write ``results.json``, ``table.md`` and plots to ``out``.

    methods: labels (``bench.closed_loop.methods``); episodes: per task, seeds ``seed + i``-placed
    via ``run_task``; max_steps/replan_every: default to the preset's; max_experts: use only the
    first N experts of the factory (tests); factory: a ``build_factory`` result to reuse.
    A method that fails to build or serve is recorded with its error and the others still run.
    Returns the results dict (also written to ``out/results.json``).
    """
    import torch

    from bench.closed_loop import report
    from policy_server.training.train import build_factory

    torch.set_num_threads(1)  # the simulator and the server share few cores; threads only thrash
    if episodes < 1:
        raise InputError(f"episodes must be >= 1, got {episodes}")
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
    fcfg = factory.get("config") or {}
    max_steps = int(max_steps or fcfg.get("max_steps") or 150)
    replan_every = replan_every if replan_every is not None else fcfg.get("replan_every")
    T = len(experts)

    hooks_for = None
    if with_router:
        from router.embedder import shared_embedder
        from router.text import TextEmbeddingHook

        emb = shared_embedder()
        hooks_for = lambda e: [TextEmbeddingHook(e["instructions"], emb,  # noqa: E731
                                                 f"suite {e.get('suite', '')}")]

    results: dict = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"preset": factory.get("preset", preset), "factory_hash": factory.get("hash"),
                   "factory_dir": factory.get("out"), "episodes": episodes, "seed": seed,
                   "max_steps": max_steps, "replan_every": replan_every,
                   "with_router": with_router, "methods": [s.to_dict() for s in specs],
                   "experts": [{k: e.get(k) for k in ("name", "kind", "suite", "tasks",
                                                       "instructions")} for e in experts],
                   "bwt_definition": "mean over i<T of acc[T][i] - acc[i][i] (skills, 1-based)",
                   "host": {"platform": platform.platform(), "cpus_torch_threads": 1,
                            "device": "cpu"}},
        "methods": {},
    }
    work_root = out / "_work"
    for spec in specs:
        log(f"[bench] method {spec.name} ({spec.description})")
        mres: dict = {"spec": spec.to_dict(), "steps": [], "error": None}
        results["methods"][spec.name] = mres
        try:
            builder = _Builder(spec, factory, work_root / spec.name,
                               hooks_for=hooks_for if spec.build == "continual" else None,
                               progress=progress)
            for t in range(1, T + 1):
                tb = time.perf_counter()
                built = builder.step(t)
                build_s = time.perf_counter() - tb
                kind, storage = _served_kind(spec, built)
                task_agnostic = kind == "checkpoint" or not per_skill_method(spec)
                frac = storage_fraction(kind, storage, t, per_skill=not task_agnostic,
                                        method=spec.method)
                log(f"  step {t}/{T}: built {kind} in {build_s:.1f}s "
                    f"(storage {frac['fraction']:.3f} of bank); evaluating")
                ev = _evaluate(factory["base"]["dir"], kind, built["out"], experts[:t],
                               task_agnostic, episodes, seed, max_steps, replan_every,
                               with_router, log)
                mres["steps"].append({"t": t, "admitted": experts[t - 1]["name"], "kind": kind,
                                      "task_agnostic": task_agnostic, "storage": storage,
                                      "storage_fraction": frac, "build_s": build_s, **ev})
                log(f"  step {t}/{T}: oracle acc "
                    + " ".join(f"{k}={v.get('oracle', 0):.2f}" for k, v in ev["skills"].items())
                    + f" ({ev['eval_s']:.0f}s)")
        except Exception as exc:  # noqa: BLE001 - one broken method must not sink the benchmark
            mres["error"] = f"{type(exc).__name__}: {exc}"
            log(f"[bench] method {spec.name} FAILED at step {len(mres['steps']) + 1}: "
                f"{mres['error']}")
        mres["summary"] = report.summarize_method(mres, [e["name"] for e in experts])
    results["wall_s"] = time.perf_counter() - t_start
    if not keep_work:
        shutil.rmtree(work_root, ignore_errors=True)
    results["artifacts"] = report.write_all(results, out)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    log(f"[bench] done in {results['wall_s']:.0f}s: {out / 'table.md'}")
    return results
