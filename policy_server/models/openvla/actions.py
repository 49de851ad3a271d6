"""Action / proprio (un)normalisation of the OpenVLA family, as pure functions.

OpenVLA (discrete): token ``t`` -> bin ``clip(V - t - 1, 0, n_bins - 2)`` -> bin centre in
[-1, 1] -> ``0.5 (x + 1) (q99 - q01) + q01`` where ``mask`` (dimensions with ``mask`` false,
e.g. the gripper, pass through). OpenVLA-OFT (continuous): the same map with ``+ 1e-8`` on the
range, on q01/q99 (``bounds_q99``, LIBERO) or min/max (``bounds``, ALOHA); proprio goes the other
way, ``clip(2 (p - low) / (high - low + 1e-8) - 1, -1, 1)`` where ``mask``.
"""

from __future__ import annotations

import numpy as np
import torch

_EPS_OFT = 1e-8


def _low_high(stats: dict, normalization: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo_k, hi_k = ("min", "max") if normalization == "bounds" else ("q01", "q99")
    lo = torch.tensor(stats[lo_k], dtype=torch.float64)
    hi = torch.tensor(stats[hi_k], dtype=torch.float64)
    mask = torch.tensor(stats.get("mask", [True] * len(stats[lo_k])), dtype=torch.bool)
    return lo, hi, mask


def bin_centers(n_bins: int) -> torch.Tensor:
    """(n_bins - 1,) float64 centres of ``n_bins`` uniform edges on [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, n_bins)
    return torch.tensor((edges[:-1] + edges[1:]) / 2.0, dtype=torch.float64)


def tokens_to_normalized(tokens: torch.Tensor, vocab: int, centers: torch.Tensor) -> torch.Tensor:
    """(..., A) int64 token ids -> (..., A) float64 normalised actions (bin centres)."""
    bins = (vocab - tokens.cpu() - 1).clamp(0, len(centers) - 1)
    return centers[bins]


def unnormalize(x: torch.Tensor, stats: dict, normalization: str = "bounds_q99",
                eps: float = 0.0) -> torch.Tensor:
    """(..., A) normalised -> (..., A) float32 in dataset units. stats: a dataset's ``action``
    statistics; eps: 0 for OpenVLA, 1e-8 for OFT (what each published decoder adds)."""
    lo, hi, mask = _low_high(stats, normalization)
    x = x.to(torch.float64).cpu()
    return torch.where(mask, 0.5 * (x + 1.0) * (hi - lo + eps) + lo, x).float()


def normalize_proprio(p: np.ndarray, stats: dict, normalization: str = "bounds_q99") -> torch.Tensor:
    """(P,) raw proprio -> (P,) float32 in [-1, 1] (OFT's ``normalize_proprio``)."""
    lo, hi, mask = _low_high(stats, normalization)
    p = torch.as_tensor(np.asarray(p, dtype=np.float64))
    out = torch.where(mask, 2.0 * (p - lo) / (hi - lo + _EPS_OFT) - 1.0, p)
    return out.clamp(-1.0, 1.0).float()


def action_bounds(stats: dict, normalization: str = "bounds_q99") -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (low, high) the decoder can output: the dataset range where masked, [-1, 1]
    elsewhere (used as the spec's clip bounds)."""
    lo, hi, mask = _low_high(stats, normalization)
    m = mask.numpy()
    return np.where(m, lo.numpy(), -1.0), np.where(m, hi.numpy(), 1.0)


OFT_EPS = _EPS_OFT
