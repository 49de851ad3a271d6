"""PEFT LoRA adapters as task vectors, checked against the LoRA forward pass itself."""

import math

import pytest
import torch
from ckpt_utils import write_checkpoint, write_lora_adapter
from torch import nn

from policy_server.errors import InputError
from policy_server.tensors.checkpoint import open_checkpoint
from policy_server.merge.task_vectors import iter_task_vectors, open_expert

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
UP = "model.layers.0.mlp.up_proj"


def _base(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"{Q}.weight": torch.randn(8, 6, generator=g),
        f"{Q}.bias": torch.randn(8, generator=g),
        f"{V}.weight": torch.randn(8, 6, generator=g),
        f"{UP}.weight": torch.randn(10, 6, generator=g),
        "model.embed_tokens.weight": torch.randn(12, 6, generator=g),
        "lm_head.weight": torch.randn(5, 8, generator=g),
    }


def _ab(r, out, inp, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def test_task_vector_matches_lora_forward(tmp_path):
    base_t = _base()
    base = open_checkpoint(write_checkpoint(tmp_path / "base", base_t))
    A, B = _ab(4, 8, 6, 1)
    ad = write_lora_adapter(tmp_path / "ad", {Q: (A, B)}, r=4, lora_alpha=8)
    ex = open_expert(ad, base)
    assert ex.kind == "lora" and ex.keys() == [f"{Q}.weight"]
    tau = ex.task_vector(f"{Q}.weight")
    assert tau.dtype == torch.float32 and tau.shape == (8, 6)
    # PEFT's forward: y = base(x) + scaling * B(A(x)); the merged weight must reproduce it
    lin = nn.Linear(6, 8)
    with torch.no_grad():
        lin.weight.copy_(base_t[f"{Q}.weight"])
        lin.bias.copy_(base_t[f"{Q}.bias"])
    x = torch.randn(3, 6)
    want = lin(x) + (8 / 4) * (x @ A.T @ B.T)
    got = x @ (base_t[f"{Q}.weight"] + tau).T + base_t[f"{Q}.bias"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # untouched tensors are None, not zeros
    assert ex.task_vector(f"{V}.weight") is None
    vecs = dict(iter_task_vectors(base, ex, progress=False))
    assert sum(v is not None for v in vecs.values()) == 1


def test_rslora_rank_and_alpha_patterns(tmp_path):
    base = open_checkpoint(write_checkpoint(tmp_path / "base", _base()))
    Aq, Bq = _ab(4, 8, 6, 1)
    Av, Bv = _ab(2, 8, 6, 2)
    Au, Bu = _ab(4, 10, 6, 3)
    ad = write_lora_adapter(tmp_path / "ad", {Q: (Aq, Bq), V: (Av, Bv), UP: (Au, Bu)}, r=4,
                            lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 2},
                            alpha_pattern={"mlp.up_proj": 3})
    ex = open_expert(ad, base)
    torch.testing.assert_close(ex.task_vector(f"{Q}.weight"), 16 / math.sqrt(4) * Bq @ Aq)
    torch.testing.assert_close(ex.task_vector(f"{V}.weight"), 16 / math.sqrt(2) * Bv @ Av)
    torch.testing.assert_close(ex.task_vector(f"{UP}.weight"), 3 / math.sqrt(4) * Bu @ Au)


def test_fan_in_fan_out_embedding_and_modules_to_save(tmp_path):
    base_t = _base()
    base_t["transformer.h.0.attn.c_attn.weight"] = torch.randn(6, 9)  # GPT-2 Conv1D: (in, out)
    base = open_checkpoint(write_checkpoint(tmp_path / "base", base_t))
    A, B = _ab(2, 9, 6, 4)
    Ae = torch.randn(2, 12)  # (r, num_embeddings)
    Be = torch.randn(6, 2)   # (dim, r)
    head = torch.randn(5, 8)
    ad = write_lora_adapter(tmp_path / "ad", {"transformer.h.0.attn.c_attn": (A, B)}, r=2,
                            lora_alpha=4, fan_in_fan_out=True,
                            embeddings={"model.embed_tokens": (Ae, Be)},
                            modules_to_save={"lm_head.weight": head})
    ex = open_expert(ad, base)
    torch.testing.assert_close(ex.task_vector("transformer.h.0.attn.c_attn.weight"), 2.0 * (B @ A).T)
    torch.testing.assert_close(ex.task_vector("model.embed_tokens.weight"), 2.0 * (Be @ Ae).T)
    # an embedding lookup with the merged table equals base lookup + scaling * B @ A[:, ids]
    ids = torch.tensor([0, 3, 11])
    merged = base_t["model.embed_tokens.weight"] + ex.task_vector("model.embed_tokens.weight")
    torch.testing.assert_close(merged[ids], base_t["model.embed_tokens.weight"][ids]
                               + 2.0 * (Be @ Ae[:, ids]).T)
    torch.testing.assert_close(ex.task_vector("lm_head.weight"), head - base_t["lm_head.weight"])


def test_model_prefix_difference_is_bridged(tmp_path):
    A, B = _ab(2, 8, 6, 5)
    # adapter says "model.layers...", base keys lack "model."
    base_t = {k.removeprefix("model."): v for k, v in _base().items()}
    base = open_checkpoint(write_checkpoint(tmp_path / "base", base_t))
    ex = open_expert(write_lora_adapter(tmp_path / "a1", {Q: (A, B)}, r=2, lora_alpha=2), base)
    assert ex.keys() == [f"{Q.removeprefix('model.')}.weight"]
    # adapter lacks "model.", base has it
    base2 = open_checkpoint(write_checkpoint(tmp_path / "base2", _base()))
    ex2 = open_expert(write_lora_adapter(tmp_path / "a2", {Q.removeprefix("model."): (A, B)},
                                         r=2, lora_alpha=2), base2)
    assert ex2.keys() == [f"{Q}.weight"]
    torch.testing.assert_close(ex.task_vector(ex.keys()[0]), ex2.task_vector(ex2.keys()[0]))


def test_adapter_errors_name_the_module(tmp_path):
    base = open_checkpoint(write_checkpoint(tmp_path / "base", _base()))
    A, B = _ab(2, 8, 6, 6)
    with pytest.raises(InputError, match="module 'model.layers.0.self_attn.k_proj' matches no base"):
        open_expert(write_lora_adapter(tmp_path / "a1", {"model.layers.0.self_attn.k_proj": (A, B)},
                                       r=2, lora_alpha=2), base)
    with pytest.raises(InputError, match="lora_A has rank 2.*r=4"):
        open_expert(write_lora_adapter(tmp_path / "a2", {Q: (A, B)}, r=4, lora_alpha=2), base)
    A2, B2 = _ab(2, 8, 7, 6)
    with pytest.raises(InputError, match=r"do not fit base tensor .*q_proj.weight' of shape \(8, 6\)"):
        open_expert(write_lora_adapter(tmp_path / "a3", {Q: (A2, B2)}, r=2, lora_alpha=2), base)
    with pytest.raises(InputError, match="use_dora is set but module .*q_proj' has no"):
        open_expert(write_lora_adapter(tmp_path / "a4", {Q: (A, B)}, r=2, lora_alpha=2,
                                       extra_config={"use_dora": True}), base)
    with pytest.raises(InputError, match="DoRA magnitude .* has shape \\(5,\\)"):
        open_expert(write_lora_adapter(tmp_path / "a6", {Q: (A, B)}, r=2, lora_alpha=2,
                                       magnitudes={Q: torch.ones(5)}), base)
    d = write_lora_adapter(tmp_path / "a5", {Q: (A, B)}, r=2, lora_alpha=2)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="no adapter_model.safetensors"):
        open_expert(d, base)


