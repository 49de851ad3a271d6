"""Transport vs peers: carve-serve, an openpi-protocol server and LeRobot's async-inference protocol
side by side in one run (issue 11, item 1).

    .venv/bin/python bench/bench_transport.py [--repeats 3] [--images 1 2] [--policy-ms 20]
        [--calls 300] [--seconds 3] [--clients 8] [--lerobot-wheel lerobot-0.4.4-py3-none-any.whl]
        [--quick] [--json OUT]

Every peer serves the same no-op policy returning a (50, 7) float32 chunk (optionally sleeping
``--policy-ms`` to emulate a forward pass) for the same observation (224x224x3 uint8 images + 8-D
float32 state), each server in its own subprocess on 127.0.0.1, each robot client in its own
subprocess:

* carve-serve: the real ``PolicyServer`` + ``PolicyClient`` episode stream (raw images);
* openpi: a websockets + msgpack-numpy server written here from openpi's published protocol, the
  policy run inline on its event loop (as openpi does); PyPI's ``openpi-client``
  ``WebsocketClientPolicy`` as client when importable (``pip install --no-deps openpi-client``:
  it pins numpy<2), else a minimal client speaking the same protocol;
* LeRobot: its generated ``AsyncInference`` gRPC stubs (loaded from ``--lerobot-wheel`` or an
  importable ``lerobot``, skipped with a reason otherwise), pickled observations and action
  chunks, a per-client observation queue (LeRobot as shipped has one shared queue, so it cannot
  serve 8 clients), its 4-worker thread pool;
* gRPC floor (a reference, not a competitor): a grpc.aio server echoing pre-serialized responses
  to the bytes of carve's request, with identity (de)serializers and no servicer code, driven the
  way ``PolicyClient`` drives its stream: what gRPC Python itself costs for these messages
  (``bench/transport/grpc_floor_peer.py``).

Scenarios, per number of images: 1 client (p50/p90 ms over ``--calls`` calls after warm-up),
``--clients`` clients (total calls/s over ``--seconds``), and the same with the ``--policy-ms``
policy. Rounds are interleaved (each repeat runs every peer for a scenario before the next; the
peer order rotates per repeat); figures are medians over the repeats. Prints a markdown table with
the ratios of issue 11's goals: carve p50 / openpi p50 <= 0.8, carve throughput / openpi's >= 1.2,
carve throughput with the slow policy / openpi's >= 8. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time

from bench.transport.common import THREAD_ENV, set_threads

PEERS = ("carve", "openpi", "lerobot", "floor")
LABEL = {"carve": "carve-serve", "openpi": "openpi websocket",
         "lerobot": "LeRobot async (gRPC + pickle)", "floor": "gRPC floor (bytes echo)"}
GOALS = {"latency": ("<=", 0.8), "throughput": (">=", 1.2), "slow": (">=", 8.0)}


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                    help="image counts to run (default both)")
    ap.add_argument("--policy-ms", type=float, default=20.0,
                    help="the slow-policy scenario's sleep")
    ap.add_argument("--calls", type=int, default=None,
                    help="timed calls of the 1-client scenario (default 300; --quick: 40)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls per client first (default 30; --quick: 5)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="duration of a throughput round (default 3; --quick: 1)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--lerobot-wheel", default=None,
                    help="lerobot .whl (pip download --no-deps lerobot==0.4.4) or unpacked dir; "
                         "default: an importable lerobot")
    ap.add_argument("--quick", action="store_true", help="smoke run: few calls, 1 repeat")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--max-seconds", type=float, default=3600.0,
                    help="every subprocess exits after this long whatever happens")
    a = ap.parse_args()
    defaults = dict(repeats=1, calls=40, warmup=5, seconds=1.0) if a.quick else \
        dict(repeats=3, calls=300, warmup=30, seconds=3.0)
    for k, v in defaults.items():  # explicit options win over --quick
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


class Peer:
    """The server subprocesses of one peer kind: one per policy delay."""

    def __init__(self, ctx, kind: str, policy_ms_values, images, stub_dir, max_seconds):
        from bench.transport import carve_peer, grpc_floor_peer, lerobot_peer, openpi_peer
        self.kind = kind
        self.ports: dict[tuple[float, int], int] = {}
        self._procs = []
        for ms in policy_ms_values:
            parent, child = ctx.Pipe()
            if kind == "carve":
                target, args = carve_peer.serve, (ms, list(images), child, max_seconds)
            elif kind == "openpi":
                target, args = openpi_peer.serve, (ms, child, max_seconds)
            elif kind == "floor":
                target, args = grpc_floor_peer.serve, (ms, list(images), child, max_seconds)
            else:
                target, args = lerobot_peer.serve, (stub_dir, ms, child, max_seconds)
            p = ctx.Process(target=target, args=args, daemon=True, name=f"serve-{kind}-{ms:g}ms")
            p.start()
            self._procs.append((p, parent, ms))
        for p, parent, ms in self._procs:
            if not parent.poll(180):
                raise RuntimeError(f"{kind} server ({ms:g} ms) did not start within 180 s")
            msg = parent.recv()
            for n in images:
                self.ports[(ms, n)] = msg["ports"][n] if "ports" in msg else msg["port"]

    def stop(self) -> None:
        for p, parent, _ in self._procs:
            try:
                parent.send("stop")
            except (BrokenPipeError, OSError):
                pass
        for p, _, _ in self._procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


class Clients:
    """A pool of client subprocesses sharing one barrier (the throughput rounds start together)."""

    def __init__(self, ctx, n: int, stub_dir, max_seconds):
        from bench.transport.clients import worker
        self.barrier = ctx.Barrier(n)
        self._conns, self._procs = [], []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(i, child, self.barrier, stub_dir, max_seconds),
                            daemon=True, name=f"client-{i}")
            p.start()
            self._conns.append(parent)
            self._procs.append(p)
        for c in self._conns:
            if not c.poll(180):
                raise RuntimeError("client workers did not start within 180 s")
            c.recv()

    def run(self, task: dict, n: int, timeout: float) -> list[dict]:
        task = dict(task, sync=n > 1)
        if n > 1:
            self.barrier.reset()
        for c in self._conns[:n]:
            c.send(task)
        out = []
        for c in self._conns[:n]:
            out.append(c.recv() if c.poll(timeout) else {"error": f"no answer within {timeout} s"})
        return out

    def stop(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


def _pct(values, q):
    import numpy as np
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _median(values):
    import numpy as np
    v = [x for x in values if x == x]
    return float(np.median(v)) if v else float("nan")


def scenarios(args) -> list[dict]:
    out = []
    for n in args.images:
        out.append({"key": f"{n}img-1client", "images": n, "mode": "latency", "clients": 1,
                    "policy_ms": 0.0, "goal": "latency"})
        out.append({"key": f"{n}img-{args.clients}clients", "images": n, "mode": "throughput",
                    "clients": args.clients, "policy_ms": 0.0, "goal": "throughput"})
        out.append({"key": f"{n}img-{args.clients}clients-{args.policy_ms:g}ms", "images": n,
                    "mode": "throughput", "clients": args.clients, "policy_ms": args.policy_ms,
                    "goal": "slow"})
    return out


def measure(clients: Clients, peer: Peer, sc: dict, args) -> dict:
    task = {"kind": peer.kind, "port": peer.ports[(sc["policy_ms"], sc["images"])],
            "n_images": sc["images"], "mode": sc["mode"], "warmup": args.warmup,
            "calls": args.calls, "seconds": args.seconds}
    res = clients.run(task, sc["clients"], timeout=120 + args.seconds + args.calls * 0.2)
    errors = [r["error"] for r in res if "error" in r]
    if errors:
        return {"error": errors[0], "n_errors": len(errors)}
    if sc["mode"] == "latency":
        lat = res[0]["lat_ms"]
        return {"p50_ms": _pct(lat, 50), "p90_ms": _pct(lat, 90), "p99_ms": _pct(lat, 99),
                "calls": len(lat), "impl": res[0]["impl"]}
    rate = sum(r["count"] / r["elapsed_s"] for r in res)
    lat = [x for r in res for x in r["lat_ms"]]
    return {"calls_per_s": rate, "calls": sum(r["count"] for r in res), "p50_ms": _pct(lat, 50),
            "per_client_calls": [r["count"] for r in res], "impl": res[0]["impl"]}


def summarise(results: dict, scs: list[dict], peers: list[str]) -> dict:
    out = {}
    for sc in scs:
        row = {}
        for p in peers:
            reps = [r for r in results.get((sc["key"], p), []) if "error" not in r]
            if not reps:
                errs = [r["error"] for r in results.get((sc["key"], p), [])]
                row[p] = {"error": errs[0] if errs else "not run"}
            elif sc["mode"] == "latency":
                row[p] = {"p50_ms": _median([r["p50_ms"] for r in reps]),
                          "p90_ms": _median([r["p90_ms"] for r in reps]), "repeats": len(reps)}
            else:
                v = [r["calls_per_s"] for r in reps]
                row[p] = {"calls_per_s": _median(v), "min": min(v), "max": max(v),
                          "repeats": len(reps)}
        out[sc["key"]] = row
    return out


def _cell(sc, v) -> str:
    if v is None:
        return "skipped"
    if "error" in v:
        return "error"
    if sc["mode"] == "latency":
        return f"{v['p50_ms']:.2f} / {v['p90_ms']:.2f}"
    if v["repeats"] > 1:
        return f"{v['calls_per_s']:.0f} ({v['min']:.0f}-{v['max']:.0f})"
    return f"{v['calls_per_s']:.0f}"


def ratio(sc, row) -> float | None:
    c, o = row.get("carve"), row.get("openpi")
    if not c or not o or "error" in c or "error" in o:
        return None
    if sc["mode"] == "latency":
        return c["p50_ms"] / o["p50_ms"]
    return c["calls_per_s"] / o["calls_per_s"]


def table(summary, scs, args, skipped: dict) -> str:
    cols = list(PEERS)
    lines = ["| scenario | " + " | ".join(LABEL[p] for p in cols) + " | carve / openpi | goal |",
             "|---" * (len(cols) + 3) + "|"]
    for sc in scs:
        name = {"latency": "1 client, p50 / p90 ms",
                "throughput": f"{sc['clients']} clients, calls/s",
                "slow": f"{sc['clients']} clients, {sc['policy_ms']:g} ms policy, calls/s",
                }[sc["goal"]]
        row = summary[sc["key"]]
        cells = [_cell(sc, row.get(p)) if p not in skipped else "skipped" for p in cols]
        r = ratio(sc, row)
        op, g = GOALS[sc["goal"]]
        met = "" if r is None else (" met" if (r <= g if op == "<=" else r >= g) else " not met")
        lines.append(f"| {sc['images']} image{'s' if sc['images'] > 1 else ''}, {name} | "
                     + " | ".join(cells) + f" | {'-' if r is None else f'{r:.2f}'} | "
                     + f"{op} {g:g}{met} |")
    return "\n".join(lines)


def main() -> None:
    args = _parse()
    for k in THREAD_ENV:              # inherited by every spawned server and client
        os.environ[k] = "1"
    set_threads()
    from bench.transport.lerobot_peer import find_stub_dir, load_stubs
    peers = list(args.peers)
    skipped: dict[str, str] = {}
    stub_dir = None
    if "lerobot" in peers:
        stub_dir, why = find_stub_dir(args.lerobot_wheel)
        if stub_dir is not None:
            try:  # fail here, not in the server subprocess, if the stubs cannot load
                load_stubs(stub_dir)
            except Exception as e:  # e.g. a protobuf runtime older than the gencode
                stub_dir, why = None, f"its stubs do not load: {type(e).__name__}: {e}"
        if stub_dir is None:
            skipped["lerobot"] = why
            peers.remove("lerobot")
            print(f"LeRobot peer skipped: {why}", flush=True)
        else:
            print(f"LeRobot peer: {why}", flush=True)
    if "openpi" in peers:
        try:
            import openpi_client  # noqa: F401
            print("openpi peer: client = PyPI openpi-client WebsocketClientPolicy", flush=True)
        except ImportError:
            print("openpi peer: openpi-client not importable; client = own minimal client of the "
                  "same protocol", flush=True)

    ctx = mp.get_context("spawn")
    scs = scenarios(args)
    policy_values = sorted({sc["policy_ms"] for sc in scs})
    started, clients = [], None
    results: dict = {}
    t_all = time.time()
    try:
        for kind in peers:
            started.append(Peer(ctx, kind, policy_values, args.images, stub_dir, args.max_seconds))
        clients = Clients(ctx, max(sc["clients"] for sc in scs), stub_dir, args.max_seconds)
        by_kind = {p.kind: p for p in started}
        print(f"servers and {args.clients} client processes up ({time.time() - t_all:.1f} s); "
              f"{args.repeats} repeat(s), {len(scs)} scenarios", flush=True)
        for rep in range(args.repeats):
            order = peers[rep % len(peers):] + peers[:rep % len(peers)]
            for sc in scs:
                for kind in order:
                    r = measure(clients, by_kind[kind], sc, args)
                    r["repeat"] = rep
                    results.setdefault((sc["key"], kind), []).append(r)
                    show = (r["error"] if "error" in r else
                            f"p50 {r['p50_ms']:.2f} ms p90 {r['p90_ms']:.2f} ms"
                            if sc["mode"] == "latency" else f"{r['calls_per_s']:.0f} calls/s")
                    print(f"  repeat {rep + 1}/{args.repeats}  {sc['key']:<22s} {kind:<8s} {show}",
                          flush=True)
    finally:
        if clients is not None:
            clients.stop()
        for p in started:
            p.stop()

    summary = summarise(results, scs, peers)
    print()
    print(f"Transport vs peers: no-op policy -> (50, 7) float32, 224x224x3 uint8 image(s) + 8-D "
          f"float32 state, loopback, median of {args.repeats} interleaved repeat(s); "
          f"1 client: {args.calls} calls after {args.warmup} warm-up; throughput: "
          f"{args.seconds:g} s rounds; {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print()
    print(table(summary, scs, args, skipped))
    for k, why in skipped.items():
        print(f"\n{LABEL[k]}: skipped ({why})")
    if "lerobot" in peers:
        print("\nLeRobot: per-client observation queue (as shipped one shared queue: a second "
              "client's Ready resets the first's); its 4-worker thread pool kept.")
    if args.json:
        out = {"args": vars(args), "skipped": skipped, "summary": summary,
               "ratios": {sc["key"]: ratio(sc, summary[sc["key"]]) for sc in scs},
               "runs": {f"{k[0]}/{k[1]}": v for k, v in results.items()},
               "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
               "wall_s": time.time() - t_all}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
