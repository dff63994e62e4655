"""Why the model counted what it counted: saliency maps and the paper's Figure 4 panel.

The paper (Hernández, Sultan & Pande 2018, Fig. 4) shows, for one image, the
input, the predicted mask, the mask's per-pixel uncertainty and the gradient of
the count loss with respect to the mask. :func:`explain_image` computes all of
them (and the gradient with respect to the input image as well), and
:func:`explanation_figure` draws the panel with matplotlib's Agg backend
(no display, no global pyplot state, safe in a web server's threads).
"""

from __future__ import annotations

import dataclasses
import io as _bytes_io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch

from celltally import io
from celltally.counter import ModelScaleImage, _out_of_memory, ensemble_mixture
from celltally.losses import gaussian_nll
from celltally.scale import model_shape
from celltally.tiling import model_canvas, padded_shape

if TYPE_CHECKING:  # pragma: no cover
    from celltally.counter import CellCounter, CountResult
    from celltally.models.pipeline import CountingPipeline

__all__ = [
    "Explanation",
    "display_max",
    "explain_image",
    "explanation_figure",
    "explanation_png",
    "saliency",
    "too_large_to_explain",
]


#: Most model-scale pixels :func:`explain_image` differentiates (one pass over the
#: whole image, about 1 KB of memory per pixel: 4 GB here; counting works in tiles).
EXPLAIN_MAX_PIXELS = 2**22
#: Memory of an explanation per ensemble member, as a share of the model's own: each
#: member's counter keeps its activations for the backward pass too (measured
#: 2.6 x the plain figure with 2 members for bbbc005, 3.1 x with 4 for nuclei).
MEMBER_MEMORY_SHARE = 0.8


@dataclass
class Explanation:
    """Everything the Figure 4 panel shows for one image.

    Attributes
    ----------
    result : CountResult
        The count of the image (as :meth:`CellCounter.count` gives it).
    image : np.ndarray
        The prepared network input (model input size, float32; for an image
        that is not one native frame, the whole image at the model's scale).
    mask : np.ndarray
        Predicted foreground probability (half the input size).
    mask_std : np.ndarray
        Per-pixel (aleatoric) standard deviation of the mask.
    mask_saliency : np.ndarray
        ``|d loss / d mask|`` at the mask's size (the paper's saliency map).
    image_saliency : np.ndarray
        ``|d loss / d image|`` at the prepared input's size (through both stages).
    true_count : float or None
        The truth the loss was taken against; None when unknown.
    loss : str
        What was differentiated: ``'count'`` (truth unknown) or ``'nll'``.
    """

    result: CountResult
    image: np.ndarray = field(repr=False)  # a notebook's repr shows the count, not the maps
    mask: np.ndarray = field(repr=False)
    mask_std: np.ndarray = field(repr=False)
    mask_saliency: np.ndarray = field(repr=False)
    image_saliency: np.ndarray = field(repr=False)
    true_count: float | None = None
    loss: str = "count"


