"""What every captioner shares: its config fields, caption targets, generation, checkpoint state.

A captioner (``model.captioner``) turns the aggregator's K tokens (B, K, Q) into a caption::

    tokenize(captions) -> TextBatch         targets: caption ids + EOS, mask 0 on padding
    loss(tokens, TextBatch) -> scalar       mean token cross-entropy over slides with a caption
    generate(tokens, **overrides) -> [str]  one caption per bag
    trainable_state_dict() -> dict          what a checkpoint stores

``t5`` (:mod:`pathm3.parts.t5`) and ``causal_lm`` (:mod:`pathm3.parts.causal_lm`) differ only in
how the projected tokens enter their language model; everything else is here. Generation
settings are config fields and, under the same names, keyword overrides of ``generate``:
``num_beams, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty,
no_repeat_ngram_size`` (None keeps the config's value).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch
from pydantic import Field, ValidationError, model_serializer
from torch import nn

from pathm3.config_errors import explain
from pathm3.errors import UsageError
from pathm3.parts.base import PartConfig, TextBatch
from pathm3.parts.lora import FinetuneSettings, apply_finetune, cast_frozen, fill_from_tensors, parameters_on_meta
from pathm3.text import clean_caption


class GenerationSettings(PartConfig):
    """How captions are generated: the defaults of ``generate(tokens, **overrides)``."""

    num_beams: int = Field(5, ge=1)  # beam width (1: greedy); sampling uses 1
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False  # sample (temperature, top_p, top_k) instead of beam search
    temperature: float = Field(1.0, gt=0)  # sampling only
    top_p: float = Field(1.0, gt=0, le=1)  # sampling only: nucleus mass
    top_k: int = Field(50, ge=0)  # sampling only: 0 keeps every token
    repetition_penalty: float = Field(1.0, gt=0)  # > 1 makes repeated tokens less likely
    no_repeat_ngram_size: int = Field(0, ge=0)  # > 0: no n-gram of this size twice in a caption


GENERATION_SETTINGS = tuple(GenerationSettings.model_fields)


class CaptionerConfig(FinetuneSettings, GenerationSettings):
    """Fields of every captioner: where its language model comes from, how it is finetuned (see
    :mod:`pathm3.parts.lora`) and how it generates. Each captioner adds ``type`` and the fields of a
    randomly initialised model (used when ``pretrained`` is null: tests, the demo)."""

    pretrained: str | None = None  # local Hugging Face folder of the language model
    tokenizer: str | None = None  # tokenizer folder (defaults to `pretrained`)
    prompt: str = ""  # text after the query tokens, e.g. "Describe the slide:"
    max_caption_length: int = Field(128, ge=1)  # target tokens, EOS included

    @model_serializer(mode="wrap")
    def _type_first(self, handler) -> dict[str, Any]:
        """Dump ``type`` and the common fields before the generation and architecture fields."""
        data = handler(self)
        return {k: data[k] for k in FIELD_ORDER if k in data} | data


FIELD_ORDER = ("type", *(k for k in CaptionerConfig.model_fields if k not in FinetuneSettings.model_fields
                         and k not in GENERATION_SETTINGS), *FinetuneSettings.model_fields, *GENERATION_SETTINGS)


def generation_kwargs(cfg: GenerationSettings, overrides: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face ``generate`` arguments from the config and per-call ``overrides`` (None keeps
    the config's value). An unknown name is a TypeError, a value out of range a UsageError."""
    unknown = sorted(set(overrides) - set(GENERATION_SETTINGS))
    if unknown:
        raise TypeError(f"unknown generation setting {unknown[0]!r} (known: {', '.join(GENERATION_SETTINGS)})")
    values = {k: getattr(cfg, k) for k in GENERATION_SETTINGS} | {k: v for k, v in overrides.items() if v is not None}
    try:
        s = GenerationSettings.model_validate(values)
    except ValidationError as exc:
        raise UsageError(f"generation setting {explain(exc, GenerationSettings)}") from None
    gen: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample,
                           "num_beams": 1 if s.do_sample else s.num_beams,
                           "repetition_penalty": s.repetition_penalty, "no_repeat_ngram_size": s.no_repeat_ngram_size}
    if s.do_sample:
        gen |= {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
    return gen


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(start, eos, pad) ids: a tokenizer without BOS starts with EOS (GPT-2, the word tokenizer),
    one without a pad token pads with EOS (GPT-2, Llama); padding never reaches a loss."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the captioner's tokenizer has no EOS token; captions could never end "
                         "(use the tokenizer of model.captioner.pretrained)")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return start, eos, pad


