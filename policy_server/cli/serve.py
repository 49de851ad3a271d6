"""``carve serve``: serve a merge state + base model over gRPC until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from policy_server.dtypes import DTYPE_NAMES


def default_threads() -> int:
    """Half the CPU cores, between 1 and 4: the rest is left to gRPC, decoding and the batcher."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _add_live_options(p) -> None:
    """The options of live version following (docs/OPERATIONS.md)."""
    live = p.add_argument_group("live version following")
    live.add_argument("--follow", action="store_true",
                      help="follow the state live: poll its CURRENT and, when an admission or a "
                           "rollback commits another version, load it beside the served one "
                           "(verified), then switch new episodes to it; running episodes finish "
                           "on the version they started on. A version that fails to verify or "
                           "load is not served (logged, counted, shown by ServerInfo)")
    live.add_argument("--follow-interval", type=float, default=2.0, metavar="S",
                      help="with --follow: seconds between two looks at CURRENT")
    live.add_argument("--admin-token-file",
                      help="file holding the admin token of the Reload RPC (switch the served "
                           "version on demand); without it Reload is refused with "
                           "PERMISSION_DENIED")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a merge state over gRPC",
                       description="Serve base + merge state to robots over gRPC "
                                   "(carve.policy.v1.PolicyService, health, reflection).")
    src = p.add_argument_group("what to serve")
    src.add_argument("--base", help="base model directory (config.json + safetensors)")
    src.add_argument("--state", help="merge-state directory (omit to serve the base alone)")
    src.add_argument("--version", help="state version to serve (default: current)")
    src.add_argument("--demo", action="store_true",
                     help="serve the cached built-in demo (built on first use)")
    src.add_argument("--no-verify", action="store_true",
                     help="skip the sha256 check of the state files at load")
    src.add_argument("--allow-base-mismatch", action="store_true",
                     help="serve the state on a base whose fingerprint differs from (or was not "
                          "recorded in) the state's manifest (warns instead of refusing). The "
                          "fingerprint is fast: file names, sizes, tensor names/shapes/dtypes and "
                          "the first and last MiB of each weight file; it does NOT cover bytes in "
                          "the middle of a file, so a base altered there is not noticed at load. "
                          "Run `carve state verify STATE --base BASE` (a full content hash) to "
                          "check every byte")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for all)")
    net.add_argument("--port", type=int, default=50051, help="port (0 = pick a free one)")
    net.add_argument("--tls-cert", help="PEM certificate (TLS when given with --tls-key)")
    net.add_argument("--tls-key", help="PEM private key")
    net.add_argument("--auth-token-file", help="file holding the bearer token clients must send")
    net.add_argument("--max-message-mb", type=int, default=32)
    net.add_argument("--max-workers", type=int, default=64,
                     help="threads for steps (observation decoding + inference), routing and "
                          "reloads; streams themselves run on one asyncio loop and hold no thread")
    net.add_argument("--max-episodes", type=int,
                     help="concurrent episode streams (RESOURCE_EXHAUSTED beyond); default and "
                          "maximum: --max-workers minus 4, so every episode's step finds a thread "
                          "while routing and reloads still get one")
    net.add_argument("--episode-idle-timeout", type=float, default=30.0, metavar="S",
                     help="end an episode with DEADLINE_EXCEEDED when no message came for S s")
    net.add_argument("--metrics-port", type=int, default=None, metavar="P",
                     help="serve Prometheus metrics at http://HOST:P/metrics (plain HTTP, no "
                          "auth, bound to --host; 0 = pick a free one; default: off)")
    net.add_argument("--grace", type=float, default=10.0, metavar="S",
                     help="on SIGTERM/SIGINT let running episodes finish for up to S s, then "
                          "end them with UNAVAILABLE and exit")
    lim = p.add_argument_group("input limits (refused with INVALID_ARGUMENT / RESOURCE_EXHAUSTED)")
    lim.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                     help="largest image (width x height), checked from the header before "
                          "decoding")
    lim.add_argument("--max-state-sigma", type=float, default=1000.0,
                     help="refuse a state element more than this many standard deviations (or "
                          "ranges) from the model's state statistics, where it has them; 0 = off")
    lim.add_argument("--max-state-abs", type=float, default=1e6,
                     help="refuse |state element| above this where the model has no state "
                          "statistics; 0 = off")
    _add_live_options(p)
    rt = p.add_argument_group("runtime")
    rt.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1...)")
    rt.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                    help="served model dtype (cast once, after the core is folded in float32)")
    rt.add_argument("--mode", default="auto", choices=["auto", "fused", "side"],
                    help="apply residuals fused into weights, on a batched side path, or auto")
    rt.add_argument("--threads", type=int, default=None, metavar="N",
                    help="torch intra-op threads (default: half the CPU cores, at most 4; torch's "
                         "own default oversubscribes a shared machine: a tiny SmolVLA chunk took "
                         "~520 ms instead of ~16 ms)")
    rt.add_argument("--vlm-dir", default=None, metavar="DIR",
                    help="LeRobot SmolVLA: local directory with the VLM's config, tokenizer and "
                         "processor (used instead of config.json's vlm_model_name; nothing is "
                         "downloaded)")
    rt.add_argument("--max-batch", type=int, default=16)
    rt.add_argument("--max-wait-ms", type=float, default=2.0,
                    help="how long the micro-batcher waits to fill a batch")
    ro = p.add_argument_group("routing")
    ro.add_argument("--router", default="text", choices=["exact", "text", "vsubspace", "hybrid"])
    ro.add_argument("--router-model", help="local sentence-transformers model dir "
                                           "(default: packaged all-MiniLM-L6-v2)")
    ro.add_argument("--abstain", default="refuse", choices=["refuse", "core-only"],
                    help="when the router is unsure: refuse the episode or run core-only")
    ro.add_argument("--min-confidence", type=float)
    ro.add_argument("--min-margin", type=float)
    ro.add_argument("--route-observation", default=None,
                    choices=["auto", "vsubspace", "descriptor", "prototypes"],
                    help="--router hybrid: what scores the first observation (default auto: "
                         "value-subspace bases, else first-frame descriptors stored by "
                         "`carve admit --frames`, else demonstration prototypes)")
    ro.add_argument("--text-weight", type=float, default=None,
                    help="--router hybrid: weight of the text probabilities (0..1; default 0.5)")
    ro.add_argument("--obs-temperature", type=float, default=None,
                    help="--router hybrid: softmax temperature of the observation scores")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run_serve)


