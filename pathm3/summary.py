"""Mean ± std over seeds: ``summary.json`` / ``summary.md`` of ``pathm3-train --seeds`` (the layout
of the paper's Tables 1 and 2). :func:`lookup` and :func:`mean_std` also serve ``pathm3-compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pathm3.files import write_text

SUMMARY_ROWS = {  # title -> (label, dotted metrics.json key, scale); rows without values are left out
    "Table 1: classification (%)": [
        ("image only, accuracy", "classification.image_only.accuracy", 100),
        ("image + text, accuracy", "classification.image_text.accuracy", 100),
        ("image + text, class words stripped", "classification.image_text_class_words_stripped.accuracy", 100),
        ("image only, balanced accuracy", "classification.image_only.balanced_accuracy", 100),
        ("image only, macro F1", "classification.image_only.macro_f1", 100),
        ("image only, AUROC", "classification.image_only.auroc", 100),
        ("image only, micro F1", "classification.image_only.micro_f1", 100),
        ("image only, macro AUROC", "classification.image_only.macro_auroc", 100),
        ("image only, subset accuracy", "classification.image_only.subset_accuracy", 100),
    ],
    "Table 2: captioning": [
        ("BLEU@4", "captioning.bleu_4", 1),
        ("METEOR", "captioning.meteor", 1),
        ("SPICE", "captioning.spice", 1),
        ("ROUGE-L", "captioning.rouge_l", 1),
        ("CIDEr", "captioning.cider", 1),
    ],
}


def lookup(metrics: dict, dotted: str) -> Any:
    """``metrics["a"]["b"]`` for ``"a.b"``; None when any part is missing or null."""
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """(mean, population std) of the non-None values, or None when there are none."""
    values = [v for v in values if v is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else None


def cell(stats: tuple[float, float] | None, scale: float = 1, digits: int = 3) -> str:
    """``mean ± std`` as a table cell (``n/a`` without values)."""
    return "n/a" if stats is None else f"{stats[0] * scale:.{digits}f} ± {stats[1] * scale:.{digits}f}"


def summarise(run_dirs: Sequence[Path], out: Path) -> dict[str, Any]:
    """mean ± std over seeds of every reported metric, as summary.json and summary.md."""
    from pathm3.evaluate import write_json

    per_seed = {d.name: json.loads((d / "metrics.json").read_text()) for d in run_dirs}
    summary: dict[str, Any] = {"seeds": list(per_seed), "metrics": {}}
    lines = [f"# {out.name}: {len(per_seed)} seed(s) ({', '.join(per_seed)})", ""]
    for title, rows in SUMMARY_ROWS.items():
        table = []
        for label, key, scale in rows:
            values = [lookup(m, key) for m in per_seed.values()]
            stats = mean_std(values)
            if stats is None:
                continue
            summary["metrics"][key] = {"mean": stats[0], "std": stats[1], "values": [v for v in values if v is not None]}
            digits = 2 if scale == 100 else 3
            seeds = ", ".join(f"{v * scale:.{digits}f}" for v in values if v is not None)
            table.append(f"| {label} | {cell(stats, scale, digits)} | {seeds} |")
        if table:
            lines += [f"## {title}", "", "| metric | mean ± std | per seed |", "|---|---|---|", *table, ""]
    notes = {m["captioning"].get("spice_note") for m in per_seed.values() if m.get("captioning")}
    lines += [f"Note: {n}" for n in notes if n]
    write_json(summary, out / "summary.json")
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    return summary