def caption_targets(tokenizer, captions: Sequence[str | None], max_length: int) -> TextBatch:
    """Each caption's ids (no special tokens, cut to ``max_length - 1``) + EOS, right-padded (B, T);
    a slide without a caption gets an all-zero mask row."""
    _, eos, pad = special_ids(tokenizer)
    rows = [r[: max_length - 1] + [eos] for r in tokenizer([c or "" for c in captions], add_special_tokens=False)["input_ids"]]
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (row, caption) in enumerate(zip(rows, captions)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = int(bool(caption))
    return TextBatch(ids, mask)


class LanguageCaptioner(nn.Module):
    """tokens (B, K, Q) -> a Hugging Face language model -> caption. Subclasses build the model as
    ``self.<lm_name>`` (on the meta device when a folder fills it, see :meth:`fill_language_model`),
    and define :meth:`prompt_inputs` (what generation starts from) and :meth:`loss`."""

    lm_name: ClassVar[str]  # attribute holding the language model

    def __init__(self, cfg: CaptionerConfig, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer

    @property
    def language_model(self) -> nn.Module:
        return getattr(self, self.lm_name)

    def train(self, mode: bool = True) -> "LanguageCaptioner":
        super().train(mode)
        if self.cfg.finetune == "frozen":
            self.language_model.eval()  # a frozen model never runs in training mode (no dropout)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: everything but the frozen weights a folder provides, i.e. the
        projection and, with LoRA, the adapters; the whole model with finetune full or no folder."""
        state = self.state_dict()
        if self.cfg.finetune == "full" or not self.cfg.pretrained:
            return state
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if not k.startswith(self.lm_name + ".") or k in trained}

    def build_language_model(self, make: Callable[[], nn.Module]) -> None:
        """``self.<lm_name> = make()``: empty (parameters on the meta device) when ``pretrained``
        names a folder that fills it (``load_pretrained``), else random and set up for finetuning."""
        if self.cfg.pretrained:
            with parameters_on_meta():
                setattr(self, self.lm_name, make())
        else:
            setattr(self, self.lm_name, make())
            apply_finetune(self.language_model, self.cfg)

    @property
    def language_model_empty(self) -> bool:
        """Whether the language model still waits for its folder's weights (on the meta device)."""
        return any(p.is_meta for p in self.language_model.parameters())

    def fill_language_model(self, tensors: dict[str, torch.Tensor], folder: str, key: str) -> None:
        """Put a folder's weights into the empty language model, then freeze it or add adapters."""
        fill_from_tensors(self.language_model, tensors, folder, key)
        apply_finetune(self.language_model, self.cfg, key.rsplit(".", 1)[0])

    def lm_dtype(self, like: torch.Tensor) -> torch.dtype:
        """The dtype the language model runs in: fp32 on CPU; a frozen model (or LoRA's base) moves
        to bf16 the first time it runs on CUDA."""
        lm = self.language_model
        if self.cfg.finetune != "full" and like.is_cuda and lm.get_input_embeddings().weight.dtype != torch.bfloat16:
            cast_frozen(lm, torch.bfloat16)
        return lm.get_input_embeddings().weight.dtype

    def tokenize(self, captions: Sequence[str | None]) -> TextBatch:
        """Targets: token ids + EOS; a slide without a caption gets an all-zero mask row."""
        return caption_targets(self.tokenizer, captions, self.cfg.max_caption_length)

    def prompt_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds (B, L, d), attention mask (B, L)) that generation starts from."""
        raise NotImplementedError

    def loss(self, tokens: torch.Tensor, target: TextBatch) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, **overrides: Any) -> list[str]:
        """One caption per bag: beam search by default, sampling with ``do_sample``; settings from
        the config, overridden by keyword (:data:`GENERATION_SETTINGS`)."""
        gen = generation_kwargs(self.cfg, overrides)
        _, eos, pad = special_ids(self.tokenizer)
        lm = self.language_model
        known, rows = len(self.tokenizer), lm.get_output_embeddings().weight.shape[0]
        if known < rows:  # never emit ids the tokenizer cannot decode (FlanT5 pads its vocabulary)
            gen["suppress_tokens"] = list(range(known, rows))
        inputs, attn = self.prompt_inputs(tokens)
        ids = lm.generate(inputs_embeds=inputs, attention_mask=attn, eos_token_id=eos, pad_token_id=pad, **gen)
        return [clean_caption(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
