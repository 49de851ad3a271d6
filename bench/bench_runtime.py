"""Benchmark of the policy runtime: per-step latency of core-only / side path / fused weights,
fused skill-switch time, and MicroBatcher throughput for 8 concurrent episodes (mixed vs same
skill).

The model is a transformer-shaped stack with realistic Linear widths (d_model x d_model attention
projections, d_model x 4 d_model MLP), every Linear weight carrying a rank-``--rank`` residual per
skill. Example (what docs/RUNTIME.md quotes):

    python bench/bench_runtime.py --dim 1024 --layers 4 --tokens 16 --rank 32 --skills 4
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.synthetic import SyntheticSnapshot, compare
from policy_server.tensors.entries import LowRank
from policy_server.models.base import ObservationBatch, PolicyBackend, PolicySpec
from policy_server.runtime import ResidualLinear, ResidualStack
from policy_server.serving import EngineConfig, assemble_engine

STATE, CHUNK, ACT = 32, 8, 7


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = max(1, d // 64)

    def forward(self, x):  # (B, L, d)
        b, n, d = x.shape
        h = self.ln1(x)
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class BenchNet(nn.Module):
    def __init__(self, d: int, layers: int, tokens: int):
        super().__init__()
        self.tokens, self.d = tokens, d
        self.state_proj = nn.Linear(STATE, tokens * d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CHUNK * ACT)

    def forward(self, state):
        x = self.state_proj(state).view(-1, self.tokens, self.d)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1)).view(-1, CHUNK, ACT)


class BenchBackend(PolicyBackend):
    def __init__(self, d, layers, tokens):
        torch.manual_seed(0)
        self.module = BenchNet(d, layers, tokens)
        self.spec = PolicySpec(state_dim=STATE, action_dim=ACT, chunk_length=CHUNK,
                               action_low=[-1e3] * ACT, action_high=[1e3] * ACT, name="bench")

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32):
        raise NotImplementedError

    def predict(self, batch):
        p = self.module.head.weight
        return self.module(torch.from_numpy(batch.state).to(p.device, p.dtype)).float()


def bench_snapshot(module: nn.Module, skills: int, rank: int) -> SyntheticSnapshot:
    """Core on every tensor, rank-r residual on every Linear weight of every block, per skill."""
    sd = module.state_dict()
    targets = [k for k, v in sd.items() if k.startswith("blocks.") and v.dim() == 2]
    return SyntheticSnapshot({k: v.shape for k, v in sd.items()}, list(sd), targets, skills, rank,
                             core_scale=1e-3, scale=1e-2)


def obs(n: int, seed: int = 0) -> ObservationBatch:
    rng = np.random.default_rng(seed)
    return ObservationBatch(rng.standard_normal((n, STATE)).astype(np.float32), ["x"] * n)


def layer_overhead(d: int, tokens: int, rank: int, batch: int, reps: int, device: str) -> None:
    """One d -> 4d ``ResidualLinear`` alone (cheap enough for many reps on a noisy CPU): base
    forward vs SGMV (rows share skills) vs BGMV (every row its own skill) side path."""
    torch.manual_seed(0)
    base = nn.Linear(d, 4 * d).to(device)
    g = torch.Generator().manual_seed(0)
    lr = {k: LowRank(torch.randn(4 * d, rank, generator=g), torch.randn(rank, d, generator=g))
          for k in range(1, batch + 1)}
    st = ResidualStack("w", base.weight, batch, lr, {})
    layer = ResidualLinear.wrap(base, "bench", st, None)
    x = torch.randn(batch, tokens, d, device=device)
    shared = [1 + i % 4 for i in range(batch)]  # 4 skills, 2 rows each (SGMV at B=8)
    distinct = list(range(1, batch + 1))        # BGMV

    def bound(rows):
        def run():
            st.bind(rows, torch.tensor(rows, device=device),
                    {k: torch.tensor([i for i, r in enumerate(rows) if r == k], device=device)
                     for k in set(rows)})
            layer(x)
            st.unbind()
        return run
    with torch.inference_mode():
        t = compare({"base": lambda: base(x), "sgmv": bound(shared), "bgmv": bound(distinct)},
                    reps, device)
    print(f"layer {d}x{4 * d}, B={batch} x {tokens} tokens, r={rank}: base {t['base']:.2f} ms | "
          f"4 skills (SGMV) x{t['sgmv'] / t['base']:.3f} | {batch} skills (BGMV) "
          f"x{t['bgmv'] / t['base']:.3f} | theory x{1 + rank * 5 * d / (4 * d * d):.3f}")


def episodes(engine, skills: list[str], steps: int) -> tuple[float, list[int]]:
    """8 robot threads, each ``steps`` sequential steps through the serving engine (its
    MicroBatcher, as the gRPC service calls it): steps/s and the batch sizes."""
    start = threading.Barrier(len(skills))

    def robot(i):
        o = obs(1, seed=i)
        # episodes start together: otherwise robots settle into cohorts that never merge
        # (a cohort resubmits while the worker serves the other), halving batch sizes
        start.wait()
        for _ in range(steps):
            engine.infer(o, skills[i])
    threads = [threading.Thread(target=robot, args=(i,)) for i in range(len(skills))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    return len(skills) * steps / dt, list(engine.batcher.batch_sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per observation")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--skills", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="rows of the mixed batch")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="steps per episode (throughput)")
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on shared cores the default count is slower)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    layer_overhead(a.dim, a.tokens, a.rank, a.batch, 5 * a.reps, a.device)
    snap = bench_snapshot(BenchBackend(a.dim, a.layers, a.tokens).module, a.skills, a.rank)
    def make(mode: str):
        # the serving composition root, over the in-memory model and state
        return assemble_engine(BenchBackend(a.dim, a.layers, a.tokens), snap, EngineConfig(
            base_dir="", mode=mode, device=a.device, router="exact", max_batch=16,
            max_wait_ms=a.max_wait_ms))
    side_engine, fused_engine = make("side"), make("fused")
    side, fused = side_engine.runtime, fused_engine.runtime
    n_par = sum(p.numel() for p in side.backend.module.parameters())
    names = side.skill_names
    print(f"model: d={a.dim} layers={a.layers} tokens={a.tokens} params={n_par / 1e6:.1f}M "
          f"skills={a.skills} rank={a.rank} residuals={side.residual_bytes() / 2**20:.1f} MiB "
          f"torch_threads={torch.get_num_threads()}")
    one, many = obs(1), obs(a.batch)
    mixed = [names[i % len(names)] for i in range(a.batch)]
    dev = a.device
    with torch.inference_mode():
        for label, b in (("B=1", one), (f"B={a.batch}", many)):
            sk = [names[0]] * len(b)
            t = compare({"core": lambda: side.infer(b, [None] * len(b)),
                         "side": lambda: side.infer(b, sk),
                         "fused": lambda: fused.infer(b, sk)}, a.reps, dev)
            print(f"latency {label:>4} one skill: core-only {t['core']:7.2f} ms | side path "
                  f"{t['side']:7.2f} ms (x{t['side'] / t['core']:.3f}) | fused "
                  f"{t['fused']:7.2f} ms "
                  f"(x{t['fused'] / t['core']:.3f})")
        t = compare({"core": lambda: side.infer(many, [None] * len(many)),
                     "side": lambda: side.infer(many, mixed),
                     "groups": lambda: fused.infer(many, mixed)}, max(3, a.reps // 2), dev, 1)
        print(f"latency B={a.batch} {len(set(mixed))} skills mixed: side path {t['side']:7.2f} ms "
              f"(x{t['side'] / t['core']:.3f} of core-only {t['core']:.2f}) | fused per skill "
              f"group (switches) {t['groups']:7.2f} ms")
        k = [0]

        def switch():
            k[0] += 1
            fused.bank.switch(1 + k[0] % len(names))
        sw = compare({"sw": switch}, max(5, a.reps), dev)["sw"]
        touched = sum(fused.bank.index.tensors[key].numel() for key in fused.bank.touched(1))
        print(f"fused switch (unmerge + merge, {touched / 1e6:.1f}M params touched): {sw:.2f} ms")
    for e in (side_engine, fused_engine):
        e.close()
        e.runtime.close()
    for label, sk in (("mixed", [names[i % len(names)] for i in range(8)]),
                      ("same", [names[0]] * 8)):
        engine = make("auto")
        sps, sizes = episodes(engine, sk, a.steps)
        print(f"8 episodes x {a.steps} steps, {label}-skill via MicroBatcher(max_wait_ms="
              f"{a.max_wait_ms}): {sps:.1f} steps/s, mean batch {np.mean(sizes):.2f}")
        engine.close()
        engine.runtime.close()


if __name__ == "__main__":
    main()