def engine_config_from_args(args):
    from policy_server.errors import InputError
    from policy_server.serving import EngineConfig

    base, state = args.base, args.state
    if args.demo:
        from policy_server.demo import ensure_demo_state

        d = ensure_demo_state()
        base, state = base or d["base_dir"], state or d["state_dir"]
    if not base:
        raise InputError("--base is required (or --demo)")
    hybrid = {"observation": args.route_observation, "text_weight": args.text_weight,
              "obs_temperature": args.obs_temperature}
    given = [k for k, v in hybrid.items() if v is not None]
    if given and args.router != "hybrid":
        flags = ", ".join("--" + {"observation": "route-observation"}.get(k, k.replace("_", "-"))
                          for k in given)
        raise InputError(f"{flags}: only for --router hybrid (got --router {args.router})")
    if args.text_weight is not None and not 0.0 <= args.text_weight <= 1.0:
        raise InputError(f"--text-weight: {args.text_weight} (0..1)")
    if args.obs_temperature is not None and not args.obs_temperature > 0:
        raise InputError(f"--obs-temperature: {args.obs_temperature} (> 0)")
    return EngineConfig(router_options={k: hybrid[k] for k in given},
                        base_dir=base, state_dir=state, state_version=args.version,
                        verify=not args.no_verify, device=args.device, dtype=args.dtype,
                        mode=args.mode, router=args.router, router_model=args.router_model,
                        abstain=args.abstain, min_confidence=args.min_confidence,
                        min_margin=args.min_margin, max_batch=args.max_batch,
                        max_wait_ms=args.max_wait_ms,
                        allow_base_mismatch=args.allow_base_mismatch,
                        backend_options={"vlm_dir": args.vlm_dir} if args.vlm_dir else {})


