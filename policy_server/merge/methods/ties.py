"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge, scale.

Per tensor, float32, over N task vectors ``tau_i``::

    trim     t_i  = tau_i * [|tau_i| >= thr_i]   thr_i: k-th largest |tau_i|, k = int(density * n)
    elect    s    = sign(sum_i t_i)                 ("mass"; "count": sign(sum_i sign(t_i)))
    disjoint a_i  = [sign(t_i) == s] * [s != 0]
             m    = sum_i a_i t_i / max(1, sum_i a_i)   ("mean"; "sum": no division;
                                                         "max": s * max_i a_i |t_i|)
    core     C    = lam * m

Zeros never survive the trim (a zero carries no sign). ``trim_scope="tensor"`` (mergekit) ranks
each task vector within the tensor; ``trim_scope="global"`` (FusionBench) ranks each task vector
over *all* merged tensors, which needs a first pass (``observe_tensor``). That pass keeps, per
task, a histogram of ``log2 |tau|`` with ``BINS_PER_OCTAVE`` bins per octave (128 KiB per task),
never the tensors; the threshold is the lower edge of the bin holding the k-th largest value, so
it is exact up to a factor ``2**(1/256)`` (~0.27 %), and a tensor's trim is decided by comparing
bin indices computed the same way in both passes (no float edge disagreement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from policy_server.errors import StateError
from policy_server.merge.blocks import kth_smallest_abs
from policy_server.merge.methods.base import (
    MergeMethod,
    MergeResult,
    TensorContext,
    register_method,
)
from policy_server.merge.methods.common import check_choice, check_float, check_taus

TRIM_SCOPES = ("tensor", "global")
CONSENSUS = ("mass", "count")
MERGE_FUNCS = ("mean", "sum", "max")

#: histogram of log2|tau| for the global trim: bins per octave and covered octaves. Values below
#: 2**LOG2_MIN fall in bin 0 and above 2**LOG2_MAX in the last bin (float32 deltas of real
#: checkpoints live well inside this range).
BINS_PER_OCTAVE = 256
LOG2_MIN = -48.0
LOG2_MAX = 16.0
N_BINS = int((LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE)


# ------------------------------------------------------------------------------------------------
# building blocks, shared with DARE-TIES


def topk_rank(n: int, density: float) -> int | None:
    """The rank (1-based, ascending) of the top-k threshold among ``n`` magnitudes, k =
    ``int(density * n)`` (at least one when density > 0): the k-th largest = the (n-k+1)-th
    smallest. None when no threshold applies (density >= 1: all nonzero kept) and 0 when
    nothing is kept."""
    if density >= 1.0:
        return None
    k = max(1, int(density * n)) if density > 0 else 0
    return 0 if k == 0 or n == 0 else n - k + 1


def magnitude_mask(tau: torch.Tensor, thr: torch.Tensor | None) -> torch.Tensor:
    """Bool mask keeping ``|tau| >= thr`` (None: every entry); zeros are never kept."""
    if thr is None:
        return tau != 0
    return (tau.abs() >= thr) & (tau != 0)


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask (tau's shape) keeping the ``int(density * numel)`` largest |tau| (at least one
    when density > 0); entries tied with the k-th largest are kept too; zeros are never kept."""
    rank = topk_rank(tau.numel(), density)
    if rank == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    # kthvalue is a selection, not a sort
    thr = None if rank is None else torch.kthvalue(tau.abs().reshape(-1), rank).values
    return magnitude_mask(tau, thr)


def log2_bins(tau: torch.Tensor) -> torch.Tensor:
    """int64 histogram bin of every |tau| (same shape); zeros get -1 (never counted, never kept)."""
    mag = tau.abs()
    with torch.no_grad():
        b = torch.floor((torch.log2(mag.clamp_min(1e-45)) - LOG2_MIN) * BINS_PER_OCTAVE)
        b = b.clamp_(0, N_BINS - 1).to(torch.int64)
    return torch.where(mag > 0, b, torch.full_like(b, -1))


def elect_sign(trimmed: torch.Tensor, consensus: str) -> torch.Tensor:
    """trimmed: (N, ...) float32 -> elected sign (...) in {-1, 0, +1} float32."""
    if consensus == "mass":
        return torch.sign(trimmed.sum(0))
    return torch.sign(torch.sign(trimmed).sum(0))


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge_func: str) -> torch.Tensor:
    """Combine the entries of ``trimmed`` (N, ...) whose sign agrees with ``sign`` (...).

    A coordinate whose elected sign is 0 merges to 0 (mergekit elects with ``sum >= 0``, so there a
    tie elects +; FusionBench replaces a zero elected sign by the majority of the elected signs).
    """
    agree = (torch.sign(trimmed) == sign.unsqueeze(0)) & (sign != 0).unsqueeze(0)
    kept = trimmed * agree
    if merge_func == "sum":
        return kept.sum(0)
    if merge_func == "max":
        return sign * kept.abs().amax(0)
    count = agree.sum(0).clamp_min(1).to(torch.float32)
    return kept.sum(0) / count


# ------------------------------------------------------------------------------------------------


@dataclass
class TiesOptions:
    density: float = field(default=0.2, metadata={"help": (
        "fraction of each task vector's entries kept by the trim (top-k by |tau|); 0.2 = the TIES "
        "paper's k=20% and FusionBench's threshold=20 (mergekit's default 1.0 = no trim)")})
    trim_scope: str = field(default="tensor", metadata={"help": (
        "'tensor': rank |tau| within each tensor (mergekit); 'global': rank each task vector "
        "over all merged tensors (FusionBench; needs an extra streaming pass that keeps only a "
        "log-magnitude histogram per task)")})
    consensus: str = field(default="mass", metadata={"help": (
        "sign election: 'mass' (sign of the summed trimmed values: the paper, FusionBench, "
        "mergekit 'sum') or 'count' (majority of signs: mergekit 'count')")})
    merge_func: str = field(default="mean", metadata={"help": (
        "disjoint merge of the sign-agreeing values: 'mean' (paper; mergekit normalize=true), "
        "'sum' (mergekit normalize=false; FusionBench's config default) or 'max'")})
    lam: float = field(default=1.0, metadata={"help": (
        "scaling of the merged task vector (paper lambda, mergekit lambda default 1.0; "
        "FusionBench's config: scaling_factor 0.5 with merge_func sum)")})

    def __post_init__(self):
        self.density = check_float("ties", "density", self.density, 0.0, 1.0, lo_open=True)
        check_choice("ties", "trim_scope", self.trim_scope, TRIM_SCOPES)
        check_choice("ties", "consensus", self.consensus, CONSENSUS)
        check_choice("ties", "merge_func", self.merge_func, MERGE_FUNCS)
        self.lam = check_float("ties", "lam", self.lam)


@register_method
class Ties(MergeMethod):
    """TIES-Merging; core = lam * disjoint-merge(elect(trim(tau_i))). No per-skill entries."""

    name = "ties"
    aliases = ("ties-merging",)
    options_cls = TiesOptions
    continual = False
    per_skill = False
    # Class-level True so a caller that only looks at the class still runs the pass; each
    # instance overrides it with what its options need (only the global trim needs it).
    needs_observe_pass = True

    def __init__(self, options=None, seed: int = 0):
        super().__init__(options, seed)
        self.needs_observe_pass = self.options.trim_scope == "global"
        self._hist: torch.Tensor | None = None      # (N, N_BINS) int64 counts of nonzero |tau|
        self._numel = 0                             # entries seen per task, zeros included
        self._thr_bins: torch.Tensor | None = None  # (N,) int64 first kept bin per task
        self._observed: set[str] = set()

    # observe pass (global trim) ----------------------------------------------------------------
    def observe_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> None:
        """Add this tensor's |tau_i| to the per-task histograms (global trim only)."""
        if self.options.trim_scope != "global":
            return
        taus = check_taus(self.name, ctx, taus)
        self._observe_add(ctx, self._task_hist(taus), taus[0].numel())

    def observe_blocked(self, ctx: TensorContext, blocks) -> None:
        """:meth:`observe_tensor` from row blocks: the histograms add up block by block. A
        tensor no expert changed is not counted (as the stream skips it on the whole path)."""
        if self.options.trim_scope != "global":
            return
        hist = torch.zeros(blocks.n, N_BINS, dtype=torch.int64)
        for _a, _b, taus in blocks:
            hist += self._task_hist(taus)
        if blocks.any_nonzero:
            self._observe_add(ctx, hist, math.prod(ctx.shape))

    @staticmethod
    def _task_hist(taus: list[torch.Tensor]) -> torch.Tensor:
        """(N, N_BINS) counts of the nonzero |tau_i| per log2 bin."""
        hist = torch.zeros(len(taus), N_BINS, dtype=torch.int64)
        for i, tau in enumerate(taus):
            b = log2_bins(tau).reshape(-1)
            hist[i] = torch.bincount(b[b >= 0], minlength=N_BINS)
        return hist

    def _observe_add(self, ctx: TensorContext, hist: torch.Tensor, numel: int) -> None:
        """Count one observed tensor (``hist``: its (N, N_BINS) histogram, ``numel``: entries
        per task, zeros included) into the run's totals."""
        if self._thr_bins is not None:  # a new merge run with the same instance: start over
            self._hist, self._numel, self._thr_bins, self._observed = None, 0, None, set()
        if ctx.name in self._observed:
            raise StateError(f"ties: tensor {ctx.name!r} observed twice in one pass")
        self._observed.add(ctx.name)
        if self._hist is None:
            self._hist = torch.zeros(hist.shape[0], N_BINS, dtype=torch.int64)
        elif self._hist.shape[0] != hist.shape[0]:
            raise StateError(f"ties: tensor {ctx.name!r} has {hist.shape[0]} task vectors, "
                             f"earlier tensors had {self._hist.shape[0]}")
        self._hist += hist
        self._numel += numel

    def _global_thresholds(self) -> torch.Tensor:
        """(N,) first kept bin per task: the bin holding each task's k-th largest |tau|."""
        if self._thr_bins is None:
            if self._hist is None:
                raise StateError("ties: trim_scope='global' needs the observe pass over every "
                                 "tensor before merge_tensor")
            k = max(1, int(self.options.density * self._numel))
            # count of entries in bins >= b, per task; the threshold is the largest b with >= k
            from_top = self._hist.flip(1).cumsum(1).flip(1)
            reach = from_top >= k
            # a task with fewer than k nonzero entries keeps all of them (bin 0)
            idx = torch.arange(N_BINS).expand_as(reach)
            self._thr_bins = torch.where(reach, idx, torch.zeros_like(idx)).amax(1)
        return self._thr_bins

    # merge -------------------------------------------------------------------------------------
    def _trim_thresholds(self, ctx: TensorContext, n: int) -> torch.Tensor:
        """(N,) first kept log2 bin per task (global trim), checked against this tensor."""
        thr = self._global_thresholds()
        if ctx.name not in self._observed:
            raise StateError(f"ties: tensor {ctx.name!r} was not in the observe pass, so the "
                             f"global threshold does not account for it")
        if thr.shape[0] != n:
            raise StateError(f"ties: tensor {ctx.name!r} has {n} task vectors, the "
                             f"observe pass saw {thr.shape[0]}")
        return thr

    def trim(self, ctx: TensorContext, taus: list[torch.Tensor]) -> torch.Tensor:
        """(N, *ctx.shape) float32 trimmed task vectors."""
        if self.options.trim_scope == "global":
            thr = self._trim_thresholds(ctx, len(taus))
            return torch.stack([t * (log2_bins(t) >= thr[i]) for i, t in enumerate(taus)])
        return torch.stack([t * topk_mask(t, self.options.density) for t in taus])

    def _combine(self, trimmed: torch.Tensor) -> torch.Tensor:
        """Elect and disjoint-merge (N, ...) trimmed values, scaled by lam: elementwise, so a
        row block of the result equals the same rows of the whole tensor's."""
        sign = elect_sign(trimmed, self.options.consensus)
        return disjoint_merge(trimmed, sign, self.options.merge_func) * self.options.lam

    def merge_tensor(self, ctx: TensorContext, taus: list[torch.Tensor]) -> MergeResult:
        """taus: N float32 tensors, shape ctx.shape -> core (float32 ctx.shape), N None entries."""
        taus = check_taus(self.name, ctx, taus)
        trimmed = self.trim(ctx, taus)
        kept = float((trimmed != 0).float().mean()) if trimmed.numel() else 0.0
        return MergeResult(core=self._combine(trimmed), entries=[None] * len(taus),
                           info={"kind": "ties", "kept_fraction": kept})

    def supports_merge_blocks(self, ctx: TensorContext) -> bool:
        """Always: given the per-tensor top-k threshold (found exactly in two passes over the
        blocks) or the global bins, trim, election and disjoint merge are elementwise."""
        return True

    def _block_masks(self, ctx: TensorContext, blocks):
        """A function ``(i, tau_rows) -> bool mask`` that trims expert i's rows exactly as
        :meth:`trim` trims the whole tensor."""
        if self.options.trim_scope == "global":
            thr = self._trim_thresholds(ctx, blocks.n)
            return lambda i, t: log2_bins(t) >= thr[i]
        rank = topk_rank(math.prod(ctx.shape), self.options.density)
        if rank == 0:
            return lambda i, t: torch.zeros_like(t, dtype=torch.bool)
        thrs = (kth_smallest_abs(blocks, [rank] * blocks.n) if rank is not None
                else [None] * blocks.n)
        return lambda i, t: magnitude_mask(t, thrs[i])

    def merge_blocked(self, ctx: TensorContext, blocks) -> MergeResult:
        """:meth:`merge_tensor` one row block of all N experts at a time (``merge/blocks.py``);
        ``kept_fraction`` is counted exactly (an integer count, not a float32 mean)."""
        mask = self._block_masks(ctx, blocks)
        core = torch.empty(ctx.shape, dtype=torch.float32)
        kept = 0
        for a, b, taus in blocks:
            trimmed = torch.stack([t * mask(i, t) for i, t in enumerate(taus)])
            kept += int((trimmed != 0).sum())
            core[a:b] = self._combine(trimmed)
            del trimmed
        total = blocks.n * math.prod(ctx.shape)
        return MergeResult(core=core, entries=[None] * blocks.n,
                           info={"kind": "ties", "kept_fraction": kept / total if total else 0.0})
