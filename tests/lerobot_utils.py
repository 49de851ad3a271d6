"""Tiny LeRobot policies and experts built offline, with LeRobot's own classes, for the LeRobot
backend tests: a tiny local SmolVLM directory (config + tokenizer + processor, random init), a
random base policy per type (SmolVLA, ACT without pretrained backbone weights, diffusion), and
experts fine-tuned from it by a few real optimisation steps on synthetic data, each saved with
its own dataset statistics (``save_pretrained`` of the policy and of both processors)."""

from __future__ import annotations

from pathlib import Path

import torch

IMG, SD, AD = 32, 6, 6
CAMERA = "observation.images.front"


def make_tiny_vlm(out: Path, image_size: int | None = None, patch: int = 16) -> Path:
    """A ~13 KB SmolVLM directory: BPE tokenizer trained in memory, SmolVLM processor, config
    (vision ``image_size`` defaults to the module's ``IMG``, the policy's image size)."""
    image_size = image_size or IMG
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor,
                              SmolVLMProcessor, SmolVLMVideoProcessor)

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<image>", "<global-img>", "<row_1_col_1>", "<video>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["pick up the red cube and place it in the box", "open the drawer\n",
                             "push the button", "stack blocks"], trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>",
                              "image_token": "<image>",
                              "end_of_utterance_token": "<end_of_utterance>",
                              "global_image_token": "<global-img>"})
    img_proc = SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": image_size},
                                     max_image_size={"longest_edge": image_size})
    SmolVLMProcessor(image_processor=img_proc, tokenizer=hf_tok,
                     video_processor=SmolVLMVideoProcessor(),
                     image_seq_len=((image_size // patch) // 2) ** 2).save_pretrained(out)
    hf_tok.save_pretrained(out)
    SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=image_size, patch_size=patch),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=len(hf_tok), max_position_embeddings=512,
                         pad_token_id=hf_tok.pad_token_id),
        scale_factor=2, image_token_id=hf_tok.convert_tokens_to_ids("<image>"),
        pad_token_id=hf_tok.pad_token_id).save_pretrained(out)
    return out


def make_stats(i: int, cameras: tuple[str, ...] = ("front",), scale: float = 1.0,
               sd: int = SD, ad: int = AD) -> dict:
    """Dataset statistics of dataset ``i``: state and action mean/std/min/max differ per ``i``
    (so a skill served with another skill's processors comes out in the wrong units)."""
    g = torch.Generator().manual_seed(100 + i)
    a_mean = torch.randn(ad, generator=g) * (1 + i) * scale
    a_std = (0.2 + torch.rand(ad, generator=g) * (1 + i)) * scale
    s_mean = torch.randn(sd, generator=g) * scale
    s_std = (0.5 + torch.rand(sd, generator=g)) * scale
    img = {"mean": torch.full((3, 1, 1), 0.5), "std": torch.full((3, 1, 1), 0.25),
           "min": torch.zeros(3, 1, 1), "max": torch.ones(3, 1, 1)}
    return {**{f"observation.images.{c}": dict(img) for c in cameras},
        "observation.state": {"mean": s_mean, "std": s_std, "min": s_mean - 3 * s_std,
                              "max": s_mean + 3 * s_std},
        "action": {"mean": a_mean, "std": a_std, "min": a_mean - 3 * a_std,
                   "max": a_mean + 3 * a_std},
    }


