"""PEFT LoRA adapters as task vectors.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r) (PEFT
strips the adapter name on save), ``...lora_embedding_A`` (r, num_embeddings) /
``...lora_embedding_B`` (dim, r) for embeddings, ``...lora_B.bias`` with ``lora_bias=True``, and
plain ``base_model.model.<module>.weight`` for ``modules_to_save`` (full replacements).

The task vector of a LoRA module is PEFT's merge delta, computed in float32:
``tau = scaling * B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``),
where ``r``/``alpha`` honour ``rank_pattern``/``alpha_pattern``; transposed for
``fan_in_fan_out`` (GPT-2 ``Conv1D``) and for embeddings; reshaped for convolutions (PEFT's conv
``lora_B`` is 1x1, so the product is exact).

DoRA (``use_dora``; a ``lora_magnitude_vector`` per module) is PEFT's merge too: with
``W = W0 + scaling * B @ A``, the merged weight is ``m / ||W||_row * W`` (the norm taken per output
feature: over the input dimension for linear layers, over ``(in, kh, kw)`` for convolutions), so
``tau = m / ||W||_row * W - W0`` needs the base weight and is not low-rank. DoRA on embeddings is
refused.

The saved tensors, not ``target_modules``, decide which modules are adapted: ``target_modules`` may
be a regex or a suffix list resolved against the live model, which a checkpoint reader cannot do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from policy_server.errors import InputError
from policy_server.tensors.checkpoint import CheckpointReader, file_digest, open_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
# lora_A/lora_B, optionally still carrying an adapter name (".default") when saved by hand
_LORA_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.(?P<p>weight|bias)$")
_EMB_RE = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?$")


def is_lora_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory with an ``adapter_config.json``."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a pattern applies when it matches a dotted suffix of the
    module name (``(.*\\.)?(pattern)$``); the first matching pattern wins."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """One adapted module. ``module``: path as in the adapter (without ``base_model.model.``);
    ``kind``: "linear" | "embedding" | "conv"; ``r``/``alpha``/``scaling`` after patterns."""

    module: str
    a_key: str
    b_key: str
    bias_key: str | None
    embedding: bool
    r: int
    alpha: float
    scaling: float
    magnitude_key: str | None = None  # DoRA


class LoraAdapter:
    """A parsed PEFT LoRA adapter (weights read lazily through a :class:`CheckpointReader`)."""

    def __init__(self, path: Path, config: dict, weights: CheckpointReader):
        self.path = path
        self.config = config
        self.weights = weights
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.modules: dict[str, LoraModule] = {}
        #: modules_to_save tensors: param path (no prefix) -> adapter key
        self.saved: dict[str, str] = {}
        self._parse()

    # ------------------------------------------------------------------ parsing
    def _parse(self) -> None:
        cfg = self.config
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise InputError(f"{self.path}/{ADAPTER_CONFIG}: peft_type {peft_type!r} is not LORA")
        try:
            r0 = int(cfg["r"])
            alpha0 = float(cfg.get("lora_alpha", r0))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{self.path}/{ADAPTER_CONFIG}: needs an integer 'r' ({e})") from e
        rslora = bool(cfg.get("use_rslora", False))
        parts: dict[str, dict[str, str]] = {}
        emb: set[str] = set()
        magnitudes: dict[str, str] = {}
        for key in self.weights.keys():
            rel = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if ".lora_magnitude_vector" in rel:
                # saved as "<mod>.lora_magnitude_vector" or with ".weight" / an adapter name after it
                magnitudes[rel[:rel.index(".lora_magnitude_vector")]] = key
                continue
            m = _LORA_RE.match(rel) or _EMB_RE.match(rel)
            if m is None:
                if ".lora_" in rel:
                    raise InputError(f"{self.path}: unrecognised LoRA tensor {key!r}")
                # modules_to_save: PEFT saves "<module>.weight"; a hand-saved wrapper may keep
                # "<module>.modules_to_save.<adapter>.weight"
                rel = re.sub(r"\.modules_to_save\.[^.]+\.", ".", rel)
                self.saved[rel] = key
                continue
            slot = "A" if m.group("ab") == "A" else "B"
            if m.re is _LORA_RE and m.group("p") == "bias":
                if slot != "B":
                    raise InputError(f"{self.path}: unexpected LoRA bias {key!r} (only lora_B has one)")
                slot = "bias"
            if m.re is _EMB_RE:
                emb.add(m.group("mod"))
            parts.setdefault(m.group("mod"), {})[slot] = key
        for mod, p in sorted(parts.items()):
            if "A" not in p or "B" not in p:
                raise InputError(f"{self.path}: module {mod!r} has lora_{'A' if 'A' not in p else 'B'}"
                                 f" missing (found {sorted(p.values())})")
            r = int(_pattern_value(cfg.get("rank_pattern"), mod, r0))
            alpha = float(_pattern_value(cfg.get("alpha_pattern"), mod, alpha0))
            a_rank = self.weights.shape(p["A"])[0]
            b_rank = self.weights.shape(p["B"])[1] if len(self.weights.shape(p["B"])) > 1 else -1
            if a_rank != r or b_rank != r:
                raise InputError(
                    f"{self.path}: module {mod!r}: lora_A has rank {a_rank} and lora_B {b_rank}, "
                    f"but the config (r / rank_pattern) says r={r}")
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            mag = magnitudes.pop(mod, None)
            if cfg.get("use_dora") and mag is None:
                raise InputError(f"{self.path}: use_dora is set but module {mod!r} has no "
                                 f"lora_magnitude_vector")
            if mag is not None and mod in emb:
                raise InputError(f"{self.path}: DoRA on embedding module {mod!r} is not supported")
            self.modules[mod] = LoraModule(mod, p["A"], p["B"], p.get("bias"), mod in emb, r,
                                           alpha, scaling, mag)
        if magnitudes:
            raise InputError(f"{self.path}: DoRA magnitude(s) without lora_A/lora_B: "
                             f"{sorted(magnitudes.values())[:5]}")
        if not self.modules and not self.saved:
            raise InputError(f"{self.path}: adapter holds no LoRA or modules_to_save tensors")

    # ------------------------------------------------------------------ binding to a base
    def bind(self, base: CheckpointReader) -> dict[str, tuple[str, object]]:
        """Map base keys to what this adapter changes there.

        Returns {base_key: ("lora", LoraModule) | ("bias", LoraModule) | ("saved", adapter_key)}.
        Raises InputError naming the module when no base key matches or shapes disagree.
        """
        out: dict[str, tuple[str, object]] = {}
        for mod, lm in self.modules.items():
            wkey = self._match(base, f"{mod}.weight", mod)
            self._check_lora_shape(base, wkey, lm)
            out[wkey] = ("lora", lm)
            if lm.bias_key is not None:
                bkey = self._match(base, f"{mod}.bias", mod)
                if tuple(self.weights.shape(lm.bias_key)) != tuple(base.shape(bkey)):
                    raise InputError(f"{self.path}: lora_B bias of {mod!r} has shape "
                                     f"{tuple(self.weights.shape(lm.bias_key))}, base {bkey!r} has "
                                     f"{tuple(base.shape(bkey))}")
                out[bkey] = ("bias", lm)
        for rel, akey in self.saved.items():
            bkey = self._match(base, rel, rel.rsplit(".", 1)[0])
            if tuple(self.weights.shape(akey)) != tuple(base.shape(bkey)):
                raise InputError(f"{self.path}: modules_to_save tensor {akey!r} has shape "
                                 f"{tuple(self.weights.shape(akey))}, base {bkey!r} has "
                                 f"{tuple(base.shape(bkey))}")
            if bkey in out:
                raise InputError(f"{self.path}: {bkey!r} is both LoRA-adapted and in modules_to_save")
            out[bkey] = ("saved", akey)
        return out

    def _match(self, base: CheckpointReader, key: str, module: str) -> str:
        # Base checkpoints differ in whether the top-level "model." is part of their keys (e.g. a
        # *ForCausalLM saved vs its inner model), so both spellings are tried.
        cands = [key]
        if key.startswith("model."):
            cands.append(key[len("model."):])
        else:
            cands.append("model." + key)
        for c in cands:
            if c in base:
                return c
        raise InputError(f"{self.path}: adapter module {module!r} matches no base tensor "
                         f"(tried {cands} in {base.path})")

    def _check_lora_shape(self, base: CheckpointReader, wkey: str, lm: LoraModule) -> None:
        a, b = self.weights.shape(lm.a_key), self.weights.shape(lm.b_key)
        bshape = tuple(base.shape(wkey))
        out_dim, in_numel = b[0], math.prod(a[1:])
        if lm.embedding or self.fan_in_fan_out:
            expect_numel = (in_numel, out_dim)
        else:
            expect_numel = (out_dim, in_numel)
        ok = (len(bshape) >= 2 and math.prod(bshape) == out_dim * in_numel
              and (bshape[0] == expect_numel[0] if len(bshape) > 2 else bshape == expect_numel))
        if not ok:
            raise InputError(f"{self.path}: module {lm.module!r}: lora_A {tuple(a)} / lora_B "
                             f"{tuple(b)} do not fit base tensor {wkey!r} of shape {bshape}")
        if lm.magnitude_key is not None:
            mshape = tuple(self.weights.shape(lm.magnitude_key))
            if math.prod(mshape) != out_dim:
                raise InputError(f"{self.path}: DoRA magnitude {lm.magnitude_key!r} has shape "
                                 f"{mshape}, module {lm.module!r} has {out_dim} output features")

    # ------------------------------------------------------------------ deltas
    def lora_delta(self, lm: LoraModule, shape: tuple[int, ...],
                   base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Task vector of one module, float32, the base tensor's ``shape``: ``scaling * B @ A``;
        for DoRA ``m / ||W0 + scaling * B @ A||_row * (W0 + ...) - W0`` (needs ``base_weight``)."""
        A = self.weights.get(lm.a_key).float()
        B = self.weights.get(lm.b_key).float()
        d = (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)) * lm.scaling  # (out, in*k)
        if lm.magnitude_key is not None:
            if base_weight is None:
                raise ValueError(f"DoRA module {lm.module!r} needs the base weight")
            W0 = base_weight.float()
            W0_rows = W0.T if self.fan_in_fan_out else W0.reshape(d.shape[0], -1)
            W = W0_rows + d
            mag = self.weights.get(lm.magnitude_key).float().reshape(-1)
            # PEFT computes the norm per output feature; float32 keeps 1/||W|| accurate for bf16 bases
            factor = mag / torch.linalg.vector_norm(W, dim=1)
            merged = factor[:, None] * W
            d = merged - W0_rows
        if lm.embedding or self.fan_in_fan_out:
            d = d.T
        return d.reshape(shape).contiguous()

    def bias_delta(self, lm: LoraModule) -> torch.Tensor:
        """With ``lora_bias``: PEFT adds ``scaling * lora_B.bias`` to the base bias. float32."""
        return self.weights.get(lm.bias_key).float() * lm.scaling

    def fingerprint(self) -> str:
        """sha256 over the adapter config and the weights' identity (size, first/last MiB)."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for f in self.weights.files:
            file_digest(f, h)
        return h.hexdigest()


def open_lora_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory. ``adapter_model.bin`` needs ``allow_pickle``."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"adapter {p}: no such directory")
    cfg_file = p / ADAPTER_CONFIG
    try:
        config = json.loads(cfg_file.read_text())
    except OSError as e:
        raise InputError(f"adapter {p}: cannot read {ADAPTER_CONFIG} ({e})") from e
    except ValueError as e:
        raise InputError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise InputError(f"{cfg_file}: expected a JSON object")
    if (p / ADAPTER_WEIGHTS).is_file():
        weights = open_checkpoint(p / ADAPTER_WEIGHTS)
    elif (p / ADAPTER_PICKLE).is_file():
        weights = open_checkpoint(p / ADAPTER_PICKLE, allow_pickle=allow_pickle)
    else:
        raise InputError(f"adapter {p}: no {ADAPTER_WEIGHTS}")
    return LoraAdapter(p, config, weights)
