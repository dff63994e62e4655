"""Counting images of any size at the model's pixel scale, in overlapping tiles.

A model folder is trained on frames of ``scale.native_size`` raw pixels
(696 x 520 for every shipped model) resized to its ``input_size``, so one
model pixel covers native / input raw pixels: ~2.7 for ``bbbc005`` (256 x
192), ~1.36 for ``nuclei`` (512 x 384). An image of another size is
resized by that same factor (optionally corrected by ``--pixel-size`` or
``--diameter``), normalized once as a whole, padded to a multiple of the
density grid (32 model px) and cut into overlapping windows. Each window
owns a core of whole density cells; the cores tile the image without
overlap, so summing the density head's per-cell counts over each window's
core counts every cell exactly once. The margin around a core only gives the
network context. Per-cell variances add the same way.

Why this design (measured in ``benchmarks/bbbc039.py``): the density head is
additive by construction, so tiling needs no blending weights and no
overlap correction; the only difference from one whole-image pass is the
context a cell sees beyond its window's margin.

The paper's 'fc' head regresses one number per fixed-size frame and has no
map to split between tiles: images larger than its native frame are refused
with a message (summing whole-tile counts would double-count cells on the
tile borders).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from celltally import io
from celltally.transforms import BACKGROUNDS, DEFAULT_NORMALIZATION

if TYPE_CHECKING:
    from celltally.models.pipeline import CounterHead, CountingPipeline

#: Default window side and margin, in model pixels (multiples of the density stride).
DEFAULT_TILE = 512
DEFAULT_MARGIN = 64
#: Model pixels per network batch of windows when counting in tiles.
WINDOW_PIXELS = 4 * DEFAULT_TILE**2
#: An image up to this much larger than the native frame still counts as one frame.
FRAME_TOLERANCE = 1.1


def merge_normalization(
    base: Mapping[str, Any] | None,
    *,
    low: float | None = None,
    high: float | None = None,
    disable: bool = False,
    background: str | None = None,
) -> dict[str, Any]:
    """The model's normalization with the user's overrides (``--norm-low/--norm-high/--no-norm``,
    ``--background``).

    Giving a percentile switches the method to 'percentile'. Raises ``InputError``
    for percentiles outside [0, 100], ``low >= high``, percentiles or a background
    with ``disable``, or a background other than 'quadratic' or 'none'.
    """
    norm = {**DEFAULT_NORMALIZATION, **dict(base or {})}
    if background is not None:
        if background not in BACKGROUNDS:
            raise io.InputError(f"--background {background!r}: choose quadratic or none")
        if disable and background != "none":
            raise io.InputError("--no-norm cannot be combined with --background quadratic")
        if background != "none" and norm.get("method") != "percentile":
            raise io.InputError(
                f"--background {background} works with percentile normalization; this model "
                f"normalizes by {norm.get('method')!r}"
            )
        norm["background"] = background
    if disable:
        if low is not None or high is not None:
            raise io.InputError("--no-norm cannot be combined with --norm-low/--norm-high")
        return {**norm, "method": "none"}
    if low is None and high is None:
        return norm
    lo = float(norm.get("low", 0.5)) if low is None else float(low)
    hi = float(norm.get("high", 99.95)) if high is None else float(high)
    if not (0.0 <= lo < hi <= 100.0):
        raise io.InputError(
            f"normalization percentiles must satisfy 0 <= low < high <= 100, got {lo} and {hi}"
        )
    return {**norm, "method": "percentile", "low": lo, "high": hi}


@dataclass(frozen=True)
class Tile:
    """One window of a padded canvas and the core of it that the window owns.

    ``window`` and ``core`` are ``(y0, y1, x0, x1)`` in canvas (model) pixels;
    the core lies inside the window and all cores tile the canvas exactly.
    """

    window: tuple[int, int, int, int]
    core: tuple[int, int, int, int]


def _axis_tiles(length: int, window: int, margin: int) -> list[tuple[int, int, int, int]]:
    """(window start, window stop, core start, core stop) along one axis."""
    if length <= window:
        return [(0, length, 0, length)]
    step = window - 2 * margin
    out = []
    for c0 in range(0, length, step):
        c1 = min(c0 + step, length)
        w0 = min(max(c0 - margin, 0), length - window)  # shift, never shrink, at the edges
        out.append((w0, w0 + window, c0, c1))
    return out


def whole_pixels(value: Any) -> int:
    """``value`` as a whole number of pixels (256 or 256.0, not 256.7 or True); ValueError."""
    if isinstance(value, bool | str) or not float(value).is_integer():
        raise ValueError(f"{value!r} is no whole number of pixels")
    return int(value)


def tile_sides(tile: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a window given as one side or a pair of whole pixels."""
    if isinstance(tile, int | float | np.integer | np.floating):
        return whole_pixels(tile), whole_pixels(tile)
    if isinstance(tile, str) or len(tile) != 2:
        raise ValueError(f"a tile is one side or a (height, width) pair, not {tile!r}")
    ty, tx = (whole_pixels(v) for v in tile)
    return ty, tx


