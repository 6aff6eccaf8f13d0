"""PathM3: whole-slide images to a slide-level diagnosis and a pathologist-style caption.

Stages, in the order data flows: ``feature_extraction`` (slide -> tiles -> features -> HDF5
bag), :mod:`pathm3.bags` (the bag format), :mod:`pathm3.manifest` (which slides, labels,
captions and splits), :mod:`pathm3.config` (typed YAML configs).
"""

__version__ = "0.1.0"