def server_config_from_args(args, token, admin_token=None):
    """The ``ServerConfig`` of the network and limit options (validated: ``InputError``)."""
    from policy_server.service.server import ServerConfig

    cfg = ServerConfig(
        host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
        auth_token=token, max_message_mb=args.max_message_mb, max_workers=args.max_workers,
        max_episodes=args.max_episodes, episode_idle_timeout_s=args.episode_idle_timeout,
        max_image_pixels=args.max_image_pixels, state_sigma=args.max_state_sigma or None,
        state_abs=args.max_state_abs or None, metrics_port=args.metrics_port,
        admin_token=admin_token, follow_interval_s=args.follow_interval if args.follow else None)
    cfg.validate()
    return cfg


def _exit_if_stuck(seconds: float) -> None:
    """Last resort of the shutdown bound: ``PolicyServer.stop`` is itself bounded, but a thread
    stuck in native code could still keep the interpreter from exiting."""
    def watchdog():
        time.sleep(seconds)
        print(f"carve serve: shutdown took more than {seconds:.0f}s; exiting now",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watchdog, name="carve-exit-watchdog", daemon=True).start()


def _metrics_note(host: str, port: int | None) -> str:
    """The tail of the "listening on" line naming the metrics endpoint (empty when off)."""
    return f"; metrics on http://{host}:{port}/metrics" if port is not None else ""


def run_serve(args) -> int:
    """``carve serve``: load, serve until SIGINT/SIGTERM, drain for ``--grace`` s, exit 0."""
    from policy_server.errors import InputError
    from policy_server.service.auth import read_token_file
    from policy_server.service.server import PolicyServer
    from policy_server.serving import StateSource, build_engine

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.grace < 0:
        raise InputError(f"--grace: {args.grace} (>= 0)")
    token = read_token_file(args.auth_token_file) if args.auth_token_file else None
    admin = read_token_file(args.admin_token_file) if args.admin_token_file else None
    scfg = server_config_from_args(args, token, admin)  # bad options fail before loading
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads: {args.threads} (>= 1)")
    import torch

    torch.set_num_threads(args.threads or default_threads())
    cfg = engine_config_from_args(args)
    if args.follow and not cfg.state_dir:
        raise InputError("--follow: needs a merge state to follow (--state or --demo)")
    source = StateSource(cfg) if cfg.state_dir else None
    server = PolicyServer(lambda: build_engine(cfg), scfg, source=source)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    port = server.start(wait_loaded=True)
    eng = server.holder.engine
    print(f"carve serve: listening on {args.host}:{port} "
          f"({'TLS' if args.tls_cert else 'plaintext'}{', token auth' if token else ''}); "
          f"{len(eng.skills())} skill(s), state {eng.info().get('state_version') or '-'}, "
          f"mode {eng.info().get('mode')}, router {eng.info().get('router')}"
          f"{', following the state' if args.follow else ''}"
          f"{_metrics_note(args.host, server.metrics_port)}", flush=True)
    stop.wait()
    print(f"carve serve: shutting down (finishing running episodes, up to {args.grace:g}s)",
          file=sys.stderr, flush=True)
    _exit_if_stuck(args.grace + 10.0)
    t0 = time.monotonic()
    server.stop(grace=args.grace)
    print(f"carve serve: stopped in {time.monotonic() - t0:.2f}s", file=sys.stderr, flush=True)
    return 0
