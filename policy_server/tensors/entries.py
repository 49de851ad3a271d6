"""Per-skill residual entries: how one skill's weights differ from ``base + core`` for one tensor.

Every merge method produces these, the state store persists them and the runtime applies them, so
this file is the contract between the three. All tensors are float32 while in memory; the state
store casts to its storage dtype on write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """Skill delta = core + P @ Q.

    P: (m, r) float32, Q: (r, n) float32. ``rel_error`` is the achieved relative Frobenius error
    ``|R - P Q|_F / |R|_F`` of the truncation (0.0 when R was zero).
    """

    P: torch.Tensor
    Q: torch.Tensor
    rel_error: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.P.shape[1])

    def numel(self) -> int:
        return self.P.numel() + self.Q.numel()

    def materialize(self) -> torch.Tensor:
        """Dense (m, n) float32 residual."""
        return self.P.float() @ self.Q.float()


@dataclass
class Dense:
    """Skill delta = core + D, D the same shape as the tensor (1-D tensors, heads, small matrices)."""

    D: torch.Tensor

    def numel(self) -> int:
        return self.D.numel()

    def materialize(self) -> torch.Tensor:
        return self.D.float()


@dataclass
class Masked:
    """Skill delta = mask * core (TALL / MergeVLA task masks). ``mask`` is a bool tensor.

    Stored bit-packed on disk (1 bit per coordinate); ``numel`` counts stored bytes' worth of
    parameters as mask.numel() / 32 float32-equivalents so storage accounting stays comparable.
    """

    mask: torch.Tensor

    def numel(self) -> int:
        return (self.mask.numel() + 31) // 32

    def materialize_delta(self, core: torch.Tensor) -> torch.Tensor:
        """Full skill delta (not residual) given the tensor's core, float32."""
        return core.float() * self.mask.to(torch.float32)


ResidualEntry = LowRank | Dense | Masked


def skill_delta(core: torch.Tensor | None, entry: ResidualEntry | None, shape) -> torch.Tensor:
    """The skill's full delta (effective weight minus base) for one tensor, float32."""
    c = core.float() if core is not None else torch.zeros(shape, dtype=torch.float32)
    if entry is None:
        return c
    if isinstance(entry, Masked):
        return entry.materialize_delta(c)
    return c + entry.materialize()