def check_tiles(tile: int | Sequence[int], *, margin: int, stride: int) -> tuple[int, int]:
    """(height, width) of the window ``tile``; ValueError unless it can be tiled with.

    ``tile`` and ``margin`` must be multiples of ``stride`` with ``tile > 2 margin``,
    so every core is a block of whole density cells.
    """
    ty, tx = tile_sides(tile)
    if any(t % stride or t <= 2 * margin for t in (ty, tx)) or margin % stride or margin < 0:
        shown = "x".join(str(t) for t in dict.fromkeys((ty, tx)))
        raise ValueError(
            f"tile {shown} and margin {margin} must be multiples of {stride} "
            f"with the tile above 2 x margin (at least {2 * margin + stride} here)"
        )
    return ty, tx


def plan_tiles(
    shape: Sequence[int],
    *,
    tile: int | Sequence[int] = DEFAULT_TILE,
    margin: int = DEFAULT_MARGIN,
    stride: int = 32,
) -> list[Tile]:
    """Windows of ``tile`` (a side, or (height, width)) whose cores cover ``shape`` once.

    A core is its window less ``margin`` on each side (except at the canvas edge).

    ``shape`` is the padded canvas (multiples of ``stride``); ``tile`` and
    ``margin`` must be multiples of ``stride`` with ``tile > 2 margin``, so every
    core is a block of whole density cells. A canvas no larger than ``tile``
    along an axis is one window along it.
    """
    ty, tx = check_tiles(tile, margin=margin, stride=stride)
    if shape[0] % stride or shape[1] % stride:
        raise ValueError(f"canvas {tuple(shape)} is not a multiple of the stride {stride}")
    ys = _axis_tiles(int(shape[0]), ty, margin)
    xs = _axis_tiles(int(shape[1]), tx, margin)
    return [
        Tile(window=(wy0, wy1, wx0, wx1), core=(cy0, cy1, cx0, cx1))
        for wy0, wy1, cy0, cy1 in ys
        for wx0, wx1, cx0, cx1 in xs
    ]


@dataclass
class DensityCount:
    """The count of one prepared (model-scale) image from the density head.

    Attributes
    ----------
    count, variance : sums of the per-cell counts and variances (with an ensemble:
        the members' mean count; mean aleatoric variance + variance of the members' counts).
    epistemic_std : std of the members' counts, None without an ensemble.
    density, density_var : per-cell maps over the padded canvas (stride x stride model px each).
    mask, mask_std : foreground probability and its std at half the model-scale size.
    tiles : number of windows the network ran on (1 = one whole-image pass).
    """

    count: float
    variance: float
    epistemic_std: float | None
    density: np.ndarray
    density_var: np.ndarray
    mask: np.ndarray
    mask_std: np.ndarray
    tiles: int


