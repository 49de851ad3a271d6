"""Row blocks of a one-shot merge: N experts' task vectors of one tensor, a block of rows at a time.

A one-shot merge that takes every expert's whole float32 task vector of a tensor at once holds
``N x`` that tensor (plus the method's temporaries, several times more): for a 151936x896
vocabulary embedding that is 0.54 GB per expert, and the merge's peak grew with N. A tensor
whose N float32 task vectors exceed :data:`BLOCK_BUDGET_BYTES` is therefore read as row blocks
``[a, b)`` holding all N experts' rows of that block, sized so ``N x rows x row bytes`` stays
within the budget: the working set no longer depends on N. Methods whose rule is elementwise
across experts, given per-tensor statistics they can gather in a first pass over the blocks
(TIES' top-k threshold), opt in with :meth:`MergeMethod.supports_merge_blocks`; results are
bit-identical to the whole-tensor path (tests/test_oneshot_memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from policy_server.merge.task_vectors import ExpertSource, check_finite
from policy_server.tensors.checkpoint import CheckpointReader

#: working set of one block: N experts' float32 rows. 64 MiB keeps a TIES block with its
#: temporaries (the stacked trimmed rows, masks, the agreeing values: about 4x the block) near
#: 0.25 GiB, while a 151936-row embedding still takes only a few dozen blocks per pass.
BLOCK_BUDGET_BYTES = 64 << 20

_F32 = 4


def rows_per_block(shape: Sequence[int], n_experts: int, budget: int) -> int:
    """Rows of one block: ``n_experts x rows x row float32 bytes <= budget``, at least one."""
    row_bytes = math.prod(shape[1:]) * _F32
    return max(1, int(budget) // max(1, n_experts * row_bytes))


class RowBlocks:
    """The N experts' float32 task vectors of tensor ``key``, read by row blocks.

    Iterating yields ``(a, b, taus)``: rows ``[a, b)`` and one float32 ``(b - a, *shape[1:])``
    tensor per expert, in expert order; it can be iterated as often as a method needs passes.
    The base rows of a block are read once and shared by the N experts. Every block read is
    checked for non-finite values (an expert's NaN must not reach the core); ``any_nonzero``
    says whether any block read so far had a nonzero entry (after one full pass: whether the
    experts changed this tensor at all).
    """

    def __init__(self, key: str, base: CheckpointReader, experts: Sequence[ExpertSource],
                 rows: int):
        self.key = key
        self.shape = tuple(base.shape(key))
        self.base = base
        self.experts = list(experts)
        self.rows = int(rows)
        self.any_nonzero = False

    @property
    def n(self) -> int:
        """Number of experts."""
        return len(self.experts)

    def ranges(self) -> Iterator[tuple[int, int]]:
        """The ``[a, b)`` row ranges, in order."""
        for a in range(0, self.shape[0], self.rows):
            yield a, min(a + self.rows, self.shape[0])

    def read(self, a: int, b: int) -> list[torch.Tensor]:
        """Every expert's float32 task-vector rows ``[a, b)``."""
        base_rows = self.base.get_rows(self.key, a, b)
        taus = []
        for e in self.experts:
            tau = check_finite(e.task_vector_rows(self.key, a, b, base_rows), e.path, self.key)
            self.any_nonzero = self.any_nonzero or bool(torch.any(tau != 0))
            taus.append(tau)
        return taus

    def __iter__(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        for a, b in self.ranges():
            yield a, b, self.read(a, b)


def row_blocks(method, ctx, base: CheckpointReader, experts: Sequence[ExpertSource],
               budget: int | None) -> RowBlocks | None:
    """A :class:`RowBlocks` for tensor ``ctx`` when it is merged in blocks, None otherwise.

    Blocked when the N float32 task vectors exceed ``budget`` (None: never), the tensor has rows,
    the method supports blocks for it and every expert can read it by rows (a LoRA expert
    cannot: it is merged whole)."""
    if budget is None or not ctx.shape or len(experts) == 0:
        return None
    if len(experts) * math.prod(ctx.shape) * _F32 <= budget:
        return None
    if not method.supports_merge_blocks(ctx):
        return None
    if not all(e.supports_rows(ctx.name) for e in experts):
        return None
    return RowBlocks(ctx.name, base, experts, rows_per_block(ctx.shape, len(experts), budget))


# ------------------------------------------------------------------------------------------------
# exact k-th smallest |tau| over the blocks (what ``torch.kthvalue`` gives on the whole tensor)

_HALF = 16
_HALF_BINS = 1 << _HALF


def _abs_bits(tau: torch.Tensor) -> torch.Tensor:
    """int64 IEEE bits of |tau| (float32): for non-negative floats the bit pattern orders as the
    value, so a selection over the bits is a selection over the magnitudes."""
    return tau.abs().reshape(-1).view(torch.int32).to(torch.int64)


def kth_smallest_abs(blocks: RowBlocks, ranks: Sequence[int | None]) -> list[torch.Tensor | None]:
    """Per expert i, the ``ranks[i]``-th smallest |tau_i| (1-based) over the whole tensor, as a
    float32 scalar equal bit for bit to ``torch.kthvalue(tau_i.abs().reshape(-1), rank)``;
    None where ``ranks[i]`` is None.

    A two-pass radix selection over the float32 bits (high 16 bits, then the low 16 bits inside
    the chosen high bin), so only two 65536-bin histograms per expert are kept, never the tensor.
    """
    todo = [i for i, r in enumerate(ranks) if r is not None]
    hist = torch.zeros(blocks.n, _HALF_BINS, dtype=torch.int64)
    for _a, _b, taus in blocks:
        for i in todo:
            hist[i] += torch.bincount(_abs_bits(taus[i]) >> _HALF, minlength=_HALF_BINS)
    hi: dict[int, int] = {}
    left: dict[int, int] = {}
    for i in todo:
        hi[i], left[i] = _bin_of_rank(hist[i], int(ranks[i]))
    hist.zero_()
    for _a, _b, taus in blocks:
        for i in todo:
            bits = _abs_bits(taus[i])
            low = bits[(bits >> _HALF) == hi[i]] & (_HALF_BINS - 1)
            hist[i] += torch.bincount(low, minlength=_HALF_BINS)
    out: list[torch.Tensor | None] = [None] * blocks.n
    for i in todo:
        lo, _ = _bin_of_rank(hist[i], left[i])
        bits = torch.tensor([(hi[i] << _HALF) | lo], dtype=torch.int32)
        out[i] = bits.view(torch.float32)[0]
    return out


def _bin_of_rank(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the ``rank``-th smallest entry, its rank within that bin), 1-based."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor(rank, dtype=torch.int64)))
    before = int(cum[b - 1]) if b > 0 else 0
    return b, rank - before
