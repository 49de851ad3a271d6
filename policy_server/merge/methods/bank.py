"""The full expert bank: every skill keeps its whole task vector (the accuracy ceiling).

No shared core; skill ``i`` runs as ``base + tau_i`` exactly. Storage is ``T * P``, the
denominator CARVE's storage fraction is reported against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from policy_server.errors import InputError
from policy_server.merge.methods.base import (
    AdmitResult,
    MergeMethod,
    TensorContext,
    TensorState,
    register_method,
)
from policy_server.tensors.entries import Dense


@dataclass
class BankOptions:
    """The bank has no knobs: it stores every task vector exactly."""


@register_method
class ExpertBankMethod(MergeMethod):
    """Keeps ``Dense(tau)`` per skill and tensor; the core stays None (base + 0)."""

    name: ClassVar[str] = "bank"
    aliases: ClassVar[tuple[str, ...]] = ("expert-bank",)
    options_cls: ClassVar[type] = BankOptions
    continual: ClassVar[bool] = True
    per_skill: ClassVar[bool] = True

    def admit_tensor(self, ctx: TensorContext, tau: torch.Tensor, state: TensorState, t: int,
                     skill: str) -> AdmitResult:
        """Store tau (float32, ``ctx.shape``) as the skill's ``Dense`` entry; no core."""
        if tuple(tau.shape) != tuple(ctx.shape):
            raise InputError(f"bank: task vector for {ctx.name!r} has shape {tuple(tau.shape)}, "
                             f"expected {tuple(ctx.shape)}")
        tau = tau.float().contiguous()
        return AdmitResult(core=None, aux={}, entry=Dense(tau),
                           info={"kind": "dense", "rank": None, "rel_error": 0.0,
                                 "tau_norm": float(torch.linalg.vector_norm(tau))})