def padded_shape(shape: Sequence[int], stride: int) -> tuple[int, int]:
    """``shape`` rounded up to multiples of ``stride``."""
    return (
        int(math.ceil(shape[0] / stride) * stride),
        int(math.ceil(shape[1] / stride) * stride),
    )


def model_canvas(prepared: np.ndarray, stride: int) -> np.ndarray:
    """``prepared`` zero-padded (bottom, right) to what the network runs on: a multiple of
    ``stride`` and of 32 model px (the segmenter's and a U-Net counter's pooled and
    upsampled grids line up only then; a per-pixel counter's own stride is 2).

    Zero is the normalized background, as the network's own zero padding. Counting
    and explaining (:mod:`celltally.explain`) both run on this canvas. A float32
    ``prepared`` that needs no padding is returned itself, not a copy (do not write
    into the result).
    """
    array = np.asarray(prepared, dtype=np.float32)
    shape = padded_shape(array.shape, math.lcm(int(stride), 32))
    if shape == array.shape:
        return array
    canvas = np.zeros(shape, dtype=np.float32)
    canvas[: array.shape[0], : array.shape[1]] = array
    return canvas


@torch.inference_mode()
def count_density(
    model: CountingPipeline,
    prepared: np.ndarray,
    *,
    tile: int | Sequence[int] | None = DEFAULT_TILE,
    margin: int = DEFAULT_MARGIN,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    members: Sequence[CounterHead] = (),
) -> DensityCount:
    """Count a prepared 2-D image (model scale, normalized) with a density-head pipeline.

    The image is padded with zeros (the normalized background, as the
    network's own zero padding) to a multiple of the density stride. With
    ``tile=None`` the network runs once on the whole canvas; otherwise on
    windows of ``tile`` model pixels whose owned cores are summed (see
    ``plan_tiles``). Memory then depends on ``tile`` and ``batch_size``, not on
    the image size.

    ``batch_size`` windows go through the network at once (default: as many as
    hold ``4 * 512**2`` model pixels, ~1 GB of activations for the small preset).

    ``members`` are extra counter heads (a deep ensemble, ``celltally.uncertainty``):
    the count is then the members' mean (the main counter included) and the
    variance the mean aleatoric variance plus the variance of the members' totals.

    The networks run in eval mode; a module given in training mode is put back
    in it afterwards.
    """
    modules = [model, *members]
    training = [(sub, sub.training) for m in modules for sub in m.modules()]
    for m in modules:
        m.eval()
    try:
        return _count_density(
            model,
            prepared,
            tile=tile,
            margin=margin,
            batch_size=batch_size,
            device=device,
            members=members,
        )
    finally:
        for sub, mode in training:  # each part as it was (e.g. a frozen segmenter in eval)
            sub.training = mode


