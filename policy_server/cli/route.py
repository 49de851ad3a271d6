"""``carve route``: ask the router of a merge state which skill would run an instruction.

    carve route STATE_DIR "put the bowl on the plate" "turn on the stove" [--file FILE]
                [--router exact|text|vsubspace|hybrid] [--min-confidence X] [--min-margin Y]
                [--image [CAMERA=]FILE] [--obs-state V,V,...] [--base DIR] [--version V] [--json]

One decision per instruction: a table, or with ``--json`` one JSON object per line (instruction,
skill, confidence, abstained, margin, runner_up, reason, router, candidates). The router is built with
``router.factory.build_router`` and queried with ``Router.route`` one instruction at a time, exactly
as the server does, so the decisions are identical to the Python API and the gRPC ``Route`` call.
With ``--base`` the served model is built by the composition root (``policy_server.serving``:
base fingerprint checked, core folded by the runtime), exactly as ``carve serve`` builds it.
An abstention is an answer, not an error (exit code 0). ``--state`` (the observation vector),
``--version-id`` and ``--model`` are deprecated spellings of ``--obs-state``, ``--version`` and
``--base``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from policy_server.cli.aliases import deprecated_alias
from policy_server.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("route", help="route instructions to skills with the state's router",
                       description="Ask the router of a merge state which skill would run each "
                                   "instruction (one decision per instruction).")
    p.add_argument("state_dir", metavar="STATE_DIR", help="merge-state directory")
    p.add_argument("instructions", nargs="*", metavar="INSTRUCTION", help="instructions to route")
    p.add_argument("--file", "-f", action="append", default=[], metavar="FILE",
                   help="read instructions from FILE, one per line ('#' comments, blank lines "
                        "skipped; '-' reads stdin); repeatable")
    p.add_argument("--router", default="text", choices=("exact", "text", "vsubspace", "hybrid"),
                   help="router kind (default: text)")
    p.add_argument("--router-model", default=None, metavar="PATH",
                   help="local sentence-transformers model directory (default: the packaged "
                        "all-MiniLM-L6-v2)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="X",
                   help="abstain below this confidence (text default 0.4)")
    p.add_argument("--min-margin", type=float, default=None, metavar="Y",
                   help="abstain when best minus runner-up confidence is below this (default 0.05)")
    p.add_argument("--temperature", type=float, default=None, help="text softmax temperature")
    p.add_argument("--version", dest="state_version", default=None, metavar="VERSION",
                   help="route with this state version (default: CURRENT)")
    p.add_argument("--version-id", dest="state_version", metavar="VERSION",
                   action=deprecated_alias("--version"), help=argparse.SUPPRESS)
    p.add_argument("--image", action="append", default=[], metavar="[CAMERA=]FILE",
                   help="first-observation image for the vsubspace/hybrid routers (PNG/JPEG); "
                        "CAMERA defaults to the model's first camera or 'image'")
    p.add_argument("--obs-state", dest="obs_state", default=None, metavar="V,V,...",
                   help="first-observation state vector (comma-separated floats; write "
                        "--obs-state=-1,2 when it starts with a minus sign)")
    p.add_argument("--state", dest="obs_state", metavar="V,V,...",
                   action=deprecated_alias("--obs-state"), help=argparse.SUPPRESS)
    p.add_argument("--base", default=None, metavar="DIR",
                   help="the base model directory (needed by the vsubspace router and by hybrid "
                        "with value-subspace scores): the model is built as carve serve builds it")
    p.add_argument("--model", dest="base", metavar="DIR", action=deprecated_alias("--base"),
                   help=argparse.SUPPRESS)
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="use a base whose fingerprint differs from (or was not recorded in) the "
                        "state's (warns instead of refusing)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run_route)


def read_instructions(args) -> list[str]:
    out = list(args.instructions)
    for f in args.file:
        if f == "-":
            lines = sys.stdin.read().splitlines()
        else:
            path = Path(f)
            if not path.is_file():
                raise InputError(f"--file {f}: no such file")
            lines = path.read_text(encoding="utf-8").splitlines()
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise InputError("no instruction given: pass INSTRUCTION arguments or --file FILE")
    return out


def build_observation(args, served=None):
    """ObservationBatch of size 1 from --image/--obs-state (images resized to ``served.spec``'s
    cameras when a served model is given), or None when neither flag is given."""
    if not args.image and args.obs_state is None:
        return None
    import cv2
    import numpy as np

    from policy_server.models.base import ObservationBatch

    spec = getattr(served, "spec", None)
    cams = list(spec.images) if spec is not None else []
    images = {}
    for item in args.image:
        cam, _, path = item.rpartition("=")
        cam = cam or (cams[len(images)] if len(images) < len(cams) else "image")
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise InputError(f"--image {path}: cannot read the image")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if spec is not None and cam in spec.images:
            s = spec.images[cam]
            if img.shape[:2] != (s.height, s.width):
                img = cv2.resize(img, (s.width, s.height), interpolation=cv2.INTER_AREA)
        images[cam] = img[None]
    if args.obs_state is not None:
        try:
            state = np.array([[float(v) for v in args.obs_state.split(",")]], dtype=np.float32)
        except ValueError as e:
            raise InputError(f"--obs-state {args.obs_state!r}: expected comma-separated floats"
                             ) from e
    else:
        dim = spec.state_dim if spec is not None else 0
        state = np.zeros((1, dim), dtype=np.float32)
    return ObservationBatch(state=state, instructions=[""], images=images)


def engine_config(args):
    """The ``EngineConfig`` ``carve serve`` would use for these routing flags."""
    from policy_server.serving import EngineConfig

    return EngineConfig(base_dir=args.base or "", state_dir=args.state_dir,
                        state_version=args.state_version, router=args.router,
                        router_model=args.router_model, min_confidence=args.min_confidence,
                        min_margin=args.min_margin,
                        router_options={"temperature": args.temperature}
                        if args.temperature is not None else {},
                        allow_base_mismatch=args.allow_base_mismatch)


def _decide(args, instructions: list[str]):
    """-> (snapshot, router, [(instruction, RouteDecision)])."""
    cfg = engine_config(args)
    if args.base:
        from policy_server.serving import build_engine

        engine = build_engine(cfg)
        try:
            obs = build_observation(args, engine)
            return (engine.snapshot, engine.router,
                    [(t, engine.route(t, obs)) for t in instructions])
        finally:
            engine.close()
    from policy_server.serving import make_router
    from policy_server.state.store import StateStore

    store = StateStore(args.state_dir)
    snap = store.open(args.state_version) if args.state_version else store.open()
    router = make_router(cfg, snap)
    obs = build_observation(args)
    return snap, router, [(t, router.route(t, obs)) for t in instructions]


def run_route(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    instructions = read_instructions(args)  # bad input fails before anything heavy is imported
    snap, router, decisions = _decide(args, instructions)
    if args.json:
        for t, d in decisions:
            print(json.dumps({"instruction": t, **d.to_json()}, ensure_ascii=False))
        return 0
    w = min(max(len(t) for t, _ in decisions), 60)
    print(f"{'instruction':<{w}}  {'skill':<18} {'conf':>6} {'margin':>7}  runner-up")
    for t, d in decisions:
        shown = t if len(t) <= w else t[:w - 2] + ".."
        skill = d.skill if not d.abstained else "(abstained)"
        print(f"{shown:<{w}}  {skill:<18} {d.confidence:>6.3f} {d.margin:>7.3f}  "
              f"{d.runner_up or '-'}")
        if d.abstained:
            print(f"{'':<{w}}  -> {d.reason}")
    n_abs = sum(d.abstained for _, d in decisions)
    print(f"\n{len(decisions)} instruction(s), {n_abs} abstained; router {router.name}, state "
          f"version {getattr(snap, 'version', '?')}")
    return 0
