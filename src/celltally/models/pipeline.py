"""The two stages joined: image -> FPN mask (+ log-variance) -> VGG count (+ log-variance)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from celltally.model_folder import first_line, read_model_config
from celltally.models.average import AverageCounter
from celltally.models.fpn import FPN
from celltally.models.unet import UNetCounter
from celltally.models.vgg import VGGCounter

#: Counter input planes, each at the mask's size (half the input). "image" is the
#: input averaged over 2x2 blocks; "image_max"/"image_min" are its 2x2 maxima and
#: minima, which keep the peaks of small nuclei and the dark gaps between touching
#: ones that averaging blurs (order statistics of each block, so the flips and
#: rotations used for augmentation and test-time averaging still commute with them).
COUNTER_INPUTS = ("mask", "image", "mask_logvar", "image_max", "image_min")
#: Where the counter reads its planes: on the mask's grid (half the input, the
#: paper) or at the full model input, the mask upsampled (small objects keep
#: their pixels; the counter then keeps VGG-11's fifth pool, so its density grid
#: is the same).
PLANES_AT = ("mask", "input")
#: What :func:`build_counter` builds.
CounterHead = VGGCounter | UNetCounter | AverageCounter


@dataclass
class PipelineOutput:
    """Batched outputs; masks are at half the input size."""

    mask: torch.Tensor  # (N, 1, h, w) in [0, 1]
    mask_logvar: torch.Tensor  # (N, 1, h, w)
    count: torch.Tensor  # (N,)
    count_logvar: torch.Tensor  # (N,)


def counter_input(
    mask: torch.Tensor,
    mask_logvar: torch.Tensor,
    image: torch.Tensor,
    inputs: list[str],
    *,
    at: str = "mask",
) -> torch.Tensor:
    """Stack the counter's input planes, in the order of ``inputs``.

    ``at='mask'``: every plane at the mask's size (the image averaged onto it);
    ``at='input'``: every plane at the image's size (the mask and its
    log-variance upsampled bilinearly; the 2x2 extremes are then undefined).
    """
    if at not in PLANES_AT:
        raise ValueError(f"planes_at must be one of {PLANES_AT}, not {at!r}")
    size = image.shape[-2:] if at == "input" else mask.shape[-2:]
    planes = []
    for name in inputs:
        if name in ("mask", "mask_logvar"):
            plane = mask if name == "mask" else mask_logvar
            if at == "input":
                plane = F.interpolate(plane, size=size, mode="bilinear", align_corners=False)
            planes.append(plane)
        elif name == "image":
            planes.append(
                image
                if at == "input"
                else F.adaptive_avg_pool2d(image, cast("tuple[int, int]", size))
            )
        elif name not in COUNTER_INPUTS:
            raise ValueError(f"unknown counter input {name!r}; choose from {COUNTER_INPUTS}")
        elif at == "input":
            raise ValueError(f"counter input {name!r} is not defined with planes at the input")
        elif name == "image_max":
            planes.append(F.adaptive_max_pool2d(image, size))
        else:  # image_min
            planes.append(-F.adaptive_max_pool2d(-image, size))
    return torch.cat(planes, dim=1)


def planes_shape(input_size: Sequence[int], planes_at: str = "mask") -> tuple[int, int]:
    """Height and width of the counter's planes for a model input of ``input_size``."""
    if planes_at == "input":
        return (int(input_size[0]), int(input_size[1]))
    return (int(input_size[0]) // 2, int(input_size[1]) // 2)


def build_counter(
    counter: Mapping[str, Any], in_channels: int, *, planes_at: str = "mask"
) -> CounterHead:
    """The counter a config's ``counter`` block describes.

    ``head``: 'fc' or 'density' (``VGGCounter``), or 'unet' (``UNetCounter``;
    ``width`` is then its first level's channels). ``average_with``: a list of
    further counter blocks whose counts are averaged with this one's
    (``AverageCounter``; this counter's density grid must be the coarsest).
    """
    if counter.get("head") == "unet":  # per-pixel centroid density (models.unet)
        built: VGGCounter | UNetCounter = UNetCounter(
            in_channels=in_channels,
            width=int(counter["width"]),
            levels=int(counter.get("levels", 3)),
            count_scale=counter["count_scale"],
            tta=counter.get("tta", "none"),
        )
    else:
        built = VGGCounter(
            in_channels=in_channels,
            width=counter["width"],
            fc=counter["fc"],
            pool_size=tuple(counter["pool_size"]),
            count_scale=counter["count_scale"],
            head=counter.get("head", "fc"),
            tta=counter.get("tta", "none"),
            keep_last_pool=planes_at == "input",
        )
    others = counter.get("average_with") or []
    if not others:
        return built
    return AverageCounter(
        [built, *(build_counter(o, in_channels, planes_at=planes_at) for o in others)]
    )


class CountingPipeline(nn.Module):
    """Segmenter and counter built from a model configuration (see ``presets``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        seg = config["segmenter"]
        cnt = config["counter"]
        self.counter_inputs = list(config["counter_inputs"])
        self.planes_at = cnt.get("planes_at", "mask")
        if self.planes_at not in PLANES_AT:
            raise ValueError(f"planes_at must be one of {PLANES_AT}, not {self.planes_at!r}")
        self.segmenter = FPN(
            in_channels=1, encoder=seg["encoder"], lateral=seg["lateral"], head=seg["head"]
        )
        self.counter = build_counter(cnt, len(self.counter_inputs), planes_at=self.planes_at)

    def counter_planes(
        self, mask: torch.Tensor, mask_logvar: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """The counter's input planes for this model (see :func:`counter_input`)."""
        return counter_input(mask, mask_logvar, image, self.counter_inputs, at=self.planes_at)

    def count_from_mask(
        self, mask: torch.Tensor, mask_logvar: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.counter(self.counter_planes(mask, mask_logvar, image))

    @property
    def density_stride(self) -> int:
        """Input pixels per density cell along each side."""
        return self.counter.stride * (2 if self.planes_at == "mask" else 1)

    def density(self, image: torch.Tensor) -> PipelineOutput:
        """Like ``forward`` but ``count``/``count_logvar`` are per-cell maps (density head only).

        Shapes: ``(N, H / s, W / s)`` with ``s = density_stride``; summing the
        count map (and the exponentiated log-variance map) over all cells gives
        ``forward``'s count (and variance).
        """
        mask, mask_logvar = self.segmenter(image, levels=1)[0]
        x = self.counter_planes(mask, mask_logvar, image)
        dens, log_var = self.counter.density(x)
        return PipelineOutput(mask, mask_logvar, dens, log_var)

    def forward(self, image: torch.Tensor) -> PipelineOutput:
        mask, mask_logvar = self.segmenter(image, levels=1)[0]
        count, count_logvar = self.count_from_mask(mask, mask_logvar, image)
        return PipelineOutput(mask, mask_logvar, count, count_logvar)


def add_counter_inputs(
    model: CountingPipeline, config: dict[str, Any], names: list[str]
) -> tuple[CountingPipeline, dict[str, Any]]:
    """A copy of ``model`` whose counter takes more input planes, computing the same counts.

    The new planes' weights in the counter's first convolution start at zero,
    so continued training starts from the old counter's function and learns
    whatever the new planes add. ``model`` and ``config`` are not modified.
    """
    unknown = [n for n in names if n not in COUNTER_INPUTS]
    if unknown:
        raise ValueError(f"unknown counter input {unknown[0]!r}; choose from {COUNTER_INPUTS}")
    new = [n for n in dict.fromkeys(names) if n not in config["counter_inputs"]]
    config = {**config, "counter_inputs": list(config["counter_inputs"]) + new}
    wider = CountingPipeline(config)
    wider.load_state_dict(widen_counter_state(model.state_dict(), len(new), prefix="counter."))
    return wider, config


def widen_counter_state(
    state: Mapping[str, torch.Tensor], extra: int, *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A counter's weights (keys under ``prefix``) for ``extra`` more input planes, appended last.

    The first convolution gets zero weights for the new planes, so the
    counter computes exactly what it did (used for ensemble members too).
    """
    key = f"{prefix}features.0.weight"
    weight = state[key]
    pad = weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])
    return {**state, key: torch.cat([weight, pad], 1)}


def load_model_folder(folder: str | Path) -> tuple[CountingPipeline, dict[str, Any]]:
    """The model and config of a model folder (``config.json`` + ``model.safetensors``).

    The reader of :func:`celltally.train.save_model_folder`'s folders; the model is
    returned as built (train mode), with the folder's weights.

    Raises
    ------
    celltally.io.InputError
        A missing, corrupt or mismatched config or weights file (named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from celltally.io import InputError

    folder = Path(folder)
    config = read_model_config(folder)
    try:
        model = CountingPipeline(config)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(
            f"{folder / 'config.json'}: not a celltally model config ({first_line(err)})"
        ) from None
    weights = folder / "model.safetensors"
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise InputError(f"{weights}: missing (a model folder holds its weights here)") from None
    except (SafetensorError, OSError) as err:
        raise InputError(f"{weights}: corrupt weights file ({first_line(err)})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(
            f"{weights}: does not fit the model in config.json ({first_line(err)})"
        ) from None
    return model, config
