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
            strip_words: bool = False, also_stripped: bool = False, captions: bool = True,
            progress: bool = True, **generation: Any) -> list[dict[str, Any]]:
    """One dict per slide: probabilities from the slide alone and, for captioned slides, from slide +
    caption (class words removed with ``strip_words``; both ways with ``also_stripped``), and a
    generated caption. One correlation pass per batch serves them all."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    strip = lambda caps: [strip_class_words(c, classes) if c else c for c in caps]  # noqa: E731
    loader = DataLoader(BagDataset(slides), batch_size=batch_size, collate_fn=collate_bags)
    rows: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
        refs = batch["captions"]
        variants = {"image_text": strip(refs) if strip_words else refs}
        if also_stripped:
            variants["image_text_stripped"] = strip(refs)
        out = model.infer(batch["features"].to(device), batch["mask"].to(device), variants,
                          generate=captions, **generation)
        probs = {"image_only": out["logits"].softmax(-1).cpu().numpy()}
        for name in variants:
            logits = out[f"logits_{name}"]
            probs[name] = None if logits is None else logits.softmax(-1).cpu().numpy()
        generated = out.get("captions")
        for i, sid in enumerate(batch["slide_ids"]):
            row = {"slide_id": sid, "label": int(batch["labels"][i]), "caption_ref": refs[i],
                   "probs_image_only": probs["image_only"][i],
                   "caption_pred": generated[i] if generated is not None else None}
            for name, texts in variants.items():
                row[f"probs_{name}"] = probs[name][i] if (probs[name] is not None and texts[i]) else None
            rows.append(row)
    return rows


def evaluate_rows(rows: Sequence[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Metrics of ``pathm3-eval`` from :func:`predict` rows."""
    labelled = [r for r in rows if r["label"] != -100]
    captioned = [r for r in rows if r["caption_ref"] and r["caption_pred"] is not None]

    def cls(key):
        rs = [r for r in labelled if r.get(key) is not None]
        if not rs:
            return None
        return classification_metrics([r["label"] for r in rs], np.stack([r[key] for r in rs]), num_classes)

    classification = None
    if labelled:
        classification = {"image_only": cls("probs_image_only"), "image_text": cls("probs_image_text")}
        if classification["image_text"] and "probs_image_text_stripped" in labelled[0]:
            classification["image_text_class_words_stripped"] = cls("probs_image_text_stripped")
    return {
        "n_slides": len(rows),
        "classification": classification,
        "captioning": None if not captioned else caption_metrics(
            {r["slide_id"]: [r["caption_ref"]] for r in captioned},
            {r["slide_id"]: r["caption_pred"] for r in captioned}),
    }


def evaluate(model: PathM3, cfg: Config, classes: Sequence[str], slides: Sequence[Slide],
             progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict a split and score it. With ``data.strip_class_words`` false, the image+text accuracy
    with class words removed from the captions is reported too (``image_text_class_words_stripped``)."""
    rows = predict(model, slides, classes, batch_size=cfg.eval.batch_size, strip_words=cfg.data.strip_class_words,
                   also_stripped=not cfg.data.strip_class_words, progress=progress,
                   num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens)
    return evaluate_rows(rows, len(classes)), rows


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
