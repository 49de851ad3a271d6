"""The expert factory behind ``carve train``: demos -> base -> one expert per suite.

Steps (all seeded, deterministic on CPU for a fixed thread count):

1. collect scripted Meta-World demonstrations for every task of the preset (cached per task as
   ``$CARVE_CACHE_DIR/demos/<task>-n<N>-s<seed>-m<max_steps>.npz``);
2. pretrain the base demo VLA on ``preset.base_tasks``; its normalisation statistics come from the
   base data and are copied unchanged into every expert (experts never re-normalise, so a task
   vector is purely a weight difference);
3. fine-tune one expert per suite starting from the base: a full fine-tune (HF-layout checkpoint
   dir) or, with ``lora=True``, a PEFT LoRA adapter on the action expert's projections;
4. optionally evaluate base vs expert on each suite in closed loop (``preset.eval_episodes``);
5. write ``factory.json`` last, so its presence marks a complete build.

The output directory defaults to ``$CARVE_CACHE_DIR/factory/<preset>-<hash>`` where the hash covers
the preset, the LoRA options and ``FACTORY_VERSION``: an unchanged request is served from cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from policy_server.errors import InputError
from policy_server.models.base import ObservationBatch
from policy_server.models.demo_vla import DemoVLABackend, DemoVLAConfig
from policy_server.sim.suites import Preset, get_preset, instruction_for
from policy_server.tensors import durable
from policy_server.training.lora import DEFAULT_TARGET_MODULES, inject_lora, save_peft_adapter

FACTORY_VERSION = 1
EVAL_SEED = 1000  # evaluation placements come from a different MT1 seed than the demos
_MARKER = ".carve-factory"
STD_FLOOR = 0.05  # metres-scale floor so constant dims (unused object slots) don't blow up


def cache_dir() -> Path:
    """``$CARVE_CACHE_DIR`` or ``~/.cache/carve-serve``."""
    return Path(os.environ.get("CARVE_CACHE_DIR") or Path.home() / ".cache" / "carve-serve")


# --------------------------------------------------------------------------------------------
# data


def load_or_collect_demos(task: str, n_episodes: int, seed: int, max_steps: int,
                          root: Path | None = None, force: bool = False):
    """Scripted demos of ``task`` (see ``sim.metaworld_env.collect_demos``), cached as .npz."""
    from policy_server.sim.metaworld_env import Demos, collect_demos

    path = (root or cache_dir()) / "demos" / f"{task}-n{n_episodes}-s{seed}-m{max_steps}.npz"
    if path.is_file() and not force:
        return Demos.load(path)
    demos = collect_demos(task, n_episodes, seed=seed, max_steps=max_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    demos.save(tmp)
    os.replace(tmp, path)
    return demos


class ChunkDataset:
    """Supervised (state, instruction, action chunk) samples from demos.

    obs: (N, state_dim) float32; chunks: (N, chunk, A) float32 - the next ``chunk`` actions of the
    same episode, the last action repeated past the episode end (so the model learns to hold
    still); task_idx: (N,) int64 into ``instructions``.
    """

    def __init__(self, demos_list, chunk_length: int):
        obs, chunks, tidx = [], [], []
        self.instructions = [instruction_for(d.task) for d in demos_list]
        for i, d in enumerate(demos_list):
            for ep in np.unique(d.episode):
                sel = np.flatnonzero(d.episode == ep)
                acts = d.actions[sel]
                idx = np.minimum(np.arange(len(sel))[:, None] + np.arange(chunk_length)[None],
                                 len(sel) - 1)
                obs.append(d.obs[sel])
                chunks.append(acts[idx])
                tidx.append(np.full(len(sel), i, dtype=np.int64))
        self.obs = np.concatenate(obs).astype(np.float32)
        self.chunks = np.concatenate(chunks).astype(np.float32)
        self.task_idx = np.concatenate(tidx)

    def __len__(self) -> int:
        return len(self.obs)


def norm_stats(obs: np.ndarray, actions: np.ndarray) -> dict[str, list[float]]:
    """Per-dimension mean/std of states (N, S) and actions (N, A), std floored at STD_FLOOR."""
    return {"state_mean": obs.mean(0).astype(float).tolist(),
            "state_std": np.maximum(obs.std(0), STD_FLOOR).astype(float).tolist(),
            "action_mean": actions.mean(0).astype(float).tolist(),
            "action_std": np.maximum(actions.std(0), STD_FLOOR).astype(float).tolist()}


# --------------------------------------------------------------------------------------------
# training


def train_backend(backend: DemoVLABackend, data: ChunkDataset, steps: int, lr: float,
                  batch_size: int, seed: int, state_noise: float = 0.05, desc: str = "train",
                  progress: bool = True) -> list[float]:
    """Behaviour cloning: L1 between predicted and demonstrated normalised chunks.

    Trains the parameters with ``requires_grad`` (all, or only LoRA factors after
    ``inject_lora``) with AdamW + cosine decay. Gaussian noise (std ``state_noise``, normalised
    units) on the input state makes the clone robust to its own small drift in closed loop.
    Returns the loss of every step (floats).
    """
    if steps < 1 or len(data) == 0:
        raise InputError(f"{desc}: need steps >= 1 and a non-empty dataset")
    gen = torch.Generator().manual_seed(seed)
    module = backend.module
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    obs = backend.normalize_state(data.obs).float()
    target = backend.normalize_action(data.chunks)
    tok = [backend.tokenize([t]) for t in data.instructions]
    ids_per_task = [t[0] for t in tok]
    task_idx = torch.as_tensor(data.task_idx)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for _ in bar:
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        s = obs[idx] + state_noise * torch.randn(batch_size, obs.shape[1], generator=gen)
        ti = task_idx[idx].tolist()
        pieces = [ids_per_task[i] for i in ti]
        offsets = torch.tensor(np.cumsum([0] + [len(p) for p in pieces[:-1]]), dtype=torch.long)
        pred = module(s, torch.cat(pieces), offsets)
        loss = torch.nn.functional.l1_loss(pred, target[idx])
        optimizer_step(loss, opt, sched, params, losses, bar)
    module.eval()
    return losses


def optimizer_step(loss: torch.Tensor, opt, sched, params, losses: list[float], bar) -> None:
    """One training step of the factory's loops: backward, gradient norm clipped at 1, optimiser
    and schedule step; the loss is appended to ``losses`` and its 50-step mean shown on ``bar``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
    if len(losses) % 50 == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")


