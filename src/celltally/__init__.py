"""celltally: count cells in microscopy images, with calibrated uncertainty."""

from typing import Any as _Any

__version__ = "0.1.0"
__all__ = ["CellCounter", "CountResult", "__version__"]


def __getattr__(name: str) -> _Any:
    """``from celltally import CellCounter``, imported on first use (torch loads only then)."""
    if name in ("CellCounter", "CountResult"):
        from celltally import counter

        return getattr(counter, name)
    raise AttributeError(f"module 'celltally' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too, for a notebook's tab completion."""
    return sorted(n for n in {*globals(), *__all__} if n != "_Any")
