"""``t5`` captioner: the K tokens, projected to the T5 width, are the encoder input of a FlanT5
(frozen, as in the paper §3.3) that writes the caption. ``prompt`` text follows the tokens.

Pretrained weights (local folders): ``pretrained`` is a plain FlanT5 folder (``google/flan-t5-xl``)
or a BLIP-2 FlanT5 folder (its ``language_model.*``, and its ``language_projection.*`` for the
projection); ``projection_pretrained`` names a BLIP-2 folder for the projection otherwise.
A frozen T5 runs in eval mode, in bf16 on CUDA, and is never stored in our checkpoints.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from pathm3.parts.base import PartConfig, TextBatch
from pathm3.text import clean_caption
from pathm3.weights import load_into, read_hf_config, read_tensors

T5_HINT = "google/flan-t5-xl (or use the BLIP-2 FlanT5 folder)"
BLIP2_HINT = "a BLIP-2 FlanT5 checkpoint in Hugging Face format (e.g. Salesforce/blip2-flan-t5-xl)"


class T5CaptionerConfig(PartConfig):
    """FlanT5 fed the projected tokens (paper §3.3)."""

    type: Literal["t5"] = "t5"
    pretrained: str | None = None  # local FlanT5 or BLIP-2 FlanT5 checkpoint folder
    tokenizer: str | None = None  # T5 tokenizer folder (defaults to `pretrained`)
    projection_pretrained: str | None = None  # BLIP-2 folder with language_projection.* (defaults to `pretrained`)
    freeze: bool = True  # the paper keeps the language model frozen
    prompt: str = ""
    max_caption_length: int = Field(128, ge=1)
    # Generation defaults (override per call).
    num_beams: int = Field(5, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
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
        raw = read_hf_config(cfg.pretrained, T5_HINT, "model.captioner.pretrained")
        return T5Config(**raw["text_config"]) if raw.get("model_type") == "blip-2" else T5Config(**raw)
    return T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                    num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


class T5Captioner(nn.Module):
    """tokens (B, K, Q) -> Linear(Q, d) -> [tokens; prompt] -> T5 encoder-decoder -> caption."""

    Config = T5CaptionerConfig

    def __init__(self, cfg: T5CaptionerConfig, in_dim: int, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        arch = t5_architecture(cfg)
        self.language_projection = nn.Linear(in_dim, arch.d_model)
        self.t5 = T5ForConditionalGeneration(arch)
        if cfg.freeze:
            self.t5.requires_grad_(False)
            self.t5.eval()

    def train(self, mode: bool = True) -> "T5Captioner":
        super().train(mode)
        if self.cfg.freeze:
            self.t5.eval()  # frozen parts never run in training mode (no dropout)
        return self

    @property
    def frozen_pretrained_prefix(self) -> str | None:
        """State-dict prefix of weights that come from a folder and are never stored."""
        return "t5." if (self.cfg.freeze and self.cfg.pretrained) else None

    def tokenize(self, captions: Sequence[str | None]) -> TextBatch:
        """Targets: token ids (+ EOS); a slide without a caption gets an all-zero mask row."""
        enc = self.tokenizer([c or "" for c in captions], padding="longest", truncation=True,
                             max_length=self.cfg.max_caption_length, return_tensors="pt")
        absent = torch.tensor([not c for c in captions])
        return TextBatch(enc["input_ids"], enc["attention_mask"].masked_fill(absent[:, None], 0))

    def _encoder_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.freeze and tokens.is_cuda and next(self.t5.parameters()).dtype != torch.bfloat16:
            self.t5.to(torch.bfloat16)  # a frozen T5 runs in bf16 on CUDA
        dtype = next(self.t5.parameters()).dtype
        prefix = self.language_projection(tokens).to(dtype)  # (B, K, d)
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
        inputs, attn = self._encoder_inputs(tokens[keep])  # (b, K+P, d)
        labels = target.ids[keep].masked_fill(target.mask[keep] == 0, -100)  # (b, T)
        return self.t5(inputs_embeds=inputs, attention_mask=attn, labels=labels).loss.float()

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, num_beams: int | None = None, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None,
                 top_p: float | None = None) -> list[str]:
        """One caption per bag: beam search by default, nucleus sampling with ``do_sample``."""
        c = self.cfg
        inputs, attn = self._encoder_inputs(tokens)
        sample = c.do_sample if do_sample is None else do_sample
        gen: dict[str, Any] = {"num_beams": 1 if sample else (num_beams or c.num_beams),
                               "max_new_tokens": max_new_tokens or c.max_new_tokens, "do_sample": sample}
        if sample:
            gen["temperature"] = c.temperature if temperature is None else temperature
            gen["top_p"] = c.top_p if top_p is None else top_p
        known, rows = len(self.tokenizer), self.t5.config.vocab_size
        if known < rows:  # never emit ids the tokenizer cannot decode (FlanT5 pads its vocabulary too)
            gen["suppress_tokens"] = list(range(known, rows))
        ids = self.t5.generate(inputs_embeds=inputs, attention_mask=attn, **gen)
        return [clean_caption(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def load_pretrained(self) -> None:
        """T5 weights from ``pretrained``; the projection from a BLIP-2 folder when one is named."""
        c = self.cfg
        if c.pretrained:
            is_blip2 = read_hf_config(c.pretrained, T5_HINT, "model.captioner.pretrained").get("model_type") == "blip-2"
            t5 = read_tensors(c.pretrained, "language_model." if is_blip2 else "", T5_HINT, "model.captioner.pretrained")
            load_into(self.t5, t5, str(c.pretrained), allow_missing=(r"embed_tokens", r"lm_head"))
        folder = c.projection_pretrained or (c.pretrained if c.pretrained and is_blip2 else None)
        if folder:
            proj = read_tensors(folder, "language_projection.", BLIP2_HINT, "model.captioner.projection_pretrained")
            if proj and proj["weight"].shape == self.language_projection.weight.shape:
                self.language_projection.load_state_dict(proj)
