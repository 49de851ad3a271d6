"""A second model family for the closed-loop benchmark: LeRobot ACT experts on Meta-World.

Same protocol as the demo VLA factory (``policy_server.training.train``), other architecture:

1. the scripted Meta-World demonstrations of the preset, through ``train.load_or_collect_demos``
   with the same per-task seeds as ``build_factory`` (so both families train on the very same
   cached ``.npz`` files);
2. one shared base: a tiny ``ACTPolicy`` (LeRobot's own config/model classes, no image backbone,
   so no pretrained weights are needed) trained on ``preset.base_tasks`` with LeRobot's own loss
   (``ACTPolicy.forward``);
3. one full fine-tune of the base per suite;
4. every policy saved as a real LeRobot policy directory: ``save_pretrained`` of the policy and of
   its pre/post processors (``make_pre_post_processors``), loadable by LeRobot alone and by the
   server's LeRobot backend;
5. ``factory.json`` written last (its presence marks a complete build), in ``build_factory``'s
   format, so ``bench.closed_loop.run.run_benchmark(factory=...)`` runs it unchanged.

Observation: the Meta-World client sends the 39-D state vector only. ACT needs an image or an
environment state, so the preprocessor carries ``StateAsEnvironmentStateStep`` (see
``act_processors``): ``observation.state`` (39,) is also ACT's ``observation.environment_state``.
Language is not an ACT input: within a suite the expert tells its tasks apart from the scene (the
object and goal entries of the state); which suite's expert serves an episode is the server's
choice (oracle skill id or the text router), exactly as for the demo VLA.

Statistics: every directory (base and experts) carries the *base's* dataset statistics. Why:
merging is weight arithmetic and is only meaningful when every expert reads and writes the same
normalised units; an expert re-normalised on its own suite would make ``expert - base`` mix a
weight change with a change of units, and a merged core (TA/TIES/..., or CARVE's core-only rows,
which the backend serves with the base's processors) would then be served in the wrong units. The
LeRobot backend does serve each skill with its own stored processors, so per-suite statistics
would still be served correctly by the bank; they would just make every merge method wrong.
Action min/max (the server's clip bounds) are Meta-World's action space, [-1, 1] per dimension.

Cache: ``$CARVE_CACHE_DIR/factory/act-<preset>-<hash>``; the hash covers the preset, the ACT
options and ``ACT_FACTORY_VERSION``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from policy_server.errors import InputError
from policy_server.sim.suites import Preset, get_preset, instruction_for
from policy_server.training.train import (
    ChunkDataset, _loss_summary, cache_dir, load_or_collect_demos, norm_stats,
    optimizer_step, reuse_or_prepare_output, write_factory_json)

ACT_FACTORY_VERSION = 1
ACTION_LOW, ACTION_HIGH = -1.0, 1.0  # Meta-World's action space: Box(-1, 1, (4,))

# ACT architecture + training per preset. Tiny on purpose (2 shared CPU cores): no image
# backbone, 128-wide transformer (at 64 wide a rank-16 residual is half a matrix, and CARVE's
# storage could not be told from the bank's). use_vae=False: the scripted demonstrations are
# unimodal (one scripted policy per task), the case where ACT's CVAE latent carries nothing and
# its KL term only slows a few hundred steps of training down. ``chunk_size`` actions are predicted, the first
# ``n_action_steps`` served per request (the client replays ``replan_every`` of them).
ACT_DEFAULTS: dict = {
    "dim_model": 128, "n_heads": 4, "dim_feedforward": 256, "n_encoder_layers": 2,
    "n_decoder_layers": 1, "chunk_size": 8, "n_action_steps": 4, "use_vae": False,
    "dropout": 0.1,
    "base_steps": 1500, "expert_steps": 600, "batch_size": 128, "lr_base": 1e-3,
    "lr_expert": 5e-4, "state_noise": 0.05,
}
_TRAIN_KEYS = ("base_steps", "expert_steps", "batch_size", "lr_base", "lr_expert", "state_noise")
ACT_PRESETS: dict[str, dict] = {"demo": {}, "bench": {"base_steps": 3000, "expert_steps": 1200}}


def act_options(preset_name: str, overrides: dict | None = None) -> dict:
    """The ACT options of a preset: ``ACT_DEFAULTS`` <- ``ACT_PRESETS[preset]`` <- overrides."""
    opts = {**ACT_DEFAULTS, **ACT_PRESETS.get(preset_name, {}), **(overrides or {})}
    unknown = sorted(set(opts) - set(ACT_DEFAULTS))
    if unknown:
        raise InputError(f"unknown ACT option(s) {unknown}; known: {sorted(ACT_DEFAULTS)}")
    if opts["n_action_steps"] > opts["chunk_size"]:
        raise InputError("ACT n_action_steps must be <= chunk_size")
    return opts


def act_hash(preset: Preset, opts: dict) -> str:
    blob = json.dumps({"preset": preset.to_dict(), "act": opts, "family": "act",
                       "version": ACT_FACTORY_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# LeRobot objects


def make_act_config(state_dim: int, action_dim: int, opts: dict):
    """LeRobot ``ACTConfig``: inputs ``observation.state`` and ``observation.environment_state``
    (both (state_dim,), the latter filled by the preprocessor), output ``action`` (action_dim,)."""
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig

    from policy_server.training.act_processors import OBS_ENV_STATE, OBS_STATE

    arch = {k: v for k, v in opts.items() if k not in _TRAIN_KEYS}
    return ACTConfig(
        input_features={OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(state_dim,)),
                        OBS_ENV_STATE: PolicyFeature(type=FeatureType.ENV, shape=(state_dim,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))},
        # ENV is not in ACT's default mapping (it would pass through unnormalised)
        normalization_mapping={"VISUAL": NormalizationMode.MEAN_STD,
                               "STATE": NormalizationMode.MEAN_STD,
                               "ENV": NormalizationMode.MEAN_STD,
                               "ACTION": NormalizationMode.MEAN_STD},
        pretrained_backbone_weights=None, device="cpu", **arch)


def dataset_stats(obs: np.ndarray, actions: np.ndarray) -> dict[str, dict[str, torch.Tensor]]:
    """LeRobot dataset statistics from states (N, S) and actions (N, A) float32: mean/std (std
    floored as the demo factory does, ``train.norm_stats``), min/max; the environment state gets
    the state's (it is the same vector); action min/max are the action space's bounds."""
    s = norm_stats(obs, actions)
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    state = {"mean": t(s["state_mean"]), "std": t(s["state_std"]),
             "min": torch.from_numpy(obs.min(0).astype(np.float32)),
             "max": torch.from_numpy(obs.max(0).astype(np.float32))}
    a = actions.shape[1]
    return {"observation.state": state,
            "observation.environment_state": {k: v.clone() for k, v in state.items()},
            "action": {"mean": t(s["action_mean"]), "std": t(s["action_std"]),
                       "min": torch.full((a,), ACTION_LOW), "max": torch.full((a,), ACTION_HIGH)}}


def make_processors(config, stats: dict):
    """LeRobot's ACT pre/post processors (``make_pre_post_processors``) with
    ``StateAsEnvironmentStateStep`` inserted right after the rename step, before batching and
    normalisation (so the environment state is normalised by the pipeline's own normaliser)."""
    from lerobot.policies.factory import make_pre_post_processors

    from policy_server.training.act_processors import StateAsEnvironmentStateStep

    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    pre.steps.insert(1, StateAsEnvironmentStateStep())
    return pre, post


def save_policy_dir(policy, pre, post, out: Path) -> Path:
    """``save_pretrained`` of the policy (config.json + model.safetensors) and both processors."""
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    return out


def load_policy_dir(path: str | Path):
    """(ACTPolicy in eval mode, preprocessor, postprocessor) with LeRobot's own loaders."""
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    policy = ACTPolicy.from_pretrained(str(path), strict=True)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(path))
    return policy, pre, post


