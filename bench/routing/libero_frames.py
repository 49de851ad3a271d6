"""Render (and cache) the first observation of LIBERO tasks from their fixed init states.

Rendered the way ``clients/libero_client.run_episode`` starts an episode: ``env.reset()``, then
``env.set_init_state(init_states[i])`` (the suite's fixed init state i, what makes LIBERO runs
comparable), then ``settle`` dummy actions. The default ``settle = 0`` is the frame the router can
see: the client opens the server episode (and the server routes it) right after the reset, before
its ``NUM_STEPS_WAIT`` = 10 settle steps; ``--settle 10`` renders the first frame the *policy* sees
instead. One env is built per task and reused for all its init states (``set_init_state``
overwrites the MuJoCo state); the one ``reset`` after the build is still needed (without it the
frames differ, measured) and costs about as much as the build.

Cache: one npz per frame, ``<cache>/libero_frames/<suite>/task<TT>_init<II>_r<RES>_s<SETTLE>.npz``
with <cache> = ``$CARVE_CACHE_DIR`` or ``~/.cache/carve-serve``. Each npz holds

  agentview     uint8 (RES, RES, 3)  third-person camera after the settle steps, as the env renders
                                     it (upside down and mirrored; clients rotate it by 180 degrees)
  wrist         uint8 (RES, RES, 3)  eye-in-hand camera, same time, as rendered
  agentview_t0  uint8 (RES, RES, 3)  third-person camera right after ``set_init_state`` (equal to
                                     ``agentview`` when settle = 0)
  state         float32 (8,)         openpi LIBERO state (eef pos, axis-angle, gripper qpos)
  meta          str (JSON)           suite, task index/name/language, init index, resolution,
                                     settle steps, render and env-build seconds

A cached frame is reused whenever its file exists; a frame is written atomically (tmp + rename), so
an interrupted run resumes where it stopped. Rendering is deterministic (two runs gave bit-identical
frames and states).

CPU rendering: ``MUJOCO_GL=osmesa`` (Debian ``libosmesa6``), set here when unset. Measured on the
2 shared cores of the dev machine at 128x128 (see docs/BENCHMARKS.md for the run's figures): env
build + reset ~12 s per task when the machine is idle (~25 s at load 8), then ~0.3 s per frame with
settle 0 and ~2.3 s with settle 10 (each step renders both cameras).

CLI::

    nice -n 19 python bench/routing/libero_frames.py --suites libero_spatial,libero_goal \
        --inits 0-9 --resolution 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
RESOLUTION = 128
# The router decides when the episode opens: the client has just reset the env to the init state
# and not stepped yet (its NUM_STEPS_WAIT = 10 settle steps come after), so the routing frame is
# the one right after set_init_state. --settle 10 renders the first frame the policy sees instead.
SETTLE_STEPS = 0


def cache_root() -> Path:
    """``$CARVE_CACHE_DIR/libero_frames`` (default ``~/.cache/carve-serve/libero_frames``)."""
    return Path(os.environ.get("CARVE_CACHE_DIR") or Path.home() / ".cache" / "carve-serve") \
        / "libero_frames"


def frame_path(suite: str, task: int, init: int, resolution: int = RESOLUTION,
               settle: int = SETTLE_STEPS, root: Path | None = None) -> Path:
    name = f"task{task:02d}_init{init:02d}_r{resolution}_s{settle}.npz"
    return (root or cache_root()) / suite / name


def load_frame(path: Path) -> dict:
    """npz -> {"agentview", "wrist", "agentview_t0": uint8 (R, R, 3), "state": float32 (8,),
    "meta": dict}."""
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in ("agentview", "wrist", "agentview_t0", "state")}
        out["meta"] = json.loads(str(z["meta"]))
    return out


def _import_libero():
    if "DISPLAY" not in os.environ:
        os.environ.setdefault("MUJOCO_GL", "osmesa")
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    return benchmark, get_libero_path, OffScreenRenderEnv


def suite_tasks(suite: str) -> list[tuple[int, str, str]]:
    """-> [(task index, task name, language)] in LIBERO's order for ``suite``."""
    benchmark, _, _ = _import_libero()
    b = benchmark.get_benchmark_dict()[suite]()
    return [(i, b.get_task(i).name, b.get_task(i).language) for i in range(b.n_tasks)]


