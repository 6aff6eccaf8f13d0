"""What the demo's caption scores can tell: BLEU-4 of every captioner that writes one fixed caption per class.

The demo's captions carry nothing but the class: each slide gets one of its class's templates
(``pathm3.synthetic.CAPTIONS``) at random. A captioner that names the right class can only settle
on one template per class, so its BLEU-4 on the test split is one of the values this prints,
and a change from one of them to another says which templates it settled on, not that it lost
information. Reads a run's ``predictions.csv`` (labels and reference captions)::

    python benchmarks/demo_captions.py demo_output/runs/demo/seed0/predictions.csv
"""

from __future__ import annotations

import csv
import itertools
import sys
from pathlib import Path
from typing import Sequence

from pathm3.errors import ArgumentParser, DataError, add_debug_flag, run_cli
from pathm3.metrics import caption_metrics
from pathm3.synthetic import CAPTIONS


def fixed_caption_scores(rows: Sequence[dict]) -> list[tuple[float, dict[str, str]]]:
    """(BLEU-4, the caption per class) of every one-template-per-class captioner, best first."""
    refs = {r["slide_id"]: [r["caption_ref"]] for r in rows}
    classes = sorted(CAPTIONS)
    out = []
    for pick in itertools.product(*(CAPTIONS[c] for c in classes)):
        chosen = dict(zip(classes, pick))
        preds = {r["slide_id"]: chosen[r["label"]] for r in rows}
        out.append((caption_metrics(refs, preds)["bleu_4"], chosen))
    return sorted(out, key=lambda t: -t[0])


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python benchmarks/demo_captions.py", description=__doc__.splitlines()[0])
    p.add_argument("predictions", metavar="PREDICTIONS_CSV", help="a demo run's predictions.csv")
    add_debug_flag(p)
    args = p.parse_args(argv)
    path = Path(args.predictions)
    if not path.is_file():
        raise DataError(f"{path}: no such file; run `make demo` first (it writes demo_output/runs/demo/seed0/)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"slide_id", "label", "caption_ref"} <= set(rows[0]) \
            or any(r["label"] not in CAPTIONS for r in rows):
        raise DataError(f"{path}: not a demo run's predictions.csv (needs slide_id, label, caption_ref, and the "
                        f"demo's classes {sorted(CAPTIONS)})")
    print(f"| BLEU-4 | {' | '.join(sorted(CAPTIONS))} |")
    print(f"|---|{'---|' * len(CAPTIONS)}")
    for bleu, chosen in fixed_caption_scores(rows):
        print(f"| {bleu:.3f} | {' | '.join(chosen[c] for c in sorted(CAPTIONS))} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
