"""``causal_lm`` captioner: a decoder-only language model (Llama, Mistral, Qwen, Gemma, OPT,
BioGPT, GPT-2, ...) continues the projected tokens into a caption, as BLIP-2's OPT does::

    tokens (B, K, Q) -> Linear(Q, d) -> [tokens; BOS; prompt; caption; EOS] -> causal LM

Labels are -100 on the tokens, BOS, the prompt and the padding, so only the caption and its EOS
are learned; generation continues [tokens; BOS; prompt]. A tokenizer without BOS (GPT-2, the word
tokenizer of the tests and the demo) starts with EOS instead.

``pretrained`` is a local folder of any Hugging Face ``AutoModelForCausalLM`` (config.json,
*.safetensors, tokenizer files); the model is built empty and takes the folder's tensors (see
:mod:`pathm3.parts.lora`, which also adapts it with LoRA). Without a folder, a Llama-style model
of the configured size is randomly initialised.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from pathm3.errors import DataError
from pathm3.parts.base import TextBatch
from pathm3.parts.generation import CaptionerConfig, LanguageCaptioner, special_ids
from pathm3.weights import read_hf_config, read_tensors

KEY = "model.captioner.pretrained"
HINT = ("the causal language model it names (Hugging Face format: config.json, *.safetensors and the "
        "tokenizer files, e.g. of meta-llama/Llama-3.2-1B)")


class CausalLMCaptionerConfig(CaptionerConfig):
    """A decoder-only language model fed the projected tokens as a prefix."""

    type: Literal["causal_lm"] = "causal_lm"
    # Llama-style architecture of a randomly initialised model (only when `pretrained` is null).
    hidden_size: int = Field(2048, ge=1)
    num_layers: int = Field(16, ge=1)
    num_heads: int = Field(32, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)  # grouped-query attention; null: num_heads
    intermediate_size: int = Field(8192, ge=1)
    vocab_size: int = Field(32000, ge=4)
    max_positions: int = Field(2048, ge=8)


def causal_lm_architecture(cfg: CausalLMCaptionerConfig) -> PretrainedConfig:
    """The folder's config.json when there is one, else a Llama-style config from ``cfg`` (with
    the word tokenizer's ids: pad 0, EOS 1, which also starts the sequence)."""
    if cfg.pretrained:
        read_hf_config(cfg.pretrained, HINT, KEY)  # a missing folder: one line naming it
        try:
            return AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"{cfg.pretrained}: config.json cannot be read ({str(exc).splitlines()[0]}) "
                            f"({KEY}); download {HINT} again") from None
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=cfg.max_positions,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def caption_sequence(num_tokens: int, start: list[int], target: TextBatch
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training sequence [K tokens; start (BOS, prompt); caption + EOS; padding] as text ids
    (B, S+T) to embed after the tokens, attention mask (B, K+S+T) and labels (B, K+S+T): the
    caption's ids, -100 on the tokens, the start and the padding."""
    b, s = target.ids.shape[0], len(start)
    ids = torch.cat([torch.tensor(start, device=target.ids.device).expand(b, s), target.ids], dim=1)  # (B, S+T)
    seen = target.mask.new_ones(b, num_tokens + s)
    attention = torch.cat([seen, target.mask], dim=1)  # (B, K+S+T)
    labels = torch.cat([torch.full_like(seen, -100, dtype=torch.long),
                        target.ids.masked_fill(target.mask == 0, -100)], dim=1)  # (B, K+S+T)
    return ids, attention, labels


class CausalLMCaptioner(LanguageCaptioner):
    """tokens (B, K, Q) -> Linear(Q, d) -> prefix of a causal LM -> caption."""

    Config = CausalLMCaptionerConfig
    lm_name = "lm"

    def __init__(self, cfg: CausalLMCaptionerConfig, in_dim: int, tokenizer):
        super().__init__(cfg, tokenizer)
        arch = causal_lm_architecture(cfg)
        try:
            self.build_language_model(lambda: AutoModelForCausalLM.from_config(arch, dtype=torch.float32))  # self.lm
        except ValueError as exc:  # not a causal language model
            raise DataError(f"{cfg.pretrained}: {str(exc).splitlines()[0]} ({KEY} must be a causal "
                            "language model: use type t5 for T5)") from None
        self.language_projection = nn.Linear(in_dim, self.lm.get_input_embeddings().embedding_dim)

    def start_ids(self) -> list[int]:
        """What follows the tokens: BOS (EOS when the tokenizer has none), then the prompt's ids."""
        prompt = self.tokenizer(self.cfg.prompt, add_special_tokens=False)["input_ids"] if self.cfg.prompt else []
        return [special_ids(self.tokenizer)[0], *prompt]

    def embed(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[Linear(tokens); embedding(ids)] (B, K+L, d), in the model's dtype."""
        prefix = self.language_projection(tokens).to(self.lm_dtype(tokens))  # (B, K, d)
        return torch.cat([prefix, self.lm.get_input_embeddings()(ids)], dim=1)

    def prompt_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[tokens; BOS; prompt] (B, K+S, d) and its attention mask: generation continues it."""
        ids = torch.tensor([self.start_ids()], device=tokens.device).expand(tokens.shape[0], -1)  # (B, S)
        inputs = self.embed(tokens, ids)
        return inputs, torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)

    def loss(self, tokens: torch.Tensor, target: TextBatch) -> torch.Tensor:
        """Mean token cross-entropy of the captions and their EOS (0 when no slide has a caption)."""
        keep = target.mask.any(dim=1)  # (B,)
        if not keep.any():
            return tokens.sum() * 0.0  # keeps the graph connected (DDP-friendly)
        ids, attention, labels = caption_sequence(tokens.shape[1], self.start_ids(),
                                                  TextBatch(target.ids[keep], target.mask[keep]))
        inputs = self.embed(tokens[keep], ids)  # (b, K+S+T, d)
        return self.lm(inputs_embeds=inputs, attention_mask=attention, labels=labels).loss.float()

    def load_pretrained(self) -> None:
        """The language model's weights from ``pretrained`` (the projection stays random)."""
        if self.cfg.pretrained and self.language_model_empty:
            tensors = read_tensors(self.cfg.pretrained, "", HINT, KEY)
            self.fill_language_model(tensors, str(self.cfg.pretrained), KEY)
