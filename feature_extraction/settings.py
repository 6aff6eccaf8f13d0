"""What an extraction run is asked to do (:class:`ExtractionSettings`), and its units of work.

The settings above the line in :class:`ExtractionSettings` decide a bag's content and go into its
fingerprint; a rerun redoes a slide whose bag was made with a different fingerprint. Changing
how tissue is found or how the grid is laid out changes bags too: that is what
``TILING_VERSION`` is for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from feature_extraction.tissue import TISSUE_METHODS
from pathm3.errors import UsageError

# 1: grid inside the slide, Otsu on skimage saturation, 0.5 threshold.
# 2: OpenCV mask, edge-padded grid, 0.2 threshold, --tissue-method.
TILING_VERSION = 2
CSV_COLUMNS = ("slide_id", "path", "status", "n_patches", "seconds", "error", "warning")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SPEED_ONLY = ("batch_size", "workers", "device", "overwrite", "previews", "progress")
_TISSUE_ONLY = ("tissue_method", "tissue_threshold")


@dataclass
class ExtractionSettings:
    """Everything that decides what a bag contains (and, below the line, how fast it is made)."""

    encoder: str = "eva-vit-g"
    weights: str | None = None
    magnification: float | None = 20.0
    mpp: float | None = None  # when set, it wins over magnification
    patch_size: int = 224
    source_magnification: float | None = None
    source_mpp: float | None = None
    tissue_method: str = "saturation"
    tissue_threshold: float = 0.2
    precision: str = "fp32"
    feature_dtype: str = "float16"
    patch_folder: bool = False
    slide_id_pattern: str | None = None
    # -- speed and bookkeeping only: not part of the fingerprint
    batch_size: int = 64
    workers: int = 2
    device: str = "cpu"
    overwrite: bool = False
    previews: bool = True
    progress: bool = True

    def fingerprint(self) -> str:
        """Hash of the settings that change a bag's content; stored in every bag for resume."""
        skip = _SPEED_ONLY + (_TISSUE_ONLY if self.patch_folder else ())
        content = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        if content["weights"]:
            content["weights"] = str(Path(content["weights"]).resolve())
        if not self.patch_folder:
            content["tiling_version"] = TILING_VERSION
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the flag of the first value out of range."""
        positive = {"--magnification": self.magnification, "--mpp": self.mpp,
                    "--source-magnification": self.source_magnification, "--source-mpp": self.source_mpp}
        for flag, value in positive.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"{flag} {value}: must be a number > 0")
        for flag, value, low in (("--patch-size", self.patch_size, 1), ("--batch-size", self.batch_size, 1),
                                 ("--workers", self.workers, 0)):
            if int(value) != value or value < low:
                raise UsageError(f"{flag} {value}: must be a whole number >= {low}")
        if not 0 <= self.tissue_threshold <= 1:
            raise UsageError(f"--tissue-threshold {self.tissue_threshold}: must be between 0 and 1")
        choices = {"--tissue-method": (self.tissue_method, TISSUE_METHODS), "--precision": (self.precision, PRECISIONS),
                   "--feature-dtype": (self.feature_dtype, ("float16", "float32"))}
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                raise UsageError(f"{flag} {value}: choose one of {', '.join(allowed)}")

    @property
    def target_magnification(self) -> float:
        """The target scale as a magnification (mag = 10 / mpp); 20x when neither is set."""
        if self.mpp is not None:
            return 10.0 / self.mpp
        return self.magnification if self.magnification is not None else 20.0


@dataclass
class SlideJob:
    """One slide to process: a slide file, or the patch images of one slide."""

    slide_id: str
    path: Path
    patch_files: list[Path] = field(default_factory=list)


@dataclass
class SlideResult:
    """One row of extraction.csv."""

    slide_id: str
    path: str
    status: str  # done | skipped | failed
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    warning: str = ""

    def row(self) -> dict:
        return {"slide_id": self.slide_id, "path": self.path, "status": self.status, "n_patches": self.n_patches,
                "seconds": f"{self.seconds:.2f}", "error": self.error, "warning": self.warning}
