"""PNG renderings for the web page: browsers cannot show TIFF or float arrays.

Every map is drawn at the same display size (the input's aspect ratio, longest
side at most ``max_side``), so the page can toggle between them in place.
"""

from __future__ import annotations

import base64
import io as _bytes_io
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

from celltally.transforms import resize_area

__all__ = ["colormap", "data_url", "display_size", "gray_png", "heat_png", "png_bytes"]


def display_size(shape: Sequence[int], max_side: int = 512) -> tuple[int, int]:
    """``(height, width)`` with the aspect ratio of ``shape`` and the longest side <= max_side.

    Parameters
    ----------
    shape : sequence of int
        ``(height, width)`` of the source image.
    max_side : int
        Longest side of the result; images already smaller keep their size.

    Returns
    -------
    tuple of int
        Display height and width, each at least 1.
    """
    height, width = int(shape[0]), int(shape[1])
    scale = min(1.0, max_side / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


@lru_cache(maxsize=8)
def colormap(name: str) -> np.ndarray:
    """A matplotlib colormap as a (256, 3) uint8 lookup table (read-only: it is cached)."""
    from matplotlib import colormaps

    table = np.rint(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    table.flags.writeable = False  # one caller's edit would recolour every later map
    return table


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a 2-D (gray) or (H, W, 3) (RGB) uint8 array as PNG."""
    buffer = _bytes_io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float array resized to ``size``: area-averaged down, bilinear up."""
    return resize_area(np.asarray(array, dtype=np.float32), size)


def _to_unit(array: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = high - low if high > low else 1.0
    return np.clip((array - low) / scale, 0.0, 1.0)


def gray_png(
    array: np.ndarray,
    size: tuple[int, int],
    *,
    low: float | None = None,
    high: float | None = None,
    percentiles: tuple[float, float] = (0.5, 99.8),
) -> bytes:
    """A gray PNG of a 2-D array at ``size``.

    Parameters
    ----------
    array : np.ndarray
        Any real 2-D array (raw image, mask...). Not modified.
    size : tuple of int
        ``(height, width)`` of the PNG.
    low, high : float, optional
        Values mapped to black and white; default: the ``percentiles`` of the
        resized array (a contrast stretch, as microscopy viewers do).
    percentiles : tuple of float
        Used when ``low``/``high`` are not given.
    """
    small = _resize(array, size)
    if low is None or high is None:
        lo, hi = np.percentile(small, percentiles)
        low = float(lo) if low is None else low
        high = float(hi) if high is None else high
    unit = _to_unit(small, low, high)
    return png_bytes(np.rint(unit * 255).astype(np.uint8))


def heat_png(
    array: np.ndarray,
    size: tuple[int, int],
    *,
    cmap: str = "inferno",
    vmax: float | None = None,
) -> tuple[bytes, float]:
    """A colour-mapped PNG of a non-negative map (uncertainty, saliency) at ``size``.

    Parameters
    ----------
    array : np.ndarray
        2-D map; values below 0 are shown as 0.
    size : tuple of int
        ``(height, width)`` of the PNG.
    cmap : str
        Matplotlib colormap name.
    vmax : float, optional
        Value shown at the top of the colormap; default
        :func:`celltally.explain.display_max` of the map at its own resolution.

    Returns
    -------
    png : bytes
    vmax : float
        The value at the top of the colour scale (for a legend).
    """
    native = np.asarray(array, dtype=np.float32)
    if vmax is None:
        from celltally.explain import display_max

        vmax = display_max(native)
    index = np.rint(_to_unit(native, 0.0, vmax) * 255).astype(np.uint8)
    # Nearest-neighbour upscaling shows the map's true resolution (and keeps the PNG small).
    rgb = Image.fromarray(colormap(cmap)[index])
    height, width = size
    if (height, width) != native.shape:
        resample = Image.Resampling.NEAREST if height >= native.shape[0] else Image.Resampling.BOX
        rgb = rgb.resize((width, height), resample)
    return png_bytes(np.asarray(rgb)), float(vmax)