def policy_fn_for(backend: DemoVLABackend):
    """``policy_fn(obs (39,), instruction) -> (chunk, 4)`` float32, clipped to the action bounds."""
    low, high = np.asarray(backend.spec.action_low), np.asarray(backend.spec.action_high)

    def fn(obs: np.ndarray, instruction: str) -> np.ndarray:
        out = backend.predict(ObservationBatch(np.asarray(obs, np.float32)[None], [instruction]))
        return np.clip(out[0].numpy(), low, high)

    return fn


# --------------------------------------------------------------------------------------------
# factory


def preset_hash(preset: Preset, lora: bool, lora_rank: int) -> str:
    blob = json.dumps({"preset": preset.to_dict(), "lora": lora, "lora_rank": lora_rank,
                       "version": FACTORY_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _loss_summary(losses: list[float]) -> dict:
    k = max(1, len(losses) // 20)
    return {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])),
            "steps": len(losses)}


def evaluate(backend: DemoVLABackend, tasks: list[str], episodes: int, max_steps: int,
             replan_every: int, seed: int = EVAL_SEED) -> dict[str, float]:
    """Closed-loop success rate per task on held-out placements (MT1 seed ``seed``)."""
    from policy_server.sim.metaworld_env import rollout

    fn = policy_fn_for(backend)
    return {t: rollout(fn, t, episodes, seed=seed, max_steps=max_steps,
                       replan_every=replan_every).success_rate for t in tasks}


