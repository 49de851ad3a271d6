"""Random-weight OpenVLA / OpenVLA-OFT checkpoints in the *published* layout (config fields,
safetensors key names, a Llama-style tokenizer whose last 256 ids are the action bins), tiny by
default, for the tests and ``bench/bench_openvla.py``. Nothing here is used when serving.

``make_config(dims="7b")`` gives the published OpenVLA-7B shapes (DINOv2 ViT-L/14 + SigLIP
SO400M/14 at 224 px, Llama-2 7B with 32064 embedding rows) for memory accounting and GPU
benchmarks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

ACTION_DIM = 7
V_TOK = 512          # tokenizer vocabulary (published: 32000); ids 256..511 are the action bins
PAD_TO = 64          # pad_to_multiple_of; the LM has V_TOK + PAD_TO embedding rows
_CHARS = "abcdefghijklmnopqrstuvwxyzIOW:?.,'-\n0123456789"


def norm_stats(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in ("libero_spatial_no_noops", "libero_object_no_noops"):
        lo = (-torch.rand(ACTION_DIM, generator=g) - 0.1).tolist()
        hi = (torch.rand(ACTION_DIM, generator=g) + 0.1).tolist()
        lo[-1], hi[-1] = 0.0, 1.0
        act = {"q01": lo, "q99": hi, "mask": [True] * (ACTION_DIM - 1) + [False],
               "mean": [0.0] * ACTION_DIM, "std": [1.0] * ACTION_DIM,
               "min": lo, "max": hi}
        out[key] = {"action": act, "num_transitions": 100, "num_trajectories": 10}
    return out


def make_config(fused: bool = True, layers: int = 2, unnorm_key: str | None = None,
                dims: str = "tiny") -> dict:
    """A config.json dict with the fields of openvla/openvla-7b; ``dims`` "tiny" (ViTs of width
    32/48 and depth 3, a 64-wide Llama with ``layers`` layers, 512-id tokenizer) or "7b"."""
    vb = "dinosiglip-vit-so-224px" if fused else "siglip-vit-so400m"
    ids = (["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"] if fused
           else ["vit_so400m_patch14_siglip_224"])
    vit = [{"embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0},
           {"embed_dim": 48, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0}][-len(ids):]
    cfg = {
        "arch_specifier": "no-align+fused-gelu-mlp" if fused else "no-align+gelu-mlp",
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "hf_llm_id": "meta-llama/Llama-2-7b-hf", "image_resize_strategy": "resize-naive",
        "image_sizes": [224] * len(ids), "llm_backbone_id": "llama2-7b-pure", "llm_max_length": 2048,
        "model_type": "openvla", "n_action_bins": 256, "norm_stats": norm_stats(),
        "output_projector_states": False, "pad_to_multiple_of": PAD_TO, "pad_token_id": V_TOK,
        "text_config": {"model_type": "llama", "vocab_size": V_TOK + PAD_TO, "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": layers,
                        "num_attention_heads": 4, "num_key_value_heads": 4,
                        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                        "pad_token_id": V_TOK, "torch_dtype": "bfloat16"},
        "timm_model_ids": ids, "timm_override_act_layers": [None] * len(ids),
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
        "use_fused_vision_backbone": fused, "vision_backbone_id": vb,
        "carve_timm_overrides": vit,
    }
    if dims == "7b":
        del cfg["carve_timm_overrides"]
        cfg["pad_token_id"] = 32000
        cfg["text_config"].update({"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                                   "num_hidden_layers": 32, "num_attention_heads": 32,
                                   "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
                                   "pad_token_id": 32000})
    if unnorm_key:
        cfg["carve_unnorm_key"] = unnorm_key
    return cfg


def make_tokenizer(vocab_size: int = V_TOK):
    """The tokenizer of :func:`save_tokenizer` as a ``LlamaTokenizerFast`` object."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"<f{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>", add_bos_token=True, add_eos_token=False)
    fast.add_special_tokens({"pad_token": "<PAD>"})
    return fast


def save_tokenizer(path: Path) -> None:
    """A char-level Llama-style fast tokenizer: <unk>=0, <s>=1, </s>=2, "▁", characters, fillers
    up to V_TOK (the last 256 are the action tokens, like Llama's rarely used last ids), then
    <PAD>=V_TOK (OpenVLA's added pad token)."""
    make_tokenizer().save_pretrained(str(path))


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights with O(1) activations everywhere (LayerScale near 1 so the ViT blocks and
    thus the image matter; timm's 1e-5 init would make the blocks almost identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale_factor"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def save_checkpoint(module: torch.nn.Module, path: Path, config: dict, shards: int = 1,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, tokenizer and the state dict as ``model.safetensors`` (shards=1) or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``."""
    return _save_state(module.state_dict(), path, config, shards, dtype)


def _save_state(state: dict, path: Path, config: dict, shards: int = 1,
                dtype: torch.dtype = torch.float32) -> Path:
    """``save_checkpoint`` for a state dict {key: tensor}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(path)
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def build_module(config: dict, seed: int = 0):
    from policy_server.models.openvla.config import parse_config
    from policy_server.models.openvla.model import OpenVLAModule

    torch.manual_seed(seed)
    module = OpenVLAModule(parse_config(config))
    randomize_(module, seed)
    return module.eval()


def make_checkpoint(path: Path, seed: int = 0, shards: int = 1, **cfg_kw) -> Path:
    config = make_config(**cfg_kw)
    return save_checkpoint(build_module(config, seed), path, config, shards=shards)


def make_expert(base_dir: Path, path: Path, seed: int, scale: float = 0.05,
                unnorm_key: str | None = None) -> Path:
    """A 'fine-tune' of ``base_dir``: the base weights plus a random low-rank update on every
    matrix of the language model and the projector (what LoRA-style fine-tunes touch)."""
    from policy_server.models.openvla.backend import OpenVLABackend

    base = OpenVLABackend.load(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.module.named_parameters():
            if p.ndim == 2 and name.startswith(("language_model.model.layers", "projector")):
                a = torch.randn(p.shape[0], 2, generator=g)
                b = torch.randn(2, p.shape[1], generator=g)
                p.add_(scale * (a @ b) / p.shape[1] ** 0.5)
    config = json.loads((Path(base_dir) / "config.json").read_text())
    if unnorm_key:
        config["carve_unnorm_key"] = unnorm_key
    return save_checkpoint(base.module, path, config)


# ------------------------------------------------------------------------------- OpenVLA-OFT
CHUNK, PROPRIO_DIM = 3, 8   # tiny chunk (LIBERO's is 8); LIBERO proprio is 8-D
OFT = {"num_actions_chunk": CHUNK, "action_dim": ACTION_DIM, "proprio_dim": PROPRIO_DIM,
       "num_images_in_input": 2, "normalization": "bounds_q99", "use_film": False}


def oft_norm_stats(seed: int = 0) -> dict:
    ns = norm_stats(seed)
    g = torch.Generator().manual_seed(seed + 100)
    for d in ns.values():
        lo = (-torch.rand(PROPRIO_DIM, generator=g)).tolist()
        hi = (torch.rand(PROPRIO_DIM, generator=g) + 0.2).tolist()
        d["proprio"] = {"q01": lo, "q99": hi, "min": lo, "max": hi, "mean": [0.0] * PROPRIO_DIM,
                        "std": [1.0] * PROPRIO_DIM}
    return ns


def make_oft_published(path: Path, seed: int = 0, shards: int = 2, step: int = 150000,
                       unnorm_key: str | None = None, film: bool = False, lora_rank: int = 4) -> Path:
    """An OFT checkpoint as the OFT repo publishes it: the VLA's safetensors (no head keys) +
    ``action_head--<step>_checkpoint.pt`` / ``proprio_projector--<step>_checkpoint.pt`` pickles
    of DDP state dicts (``module.`` prefixes); config.json has no ``carve_oft``.

    film: an OFT+ run (``--use_film True`` with LoRA): also ``vision_backbone--<step>_checkpoint.pt``
    in the layout of the published ``FiLMedPrismaticVisionBackbone`` state dict (see
    :func:`film_backbone_state`), and the safetensors hold the vision weights *before* that run's
    LoRA, so only a converter that takes the pickle as authoritative (as the eval code does)
    reproduces the model. The returned module's weights are the truth: ``build_module(...)`` with
    ``carve_oft.use_film`` and this seed."""
    config = make_config(unnorm_key=unnorm_key)
    config["norm_stats"] = oft_norm_stats()
    module = build_module(dict(config, carve_oft=dict(OFT, use_film=film)), seed)
    sd = module.state_dict()
    vla = torch.nn.Module()
    for name in ("vision_backbone", "projector", "language_model"):
        vla.add_module(name, getattr(module, name))
    if film:
        pickled, pre_lora = film_backbone_state(module, lora_rank, seed)
        vla_sd = {k: pre_lora.get(k, v) for k, v in vla.state_dict().items()
                  if not _is_film_key(k)}
        _save_state(vla_sd, path, config, shards)
        torch.save(pickled, path / f"vision_backbone--{step}_checkpoint.pt")
    else:
        save_checkpoint(vla, path, config, shards=shards)
    for head in ("action_head", "proprio_projector"):
        torch.save({"module." + k[len(head) + 1:]: v.clone() for k, v in sd.items()
                    if k.startswith(head + ".")}, path / f"{head}--{step}_checkpoint.pt")
    return path


def _is_film_key(k: str) -> bool:
    """A FiLM projector tensor (``vision_backbone.*.blocks.N.scale|shift.*``)?"""
    return k.startswith("vision_backbone.") and (".scale." in k or ".shift." in k)


def film_backbone_state(module: torch.nn.Module, rank: int, seed: int
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The FiLM module's vision backbone as the OFT fine-tuning script saves it: PEFT
    (``target_modules="all-linear"``, ``lora_alpha=min(r, 16)``) wrapped every vision linear
    *before* FiLM wrapped the blocks, so a block linear is
    ``vision_backbone.featurizer.blocks.N.block.attn.qkv.{base_layer.weight, base_layer.bias,
    lora_A.default.weight, lora_B.default.weight}``, other linears (``attn_pool.*``) the same without
    ``.block``, and FiLM's own ``blocks.N.scale/shift.{weight,bias}`` stay plain. The LoRA pair is
    random and the base layer is chosen so base + (alpha / r) B @ A equals ``module``'s weight.
    Returns (pickle state dict, {checkpoint key: pre-LoRA weight}) - float32, CPU."""
    g = torch.Generator().manual_seed(seed + 7)
    scaling = min(rank, 16) / rank
    out, pre = {}, {}
    vb = module.vision_backbone
    linears = {n for n, m in vb.named_modules() if isinstance(m, torch.nn.Linear)
               and not n.endswith((".scale", ".shift"))}
    for name, t in vb.state_dict().items():
        key = "vision_backbone." + name
        wrapped = _nest_in_block(key)
        mod, leaf = name.rsplit(".", 1)
        if mod not in linears:
            out[wrapped] = t.clone()
            continue
        base = wrapped[:-len(leaf) - 1]
        if leaf == "weight":
            a = torch.randn(rank, t.shape[1], generator=g) / t.shape[1] ** 0.5
            b = torch.randn(t.shape[0], rank, generator=g) * 0.1
            pre[key] = t - scaling * (b @ a)
            out[base + ".base_layer.weight"] = pre[key].clone()
            out[base + ".lora_A.default.weight"], out[base + ".lora_B.default.weight"] = a, b
        else:
            out[base + ".base_layer." + leaf] = t.clone()
    return out, pre


def _nest_in_block(key: str) -> str:
    """``...blocks.N.X`` -> ``...blocks.N.block.X`` for X not a FiLM projector: the nesting of the
    published ``FiLMedVisionTransformerBlock`` (which keeps the timm block as ``.block``)."""
    if _is_film_key(key):
        return key
    return re.sub(r"(\.blocks\.\d+)\.", r"\1.block.", key, count=1)
