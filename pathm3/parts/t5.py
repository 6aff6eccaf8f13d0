"""``t5`` captioner: the K tokens, projected to the T5 width, are the encoder input of a FlanT5
(frozen, as in the paper §3.3; or LoRA, or full) that writes the caption. ``prompt`` text follows
the tokens.

Pretrained weights (local folders): ``pretrained`` is a plain FlanT5 folder (``google/flan-t5-xl``)
or a BLIP-2 FlanT5 folder (its ``language_model.*``, and its ``language_projection.*`` for the
projection); ``projection_pretrained`` names a BLIP-2 folder for the projection otherwise. The
T5 is built empty and takes the folder's tensors (:mod:`pathm3.parts.lora`); checkpoints store
only what was trained (:meth:`~pathm3.parts.generation.LanguageCaptioner.trainable_state_dict`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from pathm3.parts.base import PartConfig, TextBatch
from pathm3.parts.generation import CaptionerConfig, LanguageCaptioner
from pathm3.weights import read_hf_config, read_tensors

KEY = "model.captioner.pretrained"
T5_HINT = "google/flan-t5-xl (or use the BLIP-2 FlanT5 folder)"
BLIP2_HINT = "a BLIP-2 FlanT5 checkpoint in Hugging Face format (e.g. Salesforce/blip2-flan-t5-xl)"


class T5CaptionerConfig(CaptionerConfig):
    """FlanT5 fed the projected tokens (paper §3.3)."""

    type: Literal["t5"] = "t5"
    projection_pretrained: str | None = None  # BLIP-2 folder with language_projection.* (defaults to `pretrained`)
    # Architecture of a randomly initialised T5 (only when `pretrained` is null: tests, demo).
    d_model: int = Field(2048, ge=1)
    num_layers: int = Field(24, ge=1)
    num_decoder_layers: int | None = Field(None, ge=1)
    num_heads: int = Field(32, ge=1)
    d_kv: int = Field(64, ge=1)
    d_ff: int = Field(5120, ge=1)
    vocab_size: int = Field(32128, ge=4)


class NoCaptionerConfig(PartConfig):
    """No captioner: classification only."""

    type: Literal["none"] = "none"


def t5_architecture(cfg: T5CaptionerConfig) -> T5Config:
    """From the pretrained folder when there is one, else a FlanT5-style config from ``cfg``."""
    if cfg.pretrained:
        raw = read_hf_config(cfg.pretrained, T5_HINT, KEY)
        return T5Config(**raw["text_config"]) if raw.get("model_type") == "blip-2" else T5Config(**raw)
    return T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                    num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


class T5Captioner(LanguageCaptioner):
    """tokens (B, K, Q) -> Linear(Q, d) -> [tokens; prompt] -> T5 encoder-decoder -> caption."""

    Config = T5CaptionerConfig
    lm_name = "t5"

    def __init__(self, cfg: T5CaptionerConfig, in_dim: int, tokenizer):
        super().__init__(cfg, tokenizer)
        arch = t5_architecture(cfg)
        self.language_projection = nn.Linear(in_dim, arch.d_model)
        self.build_language_model(lambda: T5ForConditionalGeneration(arch))  # self.t5

    def prompt_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input: the projected tokens, then the prompt's ids (+ EOS) embedded."""
        prefix = self.language_projection(tokens).to(self.lm_dtype(tokens))  # (B, K, d)
        if self.cfg.prompt:
            ids = self.tokenizer(self.cfg.prompt, return_tensors="pt")["input_ids"].to(prefix.device)
            prompt = self.t5.get_input_embeddings()(ids).expand(prefix.shape[0], -1, -1)  # (B, P, d)
            prefix = torch.cat([prefix, prompt], dim=1)  # (B, K+P, d)
        return prefix, torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)

    def loss(self, tokens: torch.Tensor, target: TextBatch) -> torch.Tensor:
        """Mean token cross-entropy over the slides that have a caption (0 when none has)."""
        keep = target.mask.any(dim=1)  # (B,)
        if not keep.any():
            return tokens.sum() * 0.0  # keeps the graph connected (DDP-friendly)
        inputs, attn = self.prompt_inputs(tokens[keep])  # (b, K+P, d)
        labels = target.ids[keep].masked_fill(target.mask[keep] == 0, -100)  # (b, T)
        return self.t5(inputs_embeds=inputs, attention_mask=attn, labels=labels).loss.float()

    def load_pretrained(self) -> None:
        """T5 weights from ``pretrained``; the projection from a BLIP-2 folder when one is named."""
        c = self.cfg
        is_blip2 = False
        if c.pretrained:
            is_blip2 = read_hf_config(c.pretrained, T5_HINT, KEY).get("model_type") == "blip-2"
            if self.language_model_empty:
                tensors = read_tensors(c.pretrained, "language_model." if is_blip2 else "", T5_HINT, KEY)
                self.fill_language_model(tensors, str(c.pretrained), KEY)
        folder = c.projection_pretrained or (c.pretrained if is_blip2 else None)
        if folder:
            proj = read_tensors(folder, "language_projection.", BLIP2_HINT, "model.captioner.projection_pretrained")
            if proj and proj["weight"].shape == self.language_projection.weight.shape:
                self.language_projection.load_state_dict(proj)
