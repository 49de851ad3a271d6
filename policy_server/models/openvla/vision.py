"""Prismatic vision side: timm ViT featurizers (second-to-last block patches), the projector, and
the per-featurizer image preprocessing of the published ``PrismaticImageProcessor``; for
OpenVLA-OFT+ checkpoints, FiLM (``add_film_`` / ``film_block``: the published
``FiLMedVisionTransformerBlock`` semantics on timm's own blocks).

timm is imported lazily so that importing the rest of carve-serve never needs it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from policy_server.errors import InputError
from policy_server.models.openvla.config import OpenVLAConfig


def import_timm():
    """timm, or an ``InputError`` saying how to install it (OpenVLA needs it; nothing else does)."""
    try:
        import timm
    except ImportError as e:
        raise InputError("the OpenVLA backend needs timm (pip install -r requirements-openvla.txt): "
                         f"{e}") from None
    return timm


class ScaleFactorLayerScale(nn.Module):
    """timm's LayerScale with its parameter named ``scale_factor``: the published checkpoints
    renamed ``gamma`` because transformers' loader rewrites parameter names containing it."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def _rename_layerscale(vit: nn.Module) -> None:
    from timm.models.vision_transformer import LayerScale

    for name, mod in list(vit.named_modules()):
        if isinstance(mod, LayerScale):
            parent = vit.get_submodule(name.rsplit(".", 1)[0]) if "." in name else vit
            new = ScaleFactorLayerScale(mod.gamma.shape[0])
            with torch.no_grad():
                new.scale_factor.copy_(mod.gamma)
            setattr(parent, name.rsplit(".", 1)[-1], new)


def make_featurizer(timm_id: str, img_size: int, act_layer: str | None, overrides: dict) -> nn.Module:
    """A randomly initialised timm ViT with the published construction arguments
    (``num_classes=0``, the backbone's ``img_size`` and ``act_layer``) and LayerScale renamed."""
    timm = import_timm()
    vit = timm.create_model(timm_id, pretrained=False, num_classes=0, img_size=img_size,
                            act_layer=act_layer, **overrides)
    _rename_layerscale(vit)
    return vit


def add_film_(vit: nn.Module, llm_dim: int) -> None:
    """Give every block of ``vit`` the FiLM projectors of OpenVLA-OFT (``use_film``): ``scale`` and
    ``shift``, each ``nn.Linear(llm_dim, embed_dim)`` mapping the averaged instruction embedding to
    the block's gamma / beta. They are attached to the timm ``Block`` itself (not a wrapper) so the
    state-dict keys are ``blocks.N.scale.weight`` beside the unchanged ``blocks.N.attn.*``: the
    published wrapper's ``blocks.N.block.*`` nesting is undone once by ``carve convert``."""
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block:  # the FiLM forward below re-implements exactly this class
            raise InputError(f"FiLM: featurizer block {i} is a {type(blk).__name__}, not timm's Block")
        blk.scale = nn.Linear(llm_dim, vit.embed_dim)
        blk.shift = nn.Linear(llm_dim, vit.embed_dim)


def film_block(blk: nn.Module, x: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
    """One FiLMed ViT block: (B, T, D) tokens, (B, llm_dim) averaged instruction embedding ->
    (B, T, D). The attention residual, then ``x * (1 + gamma) + beta`` with one gamma/beta per
    channel shared by every token (spatially global, as FiLM is for conv maps; ``1 +`` keeps a
    zero-initialised projector the identity), then the MLP residual: the published
    ``FiLMedVisionTransformerBlock``."""
    gamma, beta = blk.scale(lang)[:, None, :], blk.shift(lang)[:, None, :]
    x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
    x = x * (1 + gamma) + beta
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def penultimate_patches(vit: nn.Module, pixels: torch.Tensor, lang: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, N_patches, embed_dim): the output of the second-to-last
    block with the prefix (class / register) tokens dropped and no final norm, which is what the
    published backbone hard-wires (``get_intermediate_layers(n={depth - 2})``).

    lang: (B, llm_dim) averaged instruction embedding (model dtype) for a FiLM featurizer (see
    ``add_film_``), else None. The FiLM path runs the same stem timm's ``forward_intermediates``
    runs (patch embed, position embed, patch drop, pre-norm), then ``film_block`` per block."""
    if lang is None:
        out = vit.forward_intermediates(pixels, indices=[len(vit.blocks) - 2],
                                        return_prefix_tokens=False, norm=False, stop_early=True,
                                        output_fmt="NLC", intermediates_only=True)
        return out[0]
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
    for blk in list(vit.blocks)[:-1]:  # the last block's output is never read
        x = film_block(blk, x, lang)
    return x[:, vit.num_prefix_tokens:]


class PrismaticVisionBackbone(nn.Module):
    """``featurizer`` (+ ``fused_featurizer``): pixels (B, 3 * n_featurizers, S, S) -> patch
    features (B, N, sum of embed_dims), the featurizers' features concatenated along channels.
    With ``carve_oft.use_film`` every block of every featurizer carries FiLM projectors and the
    forward needs the averaged instruction embedding."""

    def __init__(self, cfg: OpenVLAConfig):
        super().__init__()
        ov = cfg.timm_overrides or ({},) * len(cfg.timm_model_ids)
        self.film = cfg.oft is not None and cfg.oft.use_film
        self.featurizer = self._featurizer(cfg, 0, ov[0])
        self.embed_dim = self.featurizer.embed_dim
        self.fused = cfg.use_fused_vision_backbone
        if self.fused:
            self.fused_featurizer = self._featurizer(cfg, 1, ov[1])
            self.embed_dim += self.fused_featurizer.embed_dim

    def _featurizer(self, cfg: OpenVLAConfig, i: int, overrides: dict) -> nn.Module:
        vit = make_featurizer(cfg.timm_model_ids[i], cfg.image_sizes[i], cfg.act_layers[i], overrides)
        if self.film:
            add_film_(vit, int(cfg.text_config["hidden_size"]))
        return vit

    def featurize_one(self, pixels: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        """One image, (B, 3 * n_featurizers, S, S) [+ (B, llm_dim) FiLM embedding] -> (B, N, embed_dim)."""
        if not self.fused:
            return penultimate_patches(self.featurizer, pixels, lang)
        a, b = torch.split(pixels, [3, 3], dim=1)
        pa = penultimate_patches(self.featurizer, a, lang)
        pb = penultimate_patches(self.fused_featurizer, b, lang)
        if pa.shape[1] != pb.shape[1]:
            raise InputError(f"fused featurizers give {pa.shape[1]} and {pb.shape[1]} patches")
        return torch.cat([pa, pb], dim=2)

    def forward(self, pixels: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3 * n_featurizers * n_images, S, S) -> (B, n_images * N, embed_dim): each image's
        patches, images concatenated along the sequence (OpenVLA-OFT's multi-image input).
        lang: (B, llm_dim) averaged instruction embedding, required iff the backbone is FiLMed
        (the same embedding modulates every image and both featurizers)."""
        if self.film != (lang is not None):
            raise ValueError("a FiLM vision backbone needs the instruction embedding; a plain one takes none")
        per = 6 if self.fused else 3
        if pixels.shape[1] == per:
            return self.featurize_one(pixels, lang)
        return torch.cat([self.featurize_one(x, lang) for x in torch.split(pixels, per, dim=1)], dim=1)


class PrismaticProjector(nn.Module):
    """GELU MLP from vision channels to the LM width: ``fc1 -> GELU -> fc2`` (``gelu-mlp``) or
    ``fc1 (4x vision dim) -> GELU -> fc2 -> GELU -> fc3`` (``fused-gelu-mlp``)."""

    def __init__(self, layers: tuple[str, ...], vision_dim: int, llm_dim: int):
        super().__init__()
        self.n = len(layers)
        if self.n == 2:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))
        return self.fc3(F.gelu(x)) if self.n == 3 else x


