"""The PathM3 model: Nyström correlation -> Q-Former (+ caption) -> averaged linear classifier,
and Q-Former queries -> projection -> frozen FlanT5 captioner.

Shapes: B bags, M patches (padded), D feature width, H correlation width, K queries,
Q Q-Former width, T caption tokens, C classes, d T5 width.

    feats (B, M, D), mask (B, M)
      -> Correlation:   E = MSA(LN(E)) + E                      (B, M, H)
      -> Q-Former:      K queries [+ T caption tokens] x-attend (B, K, Q)
      -> classifier:    Linear(Q, C) per query, mean over K     (B, C)      L_cls
      -> captioner:     Linear(Q, d), [queries; prompt] -> T5   caption     L_gen
    L = alpha * L_cls + (1 - alpha) * L_gen

Build it with :func:`build_model` (which loads pretrained parts from local folders) or
:func:`pathm3.pretrained.load_checkpoint` (our own checkpoints).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from nystrom_attention import NystromAttention
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, T5Config, T5ForConditionalGeneration
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from pathm3.config import CaptionerConfig, ModelConfig
from pathm3.text import clean_caption

# --------------------------------------------------------------------------------------------
# Correlation module


class NystromBlock(nn.Module):
    """One pre-norm residual Nyström self-attention layer: E = MSA(LN(E)) + E."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim=dim,
            dim_head=dim // heads,
            heads=heads,
            num_landmarks=landmarks,
            pinv_iterations=pinv_iterations,
            residual=True,
            dropout=dropout,
        )
        # Zero-initialised output: the block starts as the identity and only learns to mix
        # patches when that lowers the loss, which keeps small cohorts from memorising noise.
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (1, n, H) -> (1, n, H)
        return x + self.attn(self.norm(x))


class Correlation(nn.Module):
    """Input projection D -> H, then ``layers`` Nyström blocks over each bag's real patches.

    Each bag runs alone at its true length. The library's landmark groups depend on the padded
    length and its pseudo-inverse is scaled by a batch-wide maximum, so running the padded batch
    through it would make a bag's output depend on its padding and on its batch neighbours.
    """

    def __init__(self, cfg, feature_dim: int):
        super().__init__()
        h = cfg.hidden_dim
        self.proj = nn.Identity() if feature_dim == h else nn.Linear(feature_dim, h)
        n_layers = cfg.layers if cfg.enabled else 0
        self.blocks = nn.ModuleList(
            NystromBlock(h, cfg.heads, cfg.landmarks, cfg.pinv_iterations, cfg.dropout)
            for _ in range(n_layers)
        )

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats)  # (B, M, H)
        if len(self.blocks) == 0:
            return x
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            e = x[b, mask[b]].unsqueeze(0)  # (1, n_b, H): this bag's real patches
            for block in self.blocks:
                e = block(e)
            out[b, mask[b]] = e[0]
        return out  # (B, M, H), zeros at padding


# --------------------------------------------------------------------------------------------
# PathM3


def qformer_config(cfg: ModelConfig) -> Blip2QFormerConfig:
    """Q-Former architecture for a randomly initialised model (text input enabled)."""
    q = cfg.qformer
    return Blip2QFormerConfig(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        hidden_dropout_prob=q.dropout,
        attention_probs_dropout_prob=q.dropout,
        max_position_embeddings=max(q.max_text_length, 32),
        cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=cfg.correlation.hidden_dim,
        use_qformer_text_input=True,
        pad_token_id=0,
        initializer_range=q.init_std if q.init_std is not None else q.hidden_size**-0.5,
    )


def t5_config(c: CaptionerConfig) -> T5Config:
    """FlanT5-style architecture for a randomly initialised captioner."""
    return T5Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_kv=c.d_kv,
        d_ff=c.d_ff,
        num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        num_heads=c.num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


