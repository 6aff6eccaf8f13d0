"""Running a trained model over bags: typed predictions, their one file format, and the metrics
of a labelled split.

:func:`predict` gives one :class:`Prediction` per slide (probabilities from the slide alone, from
slide + caption when one is given, and a generated caption). :func:`write_predictions` is the one
writer of ``predictions.csv`` / ``.json`` (eval, predict, the demo and the post-training evaluation
all use it). :func:`evaluate` scores a split (a section is None when the split has no labels or
no captions).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from pathm3.config import Config
from pathm3.data import BagCollator, BagDataset
from pathm3.files import write_csv, write_text
from pathm3.manifest import Slide
from pathm3.metrics import caption_metrics, classification_metrics, multilabel_metrics
from pathm3.model import PathM3
from pathm3.parts.terms import contains
from pathm3.runtime import autocast, to_numpy
from pathm3.text import class_phrases, named_classes, strip_class_words


@dataclass
class Prediction:
    """One slide's prediction (probabilities are (C,) arrays; None where not computed)."""

    slide_id: str
    targets: np.ndarray  # (C,) 1/0, NaN unknown
    caption_ref: str | None
    probabilities: np.ndarray  # image only
    probabilities_text: np.ndarray | None  # image + the slide's caption (class words stripped if configured)
    probabilities_text_stripped: np.ndarray | None  # image + caption with class words stripped
    caption_pred: str | None
    embedding: np.ndarray | None = None  # (Q,) the slide's tokens, mean-pooled (caption retrieval baseline)
    slide_embedding: np.ndarray | None = None  # (E,) contrastive space, when trained with train.contrastive
    caption_embedding: np.ndarray | None = None  # (E,) the reference caption in that space
    terms: tuple[str, ...] = ()  # the caption terms the model scores (train.terms), empty without
    term_probabilities: np.ndarray | None = None  # (T,) their probabilities, None without terms

    @property
    def findings(self) -> list[str]:
        """The caption terms with probability >= 0.5, likeliest first (the ``findings`` column)."""
        if self.term_probabilities is None:
            return []
        order = np.argsort(-self.term_probabilities, kind="stable")
        return [self.terms[t] for t in order if self.term_probabilities[t] >= 0.5]

    @property
    def labelled(self) -> bool:
        return not np.isnan(self.targets).all()


@torch.no_grad()
def predict(model: PathM3, slides: Sequence[Slide], classes: Sequence[str], *, batch_size: int = 4,
            strip_words: bool = False, also_stripped: bool = False, captions: bool = True,
            progress: bool = True, precision: str = "fp32", num_workers: int = 0,
            **generation: Any) -> list[Prediction]:
    """Predict every slide on the model's device; one mixer pass per batch serves every output.

    Bags stream from disk through a DataLoader (``num_workers`` reader processes, pinned memory on
    CUDA), so only a batch is in memory at a time; ``precision`` is that of :func:`pathm3.runtime.autocast`."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    strip = lambda caps: [strip_class_words(c, classes) if c else c for c in caps]  # noqa: E731
    tokenize = model.aggregator.tokenize if (model.reads_text or model.contrastive is not None) else None
    loader = DataLoader(BagDataset(slides), batch_size=batch_size, collate_fn=BagCollator(), num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    out: list[Prediction] = []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
        refs = batch.captions
        sets = {"text": strip(refs) if strip_words else refs}
        if also_stripped:
            sets["text_stripped"] = strip(refs)
        texts = {name: _tokens(tokenize, caps, device) for name, caps in sets.items()} if tokenize else {}
        feats, mask = batch.features.to(device, non_blocking=True), batch.mask.to(device, non_blocking=True)
        with autocast(device, precision):
            res = model.infer(feats, mask, texts, generate=captions, **generation)
        probs = to_numpy(res.probabilities)
        text_probs = {k: (None if v is None else to_numpy(v)) for k, v in res.text_probabilities.items()}
        emb, slide_emb, cap_emb, terms = (None if t is None else to_numpy(t) for t in
                                          (res.embedding, res.slide_embedding, res.caption_embedding,
                                           res.term_probabilities))
        for i, sid in enumerate(batch.slide_ids):
            per_set = {k: (v[i] if v is not None and sets[k][i] else None) for k, v in text_probs.items()}
            out.append(Prediction(sid, batch.targets[i].numpy(), refs[i], probs[i], per_set.get("text"),
                                  per_set.get("text_stripped"), res.captions[i] if res.captions else None,
                                  None if emb is None else emb[i], None if slide_emb is None else slide_emb[i],
                                  None if cap_emb is None or not refs[i] else cap_emb[i], model.term_names,
                                  None if terms is None else terms[i]))
    return out


def _tokens(tokenize, captions, device):
    if not any(captions):
        return None
    t = tokenize(captions)
    return type(t)(t.ids.to(device), t.mask.to(device))


def thresholds_of(cfg: Config, classes: Sequence[str]) -> np.ndarray:
    """Per-class decision thresholds (C,) of a multi-label model from ``eval.thresholds``."""
    t = cfg.eval.thresholds
    return np.array([t.get(c, 0.5) for c in classes] if isinstance(t, dict) else [t] * len(classes))


def decide(probs: np.ndarray, multilabel: bool, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Predicted class index (single-label) or 0/1 per class (multi-label) from probabilities."""
    if not multilabel:
        return probs.argmax(-1)
    return (probs >= (0.5 if thresholds is None else thresholds)).astype(int)


