"""Feature extraction: slides (or patch folders) -> tissue patches -> frozen encoder -> HDF5 bags.

    from feature_extraction.extract import ExtractionSettings, find_slides, run
    settings = ExtractionSettings(encoder="tiny-vit", magnification=20)
    results = run(find_slides(["slides/"]), "bags/", settings)

Per slide: open it, resolve the scale, find tissue on a low-resolution thumbnail, keep the grid
patches with enough tissue (:mod:`feature_extraction.tiling`), read them in worker processes
(each with its own OpenSlide handle) while the encoder runs, write ``<slide_id>.h5`` atomically,
then a preview PNG and a row of ``extraction.csv``. The next slide is prepared in the background
while the current one is encoded. A slide that fails becomes a ``failed`` row with a one-line
reason; the run goes on. A rerun skips slides whose bag is complete and was made with the same
settings. This module gathers the public names; the work is done in

* :mod:`feature_extraction.settings` - settings, fingerprint, jobs and results,
* :mod:`feature_extraction.inputs` - finding slides and patch folders,
* :mod:`feature_extraction.pipeline` - one slide (prepare, encode, write),
* :mod:`feature_extraction.runner` - a whole run (shards, claims, extraction.csv).
"""

from __future__ import annotations

from feature_extraction.inputs import (
    DEFAULT_SLIDE_ID_PATTERN,
    IMAGE_EXTENSIONS,
    compile_slide_id_pattern,
    find_slides,
    patch_coords_from_names,
)
from feature_extraction.pipeline import (
    ImageFileDataset,
    PreparedSlide,
    RegionDataset,
    encode_dataset,
    extract_slide,
    prepare,
)
from feature_extraction.runner import bag_is_current, parse_shard, record_results, run
from feature_extraction.settings import (
    CSV_COLUMNS,
    PRECISIONS,
    TILING_VERSION,
    ExtractionSettings,
    SlideJob,
    SlideResult,
)

__all__ = [
    "CSV_COLUMNS", "DEFAULT_SLIDE_ID_PATTERN", "IMAGE_EXTENSIONS", "PRECISIONS", "TILING_VERSION",
    "ExtractionSettings", "ImageFileDataset", "PreparedSlide", "RegionDataset", "SlideJob", "SlideResult",
    "bag_is_current", "compile_slide_id_pattern", "encode_dataset", "extract_slide", "find_slides",
    "parse_shard", "patch_coords_from_names", "prepare", "record_results", "run",
]
