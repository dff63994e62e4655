"""The two stages joined: image -> FPN mask (+ log-variance) -> VGG count (+ log-variance)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from celltally.models.fpn import FPN
from celltally.models.vgg import VGGCounter

COUNTER_INPUTS = ("mask", "image", "mask_logvar")


@dataclass
class PipelineOutput:
    """Batched outputs; masks are at half the input size."""

    mask: torch.Tensor  # (N, 1, h, w) in [0, 1]
    mask_logvar: torch.Tensor  # (N, 1, h, w)
    count: torch.Tensor  # (N,)
    count_logvar: torch.Tensor  # (N,)


def counter_input(
    mask: torch.Tensor, mask_logvar: torch.Tensor, image: torch.Tensor, inputs: list[str]
) -> torch.Tensor:
    """Stack the counter's input planes at the mask's size, in the order of ``inputs``."""
    planes = []
    for name in inputs:
        if name == "mask":
            planes.append(mask)
        elif name == "mask_logvar":
            planes.append(mask_logvar)
        elif name == "image":
            planes.append(F.adaptive_avg_pool2d(image, mask.shape[-2:]))
        else:
            raise ValueError(f"unknown counter input {name!r}; choose from {COUNTER_INPUTS}")
    return torch.cat(planes, dim=1)


class CountingPipeline(nn.Module):
    """Segmenter and counter built from a model configuration (see ``presets``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        seg = config["segmenter"]
        cnt = config["counter"]
        self.counter_inputs = list(config["counter_inputs"])
        self.segmenter = FPN(
            in_channels=1, encoder=seg["encoder"], lateral=seg["lateral"], head=seg["head"]
        )
        self.counter = VGGCounter(
            in_channels=len(self.counter_inputs),
            width=cnt["width"],
            fc=cnt["fc"],
            pool_size=tuple(cnt["pool_size"]),
            count_scale=cnt["count_scale"],
            head=cnt.get("head", "fc"),
            tta=cnt.get("tta", "none"),
        )

    def count_from_mask(
        self, mask: torch.Tensor, mask_logvar: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.counter(counter_input(mask, mask_logvar, image, self.counter_inputs))

    @property
    def density_stride(self) -> int:
        """Input pixels per density cell along each side (the mask is at half size)."""
        return 2 * self.counter.stride

    def density(self, image: torch.Tensor) -> PipelineOutput:
        """Like ``forward`` but ``count``/``count_logvar`` are per-cell maps (density head only).

        Shapes: ``(N, H / s, W / s)`` with ``s = density_stride``; summing the
        count map (and the exponentiated log-variance map) over all cells gives
        ``forward``'s count (and variance).
        """
        mask, mask_logvar = self.segmenter(image, levels=1)[0]
        x = counter_input(mask, mask_logvar, image, self.counter_inputs)
        dens, log_var = self.counter.density(x)
        return PipelineOutput(mask, mask_logvar, dens, log_var)

    def forward(self, image: torch.Tensor) -> PipelineOutput:
        mask, mask_logvar = self.segmenter(image, levels=1)[0]
        count, count_logvar = self.count_from_mask(mask, mask_logvar, image)
        return PipelineOutput(mask, mask_logvar, count, count_logvar)
