"""``pathm3-compare``: every aggregator trained side by side on one manifest and split, over several
seeds, in the layout of the paper's Table 1.

    pathm3-compare --config configs/demo.yaml --aggregators qformer abmil transmil dsmil clam_sb mean max \\
        --seeds 0 1 2 --output runs/compare

Each aggregator's runs are ``DIR/<aggregator>/seed<k>/`` as ``pathm3-train`` writes them. PathM3
(``qformer``) keeps the config's mixer (the Nyström correlation) and mined prototypes
(``train.prototypes``); the MIL baselines run without either (``model.mixer.type: none``), as published. Head, captioner, optimiser and budget are the
config's for every aggregator. ``DIR/comparison.json`` and ``DIR/comparison.md`` hold one row per
aggregator: classification metrics as mean ± std over seeds, trainable parameters, seconds per
epoch, and caption metrics where a captioner ran.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from pathm3.config import Config, config_from_dict, config_to_dict
from pathm3.errors import UsageError
from pathm3.files import write_text
from pathm3.parts import AGGREGATORS
from pathm3.summary import cell, lookup, mean_std

SINGLE_LABEL = [("accuracy", "classification.image_only.accuracy"),
                ("balanced accuracy", "classification.image_only.balanced_accuracy"),
                ("macro-F1", "classification.image_only.macro_f1"),
                ("AUROC", "classification.image_only.auroc")]
MULTI_LABEL = [("micro-F1", "classification.image_only.micro_f1"),
               ("macro-F1", "classification.image_only.macro_f1"),
               ("macro AUROC", "classification.image_only.macro_auroc")]
CAPTIONS = [("BLEU-4", "captioning.bleu_4"), ("METEOR", "captioning.meteor"),
            ("ROUGE-L", "captioning.rouge_l"), ("CIDEr", "captioning.cider")]


@dataclass
class ComparisonRow:
    """One aggregator over its seeds."""

    aggregator: str
    seeds: list[int]
    metrics: dict[str, dict]  # dotted metrics.json key -> {"mean", "std", "values"}
    trainable_parameters: int
    seconds_per_epoch: float


def variant(cfg: Config, aggregator: str, output: Path) -> Config:
    """The config of one aggregator's runs: its default settings (the config's own when it is the
    config's aggregator), no mixer and no mined prototypes for the baselines, runs under
    ``output/<aggregator>``."""
    raw = config_to_dict(cfg)
    if raw["model"]["aggregator"]["type"] != aggregator:
        raw["model"]["aggregator"] = {"type": aggregator}
    if aggregator != "qformer":
        raw["model"]["mixer"] = {"type": "none"}
        raw["train"]["prototypes"] = {**raw["train"]["prototypes"], "enabled": False}
    raw["train"].update(output_dir=str(output), name=aggregator)
    return config_from_dict(raw, f"pathm3-compare --aggregators {aggregator}")


def compare(cfg: Config, aggregators: Sequence[str], seeds: Sequence[int], output: str | Path,
            progress: bool = True) -> list[ComparisonRow]:
    """Train every aggregator over the seeds; write comparison.json and comparison.md."""
    from pathm3.train import train_one

    unknown = [a for a in aggregators if a not in AGGREGATORS]
    if unknown:
        raise UsageError(f"--aggregators {' '.join(unknown)}: unknown; choose from {', '.join(AGGREGATORS)}")
    output = Path(output)
    rows = []
    for name in aggregators:
        runs = [train_one(variant(cfg, name, output), s, progress=progress) for s in seeds]
        if any(r is None for r in runs):
            return []  # a DDP rank other than 0
        metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
        info = [json.loads((r / "run.json").read_text()) for r in runs]
        keys = [k for _, k in SINGLE_LABEL + MULTI_LABEL + CAPTIONS]
        stats = {}
        for key in keys:
            values = [lookup(m, key) for m in metrics]
            summary = mean_std(values)
            if summary is not None:
                stats[key] = {"mean": summary[0], "std": summary[1], "values": values}
        rows.append(ComparisonRow(name, list(seeds), stats, info[0]["trainable_parameters"],
                                  sum(i["seconds_per_epoch"] for i in info) / len(info)))
    write_text(output / "comparison.json", json.dumps({"rows": [asdict(r) for r in rows]}, indent=2))
    write_text(output / "comparison.md", table(rows, cfg.data.multilabel, seeds))
    return rows


def table(rows: Sequence[ComparisonRow], multilabel: bool, seeds: Sequence[int]) -> str:
    """The markdown table of comparison.md."""
    columns = MULTI_LABEL if multilabel else SINGLE_LABEL
    captions = [c for c in CAPTIONS if any(k in r.metrics for r in rows for _, k in [c])]
    head = ["aggregator", *[n for n, _ in columns], "trainable parameters", "s / epoch", *[n for n, _ in captions]]
    lines = [f"# Aggregators side by side: image-only test metrics, mean ± std over seeds {', '.join(map(str, seeds))}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def stat(key):
            m = r.metrics.get(key)
            return cell(None if m is None else (m["mean"], m["std"]))
        cells = [r.aggregator, *[stat(k) for _, k in columns], f"{r.trainable_parameters:,}",
                 f"{r.seconds_per_epoch:.2f}", *[stat(k) for _, k in captions]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
