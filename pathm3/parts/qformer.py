"""``qformer`` aggregator: PathM3's BLIP-2 Q-Former (paper §3.2).

K learnable queries cross-attend to the patches; when a caption is given its tokens join the
queries' self-attention (image + text classification). Per-patch scores are the cross-attention
averaged over heads, cross-attention layers and queries, recomputed one head at a time so the
largest matrix is (B, K, M), never M x M.

Pretrained weights (local folders, nothing downloaded):
``pretrained``: a BLIP-2 FlanT5 checkpoint (``qformer.*``, ``query_tokens``);
``text_pretrained``: the text embeddings and text feed-forward layers the FlanT5 checkpoints lack
(a BLIP-2 ITM checkpoint, or a BERT folder); ``tokenizer``: a BERT tokenizer folder.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Literal, Sequence

import torch
from pydantic import Field
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
from transformers.utils import logging as hf_logging

from pathm3.errors import DataError
from pathm3.parts.base import Aggregator, AggregatorOutput, PartConfig, TextBatch
from pathm3.weights import load_into, read_hf_config, read_tensors

BLIP2_HINT = "a BLIP-2 FlanT5 checkpoint in Hugging Face format (e.g. Salesforce/blip2-flan-t5-xl)"
TEXT_HINT = "Salesforce/blip2-itm-vit-g (or bert-base-uncased)"
BERT_TOKENIZER_HINT = "bert-base-uncased (its tokenizer files)"


class QFormerConfig(PartConfig):
    """BLIP-2 Q-Former: learnable queries that cross-attend to the patches (paper Table 6)."""

    type: Literal["qformer"] = "qformer"
    pretrained: str | None = None  # local BLIP-2 checkpoint folder (Q-Former + query tokens)
    text_pretrained: str | None = None  # folder with the Q-Former text parts (blip2-itm / BERT)
    tokenizer: str | None = None  # BERT-style tokenizer folder for captions fed to the Q-Former
    num_queries: int = Field(32, ge=1)
    hidden_size: int = Field(768, ge=1)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=1)
    cross_attention_frequency: int = Field(2, ge=1)
    vocab_size: int = Field(30522, ge=4)
    max_text_length: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    # Weight init std of a randomly initialised Q-Former; null: 1/sqrt(hidden_size). BERT's
    # 0.02 suits width 768 only: at small widths it leaves query-key logits flat, and the
    # model memorises bag noise instead of learning where to look.
    init_std: float | None = Field(None, gt=0)
    text_input: Literal["always", "never", "dropout"] = "dropout"  # the caption as classifier input
    text_dropout: float = Field(0.5, ge=0, le=1)  # with text_input=dropout: P(drop the caption) in training
    # Training memory: keep only each layer's input and recompute the layer in backward, so the
    # cross-attention's keys, values and attention maps over the M patches are never all held at
    # once (whole 100k-patch bags; costs one more Q-Former forward per step).
    gradient_checkpointing: bool = False


@contextmanager
def quiet_transformers():
    """Silence transformers' log warnings inside the block."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def qformer_architecture(cfg: QFormerConfig, in_dim: int) -> Blip2QFormerConfig:
    """The Q-Former's architecture: from the pretrained folder when there is one, else from ``cfg``."""
    if cfg.pretrained:
        blip = read_hf_config(cfg.pretrained, BLIP2_HINT, "model.aggregator.pretrained")
        arch = Blip2QFormerConfig(**{**blip["qformer_config"], "use_qformer_text_input": True})
        if blip.get("num_query_tokens", cfg.num_queries) != cfg.num_queries:
            raise DataError(f"{cfg.pretrained}: has {blip['num_query_tokens']} query tokens but "
                            f"model.aggregator.num_queries is {cfg.num_queries}")
        if arch.encoder_hidden_size != in_dim:
            raise DataError(f"{cfg.pretrained}: the Q-Former cross-attends to width {arch.encoder_hidden_size} "
                            f"but the mixer gives width {in_dim} (model.mixer.hidden_dim)")
        return arch
    return Blip2QFormerConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max(cfg.max_text_length, 32), cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=in_dim, use_qformer_text_input=True, pad_token_id=0,
        initializer_range=cfg.init_std if cfg.init_std is not None else cfg.hidden_size**-0.5,
    )