def make_config(kind: str, vlm_dir: Path | None = None, cameras: tuple[str, ...] = ("front",),
                sd: int = SD, ad: int = AD, **over):
    """A tiny LeRobot config of ``kind`` with IMG x IMG ``cameras``, ``sd``-D state (default 6)
    and ``ad``-D action (default 6)."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    feats_in = {f"observation.images.{c}": PolicyFeature(type=FeatureType.VISUAL,
                                                         shape=(3, IMG, IMG)) for c in cameras}
    feats_in["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(sd,))
    feats_out = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ad,))}
    common = dict(input_features=feats_in, output_features=feats_out, device="cpu")
    if kind == "smolvla":
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

        kw = dict(vlm_model_name=str(vlm_dir), load_vlm_weights=False, chunk_size=6,
                  n_action_steps=4, resize_imgs_with_padding=(IMG, IMG), num_steps=2)
        return SmolVLAConfig(**common, **{**kw, **over})
    if kind == "act":
        from lerobot.policies.act.configuration_act import ACTConfig

        kw = dict(pretrained_backbone_weights=None, chunk_size=6, n_action_steps=4, dim_model=32,
                  n_heads=2, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
                  latent_dim=4, n_vae_encoder_layers=1)
        return ACTConfig(**common, **{**kw, **over})
    if kind == "diffusion":
        from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

        kw = dict(crop_shape=None, n_obs_steps=2, horizon=8, n_action_steps=4, down_dims=(16, 32),
                  diffusion_step_embed_dim=16, num_inference_steps=3,
                  spatial_softmax_num_keypoints=4)
        return DiffusionConfig(**common, **{**kw, **over})
    raise ValueError(kind)


def save_policy(policy, stats: dict, out: Path) -> Path:
    """``save_pretrained`` of the policy and of processors built from ``stats``."""
    from lerobot.policies.factory import make_pre_post_processors

    pre, post = make_pre_post_processors(policy.config, dataset_stats=stats)
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    return out


def _train_batch(policy, g: torch.Generator, batch_size: int = 2) -> dict:
    """A synthetic batch in normalised units (what the preprocessor would hand training)."""
    cfg = policy.config
    t_obs = cfg.n_obs_steps if cfg.type == "diffusion" else None
    lead = (batch_size, t_obs) if t_obs else (batch_size,)
    horizon = cfg.horizon if cfg.type == "diffusion" else cfg.chunk_size
    b = {**{k: torch.rand(*lead, 3, IMG, IMG, generator=g) for k in cfg.image_features},
         "observation.state": torch.randn(*lead, cfg.robot_state_feature.shape[0], generator=g),
         "action": torch.randn(batch_size, horizon, cfg.action_feature.shape[0], generator=g),
         "action_is_pad": torch.zeros(batch_size, horizon, dtype=torch.bool)}
    if cfg.type == "smolvla":
        b["observation.language.tokens"] = torch.randint(10, 100, (batch_size, 8), generator=g)
        b["observation.language.attention_mask"] = torch.ones(batch_size, 8, dtype=torch.bool)
    return b


def finetune(policy, steps: int, seed: int, lr: float = 1e-2) -> None:
    """A few real optimisation steps (Adam on LeRobot's own training loss ``policy.forward``)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    policy.train()
    for _ in range(steps):
        loss, _ = policy.forward(_train_batch(policy, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()


def build_family(root: Path, kind: str, n_experts: int = 2, steps: int = 2,
                 cameras: tuple[str, ...] = ("front",), scale: float = 1.0, sd: int = SD,
                 ad: int = AD, **over) -> dict:
    """Base + ``n_experts`` experts of one policy type under ``root``; each expert is the base
    fine-tuned ``steps`` steps and saved with dataset statistics ``make_stats(i + 1)`` (the base
    with ``make_stats(0)``); ``scale`` multiplies the statistics (robot units, e.g. degrees).
    -> {"base": dir, "experts": {name: dir}, "vlm": dir or None}."""
    from lerobot.policies.factory import get_policy_class

    torch.manual_seed(0)
    vlm = make_tiny_vlm(root / "vlm") if kind == "smolvla" else None
    cls = get_policy_class(kind)
    base = cls(make_config(kind, vlm, cameras, sd, ad, **over))
    base.eval()
    base_dir = save_policy(base, make_stats(0, cameras, scale, sd, ad), root / f"{kind}-base")
    experts = {}
    for i in range(n_experts):
        pol = cls.from_pretrained(str(base_dir), strict=True)
        finetune(pol, steps, seed=i + 1)
        experts[f"skill{i + 1}"] = save_policy(pol, make_stats(i + 1, cameras, scale, sd, ad),
                                               root / f"{kind}-skill{i + 1}")
    return {"base": base_dir, "experts": experts, "vlm": vlm}
