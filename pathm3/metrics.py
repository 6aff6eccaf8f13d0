"""Evaluation metrics: captions through pycocoevalcap, classification through scikit-learn.

Captions are tokenised once with the PTB tokenizer (one Java call for the whole split), then
scored with BLEU 1-4, METEOR (one Java call), ROUGE-L and CIDEr. SPICE needs the Stanford CoreNLP
3.6.0 jars beside pycocoevalcap; where they are missing ``spice`` is None and ``spice_note`` says
how to install them: nothing is downloaded and nothing waits on the network.
"""

from __future__ import annotations

import os
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
    from pycocoevalcap.meteor.meteor import Meteor
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
    meteor_scorer = Meteor()
    try:
        meteor, _ = meteor_scorer.compute_score(gts, res)
    finally:
        _close_meteor(meteor_scorer)
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


def _close_meteor(scorer) -> None:
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with scorer.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()


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
