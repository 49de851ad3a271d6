"""What the runtime benchmarks share: an in-memory merge-state snapshot with random core and
rank-r residuals, and a round-robin minimum-time measurement."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from policy_server.tensors.entries import LowRank


class SyntheticSnapshot:
    """A ``StateSnapshot`` stand-in: ``core`` (key -> dense float32) and, per skill, a random
    rank-``rank`` ``LowRank`` residual (factors ~ N(0, scale^2)) on every key of ``targets``."""

    def __init__(self, shapes: dict[str, torch.Size], core_keys: Sequence[str],
                 targets: Sequence[str], skills: int, rank: int, core_scale: float,
                 scale: float, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.version, self.manifest = "bench", {}
        self._core = {k: torch.randn(shapes[k], generator=g) * core_scale for k in core_keys}
        self._res = {f"skill{i}": {k: LowRank(torch.randn(shapes[k][0], rank, generator=g) * scale,
                                              torch.randn(rank, shapes[k][1], generator=g) * scale)
                                   for k in targets} for i in range(skills)}

    def skill_names(self) -> list[str]:
        return list(self._res)

    def core(self) -> dict:
        return self._core

    def residuals(self, name: str) -> dict:
        return self._res[name]

    def skill(self, name: str) -> dict:
        return {"name": name, "instructions": []}

    def skill_artifacts(self, name: str) -> dict:
        return {}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(fns: dict[str, Callable[[], object]], reps: int, device: str = "cpu",
            warmup: int = 2) -> dict[str, float]:
    """Best (minimum) wall time in ms of each ``fn()`` over ``reps``, measured round-robin: on a
    shared CPU, load from other processes only ever adds time, so the minimum is the stable
    estimate of the cost and round-robin exposes every variant to the same conditions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            ts[k].append((time.perf_counter() - t) * 1e3)
    return {k: min(v) for k, v in ts.items()}
