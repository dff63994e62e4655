"""celltally: count cells in microscopy images, with calibrated uncertainty."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["CellCounter", "CountResult", "__version__"]


def __getattr__(name: str) -> Any:
    """``from celltally import CellCounter``, imported on first use (torch loads only then)."""
    if name in ("CellCounter", "CountResult"):
        from celltally import counter

        return getattr(counter, name)
    raise AttributeError(f"module 'celltally' has no attribute {name!r}")