class PathM3(nn.Module):
    """Multimodal multi-task MIL over a bag of patch features.

    Args:
        cfg: the ``model`` section of the config.
        num_classes: C, the length of ``data.classes``.
        qformer_tokenizer / t5_tokenizer: tokenizers for captions fed to the Q-Former and for
            the captioner's targets (may be the same object for tiny models).
        qformer_cfg / t5_cfg: architectures (taken from pretrained checkpoints when loading).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_classes: int,
        qformer_tokenizer=None,
        t5_tokenizer=None,
        qformer_cfg: Blip2QFormerConfig | None = None,
        t5_cfg: T5Config | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.qformer_tokenizer = qformer_tokenizer
        self.t5_tokenizer = t5_tokenizer
        qcfg = qformer_cfg or qformer_config(cfg)
        self.correlation = Correlation(cfg.correlation, cfg.feature_dim)
        self.query_tokens = nn.Parameter(
            torch.randn(1, cfg.qformer.num_queries, qcfg.hidden_size) * qcfg.initializer_range
        )
        self.text_embeddings = Blip2TextEmbeddings(qcfg)
        self.qformer = Blip2QFormerModel(qcfg)
        self.classifier_dropout = nn.Dropout(cfg.classifier_dropout)
        self.classifier = nn.Linear(qcfg.hidden_size, num_classes)
        self.t5: T5ForConditionalGeneration | None = None
        if cfg.captioner.enabled:
            tcfg = t5_cfg or t5_config(cfg.captioner)
            self.language_projection = nn.Linear(qcfg.hidden_size, tcfg.d_model)
            self.t5 = T5ForConditionalGeneration(tcfg)
            if cfg.captioner.freeze:
                self.t5.requires_grad_(False)
                self.t5.eval()

    # ---------------------------------------------------------------- bookkeeping

    @property
    def t5_frozen(self) -> bool:
        return self.t5 is not None and self.cfg.captioner.freeze

    def train(self, mode: bool = True) -> "PathM3":
        super().train(mode)
        if self.t5_frozen:
            self.t5.eval()  # frozen parts never run in training mode (no dropout)
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs that receive gradients; the optimizer gets only these."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def use_bf16_captioner(self) -> None:
        """On CUDA, run the frozen T5 in bf16; called on each captioner use, a no-op on CPU."""
        p = next(self.t5.parameters())
        if self.t5_frozen and p.is_cuda and p.dtype != torch.bfloat16:
            self.t5.to(torch.bfloat16)

    # ---------------------------------------------------------------- building blocks

    def _qformer(
        self,
        patches: torch.Tensor,  # (B, M, H)
        mask: torch.Tensor,  # (B, M) bool
        texts: Sequence[str | None] | None = None,  # B captions joining the queries' self-attention
    ) -> torch.Tensor:
        b = patches.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)  # (B, K, Q)
        k = queries.shape[1]
        # Additive (B, 1, 1, M) mask: exact under both eager and SDPA attention, and it
        # broadcasts over the K query rows of cross-attention even when text is present.
        enc_mask = torch.zeros(mask.shape, dtype=patches.dtype, device=patches.device)
        enc_mask = enc_mask.masked_fill(~mask, torch.finfo(patches.dtype).min)[:, None, None, :]
        if texts is None:
            hidden, attn_mask = queries, None
        else:
            text_ids, text_mask = self._tokenize_qformer_text(texts, patches.device)  # (B, T)
            hidden = self.text_embeddings(input_ids=text_ids, query_embeds=queries)  # (B, K+T, Q)
            ones = torch.ones(b, k, dtype=text_mask.dtype, device=text_mask.device)
            attn_mask = torch.cat([ones, text_mask], dim=1)  # (B, K+T)
        out = self.qformer(
            query_embeds=hidden,
            query_length=k,
            attention_mask=attn_mask,
            encoder_hidden_states=patches,
            encoder_attention_mask=enc_mask,
        )
        return out.last_hidden_state[:, :k]  # (B, K, Q): query positions only

    def _logits(self, query_out: torch.Tensor) -> torch.Tensor:
        per_query = self.classifier(self.classifier_dropout(query_out))  # (B, K, C)
        return per_query.mean(dim=1)  # (B, C)

    def _tokenize_qformer_text(self, captions: Sequence[str | None], device) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.qformer_tokenizer(
            [c or "" for c in captions],
            padding="longest",
            truncation=True,
            max_length=self.cfg.qformer.max_text_length,
            return_tensors="pt",
        )
        ids, tmask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        absent = torch.tensor([c is None for c in captions], device=device)
        tmask = tmask.masked_fill(absent[:, None], 0)  # a slide without a caption sees no text
        return ids, tmask

    def _text_for_classifier(self, captions: Sequence[str | None] | None) -> list[str | None] | None:
        mode = self.cfg.text_input
        if captions is None or mode == "never":
            return None
        texts = list(captions)
        if mode == "dropout" and self.training:
            drop = (torch.rand(len(texts)) < self.cfg.text_dropout).tolist()
            texts = [None if d else t for t, d in zip(texts, drop)]
        return texts if any(t for t in texts) else None

    def _t5_inputs(self, query_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.use_bf16_captioner()
        t5_dtype = next(self.t5.parameters()).dtype
        prefix = self.language_projection(query_out).to(t5_dtype)  # (B, K, d)
        prompt = self.cfg.captioner.prompt
        if prompt:
            ids = self.t5_tokenizer(prompt, return_tensors="pt")["input_ids"].to(prefix.device)
            prompt_emb = self.t5.get_input_embeddings()(ids).expand(prefix.shape[0], -1, -1)  # (B, P, d)
            prefix = torch.cat([prefix, prompt_emb], dim=1)  # (B, K+P, d)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        return prefix, mask

    def _caption_loss(self, query_out: torch.Tensor, captions: Sequence[str | None]) -> torch.Tensor:
        keep = [i for i, c in enumerate(captions) if c]
        if self.t5 is None or not keep:
            return query_out.sum() * 0.0  # keeps the graph connected (DDP-friendly)
        inputs, attn = self._t5_inputs(query_out[keep])  # (b, K+P, d)
        enc = self.t5_tokenizer(
            [captions[i] for i in keep],
            padding="longest",
            truncation=True,
            max_length=self.cfg.captioner.max_caption_length,
            return_tensors="pt",
        )
        labels = enc["input_ids"].to(inputs.device)
        labels = labels.masked_fill(enc["attention_mask"].to(inputs.device) == 0, -100)
        return self.t5(inputs_embeds=inputs, attention_mask=attn, labels=labels).loss.float()

    def _drop_patches(self, mask: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_dropout
        if not self.training or p <= 0:
            return mask
        keep = torch.rand(mask.shape, device=mask.device) >= p
        keep = keep & mask
        empty = keep.sum(1) == 0  # never drop a whole bag
        return torch.where(empty[:, None], mask, keep)

    # ---------------------------------------------------------------- public API

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training/validation step.

        ``batch``: ``features`` (B, M, D), ``mask`` (B, M) bool, ``labels`` (B,) long with -100
        for unlabelled slides, ``captions`` list of B strings or None (captioning targets and
        classifier text), optionally ``classifier_captions`` (the classifier's text, e.g. with
        class words removed).
        Returns ``loss``, ``loss_cls``, ``loss_gen`` and ``logits`` (B, C).
        """
        feats, labels = batch["features"], batch["labels"]
        captions = batch.get("captions") or [None] * feats.shape[0]
        mask = self._drop_patches(batch["mask"])
        alpha = self.cfg.alpha

        patches = self.correlation(feats, mask)  # (B, M, H)
        q_img = self._qformer(patches, mask)  # (B, K, Q): image only
        texts = self._text_for_classifier(batch.get("classifier_captions") or captions)
        q_cls = q_img if texts is None else self._qformer(patches, mask, texts)
        logits = self._logits(q_cls)  # (B, C)

        labelled = labels != -100
        loss_cls = F.cross_entropy(logits[labelled], labels[labelled]) if labelled.any() else logits.sum() * 0.0
        loss_gen = self._caption_loss(q_img, captions) if alpha < 1 else q_img.sum() * 0.0
        loss = alpha * loss_cls + (1 - alpha) * loss_gen
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_gen": loss_gen.detach(), "logits": logits}

    def classify(
        self, bags: torch.Tensor, mask: torch.Tensor, captions: Sequence[str | None] | None = None
    ) -> torch.Tensor:
        """Class logits (B, C) from the slide alone, or slide + caption when ``captions`` is given
        (and ``model.text_input`` is not ``never``)."""
        patches = self.correlation(bags, mask)
        return self._logits(self._qformer(patches, mask, self._text_for_classifier(captions)))

    @torch.no_grad()
    def generate_captions(self, bags: torch.Tensor, mask: torch.Tensor, **generation: Any) -> list[str]:
        """One caption per bag: beam search by default, sampling with ``do_sample=True``
        (``num_beams``, ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``)."""
        return self._generate(self._qformer(self.correlation(bags, mask), mask), **generation)

    @torch.no_grad()
    def patch_scores(self, bags: torch.Tensor, mask: torch.Tensor, per_query: bool = False) -> torch.Tensor:
        """Q-Former cross-attention of each patch: (B, M), or (B, K, M) with ``per_query``.

        Averaged over heads and cross-attention layers (and queries unless ``per_query``); the
        largest matrix built is (B, heads, K, M), never M x M. Padding scores 0.
        """
        return self.infer(bags, mask, generate=False, scores=True, per_query=per_query)["patch_scores"]

    @torch.no_grad()
    def infer(
        self,
        bags: torch.Tensor,
        mask: torch.Tensor,
        caption_sets: dict[str, Sequence[str | None]] | None = None,
        *,
        generate: bool = True,
        scores: bool = False,
        per_query: bool = False,
        **generation: Any,
    ) -> dict[str, Any]:
        """Everything inference needs from one pass of the correlation module (the costly part):
        ``logits`` (image only, (B, C)); ``logits_<name>`` (B, C) for each set of classifier
        captions in ``caption_sets`` (None when none of them is used); ``captions`` (generated,
        when ``generate`` and the model has a captioner); ``patch_scores`` with ``scores``."""
        patches = self.correlation(bags, mask)  # (B, M, H)
        maps: list[torch.Tensor] = []
        with self._record_cross_attention(maps) if scores else nullcontext():
            q_img = self._qformer(patches, mask)  # (B, K, Q)
        out: dict[str, Any] = {"logits": self._logits(q_img)}
        for name, captions in (caption_sets or {}).items():
            texts = self._text_for_classifier(captions)
            out[f"logits_{name}"] = None if texts is None else self._logits(self._qformer(patches, mask, texts))
        if generate and self.t5 is not None:
            out["captions"] = self._generate(q_img, **generation)
        if scores:
            s = torch.stack(maps).mean(0).masked_fill(~mask[:, None, :], 0.0)  # (B, K, M)
            out["patch_scores"] = s if per_query else s.mean(1)
        return out

    def _generate(
        self,
        query_out: torch.Tensor,  # (B, K, Q)
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> list[str]:
        if self.t5 is None:
            raise RuntimeError("this model has no captioner (model.captioner.enabled is false)")
        c = self.cfg.captioner
        inputs, attn = self._t5_inputs(query_out)
        sample = c.do_sample if do_sample is None else do_sample
        gen: dict[str, Any] = {
            "num_beams": 1 if sample else (num_beams or c.num_beams),
            "max_new_tokens": max_new_tokens or c.max_new_tokens,
            "do_sample": sample,
        }
        if sample:
            gen["temperature"] = c.temperature if temperature is None else temperature
            gen["top_p"] = c.top_p if top_p is None else top_p
        known, rows = len(self.t5_tokenizer), self.t5.config.vocab_size
        if known < rows:  # never emit ids the tokenizer cannot decode (FlanT5 pads its vocabulary too)
            gen["suppress_tokens"] = list(range(known, rows))
        ids = self.t5.generate(inputs_embeds=inputs, attention_mask=attn, **gen)
        return [clean_caption(t) for t in self.t5_tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @contextmanager
    def _record_cross_attention(self, maps: list[torch.Tensor]):
        """Recompute each cross-attention layer's softmax from its own projections."""

        def hook(module, args, kwargs, output):
            hs = kwargs["hidden_states"]  # (B, K, Q)
            enc = kwargs["encoder_hidden_states"]  # (B, M, H)
            add_mask = kwargs["encoder_attention_mask"]  # (B, 1, 1, M)
            b, k, m = hs.shape[0], hs.shape[1], enc.shape[1]
            heads, dh = module.num_attention_heads, module.attention_head_size
            q = module.query(hs).view(b, k, heads, dh).transpose(1, 2)  # (B, h, K, dh)
            key = module.key(enc).view(b, m, heads, dh).transpose(1, 2)  # (B, h, M, dh)
            att = torch.zeros(b, k, m, device=hs.device)
            for h in range(heads):  # one head at a time keeps memory at (B, K, M)
                logits = q[:, h] @ key[:, h].transpose(1, 2) * module.scaling + add_mask[:, 0]
                att += logits.float().softmax(-1)
            maps.append(att / heads)

        handles = [
            layer.crossattention.attention.register_forward_hook(hook, with_kwargs=True)
            for layer in self.qformer.encoder.layer
            if layer.has_cross_attention
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
