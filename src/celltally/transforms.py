"""Image preparation: float conversion, area resizing, percentile normalization."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from celltally.io import strided_sample

# Minimum normalization range, 2% of the typical full scale of the dtype: keeps
# an empty (background-only) frame from being stretched until its noise looks
# like cells. 16-bit files mostly hold 12-bit camera data (full scale 4095);
# floats are taken as 0..1, as everywhere in celltally.
_MIN_RANGE_FRACTION = 0.02


def resize_area(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a 2-D image to ``size`` = (height, width) by area averaging (anti-aliased).

    Axes that grow are interpolated (bilinear). Returns float32; the input is
    not modified.
    """
    height, width = int(size[0]), int(size[1])
    array = np.asarray(image, dtype=np.float32)
    if array.shape == (height, width):
        return array.copy()
    out = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    # Average over the axes that shrink, then interpolate the ones that grow: plain
    # bilinear on a shrinking axis would skip pixels (aliasing) instead of averaging.
    pooled = (min(height, array.shape[0]), min(width, array.shape[1]))
    if pooled != array.shape:
        out = F.adaptive_avg_pool2d(out, pooled)
    if pooled != (height, width):
        out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def noise_std(image: np.ndarray) -> float:
    """Std of an image's pixel noise, by Immerkaer's (1996) Laplacian-difference estimator.

    A 3x3 mask that cancels any locally linear intensity, so smooth objects
    contribute little and the mean absolute response measures the noise:
    ``sqrt(pi / 2) / 6 * mean|image * M|``. Returns 0 for images under 3 x 3.
    """
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 2 or min(a.shape) < 3:
        return 0.0
    m = (
        a[:-2, :-2] + a[:-2, 2:] + a[2:, :-2] + a[2:, 2:]
        - 2.0 * (a[:-2, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] + a[2:, 1:-1])
        + 4.0 * a[1:-1, 1:-1]
    )  # fmt: skip
    return float(np.sqrt(np.pi / 2.0) / 6.0 * np.abs(m).mean())


#: Values of ``norm['background']``: what :func:`prepare_image` subtracts first.
BACKGROUNDS = ("quadratic", "none")
#: Share of the darkest pixels :func:`background_surface` leaves out of its fit.
DARK_FRACTION = 0.01


