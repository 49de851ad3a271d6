"""The built-in demo VLA: a small vision-language-action policy that trains on 2 CPU cores.

It is the reference ``PolicyBackend`` and the model the expert factory (``carve train``) fine-tunes
into skill experts. The layout follows VLA-Adapter / MergeVLA at toy scale:

* **instruction encoder** - a deterministic hashed word + bigram tokenizer (no vocabulary file, no
  download) -> ``nn.EmbeddingBag`` mean-pooled -> linear projection;
* **state encoder** - MLP over the normalised proprioceptive/object state;
* **image encoder** - a small strided CNN per camera, built only when the config lists cameras
  (off by default: the Meta-World demo is state-based);
* **fusion trunk** - MLP over the concatenated features producing ``num_trunk_tokens`` feature
  tokens (plus the raw state / instruction / image tokens) of width ``hidden_dim``;
* **action expert** - ``chunk_length`` learned action queries that *only* cross-attend to the trunk
  tokens (no self-attention among queries, as in MergeVLA, so each query's value path is a clean
  per-skill subspace), ``num_expert_blocks`` blocks of ``cross_attn.{q,k,v,o}_proj`` + MLP
  (``fc1``/``fc2``), then a final ``head`` block of the same form plus ``head.out_proj`` regressing
  the normalised action chunk ``(chunk_length, action_dim)``.

Parameter names are chosen to glob on, e.g. ``action_expert.blocks.0.cross_attn.v_proj.weight`` or
``action_expert.head.*``. Normalisation statistics live in ``config.json`` (never as tensors), so
merging task vectors never touches them; experts inherit the base's statistics.

Checkpoint layout (Hugging Face style)::

    DIR/config.json         {"model_type": "carve_demo_vla", ...DemoVLAConfig fields}
    DIR/model.safetensors   state_dict of DemoVLAModule (float32 unless saved otherwise)
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from policy_server.errors import InputError
from policy_server.models.base import ImageSpec, ObservationBatch, PolicyBackend, PolicySpec
from policy_server.models.config_json import read_config_json
from policy_server.models.features import RoutingFeatures

MODEL_TYPE = "carve_demo_vla"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_WORD_RE = re.compile(r"[a-z0-9]+")


@dataclass
class DemoVLAConfig:
    """Architecture + normalisation of a demo VLA; serialised as ``config.json``.

    state_mean/state_std: (state_dim,) lists; action_mean/action_std: (action_dim,) lists. Empty
    lists mean identity normalisation (mean 0, std 1). ``cameras`` maps a camera key to
    ``[height, width]`` (uint8 RGB input); empty means a state-only policy.
    """

    state_dim: int = 39
    action_dim: int = 4
    chunk_length: int = 4
    hidden_dim: int = 128
    mlp_dim: int = 256
    num_heads: int = 4
    num_trunk_tokens: int = 4
    num_expert_blocks: int = 2
    vocab_size: int = 4096
    text_dim: int = 64
    cameras: dict[str, list[int]] = field(default_factory=dict)
    cnn_channels: int = 16
    action_low: list[float] = field(default_factory=lambda: [-1.0, -1.0, -1.0, -1.0])
    action_high: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    state_mean: list[float] = field(default_factory=list)
    state_std: list[float] = field(default_factory=list)
    action_mean: list[float] = field(default_factory=list)
    action_std: list[float] = field(default_factory=list)
    name: str = "demo-vla"

    def to_json_dict(self) -> dict:
        d = asdict(self)
        d["model_type"] = MODEL_TYPE
        return d

    @classmethod
    def from_json_dict(cls, d: dict, source: str = "config") -> "DemoVLAConfig":
        if d.get("model_type") != MODEL_TYPE:
            raise InputError(f"{source}: model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise InputError(f"{source}: unknown DemoVLAConfig field(s) {unknown}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        if self.hidden_dim % self.num_heads:
            raise InputError(f"{source}: hidden_dim {self.hidden_dim} not divisible by num_heads "
                             f"{self.num_heads}")
        for name, vec, n in (("state_mean", self.state_mean, self.state_dim),
                             ("state_std", self.state_std, self.state_dim),
                             ("action_mean", self.action_mean, self.action_dim),
                             ("action_std", self.action_std, self.action_dim),
                             ("action_low", self.action_low, self.action_dim),
                             ("action_high", self.action_high, self.action_dim)):
            if vec and len(vec) != n:
                raise InputError(f"{source}: {name} has length {len(vec)}, expected {n}")
        for name, vec in (("state_std", self.state_std), ("action_std", self.action_std)):
            if any(v <= 0 for v in vec):
                raise InputError(f"{source}: {name} must be > 0")


# --------------------------------------------------------------------------------------------
# tokenizer


def hash_tokenize(text: str, vocab_size: int) -> list[int]:
    """Deterministic word + bigram hashing tokenizer.

    Lower-cases, splits on non-alphanumerics, hashes every word and adjacent word pair with
    blake2b (stable across processes, unlike Python's ``hash``) into ``[1, vocab_size)``; id 0 is
    reserved for padding. Returns at least one id (``[0]`` for empty text).
    """
    words = _WORD_RE.findall(text.lower())
    grams = words + [f"{a}_{b}" for a, b in zip(words, words[1:])]
    ids = [1 + int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
           % (vocab_size - 1) for g in grams]
    return ids or [0]


# --------------------------------------------------------------------------------------------
# modules


class CrossAttention(nn.Module):
    """Multi-head cross-attention with separately named projections (glob-friendly, LoRA-able).

    queries: (B, Q, D), context: (B, T, D) -> (B, Q, D).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, q, d = x.shape
        t = ctx.shape[1]
        h = self.heads
        qh = self.q_proj(x).view(b, q, h, d // h).transpose(1, 2)
        kh = self.k_proj(ctx).view(b, t, h, d // h).transpose(1, 2)
        vh = self.v_proj(ctx).view(b, t, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, d))


class ActionBlock(nn.Module):
    """Pre-norm block: queries cross-attend to the trunk tokens, then an MLP. No self-attention."""

    def __init__(self, dim: int, mlp_dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm_q(x), self.norm_ctx(ctx))
        return x + self.fc2(F.gelu(self.fc1(self.norm_mlp(x))))


class ActionHead(ActionBlock):
    """The final per-skill block: an ActionBlock plus ``out_proj`` to the action dimension."""

    def __init__(self, dim: int, mlp_dim: int, heads: int, action_dim: int):
        super().__init__(dim, mlp_dim, heads)
        self.norm_out = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, action_dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.out_proj(self.norm_out(super().forward(x, ctx)))


class ActionExpert(nn.Module):
    """``chunk_length`` learned queries -> blocks -> head. context (B, T, D) -> (B, chunk, A)."""

    def __init__(self, cfg: DemoVLAConfig):
        super().__init__()
        d = cfg.hidden_dim
        # small init keeps the residual stream near zero at start, as in ViT/DETR query init
        self.action_queries = nn.Parameter(torch.randn(cfg.chunk_length, d) * 0.02)
        self.blocks = nn.ModuleList(ActionBlock(d, cfg.mlp_dim, cfg.num_heads)
                                    for _ in range(cfg.num_expert_blocks))
        self.head = ActionHead(d, cfg.mlp_dim, cfg.num_heads, cfg.action_dim)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        x = self.action_queries.unsqueeze(0).expand(ctx.shape[0], -1, -1)
        for blk in self.blocks:
            x = blk(x, ctx)
        return self.head(x, ctx)


class ImageEncoder(nn.Module):
    """Small strided CNN: (B, H, W, 3) uint8 -> (B, hidden_dim). Global average pooled."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        c = channels
        self.convs = nn.Sequential(
            nn.Conv2d(3, c, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.GELU())
        self.proj = nn.Linear(4 * c, dim)

    def forward(self, img_u8: torch.Tensor) -> torch.Tensor:
        x = img_u8.permute(0, 3, 1, 2).to(self.proj.weight.dtype) / 255.0 - 0.5
        return self.proj(self.convs(x).mean(dim=(2, 3)))


class DemoVLAModule(nn.Module):
    """The whole network. Inputs are *normalised* state (B, state_dim), token ids/offsets for an
    EmbeddingBag and optional uint8 images; output is the *normalised* chunk (B, chunk, A)."""

    def __init__(self, cfg: DemoVLAConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.text_embed = nn.EmbeddingBag(cfg.vocab_size, cfg.text_dim, mode="mean")
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.state_encoder = nn.Sequential(nn.Linear(cfg.state_dim, d), nn.GELU(), nn.Linear(d, d))
        self.image_encoders = nn.ModuleDict(
            {_module_key(k): ImageEncoder(cfg.cnn_channels, d) for k in sorted(cfg.cameras)})
        n_feat = 2 + len(cfg.cameras)
        self.fusion = nn.Sequential(nn.Linear(n_feat * d, cfg.mlp_dim), nn.GELU(),
                                    nn.Linear(cfg.mlp_dim, cfg.num_trunk_tokens * d))
        # learned type/position embedding for the (n_feat + num_trunk_tokens) context tokens
        self.token_embed = nn.Parameter(torch.zeros(n_feat + cfg.num_trunk_tokens, d))
        self.action_expert = ActionExpert(cfg)

    def trunk(self, state: torch.Tensor, tok_ids: torch.Tensor, tok_offsets: torch.Tensor,
              images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Context tokens (B, 2 + n_cameras + num_trunk_tokens, hidden_dim)."""
        feats = [self.state_encoder(state), self.text_proj(self.text_embed(tok_ids, tok_offsets))]
        for key in sorted(self.cfg.cameras):
            feats.append(self.image_encoders[_module_key(key)](images[key]))
        fused = self.fusion(torch.cat(feats, dim=-1)).view(state.shape[0], self.cfg.num_trunk_tokens,
                                                           self.cfg.hidden_dim)
        return torch.cat([torch.stack(feats, dim=1), fused], dim=1) + self.token_embed

    def forward(self, state: torch.Tensor, tok_ids: torch.Tensor, tok_offsets: torch.Tensor,
                images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.action_expert(self.trunk(state, tok_ids, tok_offsets, images))


def _module_key(camera: str) -> str:
    # ModuleDict keys may not contain dots
    return camera.replace(".", "_")


# --------------------------------------------------------------------------------------------
# backend


class DemoVLABackend(PolicyBackend):
    """``PolicyBackend`` over :class:`DemoVLAModule`; handles tokenising and (un)normalising."""

    def __init__(self, config: DemoVLAConfig, module: DemoVLAModule | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
        config.validate()
        self.config = config
        if module is None:
            # fixed seed: a freshly built base is reproducible
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = DemoVLAModule(config)
        self.module = module.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        sd, am = config.state_dim, config.action_dim
        self._s_mean = torch.tensor(config.state_mean or [0.0] * sd, dtype=torch.float32)
        self._s_std = torch.tensor(config.state_std or [1.0] * sd, dtype=torch.float32)
        self._a_mean = torch.tensor(config.action_mean or [0.0] * am, dtype=torch.float32)
        self._a_std = torch.tensor(config.action_std or [1.0] * am, dtype=torch.float32)
        norm = {k: list(getattr(config, k)) for k in
                ("state_mean", "state_std", "action_mean", "action_std") if getattr(config, k)}
        self.spec = PolicySpec(
            state_dim=sd, action_dim=am, chunk_length=config.chunk_length,
            action_low=list(config.action_low), action_high=list(config.action_high),
            images={k: ImageSpec(int(h), int(w)) for k, (h, w) in config.cameras.items()},
            normalization=norm, name=config.name)

    # ---- persistence ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
             ) -> "DemoVLABackend":
        path = Path(path)
        raw = read_config_json(path, "a demo-VLA directory")
        w_path = path / WEIGHTS_NAME
        if not w_path.is_file():
            raise InputError(f"{path}: no {WEIGHTS_NAME}")
        cfg = DemoVLAConfig.from_json_dict(raw, str(path / CONFIG_NAME))
        module = DemoVLAModule(cfg)
        state = load_file(str(w_path))
        want = module.state_dict()
        missing = sorted(set(want) - set(state))
        extra = sorted(set(state) - set(want))
        if missing or extra:
            raise InputError(f"{w_path}: missing tensors {missing[:5]}, unexpected {extra[:5]}")
        for k, t in state.items():
            if tuple(t.shape) != tuple(want[k].shape):
                raise InputError(f"{w_path}: tensor {k} has shape {tuple(t.shape)}, config expects "
                                 f"{tuple(want[k].shape)}")
        module.load_state_dict({k: t.float() for k, t in state.items()})
        return cls(cfg, module, device=device, dtype=dtype)

    def with_module(self, module: nn.Module) -> "DemoVLABackend":
        """This backend around ``module`` (see ``PolicyBackend.with_module``): config, spec and
        normalisation statistics are shared (read only); the demo VLA has no per-state data."""
        new = copy.copy(self)
        new.module = module
        return new

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (contiguous CPU tensors) into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
              for k, v in self.module.state_dict().items()}
        save_file(sd, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_json_dict(), indent=2) + "\n")
        return path

    # ---- inputs ---------------------------------------------------------------------------
    def tokenize(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """EmbeddingBag inputs: flat ids (N,) int64 and per-row offsets (B,) int64."""
        ids, offsets = [], []
        for text in instructions:
            offsets.append(len(ids))
            ids.extend(hash_tokenize(text, self.config.vocab_size))
        return (torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(offsets, dtype=torch.long, device=self.device))

    def normalize_state(self, state: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, state_dim) raw -> normalised float32 tensor on the model's device/dtype."""
        s = torch.as_tensor(np.asarray(state, dtype=np.float32))
        return ((s - self._s_mean) / self._s_std).to(self.device, self.dtype)

    def normalize_action(self, action: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., action_dim) raw -> normalised float32 (CPU)."""
        return (torch.as_tensor(np.asarray(action, dtype=np.float32)) - self._a_mean) / self._a_std

    def unnormalize_action(self, a: torch.Tensor) -> torch.Tensor:
        """(..., action_dim) normalised -> environment units, float32 CPU."""
        return a.float().cpu() * self._a_std + self._a_mean

    def _check(self, batch: ObservationBatch) -> None:
        st = np.asarray(batch.state)
        if st.ndim != 2 or st.shape[1] != self.config.state_dim:
            raise InputError(f"state has shape {st.shape}, expected (B, {self.config.state_dim})")
        if st.shape[0] != len(batch.instructions):
            raise InputError(f"{st.shape[0]} states but {len(batch.instructions)} instructions")
        if not np.all(np.isfinite(st)):
            raise InputError("state contains NaN or inf")
        for key, (h, w) in self.config.cameras.items():
            img = batch.images.get(key)
            if img is None:
                raise InputError(f"missing camera image {key!r}")
            if img.dtype != np.uint8 or img.shape != (st.shape[0], h, w, 3):
                raise InputError(f"image {key!r} is {img.dtype}{tuple(img.shape)}, expected "
                                 f"uint8({st.shape[0]}, {h}, {w}, 3)")

    def forward_normalized(self, batch: ObservationBatch) -> torch.Tensor:
        """Model output (B, chunk, A) in normalised units (for training), with grad if enabled."""
        self._check(batch)
        ids, offs = self.tokenize(batch.instructions)
        images = {k: torch.as_tensor(batch.images[k], device=self.device) for k in self.config.cameras}
        return self.module(self.normalize_state(batch.state), ids, offs, images)

    def predict(self, batch: ObservationBatch) -> torch.Tensor:
        """(B, chunk_length, action_dim) float32, unnormalised and unclipped."""
        with torch.no_grad():
            return self.unnormalize_action(self.forward_normalized(batch))

    @property
    def routing_features(self) -> RoutingFeatures:
        """Value projections ``action_expert.{blocks.i,head}.cross_attn.v_proj.weight`` in
        forward order."""
        names = [f"action_expert.blocks.{i}.cross_attn.v_proj.weight"
                 for i in range(self.config.num_expert_blocks)]
        return RoutingFeatures(tuple(names + ["action_expert.head.cross_attn.v_proj.weight"]))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["DemoVLAConfig", "DemoVLAModule", "DemoVLABackend", "MODEL_TYPE", "hash_tokenize",
           "num_parameters"]
