"""celltally: count cells in microscopy images, with calibrated uncertainty."""

__version__ = "0.1.0"
