"""Shared test helpers: real checkpoint and PEFT adapter directories on disk from dicts of tensors.

Import as ``from ckpt_utils import write_checkpoint, write_lora_adapter``: ``tests/`` has no
``__init__.py``, so pytest's default import mode puts it on ``sys.path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_CONFIG = {"model_type": "demo_vla", "architectures": ["DemoVLA"]}


def write_checkpoint(out_dir, tensors: dict[str, torch.Tensor], shards: int = 1,
                     config: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a HF checkpoint dir: ``model.safetensors`` when ``shards == 1``, else
    ``shards`` files ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``
    (keys dealt round-robin in sorted order). Writes ``config.json`` (``config`` or a default) and
    any ``extra_files`` {name: text}. Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(tensors)
        groups = [keys[i::shards] for i in range(shards)]
        weight_map, total = {}, 0
        for i, group in enumerate(groups, 1):
            name = f"model-{i:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in group}, str(out / name), metadata={"format": "pt"})
            for k in group:
                weight_map[k] = name
                total += tensors[k].numel() * tensors[k].element_size()
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config or DEFAULT_CONFIG))
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    return out


def write_lora_adapter(out_dir, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       r: int, lora_alpha: float, *, use_rslora: bool = False,
                       fan_in_fan_out: bool = False, rank_pattern: dict | None = None,
                       alpha_pattern: dict | None = None,
                       modules_to_save: dict[str, torch.Tensor] | None = None,
                       embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                       lora_biases: dict[str, torch.Tensor] | None = None,
                       magnitudes: dict[str, torch.Tensor] | None = None,
                       extra_config: dict | None = None) -> Path:
    """Write a PEFT LoRA adapter dir in PEFT's saved format.

    modules: {module path: (A (r, in), B (out, r))} saved as
    ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; embeddings: {module:
    (A (r, num_embeddings), B (dim, r))} saved as ``.lora_embedding_A`` / ``_B``;
    modules_to_save: {param path e.g. "head.weight": full tensor} saved as
    ``base_model.model.<param path>``; lora_biases: {module: bias (out,)} saved as
    ``.lora_B.bias`` (PEFT ``lora_bias=True``). Conv modules pass 4-D A (r, in, kh, kw) and
    B (out, r, 1, 1). magnitudes: DoRA {module: m (out,)} saved as ``.lora_magnitude_vector``
    (PEFT drops the ``.weight`` of its DoRA layer on save) and sets ``use_dora``. Returns the
    directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd: dict[str, torch.Tensor] = {}
    for mod, (A, B) in modules.items():
        sd[f"base_model.model.{mod}.lora_A.weight"] = A.contiguous()
        sd[f"base_model.model.{mod}.lora_B.weight"] = B.contiguous()
    for mod, (A, B) in (embeddings or {}).items():
        sd[f"base_model.model.{mod}.lora_embedding_A"] = A.contiguous()
        sd[f"base_model.model.{mod}.lora_embedding_B"] = B.contiguous()
    for mod, b in (lora_biases or {}).items():
        sd[f"base_model.model.{mod}.lora_B.bias"] = b.contiguous()
    for mod, mag in (magnitudes or {}).items():
        sd[f"base_model.model.{mod}.lora_magnitude_vector"] = mag.contiguous()
    for key, t in (modules_to_save or {}).items():
        sd[f"base_model.model.{key}"] = t.contiguous()
    save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({m.rsplit(".", 1)[-1] for m in [*modules, *(embeddings or {})]})
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": "base",
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0, "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out, "target_modules": targets, "bias": "none",
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in (modules_to_save or {})}) or None,
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
        "use_dora": bool(magnitudes), "init_lora_weights": True, "lora_bias": bool(lora_biases),
    }
    cfg.update(extra_config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out
