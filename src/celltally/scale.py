"""The pixel scale a model was trained at, and the factor that brings an image to it.

A model folder's ``config.json`` may hold a ``scale`` block: the raw frame it
was trained on (``native_size``, height and width), the typical object
diameter in those raw pixels (``object_diameter_px``) and their size in
micrometres (``pixel_size_um``). ``--rescale``, ``--diameter`` and
``--pixel-size`` become one resize factor here (:func:`rescale_factor`).
No torch: ``celltally models`` reads a model's scale without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celltally import io

#: The frame every shipped model was trained on (BBBC005 / BBBC039), (height, width).
DEFAULT_NATIVE_SIZE = (520, 696)


@dataclass(frozen=True)
class ModelScale:
    """The pixel scale a model was trained at.

    Attributes
    ----------
    native_size : (height, width) of the raw training frames.
    input_size : (height, width) the frames were resized to (model pixels).
    object_diameter_px : typical object diameter in raw training pixels, if recorded.
    pixel_size_um : raw training pixel size in micrometres, if recorded.
    """

    native_size: tuple[int, int]
    input_size: tuple[int, int]
    object_diameter_px: float | None = None
    pixel_size_um: float | None = None

    @property
    def raw_per_model(self) -> tuple[float, float]:
        """Raw pixels per model pixel along y and x.

        For 696 x 520 frames: ~2.7 with ``bbbc005``'s input (256 x 192), ~1.36
        with ``nuclei``'s (512 x 384).
        """
        return (
            self.native_size[0] / self.input_size[0],
            self.native_size[1] / self.input_size[1],
        )


def off_frame(
    meta: Sequence[Mapping[str, Any]], native: Sequence[int], *, tolerance: float = 0.1
) -> list[Mapping[str, Any]]:
    """The images (``meta`` rows with a raw ``shape``) more than ``tolerance`` off the frame.

    Such an image is resized whole for training, but counted in tiles at the
    model's pixel scale (calibration counts it as ``count`` does).
    """
    return [
        m
        for m in meta
        if m.get("shape") and max(abs(m["shape"][i] / native[i] - 1) for i in (0, 1)) > tolerance
    ]


def off_frame_note(
    off: Sequence[Mapping[str, Any]], total: int, native: Sequence[int], *, kind: str
) -> str:
    """'N of M ``kind`` images are not about the model's frame ...' for :func:`off_frame`'s rows."""
    h, w = off[0]["shape"]
    return (
        f"{len(off)} of {total} {kind} images are not about the model's frame of "
        f"{native[1]} x {native[0]} px, width x height (first: {off[0]['name']}, {w} x {h})"
    )


def model_scale(config: Mapping[str, Any]) -> ModelScale:
    """The ``ModelScale`` of a model configuration (``config['scale']``, else BBBC defaults)."""
    info = dict(config.get("scale") or {})
    native = tuple(int(v) for v in info.get("native_size", DEFAULT_NATIVE_SIZE))
    diameter = info.get("object_diameter_px")
    pixel = info.get("pixel_size_um")
    return ModelScale(
        native_size=(native[0], native[1]),
        input_size=(int(config["input_size"][0]), int(config["input_size"][1])),
        object_diameter_px=None if diameter is None else float(diameter),
        pixel_size_um=None if pixel is None else float(pixel),
    )


def _positive(value: Any, flag: str) -> float:
    """``value`` as a positive finite float, or InputError naming ``flag``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (number > 0 and math.isfinite(number)):
        raise io.InputError(f"{flag} must be a positive number, got {value!r}")
    return number


def rescale_factor(
    scale: ModelScale,
    *,
    pixel_size: float | None = None,
    diameter: float | None = None,
    rescale: float | None = None,
    model_name: str = "the model",
) -> float:
    """Factor that brings the user's pixels to the model's raw training pixels (1 = same).

    Parameters
    ----------
    pixel_size : float, optional
        The user's pixel size in micrometres; needs the model's ``pixel_size_um``.
    diameter : float, optional
        Typical object diameter in the user's images, in pixels; needs the
        model's ``object_diameter_px``. Objects twice the model's diameter give 0.5.
    rescale : float, optional
        The factor itself, for any model's scale: 2 for images binned 2 x 2 or taken
        at half the model's magnification (cells half as wide as it saw).

    Raises
    ------
    InputError
        For more than one option at once, a non-positive value, or a model that
        does not record the scale the option refers to.
    """
    given = [
        flag
        for flag, value in (
            ("--pixel-size", pixel_size),
            ("--diameter", diameter),
            ("--rescale", rescale),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise io.InputError(
            f"{' and '.join(given)}: give only one of --pixel-size, --diameter and --rescale"
        )
    if rescale is not None:
        rescale = _positive(rescale, "--rescale")
        return _checked_factor(float(rescale), f"--rescale {rescale}")
    if pixel_size is not None:
        pixel_size = _positive(pixel_size, "--pixel-size")
        if scale.pixel_size_um is None:
            instead = (
                "use --diameter (typical object diameter in pixels) instead"
                if scale.object_diameter_px is not None
                else "give the resize factor instead (--rescale 2 for 2 x 2-binned images)"
            )
            raise io.InputError(
                f"{model_name} does not record the pixel size it was trained at; {instead}"
            )
        return _checked_factor(
            float(pixel_size) / scale.pixel_size_um,
            f"--pixel-size {pixel_size}",
            f"the model's {scale.pixel_size_um:g} um pixels",
        )
    if diameter is not None:
        diameter = _positive(diameter, "--diameter")
        if scale.object_diameter_px is None:
            raise io.InputError(
                f"{model_name} does not record the object diameter it was trained at; "
                "give the resize factor instead (--rescale 2 for 2 x 2-binned images)"
            )
        return _checked_factor(
            scale.object_diameter_px / float(diameter),
            f"--diameter {diameter}",
            f"objects of {scale.object_diameter_px:g} px in the model's training images",
        )
    return 1.0


#: Largest rescaling (either way) that --pixel-size / --diameter / --rescale may ask for.
MAX_RESCALE = 1000.0


def _checked_factor(factor: float, option: str, reference: str | None = None) -> float:
    """``factor``, or InputError when it rescales by more than :data:`MAX_RESCALE` either way.

    ``reference`` (what the factor was worked out against, e.g. the model's
    pixel size) is named in the message; without it the option was the factor.
    """
    if not 1.0 / MAX_RESCALE <= factor <= MAX_RESCALE:  # also inf / 0 from extreme values
        against = f" ({reference})" if reference else ""
        check = "check the value and its unit" if reference else "check the value"
        raise io.InputError(
            f"{option} would rescale the images by {factor:.3g}{against}; "
            f"celltally rescales by at most {MAX_RESCALE:g}x either way: {check}"
        )
    return factor


def model_shape(shape: Sequence[int], scale: ModelScale, factor: float = 1.0) -> tuple[int, int]:
    """Size in model pixels of a raw image of ``shape`` (rounded, at least 1 x 1)."""
    sy, sx = scale.raw_per_model
    return (
        max(1, round(int(shape[0]) * factor / sy)),
        max(1, round(int(shape[1]) * factor / sx)),
    )