def evaluate_predictions(preds: Sequence[Prediction], classes: Sequence[str], multilabel: bool = False,
                         thresholds: np.ndarray | None = None, phrases: dict[str, list[str]] | None = None,
                         reference: Sequence[Prediction] = ()) -> dict[str, Any]:
    """The ``metrics.json`` of ``pathm3-eval`` from predictions. ``phrases``: the words captions use
    per class (``captioning.class_agreement``); ``reference``: predictions of the training slides,
    whose captions are the retrieval baseline (``captioning_retrieval``)."""
    labelled = [p for p in preds if p.labelled]
    captioned = [p for p in preds if p.caption_ref and p.caption_pred is not None]

    def cls(attr: str):
        rs = [p for p in labelled if getattr(p, attr) is not None]
        if not rs:
            return None
        targets, probs = np.stack([p.targets for p in rs]), np.stack([getattr(p, attr) for p in rs])
        if multilabel:
            return multilabel_metrics(targets, probs, list(classes), thresholds)
        return classification_metrics(targets.argmax(1).tolist(), probs, len(classes))

    classification = None
    if labelled:
        classification = {"image_only": cls("probabilities"), "image_text": cls("probabilities_text")}
        if classification["image_text"] and any(p.probabilities_text_stripped is not None for p in labelled):
            classification["image_text_class_words_stripped"] = cls("probabilities_text_stripped")
    captioning = retrieved = None
    if captioned:
        refs = {p.slide_id: [p.caption_ref] for p in captioned}
        captioning = caption_metrics(refs, {p.slide_id: p.caption_pred for p in captioned})
        captioning["class_agreement"] = None if multilabel else class_agreement(captioned, classes, phrases)
        nearest = nearest_captions(captioned, reference)
        retrieved = caption_metrics(refs, nearest) if nearest else None
    return {"n_slides": len(preds), "classification": classification, "captioning": captioning,
            "captioning_retrieval": retrieved, "retrieval": retrieval_metrics(preds),
            "caption_terms": caption_term_metrics(preds)}


def caption_term_metrics(preds: Sequence[Prediction]) -> dict[str, Any] | None:
    """The model's caption-term probabilities (``train.terms``) scored as multi-label findings
    against the words of each slide's reference caption (:func:`pathm3.metrics.multilabel_metrics`,
    threshold 0.5); None without terms or reference captions."""
    rows = [p for p in preds if p.caption_ref and p.term_probabilities is not None]
    if not rows:
        return None
    terms = list(rows[0].terms)
    targets = contains([p.caption_ref for p in rows], terms).numpy()  # (n, T) 1/0
    return {"n_slides": len(rows), "n_terms": len(terms),
            **multilabel_metrics(targets, np.stack([p.term_probabilities for p in rows]), terms)}


def class_agreement(preds: Sequence[Prediction], classes: Sequence[str], phrases: dict[str, list[str]] | None
                    ) -> float | None:
    """Share of slides whose generated caption names the class the classifier predicted (image
    only); None when no reference caption names a class (the phrases are not known)."""
    known = class_phrases(classes, phrases)
    if not any(named_classes(p.caption_ref, known) for p in preds):
        return None
    return float(np.mean([classes[int(p.probabilities.argmax())] in named_classes(p.caption_pred, known)
                          for p in preds]))


def nearest_captions(preds: Sequence[Prediction], reference: Sequence[Prediction]) -> dict[str, str]:
    """Per slide, the caption of the training slide nearest by bag embedding (cosine)."""
    ref = [r for r in reference if r.caption_ref and r.embedding is not None]
    rows = [p for p in preds if p.embedding is not None]
    if not ref or not rows:
        return {}
    unit = lambda e: e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # noqa: E731
    sim = unit(np.stack([p.embedding for p in rows])) @ unit(np.stack([r.embedding for r in ref])).T
    return {p.slide_id: ref[int(j)].caption_ref for p, j in zip(rows, sim.argmax(1))}


