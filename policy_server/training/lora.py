"""Minimal LoRA for training experts, written out in the real PEFT checkpoint format.

We do not depend on ``peft``; instead :func:`inject_lora` swaps targeted ``nn.Linear`` modules for
:class:`LoRALinear` (same maths and init as PEFT's ``lora.Linear``: ``y = W0 x + b +
scaling * B(A(x))``, ``A`` Kaiming-uniform with ``a=sqrt(5)``, ``B`` zeros, ``scaling = alpha / r``),
and :func:`save_peft_adapter` writes what ``PeftModel.save_pretrained`` writes:

* ``adapter_config.json`` - ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora: false``, ``fan_in_fan_out: false``, ``bias: "none"``, ``modules_to_save: null``...
* ``adapter_model.safetensors`` - ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``base_model.model.<module>.lora_B.weight`` (out, r) (adapter name stripped, as PEFT does).

``target_modules`` follows PEFT's list semantics: a module is targeted when its qualified name
equals an entry or ends with ``"." + entry``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from policy_server.errors import InputError

PEFT_PREFIX = "base_model.model."
# every projection of the action expert (attention + MLP): the VLA-Adapter-style LoRA target set
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update. x (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        if r < 1:
            raise InputError(f"LoRA rank must be >= 1, got {r}")
        self.base_layer = base
        self.r, self.lora_alpha = int(r), float(alpha)
        self.scaling = self.lora_alpha / self.r
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts exactly at the base
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``: (out, in) float32, PEFT's merge delta."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, target_modules: list[str], r: int, alpha: float) -> list[str]:
    """Replace every targeted ``nn.Linear`` by a :class:`LoRALinear`, freeze everything else.

    Returns the qualified names of the adapted modules (sorted). Raises InputError when nothing
    matches (a typo in ``target_modules`` would otherwise train nothing).
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, target_modules)]
    if not names:
        raise InputError(f"LoRA target_modules {target_modules} match no nn.Linear in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha))
    return sorted(names)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's saved key names, contiguous float32 CPU."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    return out


def save_peft_adapter(model: nn.Module, path: str | Path, target_modules: list[str], r: int,
                      alpha: float, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA layout)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = peft_state_dict(model)
    if not sd:
        raise InputError("model has no LoRA modules to save")
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": int(r), "lora_alpha": float(alpha),
        "lora_dropout": 0.0, "target_modules": sorted(target_modules), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def merge_peft_adapter(base_state: dict[str, torch.Tensor], adapter_dir: str | Path
                       ) -> dict[str, torch.Tensor]:
    """Base state dict + an adapter written by :func:`save_peft_adapter` -> merged state dict
    (``W = W0 + alpha/r * B @ A`` per module, float32). Used by tests and for exporting a LoRA
    expert as a full checkpoint."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_rslora") or cfg.get("fan_in_fan_out"):
        raise InputError(f"{adapter_dir}: only plain LoRA adapters (no rsLoRA/fan_in_fan_out)")
    scaling = float(cfg["lora_alpha"]) / int(cfg["r"])
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    merged = {k: v.float().clone() for k, v in base_state.items()}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b = tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"]
        wkey = f"{mod}.weight"
        if wkey not in merged:
            raise InputError(f"{adapter_dir}: adapter module {mod!r} not in the base state dict")
        merged[wkey] = merged[wkey] + scaling * (b.float() @ a.float())
    return merged