def render_task(suite: str, task: int, inits: list[int], resolution: int = RESOLUTION,
                settle: int = SETTLE_STEPS, root: Path | None = None, progress=None) -> list[Path]:
    """Render the missing frames of one task (one env for all its init states); returns the paths
    of all requested frames. ``progress``: an object with ``update(n)`` (a tqdm bar) or None."""
    from clients.libero_preprocess import DUMMY_ACTION, libero_state

    paths = [frame_path(suite, task, i, resolution, settle, root) for i in inits]
    todo = [(i, p) for i, p in zip(inits, paths) if not p.is_file()]
    if progress is not None and len(todo) < len(inits):
        progress.update(len(inits) - len(todo))  # cached frames count as done
    if not todo:
        return paths
    benchmark, get_libero_path, OffScreenRenderEnv = _import_libero()
    b = benchmark.get_benchmark_dict()[suite]()
    t = b.get_task(task)
    init_states = b.get_task_init_states(task)
    bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
    t0 = time.perf_counter()
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=resolution,
                             camera_widths=resolution)
    env.seed(0)
    # needed although set_init_state overwrites the MuJoCo state: without it the rendered frames
    # differ (measured: up to 175/255 per pixel), robosuite finishes setting up the scene here
    env.reset()
    build_s = time.perf_counter() - t0
    try:
        for i, p in todo:
            t1 = time.perf_counter()
            obs = env.set_init_state(init_states[i])
            first = np.asarray(obs["agentview_image"]).copy()
            # the cameras render on every step (about half its cost, measured); disabling them
            # while settling changed the eef position by ~5e-5 and the frame by up to 16/255, so
            # the frames would no longer be the ones a LIBERO client sees: plain env.step
            for _ in range(settle):
                obs, _, _, _ = env.step(DUMMY_ACTION.tolist())
            render_s = time.perf_counter() - t1
            meta = {"suite": suite, "task": task, "name": t.name, "language": t.language,
                    "init": i, "resolution": resolution, "settle_steps": settle,
                    "render_s": render_s, "env_build_s": build_s}
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.stem + ".tmp.npz")
            np.savez_compressed(tmp, agentview=np.asarray(obs["agentview_image"], np.uint8),
                                wrist=np.asarray(obs["robot0_eye_in_hand_image"], np.uint8),
                                agentview_t0=first.astype(np.uint8),
                                state=libero_state(obs), meta=np.array(json.dumps(meta)))
            os.replace(tmp, p)
            if progress is not None:
                progress.update(1)
    finally:
        env.close()
    return paths


def ensure_frames(suites=SUITES, inits=range(10), resolution: int = RESOLUTION,
                  settle: int = SETTLE_STEPS, root: Path | None = None, tasks=None,
                  show_progress: bool = True) -> dict[tuple[str, int, int], Path]:
    """Render whatever is not cached yet; -> {(suite, task, init): npz path}. ``tasks``: optional
    {suite: [task indices]} (default: every task of the suite)."""
    from tqdm import tqdm

    inits = list(inits)
    plan = []
    for s in suites:
        ids = list(tasks[s]) if tasks and s in tasks else [i for i, _, _ in suite_tasks(s)]
        plan += [(s, i) for i in ids]
    out = {}
    with tqdm(total=len(plan) * len(inits), desc="LIBERO first frames", unit="frame",
              disable=not show_progress, file=sys.stderr) as bar:
        for s, i in plan:
            bar.set_postfix_str(f"{s} task {i}")
            for j, p in zip(inits, render_task(s, i, inits, resolution, settle, root, bar)):
                out[(s, i, j)] = p
    return out


def missing_frames(suites, inits, n_tasks: dict[str, int], resolution: int = RESOLUTION,
                   settle: int = SETTLE_STEPS, root: Path | None = None, tasks=None) -> list:
    """[(suite, task, init)] not in the cache; needs no LIBERO import. n_tasks: suite -> count."""
    out = []
    for s in suites:
        ids = list(tasks[s]) if tasks and s in tasks else range(n_tasks[s])
        out += [(s, t, i) for t in ids for i in inits
                if not frame_path(s, t, i, resolution, settle, root).is_file()]
    return out


def render_in_subprocess(suites, inits, resolution: int = RESOLUTION, settle: int = SETTLE_STEPS,
                         tasks: list[int] | None = None, niceness: int = 10) -> None:
    """Render (what is missing) in a child process under ``nice``. Processes that also load the
    sentence embedder must not import robosuite/MuJoCo themselves: importing triton (pulled in
    by transformers) after robosuite segfaults here (measured: exit 139 in the import)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--suites", ",".join(suites),
           "--inits", ",".join(str(i) for i in inits), "--resolution", str(resolution),
           "--settle", str(settle)]
    if tasks is not None:
        cmd += ["--tasks", ",".join(str(t) for t in tasks)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run(cmd, check=True, env=env, preexec_fn=lambda: os.nice(niceness))


def _parse_range(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--tasks", default=None, help="task indices within each suite, e.g. 0-9")
    ap.add_argument("--inits", default="0-9", help="init-state indices, e.g. 0-9 or 0,5")
    ap.add_argument("--resolution", type=int, default=RESOLUTION)
    ap.add_argument("--settle", type=int, default=SETTLE_STEPS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    tasks = {s: _parse_range(args.tasks) for s in suites} if args.tasks else None
    t0 = time.perf_counter()
    paths = ensure_frames(suites, _parse_range(args.inits), args.resolution, args.settle,
                          tasks=tasks)
    wall = time.perf_counter() - t0
    metas = [load_frame(p)["meta"] for p in paths.values()]
    r = np.array([m["render_s"] for m in metas])
    print(f"{len(paths)} frames under {cache_root()} in {wall:.0f} s this run; per frame (when "
          f"rendered) mean {r.mean():.2f} s, max {r.max():.2f} s; env build mean "
          f"{np.mean([m['env_build_s'] for m in metas]):.1f} s per task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