def _saliency(
    model: CountingPipeline,
    prepared: np.ndarray,
    *,
    true_count: float | None = None,
    device: torch.device | str | None = None,
    members: Sequence[torch.nn.Module] = (),
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """:func:`saliency`, plus the forward pass's (mask, mask std).

    With ``members`` (an ensemble's extra counter heads), the count is theirs and
    the model's counter's mixture, as :class:`~celltally.counter.CellCounter`
    counts with ``epistemic=True``: the mean of the counts, the members' mean
    variance plus the variance of their counts.
    """
    array = np.asarray(prepared, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D prepared image, got shape {array.shape}")
    if device is None:
        device = next(model.parameters()).device
    if model.training:
        raise ValueError("saliency needs the model in eval mode (batch norm running statistics)")
    with torch.enable_grad():
        x = torch.tensor(array, device=device)[None, None].requires_grad_(True)
        mask, mask_logvar = model.segmenter(x, levels=1)[0]
        count, count_logvar = model.count_from_mask(mask, mask_logvar, x)
        if members:
            planes = model.counter_planes(mask, mask_logvar, x)
            outs = [(count, count_logvar)] + [member(planes) for member in members]
            count, variance, _ = ensemble_mixture(outs)
            count_logvar = torch.log(variance)
        if true_count is None:
            loss = count.sum()
        else:
            target = torch.full_like(count, float(true_count))
            loss = gaussian_nll(count, target, count_logvar)
        # autograd.grad, not backward(): the parameters' .grad stay untouched, so
        # concurrent explanations (web server threads) cannot interfere.
        mask_grad, image_grad = torch.autograd.grad(loss, [mask, x])
    mask_sal = mask_grad[0, 0].abs().cpu().numpy()
    image_sal = image_grad[0, 0].abs().cpu().numpy()
    forward = (
        mask[0, 0].detach().cpu().numpy(),
        torch.exp(0.5 * mask_logvar[0, 0]).detach().cpu().numpy(),
    )
    return mask_sal.astype(np.float32), image_sal.astype(np.float32), forward


def saliency(
    model: CountingPipeline,
    prepared: np.ndarray,
    *,
    true_count: float | None = None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient magnitudes of the count loss w.r.t. the mask and w.r.t. the prepared image.

    Parameters
    ----------
    model : CountingPipeline
        The two-stage network (``segmenter`` + ``count_from_mask``); used in eval mode.
    prepared : np.ndarray
        One prepared 2-D image (model input size); not modified.
    true_count : float, optional
        When given, the loss is the aleatoric Gaussian NLL of the count against
        it, ``0.5 exp(-s) (y - mu)^2 + 0.5 s`` (the paper's training loss).
        When unknown, the NLL taken at the prediction itself has a zero
        gradient through the mean, so, as usual for saliency maps, the
        predicted count ``mu`` itself is differentiated instead.
    device : torch device, optional
        Where to run; defaults to the device of the model's parameters.

    Returns
    -------
    mask_saliency : np.ndarray
        ``|d loss / d mask|`` at half the input size: the partial derivative of
        the counter stage with respect to its mask plane (the image plane and
        mask log-variance held fixed), as in the paper.
    image_saliency : np.ndarray
        ``|d loss / d image|`` at the input size: the total derivative through
        segmenter and counter. Exactly zero where the count does not depend
        on the pixel (outside the receptive field of every counted output).
    """
    mask_sal, image_sal, _ = _saliency(model, prepared, true_count=true_count, device=device)
    return mask_sal, image_sal


def _too_large(canvas: Sequence[int], members: int) -> str | None:
    """Why a model-scale ``canvas`` (rows, columns) is too large to explain in one pass
    with ``members`` ensemble members, or None when it is not."""
    # one autograd pass: ~1 KB per model pixel, and more per ensemble member
    weight = 1 + MEMBER_MEMORY_SHARE * members
    height, width = int(canvas[0]), int(canvas[1])
    if height * width * weight <= EXPLAIN_MAX_PIXELS:
        return None
    limit = EXPLAIN_MAX_PIXELS / weight / 2**20
    with_members = f" with {members} ensemble members" if members else ""
    return (
        f"is {width} x {height} px at the model's scale, too large to explain in one "
        f"pass{with_members} (about {height * width * weight / 2**20:.0f} GB; the limit "
        f"is {limit:.3g} M px)"
    )


def too_large_to_explain(counter: CellCounter, shape: Sequence[int]) -> str | None:
    """Why :func:`explain_image` would refuse a raw image of ``shape`` (rows, columns) as
    too large, or None when it would explain it: decided as it decides, before counting
    (the web page then counts the image without its saliency map)."""
    if counter.counts_in_tiles(shape):  # the model-scale image, on the canvas counting uses
        stride = math.lcm(int(counter.model.density_stride), 32)
        canvas = padded_shape(model_shape(shape, counter.scale, counter.factor), stride)
    else:  # a native frame: resized to the model's input
        canvas = tuple(counter.input_size)
    return _too_large(canvas, len(counter.members))


#: Largest true count an explanation takes (its loss is computed in float32).
MAX_TRUE_COUNT = 1e7


def explain_image(
    counter: CellCounter,
    image: np.ndarray | str | Path,
    *,
    true_count: float | None = None,
    level: float = 0.95,
    name: str | None = None,
) -> Explanation:
    """Count one image and explain the count (mask, its uncertainty, saliency maps).

    Parameters
    ----------
    counter : CellCounter
        A loaded model. One loaded with ``epistemic=True`` explains its
        ensemble's count (the saliency of the members' mixture), as it counts.
    image : np.ndarray or path
        A raw 2-D image or an image file.
    true_count : float, optional
        The true count, if known: the saliency is then the gradient of the
        aleatoric loss against it (as in the paper); otherwise of the
        predicted count itself (see :func:`saliency`).
    level : float
        Interval level of the reported count.
    name : str, optional
        For an array: the file name it came from, read for its metadata
        (:meth:`CellCounter.count`).

    Returns
    -------
    Explanation

    Raises
    ------
    celltally.io.ImageReadError
        The file cannot be read (one-line message naming the file).
    celltally.io.InputError
        The array is not a finite 2-D image, or ``true_count`` is not a finite count
        of 0 or more.
    """
    if true_count is not None and not (
        math.isfinite(float(true_count)) and 0.0 <= float(true_count) <= MAX_TRUE_COUNT
    ):  # NaN made every saliency map NaN; 1e39 overflowed the float32 loss
        raise io.InputError(
            f"true_count must be a count from 0 to 1e7, got {true_count!r}"  # MAX_TRUE_COUNT
        )
    source = None
    if isinstance(image, str | os.PathLike):
        source = os.fspath(image)
        image = counter.read(image)
    try:
        result, prepared = counter.count_with_input(image, level=level, name=source or name)
    except io.InputError as err:
        raise io.about_file(err, source) from None
    if source is not None:
        result = dataclasses.replace(result, source=source)
    if isinstance(prepared, ModelScaleImage):
        # Counted in tiles; explained in one pass over the whole model-scale image, on
        # the zero-padded canvas counting uses: a small image or thin strip would
        # otherwise be pooled to nothing.
        prepared = prepared.prepared
        canvas = model_canvas(prepared, counter.model.density_stride)
    else:
        canvas = prepared
    if (problem := _too_large(canvas.shape, len(counter.members))) is not None:
        raise io.about_file(
            io.InputError(f"{problem}: explain a crop of it (count it whole)"), source or name
        )
    try:
        mask_sal, image_sal, (mask, mask_std) = _saliency(
            counter.model,
            canvas,
            true_count=true_count,
            device=counter.device,
            members=counter.members,  # with epistemic=True: the ensemble's count, explained
        )
    except (MemoryError, RuntimeError) as err:  # one line, as counting says it
        raise _out_of_memory(err, Path(source or name or "image"), canvas.shape) from None
    if canvas is not prepared:  # back to the image's own extent (the masks are at half size)
        height, width = prepared.shape
        half = (-(-height // 2), -(-width // 2))
        image_sal = image_sal[:height, :width]
        mask_sal, mask, mask_std = (a[: half[0], : half[1]] for a in (mask_sal, mask, mask_std))
    return Explanation(
        result=result,
        image=prepared,
        mask=mask,
        mask_std=mask_std,
        mask_saliency=mask_sal,
        image_saliency=image_sal,
        true_count=None if true_count is None else float(true_count),
        loss="count" if true_count is None else "nll",
    )


def panel_title(result: CountResult, true_count: float | None = None) -> str:
    """``'96.2 ± 3.6 cells (95%)'``, with ``', truth 96'`` when the truth is known.

    A flagged image (``result.warning``) gets a second line saying so: the figure
    often travels without the terminal's or the CSV's warning.
    """
    from celltally.calibration import EMPTY_HINT, SIZE_HINT, UNLIKE_HINT, suggested_rescale

    title = str(result)
    if true_count is not None:
        title += f", truth {true_count:g}"
    if EMPTY_HINT in result.warning:
        title += f"\n⚠ low contrast: {EMPTY_HINT}"
    if UNLIKE_HINT in result.warning:
        title += "\n⚠ unlike the model's calibration images: the interval may not hold"
    ratio = result.ood.get("size_ratio")
    if ratio is not None and (factor := suggested_rescale(result.warning)) is not None:
        # the width as counted (the warning's), the factor the whole one to count at
        title += f"\n⚠ objects {ratio:.2g}x as wide as theirs: {SIZE_HINT} {factor:.2g}"
    return title


def display_max(array: np.ndarray) -> float:
    """The value at the top of a map's colour scale (uncertainty, saliency).

    The 99.5th percentile, so that one hot pixel does not wash out the map;
    but where that is no higher than the map's median (a few cells on an
    even background: the percentile sits on the floor), the maximum, or the
    background would take the top colour and read as "uncertain everywhere".
    """
    values = np.asarray(array, dtype=np.float64)
    top = float(np.percentile(values, 99.5))
    if top <= float(np.median(values)) * (1 + 1e-6):
        top = float(values.max())
    return top if top > 0 else 1.0


def _layout(shape: tuple[int, ...], panels: int) -> tuple[int, int, tuple[float, float]]:
    """(rows, columns, figure size in inches) that keep each panel near its image's shape.

    Panels side by side (3.2 in wide each, about BBBC005's 4:3 frame) unless the
    image is more than twice as wide as tall: then one above another, so a strip
    is not drawn as thin lines. A tall image keeps its height within 9 in.
    """
    aspect = shape[0] / max(shape[1], 1)  # height / width
    if aspect < 0.5:  # wide: a column of panels, 8 in wide
        return panels, 1, (8.0, min(24.0, panels * (7.0 * aspect + 0.5) + 0.6))
    if aspect <= 1.5:
        return 1, panels, (3.2 * panels, 3.0)
    height = min(9.0, 2.2 * aspect + 0.8)
    # at least 2.3 in a panel: room for its title
    return 1, panels, (panels * max(2.3, (height - 0.8) / aspect + 0.7), height)


def _draw(expl: Explanation, *, title: str | None, true_count: float | None, image_saliency: bool):
    from matplotlib.figure import Figure

    truth = expl.true_count if true_count is None else true_count
    # what the saliency differentiates: the count itself, or its loss against the truth
    of = "count" if expl.loss == "count" else "NLL"
    # the input between its 0.5th and 99.5th percentiles: one hot pixel would leave the
    # rest black (the network sees it clipped to the normalization's range anyway)
    low, high = (float(v) for v in np.percentile(expl.image, [0.5, 99.5]))
    panels = [
        ("input (normalized)", expl.image, "gray", low, high if high > low else low + 1, ""),
        ("predicted mask", expl.mask, "gray", 0.0, 1.0, "foreground probability"),
        ("mask uncertainty", expl.mask_std, "viridis", 0.0, None, "std of the mask"),
        (f"saliency |d {of} / d mask|", expl.mask_saliency, "inferno", 0.0, None, "gradient"),
    ]
    if image_saliency:
        panels.append(
            (f"saliency |d {of} / d image|", expl.image_saliency, "inferno", 0.0, None, "gradient")
        )
    # more pixels for larger images (a whole-well mosaic), so that cells stay visible
    dpi = round(100 * min(4.0, max(1.0, max(expl.image.shape) / 300)))
    rows, columns, size = _layout(expl.image.shape, len(panels))
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, array, cmap, vmin, vmax, unit) in zip(axes, panels, strict=True):
        if vmax is None:
            vmax = display_max(array)
        shown = ax.imshow(array, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if unit:
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            bar.set_label(unit, fontsize=7)
    fig.suptitle(title or panel_title(expl.result, truth), fontsize=11)
    return fig


def explanation_figure(
    expl: Explanation,
    path: str | Path | BinaryIO,
    *,
    title: str | None = None,
    true_count: float | None = None,
    image_saliency: bool = False,
) -> str | Path | BinaryIO:
    """Draw the paper's Figure 4 panel: input | mask | mask uncertainty | saliency.

    Parameters
    ----------
    expl : Explanation
        From :func:`explain_image`.
    path : path or binary file
        Where to write; the format follows the suffix (PNG, PDF, SVG...), PNG
        for a file object. Parent folders are created.
    title : str, optional
        Overrides the default title, e.g. ``"96.2 ± 3.6 cells (95%), truth 96"``.
    true_count : float, optional
        Truth for the title; defaults to the one the explanation was made with.
    image_saliency : bool
        Add a fifth panel: the saliency with respect to the input image.

    Returns
    -------
    The ``path`` written.
    """
    fig = _draw(expl, title=title, true_count=true_count, image_saliency=image_saliency)
    if isinstance(path, str | os.PathLike):
        path = io.save_figure(fig, path)  # the path returned is the file written
    else:
        fig.savefig(path, format="png")
    return path


def explanation_png(
    expl: Explanation,
    *,
    title: str | None = None,
    true_count: float | None = None,
    image_saliency: bool = False,
) -> bytes:
    """The Figure 4 panel as PNG bytes (for a web page)."""
    buffer = _bytes_io.BytesIO()
    explanation_figure(
        expl, buffer, title=title, true_count=true_count, image_saliency=image_saliency
    )
    return buffer.getvalue()
