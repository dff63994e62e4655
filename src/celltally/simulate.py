"""SIMCEP-style simulator of BBBC005 fluorescence images with exact ground truth.

This is a re-implementation of the cell population simulator SIMCEP
(Lehmussola et al., "Computational framework for simulating fluorescence
microscope images with cell populations", IEEE TMI 26(7), 2007), tuned so that
its output is statistically close to the BBBC005 data set, which was made with
SIMCEP.  The defaults of :class:`SimulationParams` were measured on the real
BBBC005 images (F1, F23 and F48; both stains), except ``cluster_probability``
(0.25, a project choice; BBBC005 itself is unclustered, 0.0);
``benchmarks/simulator_realism.py`` re-measures the match.

Image formation, in order (each step is a SIMCEP step):

1. **Shapes.**  SIMCEP's random shape model: ten points on the unit circle
   with random radial and angular jitter, scaled by the object radius; the
   polygon through them is filled.  The nucleus (stain ``w1``) and the cell
   body (``w2``) of a cell are centred on the same point; the body is made to
   contain its nucleus.
2. **Population.**  ``count`` cells, each at an integer pixel position drawn
   uniformly over the image or, with probability ``cluster_probability``,
   near a cell placed before it (a Gaussian offset).  Bodies may overlap
   freely; a nucleus may overlap another nucleus by at most ``max_overlap``
   of its area (SIMCEP's overlap control), else its position is redrawn.
   Every nucleus centre lies in the image.
3. **Texture.**  Per object, a Perlin-like sum of upsampled random grids
   (SIMCEP's ``texture.m``), normalised to ``[bias, 1]`` in the object's
   bounding box.  Where objects of one stain overlap, their intensities are
   averaged (SIMCEP's overlap compensation).
4. **Depth of field.**  Each connected group of cells gets a random depth
   ``|N(0, 1)|``; depths are scaled so that the image's deepest group is blurred
   with ``depth_blur[1]`` and depth 0 with ``depth_blur[0]`` (Gaussian sigma,
   9 x 9 window), as SIMCEP's ``blur.c`` does.  Hence even F1 images mix sharp
   and soft cells, and a single-cell image always shows a soft cell.
5. **Measurement.**  Optional background, uneven illumination,
   autofluorescence and photon noise (all off in BBBC005), then Gaussian CCD
   read noise (sd 0.01 of full scale, SIMCEP's ``ccd`` variance 1e-4) and
   clipping to ``[0, 1]``.
6. **JPEG.**  SIMCEP stores the two stains as the red (body) and blue
   (nuclei) channels of one RGB image and passes it through JPEG (quality 100,
   4:2:0 chroma subsampling).  This shapes BBBC005's background noise (its
   histogram, 49 % zeros, and its 2 x 2 structure) and leaks faint body
   outlines into the nucleus stain.  It is reproduced with Pillow's JPEG
   codec (libjpeg; 8-bit output only).
7. **Focus blur** (the ``F`` of the file names, applied to the stored 8-bit
   in-focus image).  Measured on BBBC005: level ``F`` is MATLAB
   ``imfilter(I, fspecial('gaussian', F, sigma))``: a Gaussian of ``F`` taps
   (kernel size ``F``), zero padding (image borders darken), with
   ``sigma = round(F / 4)``.  With F23 -> sigma 6 and F48 -> sigma 12 this
   turns the real F1 files into the real F23 and F48 files bit for bit
   (:func:`focus_blur`); the other levels (absent from the measured data)
   follow the same rule, see :func:`blur_sigma`.

Scale.  Sizes are in pixels of the 696 x 520 BBBC005 frame.  For another
``size`` every length (radii, cluster spread, both blurs) is multiplied by
``scale = sqrt(height / 520 * width / 696)``, so a ``(192, 256)`` simulation
looks like a 696 x 520 one resized to 256 x 192.  Noise is not rescaled (the
background stays ~1 grey level; a resized real image has the same mean but a
smaller noise spread).

Bit depth.  ``bit_depth=8`` reproduces BBBC005's files (steps 1-7 with 8-bit
rounding and JPEG).  ``bit_depth=16`` renders the same scene without the 8-bit
JPEG round trip and scales full scale to ``params.max_value_16bit`` (default
4095, a 12-bit camera like BBBC039's), so it is the same image with finer
quantisation and no compression artefacts.
"""

from __future__ import annotations

import csv
import glob
import io
import math
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image
from scipy import ndimage, signal, special

from celltally.pools import process_map

__all__ = [
    "BLUR_LEVELS",
    "FILENAME_PATTERN",
    "PLATE_FOLDERS",
    "REFERENCE_SIZE",
    "SimulatedImage",
    "SimulationParams",
    "blur_sigma",
    "empty_frame",
    "focus_blur",
    "image_scale",
    "parse_count_range",
    "simulate_plate",
    "simulate_scene",
]

#: The 16 focus-blur levels of BBBC005 (``F`` in the file names), sharp to blurred.
BLUR_LEVELS: tuple[int, ...] = (1, 4, 7, 10, 14, 17, 20, 23, 26, 29, 32, 35, 39, 42, 45, 48)

#: (height, width) of a BBBC005 image; lengths in :class:`SimulationParams` refer to it.
REFERENCE_SIZE: tuple[int, int] = (520, 696)

#: The folders of a plate :func:`simulate_plate` writes (besides its counts.csv).
PLATE_FOLDERS: tuple[str, ...] = ("images", "masks", "labels")

#: File names written by :func:`simulate_plate` (and used by BBBC005).
FILENAME_PATTERN = re.compile(
    r"^SIMCEPImages_(?P<well>[A-Z]+\d+)_C(?P<count>\d+)_F(?P<blur>\d+)"
    r"_s(?P<site>\d+)_w(?P<stain>\d+)"
)

_N_CONTROL = 10  # SIMCEP shape model: 10 control points on the circle


