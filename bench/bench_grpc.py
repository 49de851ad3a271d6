"""gRPC round trip of one 224x224x3 observation with a no-op policy (transport cost only).

    .venv/bin/python bench/bench_grpc.py [--n 300] [--encode raw jpeg png]

Prints p50/p99 latency per image encoding, measured on loopback in one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from carve_client import PolicyClient

from bench.noop_engine import NoopEngine
from policy_server.models.base import ImageSpec, PolicySpec
from policy_server.service.server import PolicyServer, ServerConfig


def noop_engine(size: int) -> NoopEngine:
    spec = PolicySpec(state_dim=8, action_dim=7, chunk_length=8, action_low=[-1.0] * 7,
                      action_high=[1.0] * 7, images={"agentview": ImageSpec(size, size, 3)},
                      name="noop")
    return NoopEngine(spec, lambda: np.zeros((8, 7), np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="requests per encoding")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--encode", nargs="+", default=["raw", "jpeg", "png"])
    args = ap.parse_args()
    server = PolicyServer(noop_engine(args.size), ServerConfig(port=0))
    port = server.start()
    client = PolicyClient(f"127.0.0.1:{port}")
    rng = np.random.default_rng(0)
    # a smooth image (like a camera frame) so JPEG/PNG sizes are realistic, not noise-sized
    yy, xx = np.mgrid[0:args.size, 0:args.size]
    img = np.stack([(xx + yy) % 256, (2 * xx) % 256, (3 * yy) % 256], -1).astype(np.uint8)
    state = rng.standard_normal(8).astype(np.float32)
    print(f"gRPC round trip, {args.size}x{args.size}x3 image + 8-D state, no-op policy, "
          f"loopback, {args.n} requests per encoding")
    for enc in args.encode:
        with client.episode("noop", skill="noop") as ep:
            for _ in range(20):
                ep.infer(state, {"agentview": img}, encode=enc)
            lat = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                ep.infer(state, {"agentview": img}, encode=enc)
                lat.append((time.perf_counter() - t0) * 1e3)
        lat = np.array(lat)
        print(f"  {enc:5s} p50 {np.percentile(lat, 50):6.2f} ms   p99 {np.percentile(lat, 99):6.2f} "
              f"ms   mean {lat.mean():6.2f} ms")
    client.close()
    server.stop(1.0)


if __name__ == "__main__":
    main()