class ImageTransform:
    """One featurizer's preprocessing, as the published processor composes it: optional letterbox
    pad to a square (filled with the mean colour), resize (PIL, the checkpoint's interpolation,
    bicubic for every published one; ``resize-naive``
    to S x S, otherwise the shorter side to S), centre crop S x S, scale to [0, 1], normalise.

    mean/std: the backbone's (``preprocessor_config.json`` when the checkpoint has one, else timm's
    pretrained config for the timm id)."""

    _MODES = ("bicubic", "bilinear", "nearest", "lanczos")

    def __init__(self, size: int, strategy: str, mean, std, interpolation: str = "bicubic"):
        if interpolation not in self._MODES:
            raise InputError(f"preprocessor_config.json: interpolation {interpolation!r} is not one "
                             f"of {list(self._MODES)}")
        self.size, self.strategy, self.interpolation = int(size), strategy, interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def _resize(self, img: np.ndarray) -> np.ndarray:
        from PIL import Image  # a timm/torchvision dependency; PIL's bicubic is the published one

        s = self.size
        h, w = img.shape[:2]
        if self.strategy == "letterbox" and h != w:
            m = max(h, w)
            fill = np.array([int(x * 255) for x in self.mean.flatten().tolist()], dtype=np.uint8)
            canvas = np.empty((m, m, 3), dtype=np.uint8)
            canvas[:] = fill
            top, left = int((m - h) / 2), int((m - w) / 2)
            canvas[top:top + h, left:left + w] = img
            img, h, w = canvas, m, m
        if self.strategy == "resize-naive":
            size = (s, s)
        else:  # shorter side to s (torchvision Resize(int) semantics)
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if (h, w) != size:
            mode = getattr(Image.Resampling, self.interpolation.upper())
            img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), mode))
        top, left = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
        return img[top:top + s, left:left + s]

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 normalised."""
        imgs = [self._resize(np.asarray(im)) for im in images]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std


def image_transforms(cfg: OpenVLAConfig, preprocessor: dict | None) -> list[ImageTransform]:
    """One ``ImageTransform`` per featurizer. preprocessor: the checkpoint's parsed
    ``preprocessor_config.json`` (its ``means``/``stds``/``image_resize_strategy`` win) or None."""
    n = len(cfg.timm_model_ids)
    pre = preprocessor or {}
    means, stds = pre.get("means"), pre.get("stds")
    if means is None or stds is None:
        timm = import_timm()
        pcs = [timm.models.get_pretrained_cfg(t).to_dict()
               for t in cfg.timm_model_ids]
        means = [list(p.get("mean", (0.5,) * 3)) for p in pcs]
        stds = [list(p.get("std", (0.5,) * 3)) for p in pcs]
    if len(means) != n or len(stds) != n:
        raise InputError(f"preprocessor_config.json: means/stds must have {n} entries")
    strategy = pre.get("image_resize_strategy", cfg.image_resize_strategy)
    interps = pre.get("interpolations") or ["bicubic"] * n
    return [ImageTransform(cfg.image_sizes[i], strategy, means[i], stds[i], interps[i % len(interps)])
            for i in range(n)]
