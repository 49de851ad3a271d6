"""Parsing of a published OpenVLA / Prismatic ``config.json`` (no remote code is ever run).

The field names and the backbone tables follow ``prismatic/extern/hf/configuration_prismatic.py``
of openvla/openvla: a checkpoint's ``config.json`` stores ``vision_backbone_id``,
``llm_backbone_id``, ``arch_specifier``, ``use_fused_vision_backbone``, ``image_resize_strategy``,
``text_config`` (a Llama config dict), ``pad_to_multiple_of``, ``n_action_bins`` and ``norm_stats``;
``timm_model_ids`` / ``image_sizes`` are *derived* from ``vision_backbone_id`` (the published
config class recomputes them), so a stored value that disagrees is an error here rather than being
silently overwritten.

OpenVLA-OFT checkpoints are the same layout plus an action head and a proprio projector, which
the published repo ships as pickles; ``carve convert`` (``openvla/convert.py``) stores them as
safetensors under ``action_head.*`` / ``proprio_projector.*`` and records what the OFT code keeps
in Python constants (``prismatic/vla/constants.py``) as ``carve_oft`` in config.json:
``{"num_actions_chunk", "action_dim", "proprio_dim" (0 = none), "num_images_in_input",
"normalization": "bounds_q99" | "bounds", "use_film": bool}``. ``use_film`` (OFT+'s
language-conditioned ViT blocks) is what the OFT eval scripts take as a flag; ``carve convert``
sets it when the checkpoint ships the ``vision_backbone--*_checkpoint.pt`` that only FiLM runs save.

One more carve-only optional field exists: ``carve_timm_overrides`` (a list, one dict per featurizer, of
timm ViT kwargs such as ``embed_dim``/``depth``/``num_heads``/``mlp_ratio``). Published checkpoints
never carry it; the tests use it to build tiny models with the same classes and key names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from policy_server.errors import InputError
from policy_server.models.config_json import read_config_json

MODEL_TYPES = ("openvla", "prismatic")

# vision_backbone_id -> (timm ids, image sizes, act_layer overrides): the published table
# (CLIP ViTs were trained with QuickGELU, which timm must be told about).
VISION_BACKBONES: dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[str | None, ...]]] = {
    "clip-vit-l": (("vit_large_patch14_clip_224.openai",), (224,), ("quick_gelu",)),
    "clip-vit-l-336px": (("vit_large_patch14_clip_336.openai",), (336,), ("quick_gelu",)),
    "siglip-vit-so400m": (("vit_so400m_patch14_siglip_224",), (224,), (None,)),
    "siglip-vit-so400m-384px": (("vit_so400m_patch14_siglip_384",), (384,), (None,)),
    "dinov2-vit-l": (("vit_large_patch14_reg4_dinov2.lvd142m",), (224,), (None,)),
    "in1k-vit-l": (("vit_large_patch16_224.augreg_in21k_ft_in1k",), (224,), (None,)),
    "dinoclip-vit-l-336px": (("vit_large_patch14_reg4_dinov2.lvd142m",
                              "vit_large_patch14_clip_336.openai"), (336, 336), (None, "quick_gelu")),
    "dinosiglip-vit-so-224px": (("vit_large_patch14_reg4_dinov2.lvd142m",
                                 "vit_so400m_patch14_siglip_224"), (224, 224), (None, None)),
    "dinosiglip-vit-so-384px": (("vit_large_patch14_reg4_dinov2.lvd142m",
                                 "vit_so400m_patch14_siglip_384"), (384, 384), (None, None)),
}
# Only Llama-architecture LLMs are implemented (OpenVLA's is Llama-2 7B); Mistral / Phi Prismatic
# VLMs exist but no OpenVLA action model uses them.
LLM_BACKBONES = ("llama2-7b-pure", "llama2-13b-pure", "llama2-7b-chat", "llama2-13b-chat",
                 "vicuna-v15-7b", "vicuna-v15-13b")
# arch_specifier -> projector layer names ("no-align+" only says the projector was not pre-aligned)
PROJECTORS = {"gelu-mlp": ("fc1", "fc2"), "no-align+gelu-mlp": ("fc1", "fc2"),
              "fused-gelu-mlp": ("fc1", "fc2", "fc3"), "no-align+fused-gelu-mlp": ("fc1", "fc2", "fc3")}
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")
_TIMM_OVERRIDE_KEYS = {"embed_dim", "depth", "num_heads", "mlp_ratio"}


@dataclass
class OpenVLAConfig:
    """The parsed architecture. ``norm_stats``: dataset key -> {"action": {"q01": [A], "q99": [A],
    "mask": [A] bool (optional)}, ...}; ``text_config``: kwargs of ``transformers.LlamaConfig``."""

    model_type: str
    vision_backbone_id: str
    llm_backbone_id: str
    arch_specifier: str
    use_fused_vision_backbone: bool
    image_resize_strategy: str
    text_config: dict
    pad_to_multiple_of: int
    n_action_bins: int
    norm_stats: dict
    timm_model_ids: tuple[str, ...]
    image_sizes: tuple[int, ...]
    act_layers: tuple[str | None, ...]
    timm_overrides: tuple[dict, ...] = ()
    oft: "OFTConfig | None" = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def projector_layers(self) -> tuple[str, ...]:
        return PROJECTORS[self.arch_specifier]

    @property
    def tokenizer_vocab_size(self) -> int:
        """The tokenizer's vocabulary (the LM's embedding rows minus the pad-to-multiple rows);
        its last ``n_action_bins`` ids are the action tokens."""
        return int(self.text_config["vocab_size"]) - self.pad_to_multiple_of

    def action_stats(self, unnorm_key: str | None) -> dict:
        """``norm_stats[key]["action"]``; ``key=None`` is allowed only with one dataset."""
        return self.norm_stats[self.check_unnorm_key(unnorm_key)]["action"]

    def check_unnorm_key(self, unnorm_key: str | None) -> str:
        keys = sorted(self.norm_stats)
        if unnorm_key is None:
            if len(keys) != 1:
                raise InputError(f"unnorm_key: this model has statistics for {len(keys)} datasets, "
                                 f"choose one of {keys}")
            return keys[0]
        if unnorm_key not in self.norm_stats:
            raise InputError(f"unnorm_key {unnorm_key!r} is not in norm_stats; available: {keys}")
        return unnorm_key


@dataclass(frozen=True)
class OFTConfig:
    """OpenVLA-OFT's L1-regression setup (LIBERO: chunk 8, action 7, proprio 8, 2 images;
    ALOHA OFT+: chunk 25, action 14, proprio 14, 3 images, ``use_film``)."""

    num_actions_chunk: int
    action_dim: int
    proprio_dim: int
    num_images_in_input: int
    normalization: str = "bounds_q99"
    use_film: bool = False

    @classmethod
    def parse(cls, d, source: str) -> "OFTConfig":
        if not isinstance(d, dict):
            raise InputError(f"{source}: carve_oft must be an object")
        want = ("num_actions_chunk", "action_dim", "proprio_dim", "num_images_in_input")
        missing = [k for k in want if not isinstance(d.get(k), int)]
        if missing:
            raise InputError(f"{source}: carve_oft lacks integer field(s) {missing}")
        unknown = sorted(set(d) - set(want) - {"normalization", "use_film"})
        if unknown:
            raise InputError(f"{source}: carve_oft has unknown field(s) {unknown}")
        oft = cls(**d)
        if oft.normalization not in ("bounds_q99", "bounds"):
            raise InputError(f"{source}: carve_oft.normalization {oft.normalization!r} is not "
                             "'bounds_q99' or 'bounds'")
        if not isinstance(oft.use_film, bool):
            # FiLM adds tensors (blocks.N.scale/shift) to the architecture: no truthy guessing
            raise InputError(f"{source}: carve_oft.use_film must be true or false")
        if oft.num_images_in_input < 1 or min(oft.num_actions_chunk, oft.action_dim) < 1:
            raise InputError(f"{source}: carve_oft sizes must be positive")
        return oft


def _need(d: dict, key: str, typ, source: str):
    if key not in d:
        raise InputError(f"{source}: missing field {key!r}")
    if not isinstance(d[key], typ):
        raise InputError(f"{source}: field {key!r} must be {getattr(typ, '__name__', typ)}, "
                         f"got {type(d[key]).__name__}")
    return d[key]


def _check_norm_stats(ns: dict, source: str) -> None:
    for key, stats in ns.items():
        act = stats.get("action") if isinstance(stats, dict) else None
        if not isinstance(act, dict) or "q01" not in act or "q99" not in act:
            raise InputError(f"{source}: norm_stats[{key!r}] lacks action.q01 / action.q99")
        n = len(act["q01"])
        if len(act["q99"]) != n or ("mask" in act and len(act["mask"]) != n):
            raise InputError(f"{source}: norm_stats[{key!r}].action q01/q99/mask lengths differ")


def parse_config(d: dict, source: str = "config.json") -> OpenVLAConfig:
    """Validate a published-layout config dict -> ``OpenVLAConfig``; ``InputError`` naming the
    field (and listing the supported values) for anything this implementation cannot run."""
    mt = _need(d, "model_type", str, source)
    if mt not in MODEL_TYPES:
        raise InputError(f"{source}: model_type {mt!r} is not an OpenVLA/Prismatic model {MODEL_TYPES}")
    vb = _need(d, "vision_backbone_id", str, source)
    if vb not in VISION_BACKBONES:
        raise InputError(f"{source}: unsupported vision_backbone_id {vb!r}; supported: "
                         f"{sorted(VISION_BACKBONES)}")
    llm = _need(d, "llm_backbone_id", str, source)
    if llm not in LLM_BACKBONES:
        raise InputError(f"{source}: unsupported llm_backbone_id {llm!r}; supported: {list(LLM_BACKBONES)}")
    arch = _need(d, "arch_specifier", str, source)
    if arch not in PROJECTORS:
        raise InputError(f"{source}: unsupported arch_specifier {arch!r}; supported: {sorted(PROJECTORS)}")
    timm_ids, sizes, acts = VISION_BACKBONES[vb]
    # published default: fused iff the id names two backbones
    fused = d.get("use_fused_vision_backbone")
    fused = len(timm_ids) == 2 if fused is None else bool(fused)
    if fused != (len(timm_ids) == 2):
        raise InputError(f"{source}: use_fused_vision_backbone={fused} contradicts vision_backbone_id {vb!r}")
    if fused != (len(PROJECTORS[arch]) == 3):
        raise InputError(f"{source}: arch_specifier {arch!r} does not fit use_fused_vision_backbone={fused}")
    for name, want in (("image_sizes", list(sizes)), ("timm_model_ids", list(timm_ids))):
        if name in d and list(d[name]) != want:
            raise InputError(f"{source}: field {name!r} is {d[name]} but {vb!r} implies {want}")
    strategy = d.get("image_resize_strategy", "letterbox")
    if strategy not in RESIZE_STRATEGIES:
        raise InputError(f"{source}: unsupported image_resize_strategy {strategy!r}; supported: "
                         f"{list(RESIZE_STRATEGIES)}")
    text = _need(d, "text_config", dict, source)
    if text.get("model_type", "llama") != "llama":
        raise InputError(f"{source}: text_config.model_type {text.get('model_type')!r} is not 'llama'")
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        _need(text, k, int, f"{source}: text_config")
    pad = int(d.get("pad_to_multiple_of", 64))
    bins = int(d.get("n_action_bins", 256))
    norm_stats = d.get("norm_stats") or {}
    if mt == "openvla":
        norm_stats = _need(d, "norm_stats", dict, source)
        _check_norm_stats(norm_stats, source)
    if int(text["vocab_size"]) - pad < bins:
        raise InputError(f"{source}: text_config.vocab_size - pad_to_multiple_of < n_action_bins")
    overrides = tuple(d.get("carve_timm_overrides") or ())
    if overrides and (len(overrides) != len(timm_ids)
                      or any(set(o) - _TIMM_OVERRIDE_KEYS for o in overrides)):
        raise InputError(f"{source}: carve_timm_overrides must be {len(timm_ids)} dict(s) of "
                         f"{sorted(_TIMM_OVERRIDE_KEYS)}")
    oft = OFTConfig.parse(d["carve_oft"], source) if d.get("carve_oft") is not None else None
    if oft is not None and oft.num_images_in_input > 1 and not fused:
        raise InputError(f"{source}: carve_oft.num_images_in_input > 1 needs a fused vision backbone "
                         "(as in the published OFT code)")
    return OpenVLAConfig(mt, vb, llm, arch, fused, strategy, dict(text), pad, bins, norm_stats,
                         timm_ids, sizes, acts, overrides, oft, dict(d))


def read_config(path: str | Path) -> OpenVLAConfig:
    """``path/config.json`` -> ``OpenVLAConfig``."""
    return parse_config(read_config_json(path, "an OpenVLA checkpoint directory"),
                        str(Path(path) / "config.json"))
