"""The PathM3 model as a chain of parts, each chosen by ``type:`` from :mod:`pathm3.parts`.

Shapes: B bags, M patches (padded), D feature width, H mixer width, K tokens, Q token width,
C classes.

    feats (B, M, D), mask (B, M)
      -> mixer        e.g. Nyström correlation: E = MSA(LN(E)) + E        (B, M, H)
      -> aggregator   e.g. Q-Former: K queries [+ caption tokens]         (B, K, Q)   + scores (B, M)
      -> head         Linear(Q, C) per token, mean over K                 (B, C)      L_cls
      -> captioner    e.g. Linear(Q, d) -> frozen FlanT5                  caption     L_gen
    L = alpha * L_cls + (1 - alpha) * L_gen

With ``train.prototypes`` every patch is scored along class (and term) directions mined from the
training bags before training (:mod:`pathm3.parts.prototypes`), read from the features, and the
pooled scores are a second stream (B, C) averaged with the head's (and are added to the term logits).
With ``train.terms`` the caption's words get their own scores (from the tokens, the mixer's
output or both; :mod:`pathm3.parts.terms`), + weight * L_terms, and with ``captioner_tokens`` the
captioner reads their probabilities as F more tokens (B, K + F, Q); with ``model.head.captioner_token``
it reads the predicted class (the label in training) as one more. With ``model.bag_mix`` each
bag is also merged with the one before it in the batch and classified against both classes
(+ bag_mix * L_mix, training only), so no class is told by the absence of the others' patches.

PathM3 is ``nystrom -> qformer -> linear head -> t5``; the MIL baselines are ``none -> abmil``
(or transmil, dsmil, clam_sb, mean, max) with the same head and, optionally, the same captioner.
Build it with :func:`pathm3.pretrained.build_model` (loads pretrained parts from local folders)
or :func:`pathm3.pretrained.load_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from pathm3.config import ModelConfig
from pathm3.parts import AGGREGATORS, CAPTIONERS, HEADS, MIXERS
from pathm3.parts.base import AggregatorOutput, TextBatch
from pathm3.parts.contrastive import ContrastiveAlignment, ContrastiveConfig
from pathm3.parts.prototypes import PrototypesConfig, PrototypeStream
from pathm3.parts.terms import CaptionTerms, TermsConfig


@dataclass
class Batch:
    """A padded batch of bags, as :class:`pathm3.data.BagCollator` makes it."""

    slide_ids: list[str]
    features: torch.Tensor  # (B, M, D)
    mask: torch.Tensor  # (B, M) bool, True on real patches
    targets: torch.Tensor  # (B, C) float: 1/0 per class, NaN unknown
    captions: list[str | None] = field(default_factory=list)  # reference captions (metrics)
    caption_tokens: TextBatch | None = None  # the captioner's targets
    text: TextBatch | None = None  # captions as classifier input (class words stripped if asked)


@dataclass
class ModelOutput:
    """One training/validation step."""

    loss: torch.Tensor  # alpha * loss_cls + (1 - alpha) * loss_gen + w * loss_contrastive + w' * loss_terms
    #                     + bag_mix * loss_mix
    loss_cls: torch.Tensor  # detached
    loss_gen: torch.Tensor  # detached
    logits: torch.Tensor  # (B, C) from the classifier's input (with the caption when it was used)
    loss_contrastive: torch.Tensor | None = None  # detached; None without train.contrastive
    loss_terms: torch.Tensor | None = None  # detached; None without train.terms
    loss_mix: torch.Tensor | None = None  # detached; None without model.bag_mix (or outside training)


@dataclass
class Inference:
    """Everything inference gives for a batch, from one pass of the mixer."""

    logits: torch.Tensor  # (B, C) image only
    probabilities: torch.Tensor  # (B, C) softmax (single-label) or sigmoid (multi-label)
    text_probabilities: dict[str, torch.Tensor | None]  # per caption set: (B, C), None when unused
    captions: list[str] | None  # generated, when asked and the model has a captioner
    scores: torch.Tensor  # (B, M) per-patch scores of the aggregator, 0 at padding
    query_scores: torch.Tensor | None  # (B, K, M) per token, when the aggregator has them
    embedding: torch.Tensor | None = None  # (B, Q) the slide's tokens, mean-pooled
    slide_embedding: torch.Tensor | None = None  # (B, E) in the contrastive space (train.contrastive)
    caption_embedding: torch.Tensor | None = None  # (B, E) of texts["text"] in that space, rows without one 0
    term_probabilities: torch.Tensor | None = None  # (B, T) each caption term's probability (train.terms)


class PathM3(nn.Module):
    """mixer -> aggregator -> head (+ captioner), built from the ``model`` config section.

    Args:
        cfg: the ``model`` section; num_classes: C; head: ``single_label`` or ``multi_label``.
        text_tokenizer: for captions fed to an aggregator that reads text (the Q-Former).
        caption_tokenizer: the captioner's tokenizer.
        contrastive: ``train.contrastive``; with a weight > 0 the model gets the projections of
            the image-text contrastive loss (:mod:`pathm3.parts.contrastive`).
        terms: ``train.terms``; with a weight > 0 the model gets the caption-term scores
            (:mod:`pathm3.parts.terms`).
        prototypes: ``train.prototypes``; enabled, the model gets the mined-prototype stream
            (:mod:`pathm3.parts.prototypes`; filled before training by :func:`pathm3.mining.fit_prototypes`).
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, head: str = "single_label",
                 text_tokenizer=None, caption_tokenizer=None, contrastive: ContrastiveConfig | None = None,
                 terms: TermsConfig | None = None, prototypes: PrototypesConfig | None = None):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        self.mixer = MIXERS[cfg.mixer.type](cfg.mixer, cfg.feature_dim)
        aggregator = AGGREGATORS[cfg.aggregator.type]
        extra = {"tokenizer": text_tokenizer} if aggregator.takes_text else {}
        self.aggregator = aggregator(cfg.aggregator, self.mixer.out_dim, num_classes, **extra)
        captioner = CAPTIONERS[cfg.captioner.type]
        head_cfg = cfg.head if captioner else cfg.head.model_copy(update={"captioner_token": False})  # none to read it
        self.head = HEADS[head](head_cfg, self.aggregator.out_dim, num_classes)
        self.captioner = captioner(cfg.captioner, self.aggregator.out_dim, caption_tokenizer) if captioner else None
        self.contrastive = ContrastiveAlignment(contrastive, self.aggregator.out_dim) \
            if contrastive is not None and contrastive.weight > 0 else None
        self.terms = CaptionTerms(terms, self.aggregator.out_dim, self.mixer.out_dim) \
            if terms is not None and terms.weight > 0 else None
        self.prototypes = PrototypeStream(prototypes, cfg.feature_dim, num_classes, len(self.term_names)) \
            if prototypes is not None and prototypes.enabled else None

    # ---------------------------------------------------------------- bookkeeping

    @property
    def multilabel(self) -> bool:
        return self.head.multilabel

    @property
    def term_names(self) -> tuple[str, ...]:
        """The caption terms the model scores (``train.terms.terms``); empty without them."""
        return () if self.terms is None else tuple(self.terms.cfg.terms)

    @property
    def reads_text(self) -> bool:
        """Whether captions can be classifier input (a text-reading aggregator, text_input not never)."""
        return self.aggregator.takes_text and self.cfg.aggregator.text_input != "never"

    def parts(self) -> dict[str, nn.Module]:
        """The model's parts by name (what ``train.param_groups`` and summaries refer to)."""
        named = {"mixer": self.mixer, "aggregator": self.aggregator, "head": self.head,
                 "captioner": self.captioner, "contrastive": self.contrastive, "terms": self.terms,
                 "prototypes": self.prototypes}
        return {name: part for name, part in named.items() if part is not None}

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs that receive gradients; the optimizer gets only these."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores, by state-dict key: everything, except that a part with a
        ``trainable_state_dict()`` (a captioner) stores only that: it leaves out the frozen language
        model its folder provides."""
        state = self.state_dict()
        for name, part in self.parts().items():
            if hasattr(part, "trainable_state_dict"):
                keep = {f"{name}.{k}" for k in part.trainable_state_dict()}
                state = {k: v for k, v in state.items() if not k.startswith(f"{name}.") or k in keep}
        return state

    def unstored_keys(self) -> set[str]:
        """State-dict keys a checkpoint leaves out: weights read from pretrained folders again."""
        return set(self.state_dict()) - set(self.checkpoint_state_dict())

    def load_pretrained(self, only_missing: bool = False) -> None:
        """Let every part load its pretrained weights from the local folders its config names. With
        ``only_missing`` (before a checkpoint is loaded): only the parts a checkpoint cannot fill,
        those with weights it leaves out or still empty (on the meta device)."""
        unstored = self.unstored_keys() if only_missing else set()
        for name, part in self.parts().items():
            if not hasattr(part, "load_pretrained"):
                continue
            covered = not any(k.startswith(f"{name}.") for k in unstored)
            if only_missing and covered and not any(p.is_meta for p in part.parameters()):
                continue
            part.load_pretrained()

    def set_tokenizers(self, text_tokenizer=None, caption_tokenizer=None) -> None:
        """Give the text-reading aggregator and the captioner their tokenizers."""
        if self.aggregator.takes_text:
            self.aggregator.tokenizer = text_tokenizer
        if self.captioner is not None:
            self.captioner.tokenizer = caption_tokenizer

    def tokenize(self, captions: Sequence[str | None], classifier_captions: Sequence[str | None] | None = None
                 ) -> tuple[TextBatch | None, TextBatch | None]:
        """(captioner targets, classifier text) token batches for a batch's captions."""
        if not any(captions):
            return None, None
        targets = self.captioner.tokenize(captions) if self.captioner is not None else None
        cls_caps = classifier_captions if classifier_captions is not None else captions
        encodes = self.reads_text or self.contrastive is not None
        text = self.aggregator.tokenize(cls_caps) if encodes and any(cls_caps) else None
        return targets, text

    # ---------------------------------------------------------------- training

    def forward(self, batch: Batch) -> ModelOutput:
        """Losses and logits of a training/validation step."""
        mask = self._drop_patches(batch.mask)
        x = self.mixer(batch.features, mask)  # (B, M, H)
        image = self.aggregate(batch.features, x, mask, batch.targets)  # tokens (B, K, Q)
        text = self.aggregator.text_for_classifier(batch.text) if self.reads_text else None
        for_classifier = image if text is None else self.aggregate(batch.features, x, mask, batch.targets, text)
        logits, loss_cls = self._classify(for_classifier, batch.targets)  # (B, C)

        term_logits = self._term_logits(image, x, mask)  # (B, T)
        alpha = self.cfg.alpha
        loss_gen = image.tokens.sum() * 0.0
        if self.captioner is not None and alpha < 1 and batch.caption_tokens is not None:
            labels = batch.targets if self.training else None  # the class token: the label in training
            loss_gen = self.captioner.loss(self._caption_input(image, term_logits, labels), batch.caption_tokens)
        loss = alpha * loss_cls + (1 - alpha) * loss_gen
        loss_con = loss_terms = None
        if self.contrastive is not None:
            loss_con = self._contrastive_loss(image.tokens, batch.text)
            loss = loss + self.contrastive.cfg.weight * loss_con
        if self.terms is not None:
            loss_terms = self.terms.loss(term_logits, batch.captions)
            loss = loss + self.terms.cfg.weight * loss_terms
        loss_mix = None
        if self.training and self.cfg.bag_mix > 0 and batch.features.shape[0] > 1:
            loss_mix = self._mixed_loss(batch.features, mask, batch.targets)
            loss = loss + self.cfg.bag_mix * loss_mix
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return ModelOutput(loss, loss_cls.detach(), loss_gen.detach(), logits, detach(loss_con), detach(loss_terms),
                           detach(loss_mix))

    def aggregate(self, features: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                  targets: torch.Tensor | None = None, text: TextBatch | None = None) -> AggregatorOutput:
        """The aggregator's output for the mixer's output ``x`` (B, M, H), with the mined-prototype
        stream (``train.prototypes``) of the bag ``features`` (B, M, D) as ``patch_stream`` (B, C)
        and ``term_stream`` (B, T)."""
        out = self.aggregator(x, mask, targets, text)
        if self.prototypes is not None:
            out.patch_stream, out.term_stream = self.prototypes(features, mask)
        return out

    def _term_logits(self, out: AggregatorOutput, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """(B, T) caption-term logits (``train.terms``), with the prototype stream's when there is one."""
        if self.terms is None:
            return None
        logits = self.terms.logits(out.tokens, x, mask)
        return logits if out.term_stream is None else logits + out.term_stream

    def _contrastive_loss(self, tokens: torch.Tensor, text: TextBatch | None) -> torch.Tensor:
        """Image-text contrastive loss over the slides with a caption (0 with fewer than two)."""
        keep = text.mask.any(1) if text is not None else torch.zeros(0, dtype=torch.bool)
        if int(keep.sum()) < 2:
            return sum(p.sum() for p in self.contrastive.parameters()) * 0.0  # keeps the graph connected
        slides = self.contrastive.slide(tokens[keep])  # (b, E)
        texts = self.contrastive.text(self.aggregator.encode_text(TextBatch(text.ids[keep], text.mask[keep])))
        return self.contrastive.loss(slides, texts)

    def _classify(self, out: AggregatorOutput, targets: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head logits (averaged with the aggregator's instance stream and the model's patch stream,
        where there are) and the loss."""
        logits = self.head(out.tokens)  # (B, C)
        streams = [logits] + [s for s in (out.instance_logits, out.patch_stream) if s is not None]
        loss = None
        if targets is not None:
            loss = sum(self.head.loss(s, targets) for s in streams) / len(streams)
            if out.aux_loss is not None:
                w = self.aggregator.aux_weight
                loss = (1 - w) * loss + w * out.aux_loss
        return sum(streams) / len(streams), loss

    def _mixed_loss(self, features: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Classification loss on each bag merged with the one before it in the batch, image only. The
        merged bag holds both bags' evidence, so its target is both classes (single-label: half
        each; multi-label: either). A class told by the *absence* of the others' evidence fails
        here, so every class must be found by its own patches (what the heatmap can show)."""
        other = torch.roll(torch.arange(features.shape[0], device=features.device), 1)  # (B,) the partner
        feats = torch.cat([features, features[other]], dim=1)  # (B, 2M, D)
        both = torch.cat([mask, mask[other]], dim=1)  # (B, 2M)
        merged = torch.maximum(targets, targets[other]) if self.multilabel else (targets + targets[other]) / 2
        return self._classify(self.aggregate(feats, self.mixer(feats, both), both), merged)[1]  # NaN rows skipped

    def _caption_input(self, out: AggregatorOutput, term_logits: torch.Tensor | None,
                       targets: torch.Tensor | None = None) -> torch.Tensor:
        """What the captioner reads: the aggregator's tokens (B, K, Q), then the term tokens (B, F, Q)
        with ``train.terms.captioner_tokens``, then the class token (B, 1, Q) with
        ``model.head.captioner_token`` (the prediction, or the ``targets`` (B, C) where known)."""
        tokens = [out.tokens]
        if self.terms is not None and self.terms.to_captioner is not None:
            tokens.append(self.terms.caption_tokens(term_logits))
        if self.head.to_captioner is not None:
            tokens.append(self.head.caption_token(self._classify(out)[0], targets))
        return torch.cat(tokens, dim=1)  # (B, K [+ F] [+ 1], Q)

    def _captions(self, out: AggregatorOutput, x: torch.Tensor, mask: torch.Tensor, **generation: Any) -> list[str]:
        """Generated captions from the aggregator's output and the mixer's output ``x``."""
        return self.captioner.generate(self._caption_input(out, self._term_logits(out, x, mask)), **generation)

    def _drop_patches(self, mask: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_dropout
        if not self.training or p <= 0:
            return mask
        keep = (torch.rand(mask.shape, device=mask.device) >= p) & mask
        empty = keep.sum(1) == 0  # never drop a whole bag
        return torch.where(empty[:, None], mask, keep)

    # ---------------------------------------------------------------- inference

    @torch.no_grad()
    def infer(self, features: torch.Tensor, mask: torch.Tensor, texts: dict[str, TextBatch | None] | None = None,
              generate: bool = True, **generation: Any) -> Inference:
        """Image-only and (per caption set in ``texts``) image+text probabilities, generated
        captions and patch scores, from one pass of the mixer (the costly part)."""
        x = self.mixer(features, mask)  # (B, M, H)
        image = self.aggregate(features, x, mask)
        logits, _ = self._classify(image)
        text_probs: dict[str, torch.Tensor | None] = {}
        for name, batch_text in (texts or {}).items():
            text = self.aggregator.text_for_classifier(batch_text) if self.reads_text else None
            text_probs[name] = None if text is None else \
                self.head.probabilities(self._classify(self.aggregate(features, x, mask, text=text))[0])
        term_logits = self._term_logits(image, x, mask)  # (B, T)
        captions = None
        if generate and self.captioner is not None:
            captions = self.captioner.generate(self._caption_input(image, term_logits), **generation)
        slide_emb = caption_emb = None
        if self.contrastive is not None:
            slide_emb = self.contrastive.slide(image.tokens)  # (B, E)
            if (texts or {}).get("text") is not None:
                caption_emb = self.contrastive.text(self.aggregator.encode_text(texts["text"]))
                caption_emb = caption_emb * texts["text"].mask.any(1, keepdim=True)  # (B, E)
        return Inference(logits, self.head.probabilities(logits), text_probs, captions, image.scores,
                         image.query_scores, image.tokens.mean(1), slide_emb, caption_emb,
                         None if term_logits is None else torch.sigmoid(term_logits))

    # Convenience wrappers (they tokenize; forwards take tensors).

    def classify(self, features: torch.Tensor, mask: torch.Tensor,
                 captions: Sequence[str | None] | None = None) -> torch.Tensor:
        """Class logits (B, C) from the slide alone, or slide + caption when ``captions`` is given
        (and the aggregator reads text)."""
        x = self.mixer(features, mask)
        text = None
        if captions is not None and self.reads_text and any(captions):
            text = self.aggregator.text_for_classifier(self._to(self.aggregator.tokenize(captions), features))
        return self._classify(self.aggregate(features, x, mask, text=text))[0]

    @torch.no_grad()
    def generate_captions(self, features: torch.Tensor, mask: torch.Tensor, **generation: Any) -> list[str]:
        """One caption per bag; keyword overrides of the captioner's generation settings: ``num_beams``,
        ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``,
        ``no_repeat_ngram_size``."""
        if self.captioner is None:
            raise RuntimeError("this model has no captioner (model.captioner.type is none)")
        x = self.mixer(features, mask)
        return self._captions(self.aggregate(features, x, mask), x, mask, **generation)

    @torch.no_grad()
    def patch_scores(self, features: torch.Tensor, mask: torch.Tensor, per_query: bool = False) -> torch.Tensor:
        """The aggregator's per-patch scores (B, M), or (B, K, M) per token with ``per_query``."""
        out = self.infer(features, mask, generate=False)
        return out.query_scores if (per_query and out.query_scores is not None) else out.scores

    @staticmethod
    def _to(text: TextBatch, like: torch.Tensor) -> TextBatch:
        return TextBatch(text.ids.to(like.device), text.mask.to(like.device))
