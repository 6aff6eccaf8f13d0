"""Dataset-specific protocols (``python -m pathm3.datasets.patchgastric``)."""