class QFormerAggregator(Aggregator):
    """K queries (B, K, Q) that cross-attend to the patches, optionally self-attending with text."""

    Config = QFormerConfig
    takes_text = True

    def __init__(self, cfg: QFormerConfig, in_dim: int, num_classes: int, tokenizer=None):
        super().__init__(cfg, in_dim, num_classes)
        arch = qformer_architecture(cfg, in_dim)
        self.tokenizer = tokenizer
        self.out_dim, self.num_tokens = arch.hidden_size, cfg.num_queries
        self.query_tokens = torch.nn.Parameter(torch.randn(1, cfg.num_queries, arch.hidden_size) * arch.initializer_range)
        self.text_embeddings = Blip2TextEmbeddings(arch)
        self.qformer = Blip2QFormerModel(arch)
        if cfg.gradient_checkpointing:
            with quiet_transformers():  # it warns that the Q-Former has no token embeddings: true, and harmless
                self.qformer.activation_checkpointing_enable()  # non-reentrant torch.utils.checkpoint per layer

    # ---------------------------------------------------------------- text

    def tokenize(self, captions: Sequence[str | None]) -> TextBatch:
        """Token ids for the captions; a slide without a caption gets an all-zero mask row."""
        enc = self.tokenizer([c or "" for c in captions], padding="longest", truncation=True,
                             max_length=self.cfg.max_text_length, return_tensors="pt")
        absent = torch.tensor([not c for c in captions])
        return TextBatch(enc["input_ids"], enc["attention_mask"].masked_fill(absent[:, None], 0))

    def text_for_classifier(self, text: TextBatch | None) -> TextBatch | None:
        """Apply ``text_input``: never -> None; dropout -> drop each caption with text_dropout in training."""
        if text is None or self.cfg.text_input == "never":
            return None
        mask = text.mask
        if self.cfg.text_input == "dropout" and self.training:
            drop = torch.rand(mask.shape[0], device=mask.device) < self.cfg.text_dropout
            mask = mask.masked_fill(drop[:, None], 0)
        return TextBatch(text.ids, mask) if mask.any() else None

    def encode_text(self, text: TextBatch) -> torch.Tensor:
        """(B, Q) the caption alone through the Q-Former's text transformer (no queries, no
        patches), mean over its tokens: the text side of ``train.contrastive`` (BLIP-2's ITC)."""
        hidden = self.text_embeddings(input_ids=text.ids)  # (B, T, Q)
        mask = text.mask.clamp(max=1)  # rows without a caption are all 0
        seen = mask.clone()
        seen[:, 0] = 1  # attention needs one visible token per row; such rows are never used
        out = self.qformer(query_embeds=hidden, query_length=0, attention_mask=seen).last_hidden_state
        weights = mask[..., None].to(out.dtype)  # (B, T, 1)
        return (out * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, Q)

    # ---------------------------------------------------------------- forward

    def forward(self, x, mask, targets=None, text: TextBatch | None = None) -> AggregatorOutput:
        b = x.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)  # (B, K, Q)
        k = queries.shape[1]
        # Additive (B, 1, 1, M) mask: exact under both eager and SDPA attention, and it
        # broadcasts over the K query rows of cross-attention even when text is present.
        enc_mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        enc_mask = enc_mask.masked_fill(~mask, torch.finfo(x.dtype).min)[:, None, None, :]
        if text is None:
            hidden, attn_mask = queries, None
        else:
            hidden = self.text_embeddings(input_ids=text.ids, query_embeds=queries)  # (B, K+T, Q)
            ones = torch.ones(b, k, dtype=text.mask.dtype, device=x.device)
            attn_mask = torch.cat([ones, text.mask], dim=1)  # (B, K+T)
        maps: list[torch.Tensor] = []
        with self._record_cross_attention(maps):
            out = self.qformer(query_embeds=hidden, query_length=k, attention_mask=attn_mask,
                               encoder_hidden_states=x, encoder_attention_mask=enc_mask)
        per_query = torch.stack(maps).mean(0).masked_fill(~mask[:, None, :], 0.0)  # (B, K, M)
        out_tokens = out.last_hidden_state[:, :k]  # (B, K, Q): query positions only
        return AggregatorOutput(tokens=out_tokens, scores=per_query.mean(1), query_scores=per_query)

    @contextmanager
    def _record_cross_attention(self, maps: list[torch.Tensor]):
        """Recompute each cross-attention layer's softmax from its own projections (no grad)."""

        @torch.no_grad()
        def hook(module, args, kwargs, output):
            hs, enc = kwargs["hidden_states"], kwargs["encoder_hidden_states"]  # (B, K, Q), (B, M, H)
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

        handles = [layer.crossattention.attention.register_forward_hook(hook, with_kwargs=True)
                   for layer in self.qformer.encoder.layer if layer.has_cross_attention]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ---------------------------------------------------------------- pretrained weights

    def load_pretrained(self) -> None:
        """Load the Q-Former, query tokens and text parts from the configured local folders."""
        cfg = self.cfg
        if cfg.pretrained:
            # The FlanT5 checkpoints carry no text feed-forward: start it from the query one.
            qf = read_tensors(cfg.pretrained, "qformer.", BLIP2_HINT, "model.aggregator.pretrained")
            for key in list(qf):
                if "_query." in key:
                    qf.setdefault(key.replace("_query.", "."), qf[key].clone())
            load_into(self.qformer, qf, str(cfg.pretrained))
            tokens = read_tensors(cfg.pretrained, "query_tokens", BLIP2_HINT, "model.aggregator.pretrained")
            self.query_tokens.data.copy_(tokens[""])
        if cfg.text_pretrained:
            self._load_text_parts(cfg.text_pretrained)

    def _load_text_parts(self, folder: str) -> None:
        is_bert = read_hf_config(folder, TEXT_HINT, "model.aggregator.text_pretrained").get("model_type") == "bert"
        emb = read_tensors(folder, "bert.embeddings." if is_bert else "embeddings.", TEXT_HINT,
                           "model.aggregator.text_pretrained")
        load_into(self.text_embeddings, {k: v for k, v in emb.items()
                                         if k.split(".")[0] in ("word_embeddings", "position_embeddings")}, folder)
        layers = read_tensors(folder, "bert.encoder.layer." if is_bert else "qformer.encoder.layer.", TEXT_HINT,
                              "model.aggregator.text_pretrained")
        text_ffn = {f"encoder.layer.{k}": v for k, v in layers.items() if re.match(r"\d+\.(intermediate|output)\.", k)}
        self.qformer.load_state_dict(text_ffn, strict=False)
