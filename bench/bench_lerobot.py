"""LeRobot backend benchmark (prints figures measured in this run; not a timed test).

1. Per-step latency of a served policy (real gRPC server + client on loopback, one episode,
   ``ep.infer`` wall time) vs LeRobot's own in-process pipeline on the same checkpoint
   (preprocessor + ``select_action`` on a step that computes a chunk + postprocessor), for a tiny
   SmolVLA-shaped policy and ACT; ratio served / LeRobot.
2. Resident weight memory of base + core + N residuals (``carve admit``, bank and CARVE rank R)
   vs N full checkpoints, N = 2, 4, 8 (ACT experts fine-tuned from one base).

    python bench/bench_lerobot.py [--reps 30] [--threads 1] [--rank 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the offline tiny-policy builders live with the tests
sys.path.insert(0, str(ROOT))

from lerobot_utils import build_family  # noqa: E402


def carve_quiet(argv) -> int:
    """``carve ...`` in process with its report lines swallowed (the bench prints its own)."""
    import contextlib
    import io

    from policy_server.cli import main as carve

    with contextlib.redirect_stdout(io.StringIO()):
        rc = carve(argv)
    if rc:
        raise SystemExit(f"carve {argv[0]} failed with exit code {rc}")
    return rc

TASK = "pick up the red cube"


def _obs(rng, cams, img):
    return (rng.standard_normal(6).astype(np.float32),
            {c: rng.integers(0, 256, (img, img, 3), dtype=np.uint8) for c in cams})


def lerobot_step_ms(policy_dir, reps, cams, img, device) -> list[float]:
    """ms per chunk-computing step of LeRobot's own pipeline, in process."""
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    pol = get_policy_class("act" if "act" in policy_dir.name else "smolvla").from_pretrained(
        str(policy_dir), strict=True)
    pol.to(device).eval()
    pre, post = make_pre_post_processors(
        pol.config, pretrained_path=str(policy_dir),
        preprocessor_overrides={"device_processor": {"device": device}})
    rng, out = np.random.default_rng(0), []
    for i in range(reps + 3):
        st, ims = _obs(rng, cams, img)
        o = {f"observation.images.{c}": torch.from_numpy(v).permute(2, 0, 1).float() / 255
             for c, v in ims.items()}
        o.update({"observation.state": torch.from_numpy(st), "task": TASK})
        t = time.perf_counter()
        with torch.no_grad():
            pol.reset()  # a fresh chunk every step: what the server computes per request
            post(pol.select_action(pre(o)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:
            out.append((time.perf_counter() - t) * 1e3)
    return out


def served_step_ms(fam, reps, cams, img, device) -> list[float]:
    from carve_client import PolicyClient

    from policy_server.service.server import PolicyServer, ServerConfig
    from policy_server.serving import EngineConfig, build_engine

    state = fam["base"].parent / "bench-state"
    if not state.exists():
        carve_quiet(["admit", str(state), "--base", str(fam["base"]), "--expert",
                     str(fam["experts"]["skill1"]), "--skill", "skill1", "--method", "bank",
               "--no-progress"])
    server = PolicyServer(lambda: build_engine(EngineConfig(
        base_dir=str(fam["base"]), state_dir=str(state), router="exact", device=device)),
        ServerConfig(port=0))
    port = server.start()
    client = PolicyClient(f"127.0.0.1:{port}", retries=0, timeout=60)
    client.wait_ready(120)
    rng, out = np.random.default_rng(0), []
    try:
        with client.episode(TASK, skill="skill1") as ep:
            for i in range(reps + 3):
                st, ims = _obs(rng, cams, img)
                t = time.perf_counter()
                ep.infer(st, ims)
                if i >= 3:
                    out.append((time.perf_counter() - t) * 1e3)
    finally:
        client.close()
        server.stop(1.0)
    return out


def _fmt(xs):
    return f"min {min(xs):7.2f}  median {statistics.median(xs):7.2f} ms"


def latency(root, reps, device):
    print("== per-step latency (one chunk per step), served over gRPC vs LeRobot in process")
    shapes = {"smolvla": dict(img=64, over=dict(chunk_size=10, n_action_steps=10, num_steps=3,
                                                 resize_imgs_with_padding=(64, 64))),
              "act": dict(img=64, over=dict(chunk_size=10, n_action_steps=10, dim_model=64,
                                            n_heads=4, dim_feedforward=128))}
    import lerobot_utils

    for kind, sh in shapes.items():
        lerobot_utils.IMG = sh["img"]  # the builders read the image size from the module
        fam = build_family(root / kind, kind, n_experts=1, steps=1, **sh["over"])
        ref = lerobot_step_ms(fam["experts"]["skill1"], reps, ("front",), sh["img"], device)
        srv = served_step_ms(fam, reps, ("front",), sh["img"], device)
        ratio = statistics.median(srv) / statistics.median(ref)
        print(f"{kind:8s} LeRobot select_action: {_fmt(ref)} | served: {_fmt(srv)} | "
              f"median ratio x{ratio:.2f}")


def memory(root, rank, kind, ns=(2, 4, 8)):
    """Resident weight bytes of the served stack vs N full checkpoints (``kind`` experts)."""
    from policy_server.models.registry import load_backend
    from policy_server.runtime import PolicyRuntime
    from policy_server.state.store import StateStore

    print(f"== resident weights: base + core + N residuals vs N full checkpoints ({kind}, "
          f"CARVE r{rank} / bank)")
    fam = build_family(root / f"mem-{kind}", kind, n_experts=max(ns), steps=2)
    names = list(fam["experts"])
    for method in ("carve", "bank"):
        for n in ns:
            state = root / f"mem-{kind}-{method}-{n}"
            for s in names[:n]:
                extra = ["--rank", str(rank)] if method == "carve" else []
                carve_quiet(["admit", str(state), "--base", str(fam["base"]), "--expert",
                       str(fam["experts"][s]), "--skill", s, "--method", method, "--no-progress",
                       *extra])
            be = load_backend(fam["base"])
            full = sum(t.numel() * t.element_size() for t in be.module.state_dict().values())
            snap = StateStore(state).open()
            rt = PolicyRuntime(be, snap, mode="fused")
            served = full + rt.residual_bytes()
            print(f"  {method:5s} N={n}: served {served / 2**20:7.1f} MiB  vs  N full "
                  f"{n * full / 2**20:7.1f} MiB  (x{served / (n * full):.3f})")
            rt.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import os

    print(f"torch {torch.__version__}, threads {args.threads}, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-lerobot-") as tmp:
        latency(Path(tmp), args.reps, args.device)
        if not args.skip_memory:
            for kind in ("smolvla", "act"):
                memory(Path(tmp), args.rank, kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
