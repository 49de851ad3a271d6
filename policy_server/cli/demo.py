"""``carve demo``: the whole product on the built-in demo, end to end, in a few minutes on a CPU.

Builds (or reuses) demo-VLA experts trained on Meta-World, admits them into a CARVE merge state,
starts the gRPC server on loopback, runs one Meta-World episode per skill through the real client
with the server's text router choosing the skill, prints the skill chosen and the success, and
stops the server cleanly. Exits non-zero if any step failed (a routing mistake counts as one).
"""

from __future__ import annotations

import sys
import time


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo (train, merge, serve, simulate)")
    p.add_argument("--episodes", type=int, default=1, help="Meta-World episodes per skill")
    p.add_argument("--rank", type=int, default=16, help="CARVE residual rank")
    p.add_argument("--force", action="store_true", help="rebuild the cached demo experts")
    p.add_argument("--mode", default="auto", choices=["auto", "fused", "side"])
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    import torch

    from carve_client import PolicyClient
    from clients.metaworld_client import run_task
    from policy_server.demo import ensure_demo_state
    from policy_server.service.server import PolicyServer, ServerConfig
    from policy_server.serving import EngineConfig, build_engine

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print("[demo] 1/4 building demo experts and the CARVE merge state (cached after the first run)")
    d = ensure_demo_state(rank=args.rank, force=args.force)
    factory = d["factory"]
    print(f"[demo]     base {d['base_dir']}\n[demo]     state {d['state_dir']}")
    print("[demo] 2/4 starting the gRPC policy server on loopback")
    server = PolicyServer(lambda: build_engine(EngineConfig(
        base_dir=d["base_dir"], state_dir=d["state_dir"], mode=args.mode)),
        ServerConfig(host="127.0.0.1", port=0))
    port = server.start()
    failures = 0
    try:
        client = PolicyClient(f"127.0.0.1:{port}")
        client.wait_ready(60)
        info = client.server_info()
        print(f"[demo]     serving {info['num_skills']} skills, state {info['state_version']}, "
              f"mode {info['mode']}, router {info['router']}")
        print("[demo] 3/4 one Meta-World episode per skill, routed by instruction")
        for expert in factory["experts"]:
            task, instruction = expert["tasks"][0], expert["instructions"][0]
            res = run_task(client, task, n_episodes=args.episodes, instruction=instruction)
            chosen = res.episodes[0].skill if res.episodes else None
            ok_route = all(e.skill == expert["name"] for e in res.episodes)
            failures += 0 if ok_route else 1
            print(f"[demo]     {instruction!r:48s} -> skill {chosen!s:10s} "
                  f"({'right' if ok_route else 'WRONG'} skill, confidence "
                  f"{res.episodes[0].confidence:.2f}); {task}: success "
                  f"{sum(e.success for e in res.episodes)}/{len(res.episodes)}")
        client.close()
    except Exception as e:  # noqa: BLE001 - any failed step fails the demo
        print(f"[demo] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        failures += 1
    finally:
        print("[demo] 4/4 stopping the server")
        server.stop(grace=5.0)
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s: "
          f"{'all steps succeeded' if not failures else f'{failures} step(s) failed'}")
    return 1 if failures else 0