def background_surface(
    image: np.ndarray,
    *,
    step: float = 0.0,
    noise: float | None = None,
    clip: float = 2.5,
    iterations: int = 20,
    samples: int = 5_000,
) -> np.ndarray:
    """A smooth background of ``image``: a quadratic surface fitted to its background pixels.

    Uneven illumination (a ramp, a vignette) that percentile normalization would
    stretch across the whole range. The fit starts from the darker half of the
    pixels and then keeps, each round, those no more than ``clip`` noise stds
    above the surface, so bright objects do not pull it up. The darkest 1% of
    the pixels (:data:`DARK_FRACTION`) never enter it, so a dark speck, dead
    pixels or a dark corner do not pull it down (a limit below the surface
    would also drop the true background of a crowded frame, which lies far
    below the first fit). The noise std is :func:`noise_std`'s (``noise``, if
    given; a quadratic does not change it), but at least half the grey-level
    ``step`` of integer input: a blurred, quantized frame's noise estimate is
    far below its steps. Least squares on about ``samples`` pixels of a
    regular grid. A round that would keep under 2% of the pixels is not taken
    (the surface would bend where it has no support), and the surface stays
    within the image's range. On simulated BBBC005 scenes of 100 blurred cell
    bodies (F48 w2, nearly no background) the surface spans under 1% of the
    image's range.

    Returns
    -------
    numpy.ndarray
        float32 surface of ``image``'s shape (zeros for images under 3 x 3).
    """
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 2 or min(a.shape) < 3:
        return np.zeros(a.shape, dtype=np.float32)
    h, w = a.shape
    stride = max(1, round(np.sqrt(h * w / samples)))
    yy, xx = np.mgrid[0:h:stride, 0:w:stride]
    values = a[::stride, ::stride].ravel().astype(np.float64)
    y, x = yy.ravel() / max(h - 1, 1) * 2.0 - 1.0, xx.ravel() / max(w - 1, 1) * 2.0 - 1.0
    matrix = np.stack([np.ones_like(y), x, y, x * x, x * y, y * y], axis=1)
    limit = clip * max(noise_std(a) if noise is None else noise, 0.5 * step, 1e-6)

    def fit(keep: np.ndarray) -> np.ndarray:
        # normal equations of a 6-term fit, summed by einsum rather than BLAS: counting
        # prepares images in threads beside torch, and BLAS's own threads would fight it
        rows = matrix[keep]
        gram = np.einsum("ij,ik->jk", rows, rows)
        gram[np.diag_indices(6)] += 1e-9 * (np.trace(gram) + 1.0)  # never singular
        return np.linalg.solve(gram, np.einsum("ij,i->j", rows, values[keep]))

    low, median = np.quantile(values, [DARK_FRACTION, 0.5])
    usable = values > low  # a dark speck or dead pixels would pull the surface down
    keep = (values <= median) & usable
    coef = fit(keep)
    for _ in range(iterations):
        # not far above the surface (objects), and never the frame's darkest pixels
        new = (values - np.einsum("ij,j->i", matrix, coef) <= limit) & usable
        if np.array_equal(new, keep) or new.sum() < max(12, values.size // 50):
            break
        keep = new
        coef = fit(keep)
    gy = (np.arange(h, dtype=np.float32) / max(h - 1, 1) * 2.0 - 1.0)[:, None]
    gx = (np.arange(w, dtype=np.float32) / max(w - 1, 1) * 2.0 - 1.0)[None, :]
    c = coef.astype(np.float32)
    # one image-sized array: (c1 + c4 y) x, plus the terms of y alone and of x alone
    surface = (c[1] + c[4] * gy) * gx
    surface += c[0] + c[2] * gy + c[5] * gy * gy
    surface += c[3] * gx * gx
    return np.clip(surface, a.min(), a.max(), out=surface)


def normalize_percentile(
    image: np.ndarray,
    *,
    low: float = 0.5,
    high: float = 99.95,
    min_range: float = 0.0,
) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles to 0 and 1 (float32, not clipped above).

    ``min_range`` is the smallest denominator allowed, in the image's units.
    """
    array = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(array, [low, high])
    scale = max(float(hi - lo), float(min_range), 1e-6)
    return ((array - lo) / scale).astype(np.float32)


def min_range_for(dtype: np.dtype, *, image: np.ndarray | None = None) -> float:
    """The empty-frame guard for ``normalize_percentile`` for images of ``dtype``.

    2% of a typical full scale: 255 for 8-bit integers, 4095 (a 12-bit camera)
    for wider integers, 1 for floats and booleans (taken as 0..1). A float
    ``image`` whose values all lie on the 1/65535 grid but not on the 1/255
    one is a 16-bit image divided by 65535 (as ``skimage.img_as_float`` and
    many readers do): its full scale is then 4095/65535, as its integers'
    would be (a dim 12-bit image so converted was taken as an empty frame,
    and 108 nuclei counted as 40).
    """
    return _MIN_RANGE_FRACTION * _grey_levels(dtype, image)[0]


def _grey_levels(dtype: np.dtype, image: np.ndarray | None = None) -> tuple[float, float]:
    """(typical full scale, step between grey levels) of an image of ``dtype``, in its units.

    Integers: 255 or 4095, step 1, or for data scaled up after acquisition (8-bit x 257
    as skimage.img_as_uint gives, x 256, 12-bit x 16; :func:`grey_step`) the full scale
    they had and their step (a blurred empty 8-bit frame x 257 was stretched into 85
    "cells"). Floats: 0..1 from 8 bits, or 16-bit integers over 65535
    (:func:`_from_16_bits`). Booleans: 0..1, step 1.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        step = 1 if image is None else grey_step(image)
        if step > 1:
            return SCALED_FROM[step] * step, float(step)
        return (255.0 if dtype.itemsize == 1 else 4095.0), 1.0
    if dtype.kind == "f" and image is not None and _from_16_bits(image):
        return 4095.0 / 65535.0, 1.0 / 65535.0
    return 1.0, (1.0 if dtype.kind == "b" else 1.0 / 255.0)


#: The common ways data are scaled up into 16 bits after acquisition, as step:
#: the full scale before (8-bit x 257, as skimage.img_as_uint does; 8-bit x 256, a
#: byte shift; 12-bit x 16, cameras writing their 12 bits at the top of 16).
SCALED_FROM = {257: 255.0, 256: 255.0, 16: 4095.0}


def grey_step(image: np.ndarray) -> int:
    """The step of a wide unsigned image's grey levels when it is one of SCALED_FROM's, else 1.

    Every value a multiple of 257, 256 or 16: data scaled up after acquisition, whose
    noise and empty-frame floor are that many times coarser. Other steps (a dim frame
    of even values, a 0 / 255 mask) are taken as they are. Checked on about 65,000
    sampled pixels, then on all of them, a block of rows at a time (no copy of a large
    image).
    """
    array = np.asarray(image)
    if array.dtype.kind != "u" or array.dtype.itemsize < 2 or array.ndim != 2 or not array.size:
        return 1
    sample = strided_sample(array)
    rows = max(1, 2**20 // array.shape[1])
    for step in SCALED_FROM:
        if np.any(sample % step):
            continue
        if all(not np.any(array[y : y + rows] % step) for y in range(0, array.shape[0], rows)):
            return step
    return 1


def _from_16_bits(image: np.ndarray) -> bool:
    """Whether a float ``image`` holds 16-bit integers divided by 65535 (its values on the
    1/65535 grid, not all on the 1/255 one, which 8-bit integers so divided are on too)."""
    return _on_grid(image, 65535) and not _on_grid(image, 255)


def _on_grid(image: np.ndarray, steps: int) -> bool:
    """Whether ``image``'s values (about 65,000 sampled) are in [0, 1] and k / ``steps``."""
    values = np.asarray(strided_sample(np.asarray(image)), dtype=np.float64).ravel()[:65536] * steps
    if not values.size or values.min() < 0 or values.max() > steps:
        return False
    # float32 keeps k / 65535 to within 65535 * 2**-24 = 0.004 of a step
    return bool(np.all(np.abs(values - np.rint(values)) < 0.01))


DEFAULT_NORMALIZATION: dict[str, Any] = {"method": "percentile", "low": 0.5, "high": 99.95}
#: Smallest percentile range, in noise stds, of ``'percentile'`` normalization
#: (``norm['noise_range']`` overrides it; see :func:`prepare_image`).
NOISE_RANGE = 20.0


def dtype_full_scale(dtype: np.dtype) -> float:
    """255 for uint8, 65535 for uint16, 1 for anything else (floats are taken as 0..1)."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def prepare_image(
    image: np.ndarray,
    *,
    size: Sequence[int],
    norm: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Resize to the model's input ``size`` (area), then normalize as ``norm`` says.

    ``norm['method']``:

    - ``'percentile'``: map the ``low``/``high`` percentiles to 0/1, after
      resizing (~7x cheaper on 696 x 520 frames, and it sees the intensities the
      network sees); clipped to [-1, 4] so one hot pixel cannot dominate. The
      range divided by is at least ``noise_range`` (20) times the pixel noise's
      std (:func:`noise_std`) and 2% of the dtype's typical full scale
      (:func:`min_range_for`): a frame with no objects, only noise, is not
      stretched until its noise looks like cells (the shipped ``bbbc005`` model
      counted 150-160 cells in such frames; real BBBC005 and BBBC039 images
      have ranges of 40 to 100,000 noise stds, so they are untouched).
      With ``norm['background'] = 'quadratic'`` a smooth background
      (:func:`background_surface`: uneven illumination, a vignette) is
      subtracted first, so an empty but unevenly lit well is not stretched
      into a bright blob either (default ``'none'``).
    - ``'fixed'``: divide by the dtype's full scale (255 for 8-bit): keeps
      absolute brightness, which on a fixed acquisition (BBBC005) carries the
      count of overlapping cells that a per-image stretch would erase.
    - ``'none'``: resize only.
    """
    norm = {**DEFAULT_NORMALIZATION, **(norm or {})}
    method = norm["method"]
    if method == "percentile":
        image = _within_float_range(image)
    resized = resize_area(image, size)
    if method == "none":
        return resized
    if method == "fixed":
        return resized / np.float32(dtype_full_scale(image.dtype))
    if method != "percentile":
        raise ValueError(f"unknown normalization {method!r}; use percentile, fixed or none")
    background = norm.get("background", "none")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; use quadratic or none")
    noise_range = float(norm.get("noise_range", NOISE_RANGE))
    noise = noise_std(resized) if noise_range > 0 or background == "quadratic" else 0.0
    # the image's grey levels, looked at once for the background step and the floor
    full_scale, step = _grey_levels(image.dtype, image)
    if background == "quadratic":  # Immerkaer's mask ignores quadratics: the same noise after
        # the grey-level step (a finer step would let a blurred, quantized frame's fit run
        # away again)
        surface = background_surface(resized, step=step, noise=noise)
        resized = np.subtract(resized, surface, out=surface)  # a new array: the input stays
    noise_guard = noise_range * noise if noise_range > 0 else 0.0
    guard = max(_MIN_RANGE_FRACTION * full_scale, noise_guard)  # as min_range_for says
    out = normalize_percentile(resized, low=norm["low"], high=norm["high"], min_range=guard)
    return np.clip(out, -1.0, 4.0, out=out)


#: Largest magnitude a float image keeps before :func:`prepare_image` scales it down.
_FLOAT_PEAK = 2.0**40


def _within_float_range(image: np.ndarray) -> np.ndarray:
    """A float image whose magnitudes pass 2**40 scaled by a power of two below it.

    Percentile normalization does not depend on the scale, but float32 sums and
    squares of values near 1e38 (resizing, the noise estimate, the background
    fit) overflow to inf, and the count became NaN. Other images are returned
    as they are (the same object).
    """
    if np.dtype(image.dtype).kind != "f" or not image.size:
        return image
    peak = float(np.max(np.abs(image)))
    if not peak > _FLOAT_PEAK or not math.isfinite(peak):
        return image
    shift = math.ceil(math.log2(peak / _FLOAT_PEAK))
    return np.ldexp(image, -shift).astype(np.float32, copy=False)


def _percentile(flat: np.ndarray, q: float) -> float:
    """``np.percentile(flat, q)`` (linear interpolation) by one partition: ~10x faster."""
    position = (flat.size - 1) * q / 100.0
    below = int(np.floor(position))
    part = np.partition(flat, below)
    value = float(part[below])
    if below + 1 < flat.size and position > below:
        value += (position - below) * (float(part[below + 1 :].min()) - value)
    return value


def contrast(prepared: np.ndarray, *, norm: Mapping[str, Any] | None = None) -> float | None:
    """The percentile range of an image :func:`prepare_image` returned, in its scale's units.

    1 when the image's own ``low``-``high`` percentile range set the scale, below
    1 when the empty-frame guard did (a range under ``noise_range`` noise stds or
    2% of the dtype's full scale): a frame of background and noise, likely with no
    cells (of the real images only BBBC039's one image of 0 nuclei is below 1, at
    0.43; no BBBC005 image is). ``None`` unless ``norm['method']`` is
    ``'percentile'``. Capped at 1 (clipping can only lower the range).
    """
    norm = {**DEFAULT_NORMALIZATION, **(norm or {})}
    if norm["method"] != "percentile":
        return None
    flat = np.asarray(prepared, dtype=np.float32).ravel()
    if flat.size == 0:
        return None
    span = _percentile(flat, float(norm["high"])) - _percentile(flat, float(norm["low"]))
    return min(span, 1.0)


def background_level(prepared: np.ndarray) -> float | None:
    """The median of an image :func:`prepare_image` returned (0 at its low percentile, 1 at
    its high one): near 0 for fluorescence (dark background; dense BBBC005 cell bodies
    reach 0.63), near 1 for dark objects on a bright background (an inverted frame:
    0.84-1.0)."""
    flat = np.asarray(prepared, dtype=np.float32)
    if flat.size == 0:
        return None
    return float(np.median(strided_sample(flat)))  # at most 256 x 256 pixels: a level, not a count


def dense_strides(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with row-major strides computed from its shape (a copy only when needed).

    NumPy gives an axis inserted with ``[:, None]`` a stride of 0, and PyTorch
    keeps it (``is_contiguous()`` ignores size-1 axes, so ``.contiguous()``
    does not fix it). cuDNN misreads such a batch on the GPU: every image but
    the first is convolved wrongly (seen on an H200, torch 2.11 + cuDNN 9.19).
    """
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(expected)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def flip_rotate(arrays: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Apply the same one of 4 shape-preserving symmetries (k in 0..3) to each (…, H, W) tensor.

    0: identity, 1: vertical flip, 2: horizontal flip, 3: 180° rotation.
    """
    dims = {0: (), 1: (-2,), 2: (-1,), 3: (-2, -1)}[k % 4]
    return [a.flip(dims) if dims else a for a in arrays]
