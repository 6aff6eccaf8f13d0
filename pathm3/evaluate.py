"""Running a trained model over bags: predictions, and the metrics of a labelled split.

``predict`` gives one row per slide (class and probabilities from the slide alone, from slide +
caption when one is given, and a generated caption). ``evaluate`` turns the rows of a split into
the metrics of ``pathm3-eval`` (a section is None when the split has no labels or no captions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from pathm3.config import Config
from pathm3.data import BagDataset, collate_bags
from pathm3.files import write_csv, write_text
from pathm3.manifest import Slide
from pathm3.metrics import caption_metrics, classification_metrics
from pathm3.model import PathM3
from pathm3.text import strip_class_words


@torch.no_grad()
def predict(model: PathM3, slides: Sequence[Slide], classes: Sequence[str], *, batch_size: int = 4,
            strip_words: bool = False, captions: bool = True, progress: bool = True,
            **generation: Any) -> list[dict[str, Any]]:
    """One dict per slide: probabilities image-only and (when captioned) image+text, and a caption."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    cls_text = (lambda c: strip_class_words(c, classes)) if strip_words else None
    loader = DataLoader(BagDataset(slides, classifier_text=cls_text), batch_size=batch_size, collate_fn=collate_bags)
    rows: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
        feats, mask = batch["features"].to(device), batch["mask"].to(device)
        p_img = model.classify(feats, mask).softmax(-1).cpu().numpy()
        texts = batch["classifier_captions"]
        p_txt = model.classify(feats, mask, texts).softmax(-1).cpu().numpy() if any(texts) else None
        generated = model.generate_captions(feats, mask, **generation) if (captions and model.t5 is not None) else None
        for i, sid in enumerate(batch["slide_ids"]):
            rows.append({
                "slide_id": sid,
                "label": int(batch["labels"][i]),
                "caption_ref": batch["captions"][i],
                "probs_image_only": p_img[i],
                "probs_image_text": p_txt[i] if (p_txt is not None and texts[i]) else None,
                "caption_pred": generated[i] if generated is not None else None,
            })
    return rows


def evaluate_rows(rows: Sequence[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Metrics of ``pathm3-eval`` from :func:`predict` rows."""
    labelled = [r for r in rows if r["label"] != -100]
    with_text = [r for r in labelled if r["probs_image_text"] is not None]
    captioned = [r for r in rows if r["caption_ref"] and r["caption_pred"] is not None]

    def cls(rs, key):
        if not rs:
            return None
        return classification_metrics([r["label"] for r in rs], np.stack([r[key] for r in rs]), num_classes)

    return {
        "n_slides": len(rows),
        "classification": None if not labelled else {
            "image_only": cls(labelled, "probs_image_only"),
            "image_text": cls(with_text, "probs_image_text"),
        },
        "captioning": None if not captioned else caption_metrics(
            {r["slide_id"]: [r["caption_ref"]] for r in captioned},
            {r["slide_id"]: r["caption_pred"] for r in captioned}),
    }


def evaluate(model: PathM3, cfg: Config, classes: Sequence[str], slides: Sequence[Slide],
             progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict a split and score it. With ``data.strip_class_words`` false, the image+text accuracy
    with class words removed from the captions is reported too (``image_text_class_words_stripped``)."""
    gen = {"num_beams": cfg.eval.num_beams, "max_new_tokens": cfg.eval.max_new_tokens}
    rows = predict(model, slides, classes, batch_size=cfg.eval.batch_size, strip_words=cfg.data.strip_class_words,
                   progress=progress, **gen)
    metrics = evaluate_rows(rows, len(classes))
    if metrics["classification"] and metrics["classification"]["image_text"] and not cfg.data.strip_class_words:
        stripped = predict(model, slides, classes, batch_size=cfg.eval.batch_size, strip_words=True,
                           captions=False, progress=progress)
        metrics["classification"]["image_text_class_words_stripped"] = evaluate_rows(
            stripped, len(classes))["classification"]["image_text"]
    return metrics, rows


def write_predictions(rows: Sequence[dict[str, Any]], classes: Sequence[str], path: str | os.PathLike) -> Path:
    """predictions.csv: slide_id, label, pred_image_only, pred_image_text, prob_<class>..., captions."""
    fields = ["slide_id", "label", "pred_image_only", "pred_image_text", *[f"prob_{c}" for c in classes],
              "caption_ref", "caption_pred"]
    records = ({
        "slide_id": r["slide_id"],
        "label": classes[r["label"]] if r["label"] != -100 else "",
        "pred_image_only": classes[int(np.argmax(r["probs_image_only"]))],
        "pred_image_text": classes[int(np.argmax(r["probs_image_text"]))] if r["probs_image_text"] is not None else "",
        **{f"prob_{c}": f"{p:.6f}" for c, p in zip(classes, r["probs_image_only"])},
        "caption_ref": r["caption_ref"] or "",
        "caption_pred": r["caption_pred"] or "",
    } for r in rows)
    return write_csv(path, records, fields)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2))
