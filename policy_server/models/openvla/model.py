"""The OpenVLA network as an ``nn.Module`` whose ``state_dict()`` keys are the published
checkpoint's keys: ``vision_backbone.{featurizer,fused_featurizer}.*`` (timm ViTs),
``projector.fc{1,2,3}.*`` and ``language_model.*`` (a transformers ``LlamaForCausalLM``).

The glue (patch splicing after BOS, left padding, the KV-cached greedy loop) is ours: the
published remote code supports B = 1 only and, on current transformers, drops the image.
"""

from __future__ import annotations

import torch
from torch import nn

from policy_server.models.openvla.config import OpenVLAConfig
from policy_server.models.openvla.vision import PrismaticProjector, PrismaticVisionBackbone


def make_llama(text_config: dict) -> nn.Module:
    """``LlamaForCausalLM`` from the checkpoint's ``text_config`` (eager-free SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # drop fields LlamaConfig derives itself or that only describe the saving environment
    kw = {k: v for k, v in text_config.items()
          if k not in ("model_type", "architectures", "_name_or_path", "transformers_version")}
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


class MLPResNetBlock(nn.Module):
    """Pre-LayerNorm residual MLP block: ``x + ReLU(Linear(LayerNorm(x)))`` (keys ``ffn.0``/``ffn.1``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm -> fc1 -> ReLU -> blocks -> LayerNorm -> fc2 (OFT's action-head trunk)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(self.layer_norm1(x)))
        for blk in self.mlp_resnet_blocks:
            x = blk(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """OFT's continuous head: the (B, chunk * A, D) action-token hidden states regrouped per
    chunk step (B, chunk, A * D) -> (B, chunk, A) normalised actions in [-1, 1] (trained with L1)."""

    def __init__(self, llm_dim: int, action_dim: int):
        super().__init__()
        self.model = MLPResNet(2, llm_dim * action_dim, llm_dim, action_dim)

    def forward(self, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        return self.model(hidden.reshape(hidden.shape[0], chunk, -1))


class ProprioProjector(nn.Module):
    """Normalised proprio (B, P) -> one LM token (B, D): ``fc2(GELU(fc1(x)))``."""

    def __init__(self, llm_dim: int, proprio_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class OpenVLAModule(nn.Module):
    """vision_backbone + projector + language_model (+ action_head, proprio_projector for OFT).
    ``greedy_actions`` is the OpenVLA forward, ``parallel_actions`` the OFT one."""

    def __init__(self, cfg: OpenVLAConfig):
        super().__init__()
        self.vision_backbone = PrismaticVisionBackbone(cfg)
        self.projector = PrismaticProjector(cfg.projector_layers, self.vision_backbone.embed_dim,
                                            int(cfg.text_config["hidden_size"]))
        self.language_model = make_llama(cfg.text_config)
        d = int(cfg.text_config["hidden_size"])
        if cfg.oft is not None:
            self.action_head = L1RegressionActionHead(d, cfg.oft.action_dim)
            if cfg.oft.proprio_dim:
                self.proprio_projector = ProprioProjector(d, cfg.oft.proprio_dim)

    def image_tokens(self, pixels: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3 * n_featurizers, S, S) [+ (B, llm_dim) FiLM embedding, see ``film_embedding``]
        -> projected patch embeddings (B, N, llm_dim)."""
        return self.projector(self.vision_backbone(pixels, lang))

    @staticmethod
    def film_embedding(emb: torch.Tensor, lengths: list[int], stop: torch.Tensor) -> torch.Tensor:
        """The FiLM conditioning vector per row: (B, L, D) prompt embeddings (right-padded, row b
        valid for ``lengths[b]``), (D,) ``</s>`` embedding -> (B, D), the mean over the row's
        language tokens. Published OFT averages every input token that is not an action
        placeholder: BOS, the prompt, the appended "▁" *and* the trailing ``</s>``; padding is
        excluded here so a batched row equals its B = 1 forward (the only case published)."""
        return torch.stack([torch.cat([emb[r, :ln], stop[None]]).mean(dim=0)
                            for r, ln in enumerate(lengths)])

    def multimodal_embeddings(self, ids: torch.Tensor, lengths: list[int], patches: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splice patches after each row's BOS and left-pad.

        ids: (B, L) int64 right-padded prompt ids (row b valid for ``lengths[b]``, BOS first);
        patches: (B, N, D). Returns embeds (B, T, D) with T = N + max(lengths), attention mask
        (B, T) int64 (0 on the left padding) and position ids (B, T) int64 (0 at each row's BOS),
        so a padded row sees exactly what it would see alone."""
        emb = self.language_model.get_input_embeddings()(ids)  # one call: side-path safe
        b, n = patches.shape[:2]
        t = n + max(lengths)
        out = emb.new_zeros(b, t, emb.shape[-1])
        mask = torch.zeros(b, t, dtype=torch.long, device=ids.device)
        for r, ln in enumerate(lengths):
            row = torch.cat([emb[r, :1], patches[r].to(emb.dtype), emb[r, 1:ln]], dim=0)
            out[r, t - row.shape[0]:] = row
            mask[r, t - row.shape[0]:] = 1
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return out, mask, pos

    @torch.no_grad()
    def greedy_actions(self, pixels: torch.Tensor, ids: torch.Tensor, lengths: list[int],
                       n_tokens: int, token_lo: int, token_hi: int) -> torch.Tensor:
        """Greedy decode ``n_tokens`` action tokens for a batch with a KV cache.

        The argmax is taken over the action-token ids ``[token_lo, token_hi)`` only: a trained
        OpenVLA's argmax is always there, and restricting keeps a partly trained or merged
        model's output decodable. Returns (B, n_tokens) int64 token ids."""
        from transformers.cache_utils import DynamicCache

        lm = self.language_model
        embeds, mask, pos = self.multimodal_embeddings(ids, lengths, self.image_tokens(pixels))
        cache = DynamicCache()
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                 past_key_values=cache, use_cache=True)
        tokens = []
        for step in range(n_tokens):
            nxt = out.logits[:, -1, token_lo:token_hi].argmax(dim=-1) + token_lo
            tokens.append(nxt)
            if step == n_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                     past_key_values=out.past_key_values, use_cache=True)
        return torch.stack(tokens, dim=1)

    @torch.no_grad()
    def parallel_actions(self, pixels: torch.Tensor, ids: torch.Tensor, lengths: list[int],
                         proprio: torch.Tensor | None, chunk: int, action_dim: int, stop_id: int
                         ) -> torch.Tensor:
        """OpenVLA-OFT parallel decoding: one bidirectional forward, no cache.

        Per row the LM sees ``[BOS, image patches, proprio token, prompt[1:], chunk * A zero
        placeholder embeddings, STOP]`` with full (non-causal) attention over its valid tokens
        (the OFT transformers fork's attention); the action head reads the final hidden states
        starting one position *before* the first placeholder (training used labels shifted by
        one, so each action is read from the position that predicts it).
        pixels: (B, C, S, S); ids (B, L) right-padded prompt ids; proprio (B, P) normalised or
        None. A FiLM model (``carve_oft.use_film``) first modulates its ViT blocks with the rows'
        averaged prompt embeddings. Returns (B, chunk, A) normalised actions (model dtype)."""
        emb = self.language_model.get_input_embeddings()(ids)
        stop = self.language_model.get_input_embeddings()(ids.new_full((1,), stop_id))[0]
        film = self.film_embedding(emb, lengths, stop) if self.vision_backbone.film else None
        patches = self.image_tokens(pixels, film)
        if proprio is not None:
            patches = torch.cat([patches, self.proprio_projector(proprio.to(patches.dtype))[:, None]], dim=1)
        n_act = chunk * action_dim
        b, n = patches.shape[:2]
        t = n + max(lengths) + n_act + 1
        seq = emb.new_zeros(b, t, emb.shape[-1])
        valid = torch.zeros(b, t, dtype=torch.bool, device=ids.device)
        starts = []
        for r, ln in enumerate(lengths):
            row = torch.cat([emb[r, :1], patches[r].to(emb.dtype), emb[r, 1:ln],
                             emb.new_zeros(n_act, emb.shape[-1]), stop[None]], dim=0)
            off = t - row.shape[0]
            seq[r, off:], valid[r, off:] = row, True
            starts.append(off + n + ln - 1)
        pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        # 4-D boolean mask (True = may attend): every query sees every valid key; passed as-is
        mask = valid[:, None, None, :].expand(b, 1, t, t)
        hidden = self.language_model.model(inputs_embeds=seq, attention_mask=mask,
                                           position_ids=pos).last_hidden_state
        act_h = torch.stack([hidden[r, s:s + n_act] for r, s in enumerate(starts)])
        return self.action_head(act_h, chunk)
