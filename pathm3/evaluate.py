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
from pathm3.runtime import autocast, to_numpy
from pathm3.text import strip_class_words


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
    tokenize = model.aggregator.tokenize if model.reads_text else None
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
        for i, sid in enumerate(batch.slide_ids):
            per_set = {k: (v[i] if v is not None and sets[k][i] else None) for k, v in text_probs.items()}
            out.append(Prediction(sid, batch.targets[i].numpy(), refs[i], probs[i], per_set.get("text"),
                                  per_set.get("text_stripped"), res.captions[i] if res.captions else None))
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
                         thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """The ``metrics.json`` of ``pathm3-eval`` from predictions."""
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
    return {
        "n_slides": len(preds),
        "classification": classification,
        "captioning": None if not captioned else caption_metrics(
            {p.slide_id: [p.caption_ref] for p in captioned}, {p.slide_id: p.caption_pred for p in captioned}),
    }


def evaluate(model: PathM3, cfg: Config, classes: Sequence[str], slides: Sequence[Slide],
             progress: bool = True) -> tuple[dict[str, Any], list[Prediction]]:
    """Predict a split and score it. With ``data.strip_class_words`` false, the image+text accuracy
    with class words removed from the captions is reported too (``image_text_class_words_stripped``)."""
    preds = predict(model, slides, classes, batch_size=cfg.eval.batch_size, strip_words=cfg.data.strip_class_words,
                    also_stripped=not cfg.data.strip_class_words, progress=progress, precision=cfg.eval.precision,
                    num_workers=cfg.data.num_workers, num_beams=cfg.eval.num_beams,
                    max_new_tokens=cfg.eval.max_new_tokens)
    return evaluate_predictions(preds, classes, model.multilabel, thresholds_of(cfg, classes)), preds


# --------------------------------------------------------------------------------------------
# The one predictions file


def prediction_record(p: Prediction, classes: Sequence[str], multilabel: bool,
                      thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """One row of ``predictions.csv``. Single-label: ``slide_id, label, pred_image_only, pred_image_text,
    prob_<class>..., caption_ref, caption_pred``; multi-label: ``label`` (known positives) and
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
            "caption_ref": p.caption_ref or "", "caption_pred": p.caption_pred or ""}


def write_predictions(preds: Sequence[Prediction], classes: Sequence[str], path: str | os.PathLike,
                      multilabel: bool = False, thresholds: np.ndarray | None = None) -> Path:
    """Write predictions as CSV (or JSON when ``path`` ends in .json), atomically."""
    records = [prediction_record(p, classes, multilabel, thresholds) for p in preds]
    if str(path).lower().endswith(".json"):
        return write_json(records, path)
    fields = list(prediction_record(Prediction("", np.full(len(classes), math.nan), None, np.zeros(len(classes)),
                                               None, None, None), classes, multilabel))
    return write_csv(path, records, fields)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2))
