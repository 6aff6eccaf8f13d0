"""Evaluation metrics: captions through pycocoevalcap, classification through scikit-learn.

Captions are tokenised once with the PTB tokenizer (one Java call for the whole split), then
scored with BLEU 1-4, METEOR, ROUGE-L and CIDEr. METEOR's Java server takes seconds to load its
paraphrase tables, so one server serves every call in a process (:func:`start_meteor` starts it
early, e.g. while a model trains; it is closed at exit). SPICE needs the Stanford CoreNLP
3.6.0 jars beside pycocoevalcap; where they are missing ``spice`` is None and ``spice_note`` says
how to install them: nothing is downloaded and nothing waits on the network.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Mapping, Sequence

import numpy as np

CAPTION_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "spice_note")


def spice_jars_dir() -> str:
    import pycocoevalcap.spice as spice

    return os.path.join(os.path.dirname(spice.__file__), "lib")


def spice_available() -> tuple[bool, str | None]:
    """(True, None) when SPICE can run here, else (False, a one-line note on installing it)."""
    lib = spice_jars_dir()
    missing = [j for j in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
               if not os.path.isfile(os.path.join(lib, j))]
    if not missing:
        return True, None
    return False, (
        f"SPICE skipped: {', '.join(missing)} not in {lib}; on a machine with internet run "
        "`python -c \"from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()\"` "
        "(or unzip stanford-corenlp-full-2015-12-09 there)"
    )


def caption_metrics(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict:
    """Corpus metrics of ``predictions[id]`` against ``references[id]`` (one or more each)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(predictions)
    if not ids:
        raise ValueError("no captions to score")
    both = {}
    for i in ids:  # one tokenizer call for references and predictions together
        for j, ref in enumerate(references[i]):
            both[f"r{j}|{i}"] = [{"caption": ref}]
        both[f"p|{i}"] = [{"caption": predictions[i] or ""}]
    tokenised = PTBTokenizer().tokenize(both)
    gts = {i: [tokenised[f"r{j}|{i}"][0] for j in range(len(references[i]))] for i in ids}
    res = {i: [tokenised[f"p|{i}"][0] or "<empty>"] for i in ids}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    try:
        meteor, _ = start_meteor().compute_score(gts, res)
    except BaseException:
        close_meteor()  # a server that failed mid-call is not reused
        raise
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu_{k + 1}": float(bleu[k]) for k in range(4)}
    out.update(meteor=float(meteor), rouge_l=float(rouge), cider=float(cider))
    ok, note = spice_available()
    if ok:
        from pycocoevalcap.spice.spice import Spice

        spice, _ = Spice().compute_score(gts, res)
        out.update(spice=float(spice), spice_note=None)
    else:
        out.update(spice=None, spice_note=note)
    return out


_meteor = None
_meteor_lock = threading.Lock()


def start_meteor():
    """The process's METEOR scorer (pycocoevalcap's Java server), started on the first call.

    Starting returns at once; the server loads in its own process, so calling this before other
    work (training) hides the load. The server is closed at exit or by :func:`close_meteor`."""
    global _meteor
    with _meteor_lock:
        if _meteor is None or _meteor.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor

            _meteor = Meteor()
        return _meteor


def close_meteor() -> None:
    """Stop the METEOR server if one runs (the next :func:`start_meteor` starts a new one)."""
    global _meteor
    with _meteor_lock:
        scorer, _meteor = _meteor, None
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with scorer.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()


atexit.register(close_meteor)


def classification_metrics(labels: Sequence[int], probs: np.ndarray, num_classes: int) -> dict:
    """accuracy, balanced_accuracy, macro_f1, auroc (None when a class is absent) and the
    confusion matrix (rows: true class, columns: predicted)."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 roc_auc_score)

    y = np.asarray(labels)
    pred = probs.argmax(1)
    classes = list(range(num_classes))
    auroc = None
    if len(np.unique(y)) == num_classes and num_classes > 1:
        auroc = float(roc_auc_score(y, probs[:, 1]) if num_classes == 2 else
                      roc_auc_score(y, probs, multi_class="ovr", labels=classes))
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=classes, zero_division=0)),
        "auroc": auroc,
        "confusion_matrix": confusion_matrix(y, pred, labels=classes).tolist(),
    }


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str],
                       thresholds: np.ndarray | None = None) -> dict:
    """Several findings per slide, scored on the known (slide, class) entries only (NaN = unknown):
    micro_f1, macro_f1, hamming_loss, subset_accuracy (slides with every entry known), macro_auroc
    (classes with both values known), and per_class {name: precision, recall, f1, auroc}."""
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    known = ~np.isnan(targets)
    pred = (probs >= (0.5 if thresholds is None else thresholds)).astype(int)
    truth = np.nan_to_num(targets).astype(int)
    per_class, aurocs = {}, []
    for c, name in enumerate(classes):
        k = known[:, c]
        y, p = truth[k, c], pred[k, c]
        auroc = float(roc_auc_score(y, probs[k, c])) if len(np.unique(y)) == 2 else None
        if auroc is not None:
            aurocs.append(auroc)
        per_class[name] = {"precision": float(precision_score(y, p, zero_division=0)),
                           "recall": float(recall_score(y, p, zero_division=0)),
                           "f1": float(f1_score(y, p, zero_division=0)), "auroc": auroc}
    complete = known.all(axis=1)
    return {
        "micro_f1": float(f1_score(truth[known], pred[known], zero_division=0)),
        "macro_f1": float(np.mean([v["f1"] for v in per_class.values()])),
        "hamming_loss": float((truth[known] != pred[known]).mean()),
        "subset_accuracy": float((truth[complete] == pred[complete]).all(axis=1).mean()) if complete.any() else None,
        "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
        "per_class": per_class,
    }


def tune_thresholds(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-class thresholds (C,) that maximise F1 on the known entries (e.g. of the validation
    split): the midpoint between neighbouring probabilities with the best F1; 0.5 where a class
    has no known positive and negative."""
    from sklearn.metrics import f1_score

    out = np.full(targets.shape[1], 0.5)
    for c in range(targets.shape[1]):
        k = ~np.isnan(targets[:, c])
        y, p = targets[k, c].astype(int), probs[k, c]
        if len(np.unique(y)) < 2:
            continue
        values = np.unique(p)
        candidates = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
        scores = [f1_score(y, (p >= t).astype(int), zero_division=0) for t in candidates]
        out[c] = float(np.clip(candidates[int(np.argmax(scores))], 1e-6, 1 - 1e-6))
    return out
