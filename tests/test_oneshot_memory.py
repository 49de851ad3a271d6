"""One-shot merges by row blocks (``merge/blocks.py``): flat in N, bit-identical to whole tensors.

A tiny block budget forces every tensor of the test family into row blocks; the merged
checkpoints must equal, file for file, the ones merged whole (``block_budget=None``).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_engine import make_family, tree_digest
from policy_server.errors import InputError
from policy_server.merge import blocks as blocks_mod
from policy_server.merge.blocks import RowBlocks, kth_smallest_abs, row_blocks
from policy_server.merge.methods.base import get_method
from policy_server.merge.plan import tensor_context
from policy_server.merge.task_vectors import open_expert
from policy_server.state.oneshot import merge
from policy_server.tensors.checkpoint import open_checkpoint

#: a few rows per block on the test family's tensors (24 float32 columns = 96 bytes a row)
TINY = 3 * 96 * 3

CASES = [
    ("task_arithmetic", {"lam": 0.5}),
    ("magmax", {"lam": 0.5}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.5, "consensus": "count", "merge_func": "sum", "lam": 0.7}),
    ("ties", {"density": 0.3, "merge_func": "max"}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": 0.2, "trim_scope": "global"}),
]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("method,options", CASES)
def test_blocked_merge_is_bit_identical_to_whole_tensors(tmp_path, method, options, dtype,
                                                         monkeypatch):
    bdir, edirs, _, _ = make_family(tmp_path, n=3, dtype=dtype, skip=("model.norm.weight",))
    reads = []
    real_read = RowBlocks.read
    monkeypatch.setattr(RowBlocks, "read",
                        lambda self, a, b: reads.append((self.key, a, b)) or real_read(self, a, b))
    whole = merge(method, bdir, edirs, tmp_path / "whole", options=options, progress=False,
                  block_budget=None)
    assert not reads
    blocked = merge(method, bdir, edirs, tmp_path / "blocked", options=options, progress=False,
                    block_budget=TINY)
    assert whole["kind"] == blocked["kind"] == "checkpoint"
    keys = {k for k, _, _ in reads}
    assert "model.embed_tokens.weight" in keys  # 40 rows read a few at a time
    assert all(b - a <= TINY // (3 * 96) for k, a, b in reads if k.endswith("embed_tokens.weight"))
    assert checkpoint_bits(tmp_path / "blocked") == checkpoint_bits(tmp_path / "whole")


def checkpoint_bits(path) -> dict:
    """Every file's digest, the weights file's by its tensors' exact bytes instead (safetensors
    writes the ``__metadata__`` map in no fixed order, so equal checkpoints' files may differ)."""
    files = tree_digest(path)
    files.pop("model.safetensors")
    tensors = load_file(str(path / "model.safetensors"))
    return {"files": files, "tensors": {k: (v.dtype, tuple(v.shape), v.view(torch.uint8).reshape(
        -1).numpy().tobytes()) for k, v in tensors.items()}}


def test_block_rows_shrink_with_the_number_of_experts(tmp_path):
    """The budget bounds N x rows: twice the experts, half the rows per block."""
    bdir, edirs, _, _ = make_family(tmp_path, n=4)
    base = open_checkpoint(bdir)
    experts = [open_expert(e, base) for e in edirs]
    meth = get_method("ties")()
    ctx = tensor_context("model.embed_tokens.weight", base.shape("model.embed_tokens.weight"))
    two, four = (row_blocks(meth, ctx, base, experts[:n], 16 * 96) for n in (2, 4))
    assert (two.rows, four.rows) == (8, 4)
    assert row_blocks(meth, ctx, base, experts, 10**9) is None  # fits the budget: whole


def test_kth_smallest_abs_equals_kthvalue(tmp_path, monkeypatch):
    """The two-pass radix selection gives torch.kthvalue's value bit for bit, ties and zeros
    included."""
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g).round(),
            torch.zeros(50, 7)]
    taus[1][::3] = 0

    class Fake(RowBlocks):
        def __init__(self):
            self.shape, self.rows, self.experts, self.any_nonzero = (50, 7), 6, taus, False

        def read(self, a, b):
            return [t[a:b] for t in taus]

    for rank in (1, 17, 175, 349, 350):
        got = kth_smallest_abs(Fake(), [rank, rank, rank])
        for t, v in zip(taus, got):
            want = torch.kthvalue(t.abs().reshape(-1), rank).values
            assert v.view(torch.int32) == want.view(torch.int32)
    assert kth_smallest_abs(Fake(), [None, 3, None])[0] is None


def test_blocked_merge_refuses_non_finite_experts(tmp_path):
    bdir, edirs, base, experts = make_family(tmp_path, n=2)
    from ckpt_utils import write_checkpoint

    bad = dict(experts[1])
    bad["model.embed_tokens.weight"] = bad["model.embed_tokens.weight"].clone()
    bad["model.embed_tokens.weight"][30, 2] = float("nan")
    write_checkpoint(tmp_path / "bad", bad)
    with pytest.raises(InputError, match="non-finite"):
        merge("ties", bdir, [edirs[0], tmp_path / "bad"], tmp_path / "out", progress=False,
              block_budget=TINY)


def test_default_budget_blocks_only_huge_tensors():
    """The default budget blocks a vocabulary embedding, not a 0.5B model's layer matrices at
    N = 2 (whatever is merged whole then fits the budget: the bound holds either way)."""
    assert blocks_mod.rows_per_block((151936, 896), 2, blocks_mod.BLOCK_BUDGET_BYTES) < 151936
    assert 2 * 4864 * 896 * 4 <= blocks_mod.BLOCK_BUDGET_BYTES