def retrieval_metrics(preds: Sequence[Prediction], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Any] | None:
    """Slide->caption and caption->slide recall@k in the contrastive space over the slides with a
    caption. Slides sharing a caption text share its candidate: a hit is any item whose caption
    text is the query's (chance: k / number of distinct captions)."""
    rows = [p for p in preds if p.slide_embedding is not None and p.caption_embedding is not None]
    if len(rows) < 2:
        return None
    texts = sorted({p.caption_ref for p in rows})
    which = np.array([texts.index(p.caption_ref) for p in rows])  # (n,) each slide's caption
    caption_emb = np.stack([next(p.caption_embedding for p in rows if p.caption_ref == t) for t in texts])  # (u, E)
    sim = np.stack([p.slide_embedding for p in rows]) @ caption_emb.T  # (n slides, u captions)
    order_c = np.argsort(-sim, axis=1, kind="stable")  # captions ranked per slide
    order_s = np.argsort(-sim.T, axis=1, kind="stable")  # slides ranked per caption
    out: dict[str, Any] = {"n_slides": len(rows), "n_captions": len(texts)}
    for k in ks:
        out[f"slide_to_caption_r@{k}"] = float(np.mean([which[i] in order_c[i, :k] for i in range(len(rows))]))
        out[f"caption_to_slide_r@{k}"] = float(np.mean([(which[order_s[j, :k]] == j).any() for j in range(len(texts))]))
    return out


def training_slides(cfg: Config, classes: Sequence[str]) -> list[Slide]:
    """The config's training slides with a caption and a bag (the retrieval baseline's captions);
    none when the training manifest or its bags are not here."""
    from pathm3.errors import DataError
    from pathm3.manifest import read_manifest

    try:
        slides = read_manifest(cfg.data.manifest, cfg.data.bags_dir, classes, splits=["train"],
                               multilabel=cfg.data.multilabel)
    except (DataError, OSError):
        return []
    return [s for s in slides if s.caption and Path(s.bag_path).is_file()]


def evaluate(model: PathM3, cfg: Config, classes: Sequence[str], slides: Sequence[Slide],
             progress: bool = True, reference: Sequence[Slide] = ()) -> tuple[dict[str, Any], list[Prediction]]:
    """Predict a split and score it. With ``data.strip_class_words`` false, the image+text accuracy
    with class words removed from the captions is reported too (``image_text_class_words_stripped``).
    ``reference``: the training slides, for the caption retrieval baseline (one more pass, no captions)."""
    run = dict(batch_size=cfg.eval.batch_size, progress=progress, precision=cfg.eval.precision,
               num_workers=cfg.data.num_workers)
    preds = predict(model, slides, classes, strip_words=cfg.data.strip_class_words,
                    also_stripped=not cfg.data.strip_class_words, num_beams=cfg.eval.num_beams,
                    max_new_tokens=cfg.eval.max_new_tokens, **run)
    captioned = [s for s in reference if s.caption] if model.captioner is not None else []
    refs = predict(model, captioned, classes, captions=False, **run) if captioned else []
    return evaluate_predictions(preds, classes, model.multilabel, thresholds_of(cfg, classes),
                                cfg.data.class_phrases, refs), preds


# --------------------------------------------------------------------------------------------
# The one predictions file


def prediction_record(p: Prediction, classes: Sequence[str], multilabel: bool,
                      thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """One row of ``predictions.csv``. Single-label: ``slide_id, label, pred_image_only, pred_image_text,
    prob_<class>..., caption_ref, caption_pred`` and, when the model scores caption terms, ``findings``
    (the terms with probability >= 0.5, likeliest first, ``;``-joined); multi-label: ``label`` (known positives) and
    ``pred_labels`` / ``pred_labels_image_text`` are ``;``-joined class names."""
    def name(probs):
        if probs is None:
            return ""
        chosen = decide(probs, multilabel, thresholds)
        return ";".join(c for c, on in zip(classes, chosen) if on) if multilabel else classes[int(chosen)]

    truth = ";".join(c for c, t in zip(classes, p.targets) if t == 1) if multilabel else \
        ("" if not p.labelled else classes[int(np.nanargmax(p.targets))])
    preds = {"pred_labels": name(p.probabilities), "pred_labels_image_text": name(p.probabilities_text)} \
        if multilabel else {"pred_image_only": name(p.probabilities), "pred_image_text": name(p.probabilities_text)}
    return {"slide_id": p.slide_id, "label": truth, **preds,
            **{f"prob_{c}": round(float(v), 6) for c, v in zip(classes, p.probabilities)},
            "caption_ref": p.caption_ref or "", "caption_pred": p.caption_pred or "",
            **({"findings": ";".join(p.findings)} if p.terms else {})}


def write_predictions(preds: Sequence[Prediction], classes: Sequence[str], path: str | os.PathLike,
                      multilabel: bool = False, thresholds: np.ndarray | None = None) -> Path:
    """Write predictions as CSV (or JSON when ``path`` ends in .json), atomically."""
    records = [prediction_record(p, classes, multilabel, thresholds) for p in preds]
    if str(path).lower().endswith(".json"):
        return write_json(records, path)
    fields = list(records[0]) if records else \
        list(prediction_record(Prediction("", np.full(len(classes), math.nan), None, np.zeros(len(classes)),
                                          None, None, None), classes, multilabel))
    return write_csv(path, records, fields)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2))