# --------------------------------------------------------------------------------------------
# training


def normalised_tensors(pre, data: ChunkDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset through the policy's own preprocessor: states (N, S) and action chunks
    (N, chunk, A), float32, normalised with the pipeline's statistics (what serving will feed
    the model, so training and serving cannot disagree on units)."""
    out = pre({"observation.state": torch.from_numpy(data.obs),
               "action": torch.from_numpy(data.chunks), "task": ""})
    return out["observation.state"].float(), out["action"].float()


def train_act(policy, states: torch.Tensor, chunks: torch.Tensor, steps: int, lr: float,
              batch_size: int, seed: int, state_noise: float, desc: str = "train",
              progress: bool = False) -> list[float]:
    """Behaviour cloning with LeRobot's ACT loss (``ACTPolicy.forward``: L1 on the normalised
    chunk; no KL since use_vae=False) on normalised states (N, S) / chunks (N, chunk, A).

    AdamW + linear warm-up and cosine decay, as the demo factory; Gaussian noise (std
    ``state_noise``, normalised units) on the state makes the clone robust to its own drift in
    closed loop; the same noisy vector is the environment state (the preprocessor's copy).
    ``action_is_pad`` is all False: chunks past an episode end repeat its last action (hold
    still), as the demo factory's ``ChunkDataset`` builds them. Returns every step's loss.
    """
    if steps < 1 or len(states) == 0:
        raise InputError(f"{desc}: need steps >= 1 and a non-empty dataset")
    from policy_server.training.act_processors import OBS_ENV_STATE, OBS_STATE

    gen = torch.Generator().manual_seed(seed)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    pad = torch.zeros(batch_size, chunks.shape[1], dtype=torch.bool)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for _ in bar:
        idx = torch.randint(len(states), (batch_size,), generator=gen)
        s = states[idx] + state_noise * torch.randn(batch_size, states.shape[1], generator=gen)
        loss, _ = policy.forward({OBS_STATE: s, OBS_ENV_STATE: s, "action": chunks[idx],
                                  "action_is_pad": pad})
        optimizer_step(loss, opt, sched, params, losses, bar)
    policy.eval()
    return losses


# --------------------------------------------------------------------------------------------
# factory


def collect_preset_demos(p: Preset, force: bool = False, progress: bool = False):
    """{task: Demos} and {task: {episodes, steps, seconds}} for every task of ``p``, with the
    per-task seeds ``build_factory`` uses (``p.seed * 1000 + i``, i over base tasks then suite
    tasks in order): the same cached files the demo VLA factory trains on."""
    tasks = list(p.base_tasks) + [t for s in p.suites.values() for t in s]
    demos, info = {}, {}
    for i, task in enumerate(tqdm(tasks, desc="demos", disable=not progress, leave=False)):
        n = p.episodes_base if task in p.base_tasks else p.episodes_expert
        d = load_or_collect_demos(task, n, seed=p.seed * 1000 + i, max_steps=p.max_steps,
                                  force=force)
        demos[task] = d
        info[task] = {"episodes": d.n_episodes, "steps": int(len(d.obs)),
                      "seconds": round(d.seconds, 2)}
    return demos, info


def build_act_factory(preset: str | Preset = "demo", out: str | Path | None = None,
                      force: bool = False, progress: bool = False, *, act: dict | None = None,
                      max_suites: int | None = None, num_threads: int = 1) -> dict:
    """Build (or reuse) the ACT base + one ACT expert per suite of ``preset``.

    act: overrides of ``ACT_DEFAULTS`` (architecture and training: steps, lr, batch size);
    max_suites: keep only the first N suites of the preset (quick runs; part of the hash).
    Returns the factory.json content, ``build_factory``'s format: ``preset``, ``family`` ("act"),
    ``hash``, ``out``, ``config`` (the preset, with the ACT options under ``act``), ``base``
    {dir, tasks, instructions, losses, seconds}, ``experts`` [{name, dir, kind "full", suite,
    tasks, instructions, losses, seconds}], ``demos``, ``total_seconds``.

    Training runs with ``num_threads`` torch threads (restored afterwards): 1 is what a shared
    2-core box affords and what keeps a build bit-reproducible.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _build(preset, out, force, progress, act, max_suites)
    finally:
        torch.set_num_threads(prev)


def _build(preset, out, force, progress, act, max_suites) -> dict:
    p = get_preset(preset) if isinstance(preset, str) else preset
    if max_suites is not None:
        if max_suites < 1:
            raise InputError(f"max_suites must be >= 1, got {max_suites}")
        p = replace(p, suites=dict(list(p.suites.items())[:max_suites]))
    opts = act_options(p.name, act)
    key = act_hash(p, opts)
    out = Path(out) if out else cache_dir() / "factory" / f"act-{p.name}-{key}"
    done = reuse_or_prepare_output(out, key, force)
    if done is not None:
        return done
    t_start = time.perf_counter()
    torch.manual_seed(p.seed)  # ACT's weight init
    from lerobot.policies.act.modeling_act import ACTPolicy

    demos, demo_info = collect_preset_demos(p, force=force, progress=progress)

    # ---- base ----
    t0 = time.perf_counter()
    base_data = ChunkDataset([demos[t] for t in p.base_tasks], opts["chunk_size"])
    stats = dataset_stats(base_data.obs, base_data.chunks[:, 0])
    cfg = make_act_config(base_data.obs.shape[1], base_data.chunks.shape[2], opts)
    pre, post = make_processors(cfg, stats)
    base = ACTPolicy(cfg)
    s, c = normalised_tensors(pre, base_data)
    base_losses = train_act(base, s, c, opts["base_steps"], opts["lr_base"], opts["batch_size"],
                            p.seed, opts["state_noise"], desc="act base", progress=progress)
    base_dir = save_policy_dir(base, pre, post, out / "base")
    config = dict(p.to_dict(), act=opts)
    result = {
        "preset": p.name, "family": "act", "hash": key, "out": str(out), "config": config,
        "lora": False,
        "base": {"dir": str(base_dir), "tasks": list(p.base_tasks),
                 "instructions": [instruction_for(t) for t in p.base_tasks],
                 "losses": _loss_summary(base_losses),
                 "seconds": round(time.perf_counter() - t0, 2)},
        "experts": [], "demos": demo_info,
    }

    # ---- experts: full fine-tunes of the saved base, saved with the base's processors ----
    for j, (suite, suite_tasks) in enumerate(p.suites.items()):
        t0 = time.perf_counter()
        data = ChunkDataset([demos[t] for t in suite_tasks], opts["chunk_size"])
        exp, epre, epost = load_policy_dir(base_dir)
        s, c = normalised_tensors(epre, data)
        seed = p.seed + 101 * (j + 1)
        losses = train_act(exp, s, c, opts["expert_steps"], opts["lr_expert"],
                           opts["batch_size"], seed, opts["state_noise"],
                           desc=f"act expert {suite}", progress=progress)
        edir = save_policy_dir(exp, epre, epost, out / "experts" / suite)
        result["experts"].append({
            "name": suite, "dir": str(edir), "kind": "full", "suite": suite,
            "tasks": list(suite_tasks), "instructions": [instruction_for(t) for t in suite_tasks],
            "losses": _loss_summary(losses), "seconds": round(time.perf_counter() - t0, 2)})
    result["total_seconds"] = round(time.perf_counter() - t_start, 2)
    write_factory_json(out, result)
    return result


__all__ = ["build_act_factory", "ACT_DEFAULTS", "ACT_PRESETS", "act_options", "make_act_config",
           "make_processors", "load_policy_dir", "train_act", "dataset_stats"]