def test_conv_and_lora_bias_match_forward(tmp_path):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(8)
    base_t = {"enc.conv.weight": torch.randn(5, 3, 3, 3, generator=g),
              "enc.conv.bias": torch.randn(5, generator=g)}
    base = open_checkpoint(write_checkpoint(tmp_path / "base", base_t))
    A = torch.randn(2, 3, 3, 3, generator=g)   # lora_A: Conv2d(in=3, r=2, kernel 3)
    B = torch.randn(5, 2, 1, 1, generator=g)   # lora_B: Conv2d(r=2, out=5, kernel 1)
    bias = torch.randn(5, generator=g)
    ex = open_expert(write_lora_adapter(tmp_path / "ad", {"enc.conv": (A, B)}, r=2, lora_alpha=6,
                                        lora_biases={"enc.conv": bias}), base)
    assert ex.keys() == ["enc.conv.bias", "enc.conv.weight"]
    x = torch.randn(2, 3, 7, 7, generator=g)
    # PEFT's conv forward: base(x) + scaling * lora_B(lora_A(x)), lora_B carrying the bias
    want = (F.conv2d(x, base_t["enc.conv.weight"], base_t["enc.conv.bias"], padding=1)
            + 3.0 * F.conv2d(F.conv2d(x, A, padding=1), B, bias))
    got = F.conv2d(x, base_t["enc.conv.weight"] + ex.task_vector("enc.conv.weight"),
                   base_t["enc.conv.bias"] + ex.task_vector("enc.conv.bias"), padding=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pickled_adapter_needs_opt_in(tmp_path):
    base = open_checkpoint(write_checkpoint(tmp_path / "base", _base()))
    A, B = _ab(2, 8, 6, 9)
    d = write_lora_adapter(tmp_path / "ad", {Q: (A, B)}, r=2, lora_alpha=4)
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "adapter_model.safetensors")), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="adapter_model.bin: is a pickle checkpoint"):
        open_expert(d, base)
    ex = open_expert(d, base, allow_pickle=True)
    torch.testing.assert_close(ex.task_vector(f"{Q}.weight"), 2.0 * B @ A)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_task_vector_matches_dora_forward(tmp_path, fan_in_fan_out):
    g = torch.Generator().manual_seed(10)
    W0 = torch.randn(8, 6, generator=g)  # (out, in)
    bias = torch.randn(8, generator=g)
    base_t = {f"{Q}.weight": W0.T.contiguous() if fan_in_fan_out else W0, f"{Q}.bias": bias}
    base = open_checkpoint(write_checkpoint(tmp_path / "base", base_t))
    A, B = _ab(2, 8, 6, 11)
    mag = torch.rand(8, generator=g) + 0.5
    ex = open_expert(write_lora_adapter(tmp_path / "ad", {Q: (A, B)}, r=2, lora_alpha=4,
                                        fan_in_fan_out=fan_in_fan_out, magnitudes={Q: mag}), base)
    tau = ex.task_vector(f"{Q}.weight")
    # DoRA forward (Liu et al. 2024 / PEFT): y = m / ||W0 + s B A||_row * (W0 x + s B A x) + b
    x = torch.randn(4, 6, generator=g)
    s = 4 / 2
    norm = torch.linalg.vector_norm(W0 + s * B @ A, dim=1)
    want = (x @ W0.T + s * x @ A.T @ B.T) * (mag / norm) + bias
    W_eff = base_t[f"{Q}.weight"] + tau
    got = (x @ W_eff if fan_in_fan_out else x @ W_eff.T) + bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the delta is not a low-rank product: it rescales W0's rows too
    assert torch.linalg.matrix_rank(tau if not fan_in_fan_out else tau.T) > 2
    # older PEFT / other tools save the magnitude with a ".weight" suffix: same task vector
    from safetensors.torch import load_file, save_file

    f = tmp_path / "ad" / "adapter_model.safetensors"
    sd = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v
          for k, v in load_file(str(f)).items()}
    save_file(sd, str(f))
    torch.testing.assert_close(open_expert(tmp_path / "ad", base).task_vector(f"{Q}.weight"), tau)
