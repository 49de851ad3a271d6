"""Benchmark of the served OpenVLA / OpenVLA-OFT backend: per-step latency fused vs side path
(B = 1 and B = 8 mixed skills), the fused skill-switch time, tokens/s of the greedy action decode,
and the resident-memory accounting of base + core + N rank-r residuals vs N full checkpoints
(from the published 7B shapes, built on the meta device, and measured on the model served).

Random weights in the published layout (``policy_server.models.openvla.tiny``); every Linear of
the language model and the projector (and the OFT action head) carries a rank-r residual per skill.

    python bench/bench_openvla.py --threads 1                     # tiny OpenVLA + OFT on the CPU
    python bench/bench_openvla.py --dims 7b --device cuda --rank 64 --skills 4   # a GPU, 7B shapes
    python bench/bench_openvla.py --accounting-only               # the 7B memory table only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy_server.models.base import ObservationBatch  # noqa: E402
from policy_server.models.openvla import tiny  # noqa: E402
from policy_server.models.openvla.config import parse_config  # noqa: E402
from bench.synthetic import SyntheticSnapshot, compare  # noqa: E402

GiB = 2 ** 30


def residual_targets(sd: dict) -> list[str]:
    """The 2-D weights a LoRA-style OpenVLA fine-tune changes: LM + projector (+ OFT head)."""
    pre = ("language_model.model.layers.", "projector.", "action_head.", "proprio_projector.")
    return [k for k, v in sd.items() if v.dim() == 2 and k.startswith(pre) and k.endswith(".weight")]


def accounting(rank: int, ns=(1, 4, 10, 40), bytes_per=2) -> None:
    """Resident bytes (bf16) from the published OpenVLA-7B shapes (meta device: nothing allocated)."""
    from policy_server.models.openvla.model import OpenVLAModule

    cfg = parse_config(tiny.make_config(dims="7b"))
    with torch.device("meta"):
        sd = OpenVLAModule(cfg).state_dict()
    model = sum(v.numel() for v in sd.values()) * bytes_per
    res = sum(rank * (sd[k].shape[0] + sd[k].shape[1]) for k in residual_targets(sd)) * bytes_per
    print(f"OpenVLA-7B shapes: {sum(v.numel() for v in sd.values()) / 1e9:.3f} B params, "
          f"{model / GiB:.2f} GiB bf16; one rank-{rank} residual on {len(residual_targets(sd))} "
          f"matrices (LM + projector): {res / GiB:.3f} GiB")
    for n in ns:
        served = model + n * res  # base + core are folded into one copy by the runtime
        print(f"  N={n:3d}: base+core+N residuals {served / GiB:7.2f} GiB | N full checkpoints "
              f"{n * model / GiB:8.2f} GiB | ratio {served / (n * model):.3f}")


def bench_snapshot(sd: dict, skills: int, rank: int) -> SyntheticSnapshot:
    """A small dense core and rank-r residuals on every target, per skill."""
    tg = residual_targets(sd)
    return SyntheticSnapshot({k: v.shape for k, v in sd.items()}, tg[:4], tg, skills, rank,
                             core_scale=1e-4, scale=1e-3)


def make_backend(dims: str, oft: bool, device: str):
    from policy_server.models.openvla.backend import OpenVLABackend
    from policy_server.models.openvla.model import OpenVLAModule

    raw = tiny.make_config(dims=dims, unnorm_key="libero_spatial_no_noops")
    if oft:
        raw["norm_stats"] = tiny.oft_norm_stats()
        raw["carve_oft"] = dict(tiny.OFT, num_actions_chunk=8 if dims == "7b" else tiny.CHUNK)
    cfg = parse_config(raw)
    with torch.device(device):  # built where it runs: a 7B model is never materialised twice
        module = OpenVLAModule(cfg)
    if dims == "tiny":
        tiny.randomize_(module, 0)
    vocab = cfg.tokenizer_vocab_size
    return OpenVLABackend(cfg, module, tiny.make_tokenizer(vocab), device=device)


def obs(backend, n: int, seed: int = 0) -> ObservationBatch:
    rng = np.random.default_rng(seed)
    s = backend.config.image_sizes[0]
    imgs = {k: rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) for k in backend.spec.images}
    instr = ["pick up the black bowl between the plate and the ramekin and place it on the plate"] * n
    return ObservationBatch(rng.normal(size=(n, backend.spec.state_dim)).astype(np.float32), instr, imgs)


def best_ms(fn, reps: int, device: str, warmup: int = 1) -> float:
    """Minimum wall time in ms over ``reps`` (load from other processes only adds time)."""
    return compare({"fn": fn}, reps, device, warmup)["fn"]


def run_family(a, oft: bool) -> None:
    from policy_server.serving import EngineConfig, assemble_engine

    dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    sd = make_backend(a.dims, oft, "meta").module.state_dict()
    snap = bench_snapshot(sd, a.skills, a.rank)
    engines = {m: assemble_engine(make_backend(a.dims, oft, a.device), snap, EngineConfig(
        base_dir="", mode=m, device=a.device, dtype=dtype, router="exact", max_wait_ms=0.0))
        for m in ("side", "fused")}
    side, fused = engines["side"].runtime, engines["fused"].runtime
    names = side.skill_names
    be = side.backend
    label = "OFT" if oft else "OpenVLA"
    n_par = sum(p.numel() for p in be.module.parameters())
    elem = 2 if dtype == "bfloat16" else 4
    pq = sum(a.rank * (sd[k].shape[0] + sd[k].shape[1]) for k in residual_targets(sd)) * a.skills * elem
    print(f"{label} ({a.dims}, {n_par / 1e6:.1f}M params, {a.device} {dtype}): {a.skills} skills at "
          f"rank {a.rank}, runtime residual bytes {side.residual_bytes() / 2**20:.1f} MiB "
          f"(P, Q factors alone: {pq / 2**20:.1f} MiB)")
    with torch.inference_mode():
        for b in (1, a.batch):
            o = obs(be, b)
            one = [names[0]] * b
            t = {"core": best_ms(lambda: side.infer(o, [None] * b), a.reps, a.device),
                 "side": best_ms(lambda: side.infer(o, one), a.reps, a.device),
                 "fused": best_ms(lambda: fused.infer(o, one), a.reps, a.device)}
            toks = "" if oft else f", {b * be.spec.action_dim / (t['fused'] / 1e3):.0f} action tokens/s fused"
            print(f"  B={b:<2d} one skill: core-only {t['core']:8.2f} ms | side {t['side']:8.2f} ms | "
                  f"fused {t['fused']:8.2f} ms{toks}")
        o = obs(be, a.batch)
        mixed = [names[i % len(names)] for i in range(a.batch)]
        ts = best_ms(lambda: side.infer(o, mixed), a.reps, a.device)
        tg = best_ms(lambda: fused.infer(o, mixed), max(1, a.reps // 2), a.device)
        print(f"  B={a.batch} {len(set(mixed))} skills mixed: side path {ts:8.2f} ms | fused per "
              f"skill group {tg:8.2f} ms")
        k = [0]

        def switch():
            k[0] += 1
            fused.bank.switch(1 + k[0] % len(names))
        print(f"  fused skill switch (unmerge + merge): {best_ms(switch, a.reps, a.device):.2f} ms")
    for e in engines.values():
        e.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", choices=("tiny", "7b"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=None, help="default: 8 tiny, 64 for 7b")
    ap.add_argument("--skills", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--families", default="openvla,oft")
    ap.add_argument("--accounting-only", action="store_true")
    a = ap.parse_args()
    a.rank = a.rank or (64 if a.dims == "7b" else 8)
    if a.threads:
        torch.set_num_threads(a.threads)
    accounting(64)
    if a.accounting_only:
        return
    for fam in a.families.split(","):
        run_family(a, oft=fam == "oft")


if __name__ == "__main__":
    main()