def _count_density(
    model: CountingPipeline,
    prepared: np.ndarray,
    *,
    tile: int | Sequence[int] | None,
    margin: int,
    batch_size: int | None,
    device: str | torch.device,
    members: Sequence[CounterHead],
) -> DensityCount:
    """:func:`count_density` for modules already in eval mode."""
    array = np.asarray(prepared, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a prepared 2-D image, got shape {array.shape}")
    stride = int(model.density_stride)
    height, width = array.shape
    canvas = model_canvas(array, stride)
    canvas_shape = canvas.shape
    if tile is None:
        whole = (0, canvas_shape[0], 0, canvas_shape[1])
        tiles = [Tile(window=whole, core=whole)]
    else:
        tiles = plan_tiles(canvas_shape, tile=tile, margin=margin, stride=stride)
    gy, gx = canvas_shape[0] // stride, canvas_shape[1] // stride
    counters = [model.counter, *members]
    density = np.zeros((len(counters), gy, gx), dtype=np.float64)
    density_var = np.zeros((len(counters), gy, gx), dtype=np.float64)
    mask = np.zeros((canvas_shape[0] // 2, canvas_shape[1] // 2), dtype=np.float32)
    mask_std = np.zeros_like(mask)
    if batch_size is None:
        wy0, wy1, wx0, wx1 = tiles[0].window
        batch_size = max(1, WINDOW_PIXELS // ((wy1 - wy0) * (wx1 - wx0)))
    for start in range(0, len(tiles), max(1, batch_size)):
        chunk = tiles[start : start + max(1, batch_size)]
        x = torch.from_numpy(
            np.stack([canvas[t.window[0] : t.window[1], t.window[2] : t.window[3]] for t in chunk])
        )[:, None].to(device)
        mask_t, mask_logvar = model.segmenter(x, levels=1)[0]
        planes = model.counter_planes(mask_t, mask_logvar, x)
        outs = [c.density(planes) for c in counters]
        dens = torch.stack([o[0] for o in outs], 1).double().cpu().numpy()
        var = torch.exp(torch.stack([o[1] for o in outs], 1).double()).cpu().numpy()
        m = mask_t[:, 0].cpu().numpy()
        ms = torch.exp(0.5 * mask_logvar[:, 0]).cpu().numpy()
        for i, t in enumerate(chunk):
            wy0, _, wx0, _ = t.window
            cy0, cy1, cx0, cx1 = t.core
            # Cores and windows are multiples of the stride: whole cells, exact slices.
            cells = (
                slice((cy0 - wy0) // stride, (cy1 - wy0) // stride),
                slice((cx0 - wx0) // stride, (cx1 - wx0) // stride),
            )
            dest = (slice(cy0 // stride, cy1 // stride), slice(cx0 // stride, cx1 // stride))
            density[(slice(None), *dest)] = dens[i][(slice(None), *cells)]
            density_var[(slice(None), *dest)] = var[i][(slice(None), *cells)]
            half = (
                slice((cy0 - wy0) // 2, (cy1 - wy0) // 2),
                slice((cx0 - wx0) // 2, (cx1 - wx0) // 2),
            )
            mdest = (slice(cy0 // 2, cy1 // 2), slice(cx0 // 2, cx1 // 2))
            mask[mdest] = m[i][half]
            mask_std[mdest] = ms[i][half]
    mh, mw = (height + 1) // 2, (width + 1) // 2
    totals = density.sum((1, 2))
    spread_var = float(totals.var()) if len(counters) > 1 else 0.0
    return DensityCount(
        count=float(totals.mean()),
        variance=float(density_var.sum((1, 2)).mean()) + spread_var,
        epistemic_std=math.sqrt(spread_var) if len(counters) > 1 else None,
        density=density.mean(0).astype(np.float32),
        density_var=density_var.mean(0).astype(np.float32),
        mask=fit_extent(mask[:mh, :mw], (height, width)),
        mask_std=fit_extent(mask_std[:mh, :mw], (height, width)),
        tiles=len(tiles),
    )


def fit_extent(half: np.ndarray, extent: Sequence[int]) -> np.ndarray:
    """A half-resolution map resampled so that its grid spans ``extent`` model px exactly.

    ``half``'s ``mh x mw`` cells cover ``2 mh x 2 mw`` model pixels; for an odd
    side that is one pixel past the image, and a mask resized onto the raw image
    (:func:`resize_to`, e.g. for per-object labels) was stretched by it: centroids
    shifted by up to a model pixel towards the far side. The shape is kept.
    """
    mh, mw = half.shape
    height, width = int(extent[0]), int(extent[1])
    if (2 * mh, 2 * mw) == (height, width):
        return half.copy()
    full = resize_to(half, (2 * mh, 2 * mw))[:height, :width]
    return resize_to(full, (mh, mw)).astype(half.dtype, copy=False)


def resize_to(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to ``shape`` (e.g. a mask back to the raw image)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=(int(shape[0]), int(shape[1])), mode="bilinear")
    return out[0, 0].numpy()