def build_factory(preset: str | Preset = "demo", out: str | Path | None = None, lora: bool = False,
                  force: bool = False, lora_rank: int | None = None, eval_episodes: int | None = None,
                  progress: bool = True, num_threads: int = 1) -> dict:
    """Build (or reuse) the base + experts of ``preset``; returns the factory.json content.

    Keys: ``preset``, ``hash``, ``out``, ``base`` {dir, tasks, instructions, losses, seconds},
    ``experts`` [{name, dir, kind ("full"|"lora"), suite, tasks, instructions, losses, seconds}],
    ``demos`` {task: {episodes, steps, seconds}}, ``eval`` (when episodes > 0), ``total_seconds``.

    Training runs with ``num_threads`` torch threads (restored afterwards): 1 is both the fastest
    for this small model on a shared 2-core box and what makes builds bit-reproducible.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _build_factory(preset, out, lora, force, lora_rank, eval_episodes, progress)
    finally:
        torch.set_num_threads(prev_threads)


def write_factory_json(out: Path, result: dict) -> None:
    """Commit a finished build: ``out/factory.json`` written atomically and durably (its
    presence with the right hash is what marks the build as reusable)."""
    durable.write_bytes_durable(out / "factory.json",
                                (json.dumps(result, indent=2) + "\n").encode())


def reuse_or_prepare_output(out: Path, key: str, force: bool) -> dict | None:
    """The cached factory.json content when ``out`` holds a finished build of ``key`` (and not
    ``force``); else ``out`` is emptied and marked for a fresh build and None is returned."""
    fj = out / "factory.json"
    if fj.is_file() and not force:
        done = json.loads(fj.read_text())
        if done.get("hash") == key:
            return done
    if out.exists():
        # stale or forced: rebuild from scratch, never mix builds - but only delete what a
        # factory build wrote (marker file), never a user's unrelated directory
        if any(out.iterdir()) and not (out / _MARKER).is_file():
            raise InputError(f"{out}: exists, is not empty and is not a carve factory output; "
                             "choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / _MARKER).write_text(key + "\n")
    return None


def _build_factory(preset, out, lora, force, lora_rank, eval_episodes, progress) -> dict:
    p = get_preset(preset) if isinstance(preset, str) else preset
    if lora_rank is not None:
        p = replace(p, lora_rank=int(lora_rank))
    if eval_episodes is not None:
        p = replace(p, eval_episodes=int(eval_episodes))
    key = preset_hash(p, lora, p.lora_rank)
    out = Path(out) if out else cache_dir() / "factory" / f"{p.name}-{key}{'-lora' if lora else ''}"
    done = reuse_or_prepare_output(out, key, force)
    if done is not None:
        return done
    t_start = time.perf_counter()
    torch.manual_seed(p.seed)

    tasks = list(p.base_tasks) + [t for s in p.suites.values() for t in s]
    demos, demo_info = {}, {}
    for i, task in enumerate(tqdm(tasks, desc="demos", disable=not progress, leave=False)):
        n = p.episodes_base if task in p.base_tasks else p.episodes_expert
        # a distinct seed per task keeps placements of different tasks independent
        d = load_or_collect_demos(task, n, seed=p.seed * 1000 + i, max_steps=p.max_steps, force=force)
        demos[task] = d
        demo_info[task] = {"episodes": d.n_episodes, "steps": int(len(d.obs)),
                           "seconds": round(d.seconds, 2)}

    # ---- base ----
    base_demos = [demos[t] for t in p.base_tasks]
    cfg = DemoVLAConfig(**p.model)
    base_data = ChunkDataset(base_demos, cfg.chunk_length)
    stats = norm_stats(base_data.obs, base_data.chunks[:, 0])
    cfg = replace(cfg, name=f"{p.name}-base", **stats)
    base = DemoVLABackend(cfg, seed=p.seed)
    t0 = time.perf_counter()
    base_losses = train_backend(base, base_data, p.base_steps, p.lr_base, p.batch_size, p.seed,
                                desc="base", progress=progress)
    base_dir = base.save_pretrained(out / "base")
    result = {
        "preset": p.name, "hash": key, "out": str(out), "config": p.to_dict(), "lora": lora,
        "base": {"dir": str(base_dir), "tasks": list(p.base_tasks),
                 "instructions": [instruction_for(t) for t in p.base_tasks],
                 "losses": _loss_summary(base_losses), "seconds": round(time.perf_counter() - t0, 2)},
        "experts": [], "demos": demo_info,
    }

    # ---- experts ----
    for j, (suite, suite_tasks) in enumerate(p.suites.items()):
        t0 = time.perf_counter()
        data = ChunkDataset([demos[t] for t in suite_tasks], cfg.chunk_length)
        exp = DemoVLABackend.load(base_dir)
        exp.config = replace(exp.config, name=f"{p.name}-{suite}")
        exp.spec.name = exp.config.name
        seed = p.seed + 101 * (j + 1)
        if lora:
            torch.manual_seed(seed)  # LoRA A init
            inject_lora(exp.module, DEFAULT_TARGET_MODULES, p.lora_rank, p.lora_alpha)
            losses = train_backend(exp, data, p.expert_steps, p.lr_lora, p.batch_size, seed,
                                   desc=f"expert {suite} (lora r={p.lora_rank})", progress=progress)
            edir = save_peft_adapter(exp.module, out / "experts" / suite, DEFAULT_TARGET_MODULES,
                                     p.lora_rank, p.lora_alpha, base_model_name_or_path=str(base_dir))
        else:
            losses = train_backend(exp, data, p.expert_steps, p.lr_expert, p.batch_size, seed,
                                   desc=f"expert {suite}", progress=progress)
            edir = exp.save_pretrained(out / "experts" / suite)
        result["experts"].append({
            "name": suite, "dir": str(edir), "kind": "lora" if lora else "full", "suite": suite,
            "tasks": list(suite_tasks), "instructions": [instruction_for(t) for t in suite_tasks],
            "losses": _loss_summary(losses), "seconds": round(time.perf_counter() - t0, 2)})
        if p.eval_episodes > 0:
            result["experts"][-1]["_backend"] = exp

    # ---- optional closed-loop evaluation ----
    if p.eval_episodes > 0:
        t0 = time.perf_counter()
        ev = {}
        for e in result["experts"]:
            exp = e.pop("_backend")
            ev[e["name"]] = {
                "expert": evaluate(exp, e["tasks"], p.eval_episodes, p.max_steps, p.replan_every),
                "base": evaluate(base, e["tasks"], p.eval_episodes, p.max_steps, p.replan_every)}
        ev["base_tasks"] = {"base": evaluate(base, list(p.base_tasks), p.eval_episodes, p.max_steps,
                                             p.replan_every)}
        result["eval"] = {"episodes": p.eval_episodes, "seed": EVAL_SEED,
                          "replan_every": p.replan_every, "success": ev,
                          "seconds": round(time.perf_counter() - t0, 2)}
    result["total_seconds"] = round(time.perf_counter() - t_start, 2)
    write_factory_json(out, result)
    return result
