"""PathM3: whole-slide images to a slide-level diagnosis and a pathologist-style caption.

Stages, in the order data flows: ``feature_extraction`` (slide -> tiles -> features -> HDF5
bag), :mod:`pathm3.bags` (the bag format), :mod:`pathm3.manifest` (which slides, labels or
findings, captions and splits), :mod:`pathm3.data` (bags as batches), :mod:`pathm3.parts` (the
model's parts: mixers, aggregators, heads, captioners, chosen by ``type:``), :mod:`pathm3.model`
(the chain of parts), :mod:`pathm3.pretrained` (building, local weights, checkpoints),
:mod:`pathm3.train` (Lightning), :mod:`pathm3.evaluate` and :mod:`pathm3.metrics`,
:mod:`pathm3.compare` (aggregators side by side), :mod:`pathm3.heatmap`, :mod:`pathm3.demo`.
Typed YAML configs live in :mod:`pathm3.config`, user-facing errors in :mod:`pathm3.errors`.
"""

__version__ = "0.5.0"
