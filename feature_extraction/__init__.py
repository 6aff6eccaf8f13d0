"""Feature extraction: whole-slide images and patch folders to HDF5 bags (see pathm3.bags)."""
