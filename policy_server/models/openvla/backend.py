"""``OpenVLABackend``: serves a published OpenVLA (or converted OpenVLA-OFT) checkpoint directory
without its remote code.

Directory layout read (as published on the Hugging Face hub)::

    DIR/config.json                       model_type "openvla" | "prismatic" (see config.py)
    DIR/model.safetensors                 or model.safetensors.index.json + shards
    DIR/tokenizer.json (+ tokenizer_config.json)   the Llama tokenizer (fast); or tokenizer.model
    DIR/preprocessor_config.json          optional: per-featurizer means/stds, resize strategy

OpenVLA (``predict``): the prompt ``In: What action should the robot take to {instruction}?\\nOut:``
(instruction lower-cased, as OpenVLA's training data and eval scripts do), BOS added by the
tokenizer, the empty "▁" token appended as the published ``predict_action`` does; image patches
spliced after BOS; ``action_dim`` greedy tokens (KV cache, batched); un-normalised per row with
that row's skill statistics (``actions.py``). OFT (config ``carve_oft``): one bidirectional
forward, the L1 head reads the placeholder positions (``model.OpenVLAModule.parallel_actions``);
with ``carve_oft.use_film`` the ViT blocks are first FiLM-modulated by the prompt's mean embedding.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from policy_server.errors import InputError
from policy_server.models.base import ImageSpec, ObservationBatch, PolicyBackend, PolicySpec
from policy_server.models.openvla import actions as A
from policy_server.models.openvla.config import OpenVLAConfig, read_config
from policy_server.models.openvla.vision import image_transforms

PROMPT = "In: What action should the robot take to {}?\nOut:"
IMAGE_KEY = "image"
EMPTY_TOKEN = "\u2581"  # Llama's "▁" (id 29871 in the published tokenizer)
STOP_TOKEN_ID = 2       # Llama's </s>: OFT appends it after the action placeholders


def build_prompt(instruction: str) -> str:
    return PROMPT.format(instruction.lower())


def image_keys(n_images: int) -> list[str]:
    """Wire camera keys: ``image`` (third-person) then ``wrist_image``, ``wrist_image_2``..."""
    return [IMAGE_KEY] + ["wrist_image" + ("" if i == 1 else f"_{i}") for i in range(1, n_images)]


def load_weights(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Copy the checkpoint's tensors into ``module`` one at a time (never a second full copy);
    ``InputError`` naming missing / unexpected / mis-shaped keys."""
    from policy_server.tensors.checkpoint import open_checkpoint

    want = module.state_dict()
    with open_checkpoint(path) as reader:
        have = set(reader.keys())
        missing, extra = sorted(set(want) - have), sorted(have - set(want))
        if missing or extra:
            raise InputError(f"{path}: checkpoint keys do not match the config's architecture: "
                             f"missing {len(missing)} {missing[:5]}, unexpected {len(extra)} {extra[:5]}")
        for key, dst in want.items():
            if tuple(reader.shape(key)) != tuple(dst.shape):
                raise InputError(f"{path}: tensor {key} has shape {tuple(reader.shape(key))}, "
                                 f"the config implies {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(reader.get(key))
    module.to(dtype=dtype)


def materialize(module_cls, cfg: OpenVLAConfig, dtype: torch.dtype) -> torch.nn.Module:
    """Build ``module_cls(cfg)`` on the meta device and allocate it uninitialised in ``dtype`` on
    the CPU: a 7B model is neither randomly initialised (minutes on a CPU) nor held twice. Every
    persistent tensor is then overwritten by ``load_weights``; the only non-persistent buffers,
    the Llama rotary frequencies, are recomputed here."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        module = module_cls(cfg)
    module = module.to(dtype=dtype).to_empty(device="cpu")
    lm = module.language_model.model
    lm.rotary_emb = LlamaRotaryEmbedding(config=lm.config)  # float32 inv_freq, as transformers builds it
    persistent = set(module.state_dict())
    stray = [n for n, _ in module.named_buffers() if n not in persistent and "rotary_emb" not in n]
    if stray:  # a timm/transformers upgrade added state this loader does not know how to rebuild
        raise InputError(f"OpenVLA module has non-persistent buffers {stray} that loading cannot restore")
    return module


def load_tokenizer(path: Path):
    """The checkpoint's Llama tokenizer through transformers' own classes (no remote code):
    ``tokenizer.json`` directly; a ``tokenizer.model``-only directory is converted by transformers
    (needs sentencepiece)."""
    from transformers import LlamaTokenizerFast

    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise InputError(f"{path}: no tokenizer.json or tokenizer.model")
    try:
        return LlamaTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (ImportError, ValueError, OSError) as e:
        raise InputError(f"{path}: cannot load the Llama tokenizer ({type(e).__name__}: "
                         f"{str(e)[:300]}); a tokenizer.model-only directory needs sentencepiece") from None


class OpenVLABackend(PolicyBackend):
    """OpenVLA / OFT over ``OpenVLAModule``.

    OpenVLA: chunk 1, action_dim from ``norm_stats``, no state (``state_dim`` 0), one camera
    ``image``. OFT: chunk ``num_actions_chunk``, state = proprio (``proprio_dim``), cameras
    ``image`` + ``wrist_image``... Images are uint8 (B, S, S, 3) at the first featurizer's size."""

    def __init__(self, config: OpenVLAConfig, module, tokenizer, preprocessor: dict | None = None,
                 unnorm_key: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.config = config
        self.module = module.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.transforms = image_transforms(config, preprocessor)
        vocab = config.tokenizer_vocab_size
        # the published tokenizer has 32000 ids + an added <PAD>; the action bins are the last
        # n_action_bins ids *below* text_config.vocab_size - pad_to_multiple_of
        if not vocab <= len(tokenizer) <= int(config.text_config["vocab_size"]):
            raise InputError(f"tokenizer has {len(tokenizer)} tokens; text_config.vocab_size - "
                             f"pad_to_multiple_of = {vocab} requires between {vocab} and "
                             f"{config.text_config['vocab_size']}")
        self.token_lo, self.token_hi = vocab - config.n_action_bins, vocab
        self.bin_centers = A.bin_centers(config.n_action_bins)
        self.empty_id = tokenizer.convert_tokens_to_ids(EMPTY_TOKEN)
        if self.empty_id is None or self.empty_id == tokenizer.unk_token_id:
            raise InputError(f"tokenizer has no {EMPTY_TOKEN!r} token (OpenVLA's prompt ends with it)")
        raw_key = unnorm_key or config.raw.get("carve_unnorm_key")
        has_default = bool(raw_key) or len(config.norm_stats) == 1
        self.unnorm_key = config.check_unnorm_key(raw_key) if has_default else None
        self.skill_stats: dict[str, tuple[str, dict]] = {}  # skill -> (unnorm_key, dataset stats)
        self.spec = self._make_spec()

    @property
    def normalization(self) -> str:
        return self.config.oft.normalization if self.config.oft else "bounds_q99"

    def _make_spec(self) -> PolicySpec:
        keys = [self.unnorm_key] if self.unnorm_key else sorted(self.config.norm_stats)
        all_stats = [self.config.norm_stats[k] for k in keys] + [d for _, d in self.skill_stats.values()]
        bounds = [A.action_bounds(d["action"], self.normalization) for d in all_stats]
        if len({len(lo) for lo, _ in bounds}) != 1:
            raise InputError("norm_stats: datasets differ in action_dim; set carve_unnorm_key")
        oft = self.config.oft
        if oft is not None and len(bounds[0][0]) != oft.action_dim:
            raise InputError(f"norm_stats action_dim {len(bounds[0][0])} != carve_oft.action_dim "
                             f"{oft.action_dim}")
        s = self.config.image_sizes[0]
        norm = {}
        if self.unnorm_key:
            a = self.config.norm_stats[self.unnorm_key]["action"]
            norm = {"action_q01": list(a["q01"]), "action_q99": list(a["q99"])}
        n_img = oft.num_images_in_input if oft else 1
        return PolicySpec(
            state_dim=oft.proprio_dim if oft else 0, action_dim=len(bounds[0][0]),
            chunk_length=oft.num_actions_chunk if oft else 1,
            action_low=np.min([lo for lo, _ in bounds], 0).tolist(),
            action_high=np.max([hi for _, hi in bounds], 0).tolist(),
            images={k: ImageSpec(s, s) for k in image_keys(n_img)}, normalization=norm,
            name=f"openvla{'-oft' if oft else ''}:{self.config.vision_backbone_id}")

    @classmethod
    def load(cls, path, device: str = "cpu", dtype: torch.dtype = torch.float32,
             unnorm_key: str | None = None) -> "OpenVLABackend":
        from policy_server.models.openvla.model import OpenVLAModule

        path = Path(path)
        cfg = read_config(path)
        module = materialize(OpenVLAModule, cfg, dtype)
        load_weights(module, path, dtype)
        pre = None
        if (path / "preprocessor_config.json").is_file():
            pre = json.loads((path / "preprocessor_config.json").read_text())
        return cls(cfg, module, load_tokenizer(path), pre, unnorm_key, device=device, dtype=dtype)

    # ---- inputs ---------------------------------------------------------------------------
    def tokenize(self, instructions: list[str]) -> tuple[torch.Tensor, list[int]]:
        """-> right-padded ids (B, L) int64 on the device and the per-row lengths."""
        rows = []
        for text in instructions:
            ids = self.tokenizer(build_prompt(text), add_special_tokens=True)["input_ids"]
            if ids[-1] != self.empty_id:  # what predict_action appends (training-time parity)
                ids = ids + [self.empty_id]
            rows.append(ids)
        width = max(len(r) for r in rows)
        out = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out.to(self.device), [len(r) for r in rows]

    def pixel_values(self, batch: ObservationBatch) -> torch.Tensor:
        """-> (B, 3 * n_featurizers * n_images, S, S) in the model dtype: per camera (spec order)
        each featurizer's own normalisation, all channel-stacked as the published processor /
        OFT eval code stack them."""
        parts = [t(np.asarray(batch.images[k])) for k in self.spec.images for t in self.transforms]
        return torch.cat(parts, dim=1).to(self.device, self.dtype)

    def _check(self, batch: ObservationBatch) -> None:
        b, s = len(batch.instructions), self.config.image_sizes[0]
        if sorted(batch.images) != sorted(self.spec.images):
            raise InputError(f"images: this model takes exactly the camera(s) {list(self.spec.images)}; "
                             f"got {sorted(batch.images)}")
        for k in self.spec.images:
            img = np.asarray(batch.images[k])
            if img.dtype != np.uint8 or img.shape != (b, s, s, 3):
                raise InputError(f"image {k!r} is {img.dtype}{tuple(img.shape)}, expected "
                                 f"uint8({b}, {s}, {s}, 3)")
        if self.config.oft is not None and self.config.oft.proprio_dim:
            st = np.asarray(batch.state)
            if st.shape != (b, self.config.oft.proprio_dim) or not np.all(np.isfinite(st)):
                raise InputError(f"state is {tuple(st.shape)}, expected finite "
                                 f"({b}, {self.config.oft.proprio_dim}) proprio")

    # ---- outputs --------------------------------------------------------------------------
    def row_stats(self, batch: ObservationBatch) -> list[dict]:
        """Each row's dataset statistics ({"action": ..., "proprio": ...}): its skill's (stored
        at admission), the base default for core-only rows (``carve_unnorm_key`` or a single
        dataset), else ``InputError``."""
        skills = getattr(batch, "skills", None) or [None] * len(batch)
        out = []
        for s in skills:
            if s in self.skill_stats:
                out.append(self.skill_stats[s][1])
            elif self.unnorm_key is not None:
                out.append(self.config.norm_stats[self.unnorm_key])
            else:
                raise InputError(f"unnorm_key: {'skill ' + repr(s) if s else 'a core-only episode'} "
                                 f"has no stored statistics and the base has no default; set "
                                 f"carve_unnorm_key to one of {sorted(self.config.norm_stats)}")
        return out

    def tokens_to_actions(self, tokens: torch.Tensor, unnorm_key: str | None = None,
                          stats: dict | None = None) -> torch.Tensor:
        """(B, A) action token ids -> (B, A) float32 actions in dataset units, un-normalised with
        ``stats`` (a dataset's action stats) or ``norm_stats[unnorm_key or the default].action``."""
        if stats is None:
            stats = self.config.action_stats(unnorm_key or self.unnorm_key)
        x = A.tokens_to_normalized(tokens, self.config.tokenizer_vocab_size, self.bin_centers)
        return A.unnormalize(x, stats)

    def predict_tokens(self, batch: ObservationBatch) -> torch.Tensor:
        """(B, action_dim) int64 greedy action tokens (OpenVLA)."""
        self._check(batch)
        ids, lengths = self.tokenize(batch.instructions)
        return self.module.greedy_actions(self.pixel_values(batch), ids, lengths,
                                          self.spec.action_dim, self.token_lo, self.token_hi)

    def predict_normalized_oft(self, batch: ObservationBatch, stats: list[dict]) -> torch.Tensor:
        """(B, chunk, A) float32 normalised OFT actions (proprio normalised per row)."""
        oft = self.config.oft
        self._check(batch)
        ids, lengths = self.tokenize(batch.instructions)
        proprio = None
        if oft.proprio_dim:
            if any("proprio" not in d for d in stats):
                raise InputError("norm_stats: an OFT model with proprio needs 'proprio' statistics")
            proprio = torch.stack([A.normalize_proprio(p, d["proprio"], oft.normalization)
                                   for p, d in zip(np.asarray(batch.state), stats)]).to(self.device)
        return self.module.parallel_actions(self.pixel_values(batch), ids, lengths, proprio,
                                            oft.num_actions_chunk, oft.action_dim, STOP_TOKEN_ID).float()

    def predict(self, batch: ObservationBatch) -> torch.Tensor:
        """(B, chunk, action_dim) float32 un-normalised actions, each row with its skill's stats."""
        stats = self.row_stats(batch)
        if self.config.oft is not None:
            x = self.predict_normalized_oft(batch, stats).cpu()
            return torch.stack([A.unnormalize(x[i], d["action"], self.normalization, A.OFT_EPS)
                                for i, d in enumerate(stats)])
        tokens = self.predict_tokens(batch)
        return torch.stack([self.tokens_to_actions(tokens[i:i + 1], stats=d["action"])[0]
                            for i, d in enumerate(stats)])[:, None, :]

    # ---- serving hooks --------------------------------------------------------------------
    def with_module(self, module: torch.nn.Module) -> "OpenVLABackend":
        """This backend around ``module`` (see ``PolicyBackend.with_module``): config,
        tokenizer and image transforms are shared (read only); the per-skill statistics are
        read again by ``attach_state`` (it replaces ``skill_stats`` and ``spec``, never mutates
        them, so the served backend's stay as they are)."""
        new = copy.copy(self)
        new.module = module
        new.skill_stats = {}
        return new

    def attach_state(self, snapshot) -> None:
        """Read every skill's ``openvla_action_stats`` artifact (skills admitted without it use
        the base default); widen the spec's bounds to cover every skill's range."""
        from policy_server.models.openvla.skills import ARTIFACT, decode_stats

        self.skill_stats = {}
        if snapshot is not None:
            for name in snapshot.skill_names():
                arts = snapshot.skill_artifacts(name)
                if ARTIFACT in arts:
                    self.skill_stats[name] = decode_stats(arts[ARTIFACT])
        self.spec = self._make_spec()

    @classmethod
    def admission_hooks(cls, base_dir, expert_dir) -> list:
        from policy_server.models.openvla.skills import OpenVLAStatsHook

        return [OpenVLAStatsHook(base_dir, expert_dir)]