@dataclass(frozen=True)
class SimulationParams:
    """Parameters of the simulator; the defaults reproduce BBBC005 (but for clustering).

    Lengths are pixels at the 696 x 520 reference size (they are scaled with
    the image, see :func:`image_scale`); intensities are fractions of full
    scale (1.0 = 255 in 8-bit).

    Parameters
    ----------
    cluster_probability : float, default 0.25
        Probability that a cell is placed near an already placed cell (a
        Gaussian offset, see ``cluster_spread``) instead of uniformly.  0.25 is
        the project's choice: it adds clumps that training benefits from.
        BBBC005 itself is *not* clustered: its nucleus nearest-neighbour
        distances match ``cluster_probability=0.0`` (fraction of nuclei with a
        neighbour closer than 45 / 60 / 80 px: real 0.10 / 0.26 / 0.44;
        0.0 gives 0.09 / 0.27 / 0.44; 0.25 gives 0.21 / 0.41 / 0.60).  Use 0.0
        for the closest match to BBBC005.
    cluster_spread : float, default 1.0
        Standard deviation of a clustered cell's offset from its parent cell,
        in units of ``cytoplasm_radius``: clustered cells' bodies touch or
        overlap and their nuclei lie side by side.
    max_overlap : float, default 0.1
        Largest fraction of a nucleus's area that may overlap another nucleus
        (and vice versa); a placement that exceeds it is redrawn (SIMCEP's
        overlap control, at the nucleus level).  0.1 reproduces the number of
        separate Otsu objects in real F1 w1 images (10/23/48/74/100 cells:
        real 9.8/21.5/42.7/60.1/76.7, unclustered simulation
        9.3/22.7/43.3/61.8/76.3; with free overlap, 1.0, only 57 at 100
        cells).
    nucleus_radius : float, default 16.4
        SIMCEP radius of a nucleus.  Gives the real nucleus areas (Otsu at
        F1, isolated nuclei, 10/50/90th percentiles: real 726/788/855 px,
        simulated 724/785/855).
    cytoplasm_radius : float, default 33.0
        SIMCEP radius of a cell body.  Gives the real median body area (Otsu at
        F1, isolated cells: real 3,257 px, simulated 3,250).
    nucleus_shape : tuple of float, default (0.13, 0.1)
        SIMCEP shape parameters (radial jitter, angular jitter in radians) of
        nuclei: nearly round, slightly polygonal.  Real solidity 0.97 and
        eccentricity 0.28/0.42/0.54 (10/50/90th pct); simulated 0.97 and
        0.28/0.41/0.55.
    cytoplasm_shape : tuple of float, default (0.3, 0.05)
        The same for cell bodies (SIMCEP's default): irregular polygons with
        straight edges, sharp corners and notches.  Real solidity 0.95,
        eccentricity 0.55; simulated 0.95, 0.56.
    nucleus_texture : tuple of float, default (0.5, 2, 5, 0.2)
        SIMCEP texture parameters (persistence, first octave, number of
        octaves, bias) of nuclei (SIMCEP's default): smooth, large bright and
        dark patches.  Texture values span ``[bias, 1]`` times the peak
        intensity in each object's bounding box.  Inside real in-focus nuclei
        (medians, as for ``cytoplasm_texture``): sd 20.5, fine 1.50, medium
        10.7; simulated 21.3, 1.43, 9.8.
    cytoplasm_texture : tuple of float, default (1.0, 2, 4, 0.39)
        The same for cell bodies: a cloudy texture with 2-4 px grain and no
        pixel-level noise.  SIMCEP's default (0.9, 2, 8, 0.2) adds per-pixel
        noise that the real bodies do not have.  Measured inside real
        in-focus bodies (6 px from the edge; medians): sd 17.7, sd of
        ``I - G_1 * I`` 1.31, of ``G_1 * I - G_4 * I`` 7.9 (``G_s``: Gaussian
        blur); simulated 17.7, 1.32, 7.9.
    nucleus_intensity : float, default 1.0
        Peak of the nucleus texture.  Real isolated nuclei at F1 (medians):
        mean 134 grey levels inside the Otsu mask, sd 33, maximum 202;
        simulated 139, 35, 207.
    cytoplasm_intensity : float, default 0.875
        Peak of the body texture.  Real bodies: mean 145, sd 26, maximum 201;
        simulated 146, 25, 204.
    intensity_variation : float, default 0.0
        Standard deviation of a per-cell multiplicative brightness factor
        ``1 + N(0, intensity_variation)``.  BBBC005 has none beyond what
        texture normalisation and depth blur give (0.0).
    depth_blur : tuple of float, default (0.5, 5.0)
        Gaussian sigma (px) for depth 0 and for the image's deepest cell group
        (SIMCEP's ``blurimage(..., 0.5, 5)``).
    depth_blur_window : int, default 9
        Size of the (square) depth-blur window in px (SIMCEP: 9).
    background : float, default 0.0
        Constant added to the whole image.  BBBC005's background (~0.9 grey
        levels) is entirely clipped read noise, so 0.
    illumination : float, default 0.0
        Amplitude of uneven illumination: a 2nd-degree polynomial field, this
        value at the image centre, 0 in the corners, added to the image.  The
        real background is flat to within 0.05 grey levels: 0.
    autofluorescence : float, default 0.0
        Amplitude of an additive Perlin-texture background.  Not seen in
        BBBC005: 0.
    read_noise : float, default 0.01
        Standard deviation of additive Gaussian (CCD) noise before clipping.
        0.01 (SIMCEP's ``ccd = 1e-4`` variance) gives the real background
        histogram (49 % zeros, mean 0.93 grey levels at F1 in w1).
    photon_noise : float, default 0.0
        Signal-dependent noise: adds ``N(0, photon_noise * signal)``
        (variance proportional to the signal, i.e. Poisson-like).  Not
        present in BBBC005: 0.
    jpeg_quality : int or None, default 100
        Quality of the JPEG round trip of the 8-bit RGB composite (SIMCEP
        ``measurement.comp = 0`` means quality 100, still with 4:2:0 chroma
        subsampling).  None skips it.  Ignored for 16-bit output.
    max_value_16bit : int, default 4095
        Value of full scale (1.0) in 16-bit output: 4095 is a 12-bit camera
        like BBBC039's; 65535 uses the full 16-bit range.
    """

    cluster_probability: float = 0.25
    cluster_spread: float = 1.0
    max_overlap: float = 0.1
    nucleus_radius: float = 16.4
    cytoplasm_radius: float = 33.0
    nucleus_shape: tuple[float, float] = (0.13, 0.1)
    cytoplasm_shape: tuple[float, float] = (0.3, 0.05)
    nucleus_texture: tuple[float, float, float, float] = (0.5, 2, 5, 0.2)
    cytoplasm_texture: tuple[float, float, float, float] = (1.0, 2, 4, 0.39)
    nucleus_intensity: float = 1.0
    cytoplasm_intensity: float = 0.875
    intensity_variation: float = 0.0
    depth_blur: tuple[float, float] = (0.5, 5.0)
    depth_blur_window: int = 9
    background: float = 0.0
    illumination: float = 0.0
    autofluorescence: float = 0.0
    read_noise: float = 0.01
    photon_noise: float = 0.0
    jpeg_quality: int | None = 100
    max_value_16bit: int = 4095

    def __post_init__(self) -> None:
        if not 0.0 <= self.cluster_probability <= 1.0:
            raise ValueError(
                f"cluster_probability must be in [0, 1], got {self.cluster_probability}"
            )
        if not 0.0 <= self.max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be in [0, 1], got {self.max_overlap}")
        for name in ("nucleus_radius", "cytoplasm_radius"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "cluster_spread",
            "intensity_variation",
            "background",
            "illumination",
            "autofluorescence",
            "read_noise",
            "photon_noise",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("nucleus_shape", "cytoplasm_shape", "depth_blur"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 0:
                raise ValueError(f"{name} must be two numbers >= 0, got {value}")
        if self.depth_blur[0] > self.depth_blur[1]:
            raise ValueError(
                f"depth_blur must be (low, high) with low <= high, got {self.depth_blur}"
            )
        for name in ("nucleus_texture", "cytoplasm_texture"):
            value = getattr(self, name)
            if len(value) != 4 or value[0] <= 0 or value[2] < 1 or not 0 <= value[3] <= 1:
                raise ValueError(
                    f"{name} must be (persistence > 0, first octave, octaves >= 1, "
                    f"bias in [0, 1]), got {value}"
                )
        for name in ("nucleus_intensity", "cytoplasm_intensity"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.depth_blur_window < 1:
            raise ValueError(f"depth_blur_window must be >= 1, got {self.depth_blur_window}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be None or in 1..100, got {self.jpeg_quality}")
        if not 1 <= self.max_value_16bit <= 65535:
            raise ValueError(f"max_value_16bit must be in 1..65535, got {self.max_value_16bit}")


@dataclass(frozen=True)
class SimulatedImage:
    """One simulated image and its exact truth.

    Attributes
    ----------
    image : numpy.ndarray
        2-D ``uint8`` or ``uint16`` image, shape ``(height, width)``.
    mask : numpy.ndarray
        2-D bool foreground of this stain (nuclei for stain 1, cell bodies for
        stain 2), unblurred truth geometry; equals ``labels > 0``.
    labels : numpy.ndarray
        2-D ``int32`` instance labels of this stain, 0 = background, cell ``i``
        = ``i + 1``.  Where objects overlap, a pixel goes to the cell whose
        centre is nearest; every cell keeps at least its centre pixel, so
        ``labels.max() == count`` and all ``count`` labels occur.
    count : int
        Number of cells.
    blur : int
        Focus-blur level (one of :data:`BLUR_LEVELS`).
    stain : int
        1 = nuclei (``w1``), 2 = cell bodies (``w2``).
    """

    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    count: int
    blur: int
    stain: int


# --------------------------------------------------------------------------- validation


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"size must be (height, width) with both sides >= 1, got {tuple(size)}")
    from celltally.io import MAX_IMAGE_PIXELS

    if height * width > MAX_IMAGE_PIXELS:  # beyond what celltally reads back; and memory
        raise ValueError(
            f"size {height}x{width} is larger than celltally reads (at most {MAX_IMAGE_PIXELS:,} "
            "pixels per image)"
        )
    return height, width


def _check_blur(blur: int) -> int:
    if isinstance(blur, bool) or blur not in BLUR_LEVELS:
        raise ValueError(f"blur must be one of {', '.join(map(str, BLUR_LEVELS))}; got {blur!r}")
    return int(blur)


def _check_stain(stain: int) -> int:
    if isinstance(stain, bool) or stain not in (1, 2):
        raise ValueError(f"stain must be 1 (nuclei) or 2 (cell bodies), got {stain!r}")
    return int(stain)


def _check_bit_depth(bit_depth: int) -> int:
    if isinstance(bit_depth, bool) or bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    return int(bit_depth)


def _check_count(count: int, size: tuple[int, int]) -> int:
    try:
        whole = not isinstance(count, (bool, str)) and int(count) == count
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ValueError(f"count must be a whole number >= 0, got {count!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count > size[0] * size[1]:
        raise ValueError(f"count {count} exceeds the {size[0] * size[1]} pixels of a {size} image")
    return int(count)


# --------------------------------------------------------------------------- public helpers


def image_scale(size: Sequence[int]) -> float:
    """Length scale of an image of ``size`` relative to 696 x 520.

    Parameters
    ----------
    size : sequence of int
        ``(height, width)``.

    Returns
    -------
    float
        ``sqrt(height / 520 * width / 696)``; 1.0 for BBBC005's size.
    """
    height, width = _check_size(size)
    return math.sqrt(height / REFERENCE_SIZE[0] * width / REFERENCE_SIZE[1])


def blur_sigma(blur: int) -> float:
    """Gaussian sigma (px at 696 x 520) of focus-blur level ``blur``.

    BBBC005 level ``F`` is a Gaussian kernel of ``F`` taps with sigma
    ``round(F / 4)`` (half rounded up), applied with zero padding.  Measured:
    F23 -> 6.0 and F48 -> 12.0 (free fits to the real images give 6.000 and
    12.000, and with them the real F1 files blur into the real F23 and F48
    files bit for bit).  The other levels are not in the measured data and
    follow the same rule (an assumption; ``ceil(F / 4)`` would also fit F23
    and F48 and differs at F17, F29 and F45 by 1):
    F1 -> no blur, F4 1, F7 2, F10 3, F14 4, F17 4, F20 5, F23 6, F26 7, F29 7,
    F32 8, F35 9, F39 10, F42 11, F45 11, F48 12.

    Parameters
    ----------
    blur : int
        One of :data:`BLUR_LEVELS`.

    Returns
    -------
    float
        The sigma; 0.0 for F1 (no blur).
    """
    blur = _check_blur(blur)
    if blur == 1:
        return 0.0
    return float(math.floor(blur / 4 + 0.5))


def parse_count_range(text: str) -> tuple[int, int]:
    """Parse ``"LO-HI"`` or ``"N"`` into an inclusive count range.

    Parameters
    ----------
    text : str
        For example ``"1-100"`` or ``"40"``.

    Returns
    -------
    tuple of int
        ``(lo, hi)``; ``"40"`` gives ``(40, 40)``.

    Raises
    ------
    ValueError
        If the text is not one or two whole numbers >= 0 with ``lo <= hi``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if match is None:
        raise ValueError(
            f"invalid count range {text!r}: expected 'N' or 'LO-HI' with whole numbers >= 0"
        )
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) is not None else lo
    if lo > hi:
        raise ValueError(f"invalid count range {text!r}: LO ({lo}) is larger than HI ({hi})")
    return lo, hi


# --------------------------------------------------------------------------- shapes


def _shape_curves(
    rng: np.random.Generator, n: int, jitter: tuple[float, float], radius: float
) -> np.ndarray:
    """SIMCEP random shapes: ``(n, 10, 2)`` polygon vertices as (y, x) offsets in px.

    Ten points at equal angles on the unit circle; each coordinate gets a
    uniform radial jitter ``+-jitter[0]`` and its own angular jitter
    ``+-jitter[1]`` rad.  The polygon is centred on its bounding-box centre,
    as SIMCEP places shapes.  (BBBC005's outlines are straight-edged with
    sharp corners, i.e. these polygons, not the smooth splines of later SIMCEP
    versions.)
    """
    s1, s2 = jitter
    t = np.arange(_N_CONTROL) * (2 * np.pi / _N_CONTROL)
    u = rng.random((4, n, _N_CONTROL))
    x = s1 * (2 * u[0] - 1) + np.cos(t + s2 * (2 * u[1] - 1))
    y = s1 * (2 * u[2] - 1) + np.sin(t + s2 * (2 * u[3] - 1))
    points = np.stack([y, x], axis=-1) * radius  # (n, K, 2)
    centre = (points.min(axis=1) + points.max(axis=1)) / 2
    return points - centre[:, None, :]


def _fill_polygons(ys: np.ndarray, xs: np.ndarray, side: int) -> np.ndarray:
    """Even-odd scanline fill of closed polygons into ``(n, side, side)`` bool patches.

    ``ys``, ``xs`` are ``(n, vertices)`` patch coordinates; pixel ``(r, c)``
    has its centre at ``(r, c)`` (the same pixels as ``skimage.draw.polygon``).
    """
    n = ys.shape[0]
    y0, y1 = ys[:, None, :], np.roll(ys, -1, axis=1)[:, None, :]
    r = np.arange(side, dtype=float)[None, :, None]
    crosses = ((y0 <= r) & (r < y1)) | ((y1 <= r) & (r < y0))  # (n, side, edges)
    cell, row, edge = np.nonzero(crosses)
    ya, yb = ys[cell, edge], np.roll(ys, -1, axis=1)[cell, edge]
    xa, xb = xs[cell, edge], np.roll(xs, -1, axis=1)[cell, edge]
    xcross = xa + (row - ya) * (xb - xa) / (yb - ya)
    start = np.clip(np.floor(xcross).astype(np.int64) + 1, 0, side)
    flat = (cell * side + row) * (side + 1) + start
    toggles = np.bincount(flat, minlength=n * side * (side + 1)).reshape(n, side, side + 1)
    return (np.cumsum(toggles[:, :, :side], axis=2) & 1).astype(bool)


def _keys_cubic(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel (a = -0.5), as MATLAB's bicubic ``interp2``."""
    t = np.abs(t)
    return np.where(
        t <= 1,
        1.5 * t**3 - 2.5 * t**2 + 1,
        np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0),
    )


@lru_cache(maxsize=1024)
def _octave_matrix(n_out: int, f: int) -> np.ndarray:
    """(n_out, f) matrix: 3-tap edge-replicated mean of an ``f`` grid, then resampling.

    Resampling follows SIMCEP's ``interp2(grid, linspace(1, f, n_out))``:
    bilinear for grids smaller than 3, bicubic otherwise.
    """
    smooth = np.zeros((f, f))
    for i in range(f):
        for d in (-1, 0, 1):
            smooth[i, min(max(i + d, 0), f - 1)] += 1 / 3
    pos = np.linspace(0, f - 1, n_out) if n_out > 1 else np.array([(f - 1) / 2])
    interp = np.zeros((n_out, f))
    base = np.floor(pos).astype(int)
    taps = (0, 1) if f < 3 else (-1, 0, 1, 2)
    for d in taps:
        j = base + d
        w = 1 - np.abs(pos - j) if f < 3 else _keys_cubic(pos - j)
        w = np.clip(w, 0, None) if f < 3 else w
        np.add.at(interp, (np.arange(n_out), np.clip(j, 0, f - 1)), w)
    out = interp @ smooth
    out.setflags(write=False)
    return out


def _small_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for ``a`` ``(n, m, k)`` and ``b`` ``(k, p)``, as many small matrix products.

    Each product stays below 2e5 multiply-adds, where OpenBLAS runs
    single-threaded (its threshold is 65536 * 4).  Larger products start BLAS
    threads, which on a busy machine (simulation in several worker
    processes) can be 100x slower.
    """
    n, m, k = a.shape
    p = b.shape[1]
    blocks = max(1, min(m, math.ceil(m * k * p / 200_000)))
    rows = math.ceil(m / blocks)
    if rows * blocks != m:
        a = np.concatenate([a, np.zeros((n, rows * blocks - m, k), dtype=a.dtype)], axis=1)
    out = np.matmul(a.reshape(n * blocks, rows, k), b)
    return out.reshape(n, rows * blocks, p)[:, :m]


def _textures(
    rng: np.random.Generator,
    params: tuple[float, float, float, float],
    region: np.ndarray,
    span: float,
    peak: np.ndarray,
) -> np.ndarray:
    """SIMCEP Perlin textures, one per patch of ``region`` ``(n, side, side)``.

    Octave ``k`` is a square grid of U(0, 1) values with ``2**k`` nodes per
    ``span`` px (SIMCEP stretches it over the object's bounding box, about
    ``span`` px), smoothed by a 3-node mean and resampled bicubically onto
    the patch, weighted by ``persistence**k``.  Octaves with more nodes than
    pixels are sampled at (almost) independent nodes; they are drawn directly
    as per-pixel noise of the same variance, which is much cheaper; large
    octaves (64+ nodes) with nodes less than 1.5 px apart are drawn with one
    node per pixel (no resampling).
    Texture ``i`` is scaled to ``[bias, 1] * peak[i]`` over the bounding box of
    ``region[i]`` (the object's), as SIMCEP does.
    """
    persistence, first, octaves, bias = params
    n, side = region.shape[0], region.shape[1]
    first = max(int(first), 1)
    out = np.zeros((n, side, side), dtype=np.float32)
    iid_var = pixel_amp = 0.0
    for octave in range(first, first + int(octaves)):
        f = max(int(round(2**octave * side / max(span, 1.0))), 1)
        amp = persistence**octave
        if f > side:
            iid_var += amp * amp / 108.0  # variance of a 3-node mean of U(0, 1) values
        elif f * 3 > side * 2 and f >= 64:  # large and < 1.5 px apart: one node per pixel
            pixel_amp += amp
        else:
            w = (amp * _octave_matrix(side, f)).astype(np.float32)
            grid = rng.random((n, f, f), dtype=np.float32)
            half_way = _small_matmul(grid.transpose(0, 2, 1), w.T).transpose(0, 2, 1)
            out += _small_matmul(half_way, w.T)  # w @ grid @ w.T
    if iid_var > 0 or pixel_amp > 0:
        # One U(0, 1) draw per pixel serves both: its 3 x 3 mean (pixel-level octaves)
        # and, for the finer octaves, the value itself scaled to their variance.
        noise = rng.random((n, side + 2, side + 2), dtype=np.float32)
        if pixel_amp > 0:
            box = noise[:, :-2] + noise[:, 1:-1] + noise[:, 2:]
            box = box[:, :, :-2] + box[:, :, 1:-1] + box[:, :, 2:]
            box *= np.float32(pixel_amp / 9)
            out += box
        if iid_var > 0:
            centre = noise[:, 1:-1, 1:-1]
            centre *= np.float32(math.sqrt(12 * iid_var))
            out += centre
    # Scale to [bias, 1] (times ``peak``) over each bounding box; outside it is never used.
    rows = cast(np.ndarray, region.any(axis=2))  # arrays (n, side): an axis is given
    cols = cast(np.ndarray, region.any(axis=1))
    r0, r1 = rows.argmax(axis=1), side - rows[:, ::-1].argmax(axis=1)
    c0, c1 = cols.argmax(axis=1), side - cols[:, ::-1].argmax(axis=1)
    for i in range(n):
        box = out[i, r0[i] : r1[i], c0[i] : c1[i]]
        lo, hi, top = float(box.min()), float(box.max()), float(peak[i])
        gain = (1 - bias) * top / (hi - lo) if hi > lo else 0.0
        offset = bias * top - lo * gain if hi > lo else top
        out[i] *= np.float32(gain)
        out[i] += np.float32(offset)
    return out


# --------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class _Cells:
    """A scene's cells; each object is drawn in a square patch centred on its cell's centre."""

    centres: np.ndarray  # (n, 2) int64 (y, x)
    nuclei: np.ndarray  # (n, s, s) bool, s odd; patch i starts at centres[i] - s // 2
    bodies: np.ndarray  # (n, t, t) bool, t odd, t >= s; contains the nucleus
    nucleus_tex: np.ndarray  # (n, s, s) float32
    body_tex: np.ndarray  # (n, t, t) float32
    depths: np.ndarray  # (n,) float


def _resolve_params(params: SimulationParams | None) -> SimulationParams:
    if params is None:
        return SimulationParams()
    if not isinstance(params, SimulationParams):
        raise ValueError(f"params must be a SimulationParams, got {type(params).__name__}")
    return params


def _place_cells(
    rng: np.random.Generator,
    size: tuple[int, int],
    p: SimulationParams,
    scale: float,
    nuclei: np.ndarray,
) -> np.ndarray:
    """Integer (y, x) centres, ``(n, 2)``, for the nucleus masks ``nuclei`` ``(n, s, s)``.

    A cell goes near a random earlier cell with probability
    ``cluster_probability``, else anywhere.  A position is redrawn when its
    nucleus would overlap an earlier nucleus by more than ``max_overlap`` of
    either one's area (SIMCEP's overlap control) or share its centre pixel.
    After 150 failed tries the overlap limit is waived, so the count is exact.
    """
    height, width = size
    count, side = nuclei.shape[0], nuclei.shape[1]
    half = side // 2
    spread = p.cluster_spread * p.cytoplasm_radius * scale
    limit = p.max_overlap
    owner = np.zeros((height + 2 * half, width + 2 * half), dtype=np.int32) if limit < 1 else None
    areas = nuclei.reshape(count, -1).sum(axis=1)
    taken: set[tuple[int, int]] = set()
    centres = np.zeros((count, 2), dtype=np.int64)
    for i in range(count):
        clustered = i > 0 and rng.random() < p.cluster_probability
        for attempt in range(200):
            if clustered and attempt < 100:
                parent = centres[rng.integers(i)]
                y, x = (int(v) for v in np.rint(parent + rng.normal(0.0, spread, 2)))
                if not (0 <= y < height and 0 <= x < width):
                    continue
            else:
                y, x = int(rng.integers(height)), int(rng.integers(width))
            if (y, x) in taken:
                continue
            if owner is not None and attempt < 150:
                under = owner[y : y + side, x : x + side][nuclei[i]]
                under = under[under > 0]
                if under.size:
                    if limit <= 0:
                        continue
                    ids, shared = np.unique(under, return_counts=True)
                    if (shared > limit * areas[i]).any() or (shared > limit * areas[ids - 1]).any():
                        continue
            break
        else:  # a tiny, nearly full image: the first free pixel in raster order
            free = np.ones(height * width, dtype=bool)
            free[[a * width + b for a, b in taken]] = False
            y, x = divmod(int(np.flatnonzero(free)[0]), width)
        taken.add((y, x))
        centres[i] = (y, x)
        if owner is not None:
            owner[y : y + side, x : x + side][nuclei[i]] = i + 1
    return centres


def _make_cells(
    count: int, size: tuple[int, int], p: SimulationParams, rng: np.random.Generator
) -> _Cells:
    """Draw a scene's cells: everything random about the scene except the noise."""
    scale = image_scale(size)
    if count == 0:
        empty = np.zeros((0, 1, 1), dtype=bool)
        flat = np.zeros((0, 1, 1), dtype=np.float32)
        return _Cells(np.zeros((0, 2), dtype=np.int64), empty, empty, flat, flat, np.zeros(0))
    nuclei = _shape_curves(rng, count, p.nucleus_shape, p.nucleus_radius * scale)
    bodies = _shape_curves(rng, count, p.cytoplasm_shape, p.cytoplasm_radius * scale)
    n_side = 2 * int(math.ceil(float(np.abs(nuclei).max()))) + 3
    side = max(2 * int(math.ceil(float(np.abs(bodies).max()))) + 3, n_side)
    half, n_half = side // 2, n_side // 2
    nuc = _fill_polygons(nuclei[..., 0] + n_half, nuclei[..., 1] + n_half, n_side)
    nuc[:, n_half, n_half] = True
    centres = _place_cells(rng, size, p, scale, nuc)
    depths = np.abs(rng.standard_normal(count))
    gains = np.clip(1.0 + p.intensity_variation * rng.standard_normal(count), 0.0, None)
    body = _fill_polygons(bodies[..., 0] + half, bodies[..., 1] + half, side)
    span = slice(half - n_half, half + n_half + 1)
    body[:, span, span] |= nuc
    n_span, b_span = (2 * r * scale + 1 for r in (p.nucleus_radius, p.cytoplasm_radius))
    ntex = _textures(rng, p.nucleus_texture, nuc, n_span, p.nucleus_intensity * gains)
    btex = _textures(rng, p.cytoplasm_texture, body, b_span, p.cytoplasm_intensity * gains)
    return _Cells(centres, nuc, body, ntex, btex, depths)


def _gauss_taps(sigma: float, length: int) -> np.ndarray:
    """Normalised 1-D Gaussian of ``length`` taps (MATLAB ``fspecial`` style)."""
    x = np.arange(length) - (length - 1) / 2
    if sigma <= 0:
        k = (np.abs(x) < 0.5).astype(float)
        if not k.any():
            k = np.ones(length)
    else:
        k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def _scatter(
    centres: np.ndarray, masks: np.ndarray, tex: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One stain: overlap-averaged ideal image and nearest-centre instance labels.

    Works on a canvas padded by half a patch, so no patch needs clipping.  A
    pixel shared by several cells goes to the one whose centre is nearest
    (ties: the lower index), so each cell keeps at least its centre pixel.
    """
    height, width = size
    n, side = masks.shape[0], masks.shape[1]
    half = side // 2
    shape = (height + 2 * half, width + 2 * half)
    value = np.zeros(shape, dtype=np.float32)
    cover = np.zeros(shape, dtype=np.int32)
    labels = np.zeros(shape, dtype=np.int32)
    best = np.full(shape, np.iinfo(np.int32).max, dtype=np.int32)
    rows, cols = np.ogrid[:side, :side]
    d2 = ((rows - half) ** 2 + (cols - half) ** 2).astype(np.int32)
    for i in range(n):
        y, x = int(centres[i, 0]), int(centres[i, 1])
        window = (slice(y, y + side), slice(x, x + side))
        mask = masks[i]
        value[window] += tex[i] * mask
        cover[window] += mask
        wins = mask & (d2 < best[window])
        best[window][wins] = d2[wins]
        labels[window][wins] = i + 1
    value /= np.maximum(cover, 1)  # overlapping objects are averaged (SIMCEP)
    crop = (slice(half, half + height), slice(half, half + width))
    return value[crop], labels[crop]


def _render_ideal(
    cells: _Cells, size: tuple[int, int], p: SimulationParams, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Depth-blurred ideal images, labels and truth masks, each ``(2, H, W)`` (nuclei, bodies)."""
    height, width = size
    n_value, n_labels = _scatter(cells.centres, cells.nuclei, cells.nucleus_tex, size)
    b_value, b_labels = _scatter(cells.centres, cells.bodies, cells.body_tex, size)
    value = np.stack([n_value, b_value])  # float32
    labels = np.stack([n_labels, b_labels])
    masks = labels > 0
    if len(cells.depths) == 0:
        return value, labels, masks

    # Depth of field: one depth per 8-connected group of cells (SIMCEP's bwlabel groups).
    groups, n_groups = ndimage.label(masks[1], structure=np.ones((3, 3), dtype=bool))
    depth = np.full(n_groups + 1, -1.0)
    for i in range(len(cells.depths) - 1, -1, -1):  # the lowest-index cell of a group wins
        depth[groups[cells.centres[i, 0], cells.centres[i, 1]]] = cells.depths[i]
    depth[0] = 0.0
    deepest = depth.max()
    lo, hi = (v * scale for v in p.depth_blur)
    radius = max(int(round((p.depth_blur_window - 1) / 2 * scale)), 0)
    if radius == 0:
        return value, labels, masks
    out = np.zeros_like(value)
    for g, box in enumerate(ndimage.find_objects(groups), start=1):
        if box is None:
            continue
        sigma = lo + (hi - lo) * (depth[g] / deepest if deepest > 0 else 0.0)
        rs, cs = box
        r0, r1 = max(rs.start - radius, 0), min(rs.stop + radius, height)
        c0, c1 = max(cs.start - radius, 0), min(cs.stop + radius, width)
        sub = value[:, r0:r1, c0:c1] * (groups[r0:r1, c0:c1] == g)
        taps = _gauss_taps(sigma, 2 * radius + 1)
        sub = ndimage.correlate1d(sub, taps, axis=1, mode="nearest")
        sub = ndimage.correlate1d(sub, taps, axis=2, mode="nearest")
        out[:, r0:r1, c0:c1] += sub
    return out, labels, masks


@lru_cache(maxsize=1)
def _normal_table() -> np.ndarray:
    """Standard normal quantiles at 65,536 equally likely levels (an inverse-CDF table)."""
    table = special.ndtri((np.arange(65536) + 0.5) / 65536).astype(np.float32)
    table.setflags(write=False)
    return table


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise via the quantile table (3x faster than ``standard_normal``)."""
    return _normal_table()[rng.integers(0, 65536, size=shape, dtype=np.uint16)]


def _measure(ideal: np.ndarray, p: SimulationParams, rng: np.random.Generator) -> np.ndarray:
    """Add background, illumination, autofluorescence and noise; clip to [0, 1]."""
    _, height, width = ideal.shape
    img = ideal.astype(np.float32)  # a copy
    if p.background > 0:
        img += np.float32(p.background)
    if p.illumination > 0:
        yy = np.linspace(-1, 1, height)[:, None]
        xx = np.linspace(-1, 1, width)[None, :]
        img += (p.illumination * (1 - (xx * xx + yy * yy) / 2)).astype(np.float32)
    if p.autofluorescence > 0:
        side = max(height, width)
        whole = np.ones((1, side, side), dtype=bool)
        back = _textures(rng, (0.9, 1, 5, 0.0), whole, side, np.ones(1))[0, :height, :width]
        img += np.float32(p.autofluorescence) * back
    noise = _gaussian(rng, (2, height, width))
    if p.photon_noise > 0:
        img += np.sqrt(np.float32(p.photon_noise) * np.clip(img, 0, None)) * noise[::-1]
    noise *= np.float32(p.read_noise)
    img += noise
    return np.clip(img, 0.0, 1.0, out=img)


def _jpeg_round_trip(nuclei: np.ndarray, bodies: np.ndarray, quality: int) -> np.ndarray:
    """SIMCEP's JPEG step on the RGB composite (R = bodies, B = nuclei), 4:2:0."""
    rgb = np.zeros(nuclei.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = bodies
    rgb[..., 2] = nuclei
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="JPEG", quality=quality, subsampling=2)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        out = np.asarray(decoded.convert("RGB"))
    return np.stack([out[..., 2], out[..., 0]])


@dataclass(frozen=True)
class _Rendered:
    """An in-focus scene, both stains: images (float32 grey levels of the output) and truth."""

    images: np.ndarray  # (2, H, W) float32: 0..255 (whole numbers) or 0..max_value_16bit
    labels: np.ndarray  # (2, H, W) int32
    masks: np.ndarray  # (2, H, W) bool
    count: int
    scale: float


def _render_scene(
    count: int,
    size: tuple[int, int],
    bit_depth: int,
    params: SimulationParams,
    rng: np.random.Generator,
) -> _Rendered:
    scale = image_scale(size)
    cells = _make_cells(count, size, params, rng)
    ideal, labels, masks = _render_ideal(cells, size, params, scale)
    img = _measure(ideal, params, rng)
    if bit_depth == 8:
        u8 = np.floor(img * 255 + 0.5).astype(np.uint8)  # MATLAB im2uint8
        if params.jpeg_quality is not None:
            u8 = _jpeg_round_trip(u8[0], u8[1], params.jpeg_quality)
        img = u8.astype(np.float32)
    else:
        img *= np.float32(params.max_value_16bit)
    return _Rendered(img, labels, masks, count, scale)


def _focus_blur(image: np.ndarray, blur: int, scale: float) -> np.ndarray:
    """BBBC005 focus blur: ``imfilter(I, fspecial('gaussian', F, round(F/4)))`` at ``scale``.

    Correlation with zero padding and MATLAB's kernel centre (for an even
    size ``F`` the centre is tap ``F / 2 - 1``).
    """
    if blur == 1:
        return image
    length = max(int(round(blur * scale)), 1)
    if length == 1:
        return image
    taps = _gauss_taps(blur_sigma(blur) * scale, length)
    centre = (length - 1) // 2
    image = image.astype(np.float64)  # MATLAB filters in double precision
    if length <= 32:
        origin = centre - length // 2
        out = ndimage.correlate1d(image, taps, axis=0, mode="constant", origin=origin)
        return ndimage.correlate1d(out, taps, axis=1, mode="constant", origin=origin)
    # Long kernels: the same correlation (the taps are symmetric) through FFT, axis by axis.
    height, width = image.shape
    start = length - 1 - centre
    out = signal.fftconvolve(image, taps[:, None])[start : start + height]
    return signal.fftconvolve(out, taps[None, :])[:, start : start + width]


def focus_blur(image: np.ndarray, blur: int, *, scale: float = 1.0) -> np.ndarray:
    """Apply BBBC005 focus-blur level ``blur`` to an in-focus image.

    Applied to a real BBBC005 F1 file this gives the real F23 and F48 files
    bit for bit (checked by ``benchmarks/simulator_realism.py``).

    Parameters
    ----------
    image : numpy.ndarray
        2-D image.  Integer images are returned rounded (half up) and clipped
        to their dtype; float images are returned as float64.
    blur : int
        One of :data:`BLUR_LEVELS` (1 returns a copy).
    scale : float, default 1.0
        Length scale of the image relative to 696 x 520 (see
        :func:`image_scale`); kernel size and sigma are multiplied by it.

    Returns
    -------
    numpy.ndarray
        The blurred image, same shape (and dtype for integer input).
    """
    blur = _check_blur(blur)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {arr.shape}")
    out = _focus_blur(arr.astype(np.float64), blur, scale)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return np.clip(np.floor(out + 0.5), info.min, info.max).astype(arr.dtype)
    return np.array(out, dtype=np.float64)


def _to_output(image: np.ndarray, bit_depth: int, params: SimulationParams) -> np.ndarray:
    """Round grey levels to the output type (MATLAB-style: half away from zero)."""
    if bit_depth == 8:
        return np.clip(np.floor(image + 0.5), 0, 255).astype(np.uint8)
    top = params.max_value_16bit
    return np.clip(np.floor(image + 0.5), 0, top).astype(np.uint16)


def _generator(seed: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an int, a numpy Generator or None, got {seed!r}")
    return np.random.default_rng(seed)


def simulate_scene(
    count: int,
    *,
    blur: int = 1,
    stain: int = 1,
    size: tuple[int, int] = (520, 696),
    bit_depth: int = 8,
    seed: int | np.random.Generator | None = None,
    params: SimulationParams | None = None,
) -> SimulatedImage:
    """Simulate one BBBC005-style image with exact truth.

    The scene (cell positions, shapes, textures, depths, noise) is drawn from
    ``seed`` before and independently of ``blur`` and ``stain``, so the same
    seed gives the same cells at every blur level and in both stains (each
    body contains its nucleus).

    Parameters
    ----------
    count : int
        Number of cells (>= 0; 0 gives an empty, noise-only image).
    blur : int, default 1
        Focus-blur level, one of :data:`BLUR_LEVELS` (1 = in focus).
    stain : int, default 1
        1 = nuclei (``w1``), 2 = cell bodies (``w2``).
    size : tuple of int, default (520, 696)
        ``(height, width)``.  Objects and blurs scale with the image (see
        :func:`image_scale`).
    bit_depth : int, default 8
        8 (``uint8``, BBBC005's format) or 16 (``uint16``, full scale at
        ``params.max_value_16bit``).
    seed : int, numpy.random.Generator or None
        Same int seed, same output.  A Generator is advanced.
    params : SimulationParams, optional
        Defaults reproduce BBBC005.

    Returns
    -------
    SimulatedImage
        The image and its truth (mask, labels and count of this stain).

    Raises
    ------
    ValueError
        For a negative count, an unknown blur level or stain, a bad size or
        bit depth.
    """
    size = _check_size(size)
    count = _check_count(count, size)
    blur = _check_blur(blur)
    stain = _check_stain(stain)
    bit_depth = _check_bit_depth(bit_depth)
    params = _resolve_params(params)
    rendered = _render_scene(count, size, bit_depth, params, _generator(seed))
    ch = stain - 1
    image = _to_output(_focus_blur(rendered.images[ch], blur, rendered.scale), bit_depth, params)
    return SimulatedImage(
        image=image,
        mask=rendered.masks[ch].copy(),
        labels=rendered.labels[ch].copy(),
        count=count,
        blur=blur,
        stain=stain,
    )


def empty_frame(
    *,
    size: tuple[int, int] = (520, 696),
    bit_depth: int = 16,
    seed: int | np.random.Generator | None = None,
    illumination: str | None = None,
) -> np.ndarray:
    """A camera frame with no objects: offset, uneven illumination and noise.

    What a microscope records in an empty well (or a well whose cells all
    died), with its parameters drawn from ``seed`` over ranges wider than
    BBBC005's and BBBC039's backgrounds: an offset (8-bit: 2-60 grey levels;
    16-bit: 50-3000), Gaussian read noise of std 0.5-6 (8-bit) or 2-80
    (16-bit) grey levels plus Poisson-like shot noise on the offset, and, in
    two frames of three, a smooth illumination field (a linear ramp or a
    radial vignette) of up to 10 noise stds. For training and checking that
    a model counts 0 there (:func:`simulate_scene` with ``count=0`` gives
    BBBC005's own, much quieter, background).

    Parameters
    ----------
    size : tuple of int, default (520, 696)
        ``(height, width)``.
    bit_depth : int, default 16
        8 (``uint8``) or 16 (``uint16``).
    seed : int, numpy.random.Generator or None
        Same int seed, same frame.
    illumination : {'flat', 'ramp', 'vignette'}, optional
        Force this illumination field (default: drawn from ``seed``; the other
        parameters are drawn the same either way).

    Returns
    -------
    numpy.ndarray
        ``(height, width)`` array of ``uint8`` or ``uint16``.
    """
    kinds = ("flat", "ramp", "vignette")
    if illumination is not None and illumination not in kinds:
        raise ValueError(f"illumination must be one of {kinds}, got {illumination!r}")
    height, width = _check_size(size)
    bit_depth = _check_bit_depth(bit_depth)
    rng = _generator(seed)
    if bit_depth == 8:
        offset, read = rng.uniform(2.0, 60.0), rng.uniform(0.5, 6.0)
        top = 255.0
    else:
        offset, read = rng.uniform(50.0, 3000.0), rng.uniform(2.0, 80.0)
        top = 65535.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(height - 1, 1) - 0.5, xx / max(width - 1, 1) - 0.5
    kind = int(rng.integers(0, 3))
    if illumination is not None:
        kind = kinds.index(illumination)
    amplitude = rng.uniform(0.0, 10.0) * read
    if kind == 1:  # linear ramp in a random direction
        angle = rng.uniform(0.0, 2.0 * np.pi)
        field = amplitude * (np.cos(angle) * xx + np.sin(angle) * yy)
    elif kind == 2:  # vignette: darker towards the corners
        field = -amplitude * 2.0 * (xx**2 + yy**2)
    else:
        field = np.zeros_like(xx)
    mean = offset + field
    shot = np.sqrt(np.clip(mean, 0.0, None) * rng.uniform(0.0, 0.05))
    noise = _gaussian(rng, (height, width)) * np.sqrt(read**2 + shot**2)
    return np.clip(np.rint(mean + noise), 0, top).astype(np.uint8 if bit_depth == 8 else np.uint16)


# --------------------------------------------------------------------------- plate


def _plate_counts(counts: tuple[int, int] | Sequence[int], images: int, rng) -> list[int]:
    if isinstance(counts, str | bytes):  # "59" is not the counts 5 and 9
        raise ValueError(f"counts must be a (lo, hi) tuple or a sequence of counts, got {counts!r}")
    if not isinstance(counts, tuple):
        counts = list(counts)  # a generator is read once
    for value in counts:  # 2.7 must not become a 'C2' truth
        _check_count(value, (1 << 31, 1))
    if isinstance(counts, tuple) and len(counts) == 2:
        lo, hi = (int(v) for v in counts)
        if lo < 0 or lo > hi:
            raise ValueError(f"counts range must be (lo, hi) with 0 <= lo <= hi, got {counts}")
        return [int(v) for v in rng.integers(lo, hi + 1, size=images)]
    values = [int(v) for v in counts]
    if not values:
        raise ValueError("counts must be a (lo, hi) tuple or a non-empty sequence of counts")
    if min(values) < 0:
        raise ValueError(f"counts must be >= 0, got {min(values)}")
    return [values[i % len(values)] for i in range(images)]


def _tiff_bytes(array: np.ndarray) -> bytes:
    """A zlib-compressed TIFF (level 1: 4x faster than the default, files ~6 % larger)."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression="zlib", compressionargs={"level": 1})
    return buffer.getvalue()


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _scene_stem(index: int, width_digits: int, count: int, blur: int, stain: int) -> str:
    """The file stem of scene ``index`` at one blur and stain (BBBC005's naming)."""
    row = chr(ord("A") + BLUR_LEVELS.index(blur))
    return f"SIMCEPImages_{row}{index + 1:0{width_digits}d}_C{count}_F{blur}_s01_w{stain}"


def _stale_files(out: Path, stems: set[str]) -> list[Path]:
    """Files in ``out``'s images/, masks/ and labels/ a plate of ``stems`` would not rewrite,
    and ``out/counts.csv`` if it names an image the plate would not write (a user's)."""
    stale = sorted(
        path
        for sub in PLATE_FOLDERS
        if (out / sub).is_dir()
        for path in (out / sub).iterdir()
        if path.stem not in stems
    )
    table = out / "counts.csv"
    if table.is_file():
        try:
            with table.open(newline="", encoding="utf-8-sig") as handle:
                names = [row.get("image") or "" for row in csv.DictReader(handle)]
        except (OSError, UnicodeDecodeError, csv.Error):
            names = [""]  # unreadable: not one this module wrote
        if any(Path(name).stem not in stems for name in names):
            stale.append(table)
    return stale


def _write_scene(job: tuple) -> list[tuple[str, int, int, int]]:
    """Render one scene and write it at every requested blur and stain; return csv rows."""
    (out_dir, index, width_digits, count, entropy, blurs, stains, size, bit_depth, params) = job
    rendered = _render_scene(count, size, bit_depth, params, np.random.default_rng(entropy))
    out = Path(out_dir)
    label_dtype = np.uint16 if count <= 65535 else np.int32
    rows = []
    for stain in stains:
        ch = stain - 1
        mask_png = _png_bytes(rendered.masks[ch].astype(np.uint8) * 255)
        label_tif = _tiff_bytes(rendered.labels[ch].astype(label_dtype))
        for blur in blurs:
            stem = _scene_stem(index, width_digits, count, blur, stain)
            blurred = _focus_blur(rendered.images[ch], blur, rendered.scale)
            image = _to_output(blurred, bit_depth, params)
            (out / "images" / f"{stem}.TIF").write_bytes(_tiff_bytes(image))
            (out / "masks" / f"{stem}.png").write_bytes(mask_png)
            (out / "labels" / f"{stem}.tif").write_bytes(label_tif)
            rows.append((f"{stem}.TIF", count, blur, stain))
    return rows


def _whole_at_least_1(value: object) -> bool:
    """Whether ``value`` is a whole number >= 1 (not a bool, None or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return float(value).is_integer() and float(value) >= 1


def simulate_plate(
    out_dir: str | os.PathLike[str],
    *,
    images: int,
    counts: tuple[int, int] | Sequence[int] = (1, 100),
    blurs: Sequence[int] = (1, 23, 48),
    stains: Sequence[int] = (1, 2),
    seed: int = 0,
    size: tuple[int, int] = (520, 696),
    bit_depth: int = 8,
    params: SimulationParams | None = None,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write a simulated BBBC005-style plate: images, masks, labels and counts.csv.

    ``images`` is the number of **scenes**; each scene is written at every
    requested blur level and stain, so the plate holds
    ``images * len(blurs) * len(stains)`` image files (like BBBC005, where one
    scene appears at every blur in both stains).  Files::

        out_dir/images/SIMCEPImages_<well>_C<count>_F<blur>_s01_w<stain>.TIF
        out_dir/masks/<same stem>.png    8-bit, 0 / 255 truth foreground of that stain
        out_dir/labels/<same stem>.tif   uint16 instance labels (int32 above 65,535 cells)
        out_dir/counts.csv               image,count,blur,stain (as the real counts.csv)

    The well is BBBC005's: row letter = position of the blur level in
    :data:`BLUR_LEVELS` (A = F1, H = F23, P = F48), column = scene number
    (1-based, zero padded to at least 2 digits); the site is always ``s01``.
    TIFFs are zlib-compressed (level 1).  Masks and labels are the unblurred truth, the
    same for every blur level of a scene.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Folder to write. A new folder appears whole or not at all (the plate is
        written in a hidden folder beside it and renamed into place, so an
        interrupted run leaves no partial plate; one killed outright leaves the
        hidden folder, which the next run into ``out_dir`` removes). Files of the same names are
        overwritten (the same arguments write the same plate again); any other
        file in its ``images/``, ``masks/`` or ``labels/`` is refused, since
        ``counts.csv`` would not describe it.
    images : int
        Number of scenes (>= 1).
    counts : tuple of int or sequence of int, default (1, 100)
        A 2-tuple ``(lo, hi)``: each scene's count is drawn uniformly from the
        inclusive range.  Any other sequence (e.g. a list): counts are taken
        from it in order, cycling.
    blurs : sequence of int, default (1, 23, 48)
        Blur levels to write (each in :data:`BLUR_LEVELS`).
    stains : sequence of int, default (1, 2)
        Stains to write.
    seed : int, default 0
        Same arguments, same bytes (also with ``workers > 1``): scene ``i`` is
        seeded by child ``i`` of ``numpy.random.SeedSequence(seed)``.
    size, bit_depth, params
        As in :func:`simulate_scene`.
    workers : int, default 1
        Processes; scenes are independent, so the output does not depend on it.
    progress : bool, default False
        Show a tqdm progress bar (only when stderr is a terminal).

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Raises
    ------
    ValueError
        For ``images < 1``, bad counts, blur levels, stains, size or bit depth,
        or a folder holding files of another plate.
    """
    if not _whole_at_least_1(images):
        raise ValueError(f"images (--images) must be a whole number >= 1, got {images!r}")
    if not _whole_at_least_1(workers):
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    images = int(images)
    size = _check_size(size)
    bit_depth = _check_bit_depth(bit_depth)
    params = _resolve_params(params)
    blurs = tuple(dict.fromkeys(_check_blur(b) for b in blurs))
    stains = tuple(dict.fromkeys(_check_stain(s) for s in stains))
    if not blurs or not stains:
        raise ValueError("blurs and stains must each name at least one level")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    children = np.random.SeedSequence(int(seed)).spawn(images + 1)
    scene_counts = _plate_counts(counts, images, np.random.default_rng(children[0]))
    for c in scene_counts:
        _check_count(c, size)

    out = Path(out_dir)
    digits = max(2, len(str(images)))
    stems = {
        _scene_stem(i, digits, scene_counts[i], blur, stain)
        for i in range(images)
        for blur in blurs
        for stain in stains
    }
    if stale := _stale_files(out, stems):
        raise ValueError(
            f"{out} already holds {len(stale)} file(s) this plate would not rewrite (e.g. "
            f"{stale[0].relative_to(out)}): its counts.csv would not describe them; write "
            "the plate into a new folder, or empty this one"
        )
    # A new plate is written into a staging folder beside ``out`` and renamed into
    # place when whole, so an interrupted run leaves no partial plate behind.
    staging = _staging_folder(out)
    target = staging or out
    try:
        for sub in PLATE_FOLDERS:
            (target / sub).mkdir(parents=True, exist_ok=True)
        _write_plate(
            target,
            images,
            digits,
            scene_counts,
            children,
            blurs,
            stains,
            size,
            bit_depth,
            params,
            workers,
            progress,
        )
        if staging is not None:
            try:
                os.rename(staging, out)
            except OSError as err:
                # another run made the folder meanwhile: the same plate (the same names,
                # hence the same bytes) is fine; another plate is not
                if not out.is_dir() or _stale_files(out, stems):
                    raise ValueError(
                        f"{out}: could not move the finished plate into place "
                        f"({err.strerror}); another run wrote another plate there meanwhile"
                    ) from None
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _staging_folder(out: Path) -> Path | None:
    """A new empty folder beside ``out`` to write a plate into, or None to write in place.

    Only a plate in a new folder is staged; one rewritten over itself has the same
    names and bytes, and an existing folder may be the working directory.
    """
    if out.exists() or out.is_symlink():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.partial-"
    for old in out.parent.glob(f"{glob.escape(prefix)}*"):  # left by a killed run
        pid = old.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    staging = out.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # mode from the umask, as ``out`` would have
    return staging


def _alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (a staging folder's owner)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _write_plate(
    out: Path,
    images: int,
    digits: int,
    scene_counts: list[int],
    children: list[np.random.SeedSequence],
    blurs: tuple[int, ...],
    stains: tuple[int, ...],
    size: tuple[int, int],
    bit_depth: int,
    params: SimulationParams,
    workers: int,
    progress: bool,
) -> None:
    """Render and write every scene of a plate into ``out``, then its counts.csv."""
    jobs = [
        (
            str(out),
            i,
            digits,
            scene_counts[i],
            children[i + 1],
            blurs,
            stains,
            size,
            bit_depth,
            params,
        )
        for i in range(images)
    ]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=images, desc="simulating", unit="scene", disable=None)
    rows: list[tuple[str, int, int, int]] = []
    try:
        if workers > 1 and images > 1:
            chunk = max(1, images // (8 * workers))
            for result in process_map(
                _write_scene, jobs, workers=min(workers, images), chunksize=chunk
            ):
                rows.extend(result)
                if bar is not None:
                    bar.update(1)
        else:
            for job in jobs:
                rows.extend(_write_scene(job))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    rows.sort()
    partial = out / f".counts.csv.partial-{os.getpid()}"
    try:
        with partial.open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["image", "count", "blur", "stain"])
            writer.writerows(rows)
        os.replace(partial, out / "counts.csv")
    finally:
        partial.unlink(missing_ok=True)  # a failed write (a full disk) leaves no scrap
