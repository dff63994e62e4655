"""Counters averaged: several count heads on the same planes, one count.

The ``nuclei`` model averages its grid-density VGG counter with a per-pixel
U-Net counter (``models.unet``): on its 20 calibration images the two err
on different images (MAE 4.17 and 3.11; their mean 3.03, with the width-32
U-Net shipped since the second GPU round, docs/finetuning.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn


def sum_to_grid(values: torch.Tensor, grid: Sequence[int], factor: int) -> torch.Tensor:
    """Sum an ``(N, H, W)`` map over ``factor x factor`` blocks onto an ``(N, *grid)`` grid.

    The map is zero-padded to whole blocks first. Blocks beyond the grid (a
    side that is not a multiple of ``factor``: the coarser counter's pooling
    floors it) are added to the grid's last row or column, so the grid sums to
    the whole map; when ``H`` and ``W`` are multiples of ``factor`` (as tiles
    are) each block is its own cell.
    """
    gh, gw = int(grid[0]), int(grid[1])
    if gh < 1 or gw < 1:  # an empty grid holds nothing
        return values.new_zeros(*values.shape[:-2], max(gh, 0), max(gw, 0))
    h, w = values.shape[-2:]
    bh, bw = max(gh, -(-h // factor)), max(gw, -(-w // factor))
    values = F.pad(values, (0, bw * factor - w, 0, bh * factor - h))
    blocks = values.reshape(*values.shape[:-2], bh, factor, bw, factor).sum((-3, -1))
    if bh > gh:  # rows beyond the grid: into its last row
        last = blocks[..., gh - 1 :, :].sum(-2, keepdim=True)
        blocks = torch.cat([blocks[..., : gh - 1, :], last], dim=-2)
    if bw > gw:
        last = blocks[..., :, gw - 1 :].sum(-1, keepdim=True)
        blocks = torch.cat([blocks[..., :, : gw - 1], last], dim=-1)
    return blocks


class _Part(Protocol):
    """What an averaged counter has (``VGGCounter``, ``UNetCounter``); for type checking."""

    @property
    def stride(self) -> int: ...

    def density(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class AverageCounter(nn.Module):
    """The mean of ``counters``' counts (and variances), each reading the same planes.

    ``forward`` averages the counters' counts and their variances (the aleatoric
    part of a mixture, as test-time averaging does). ``density`` sums every
    counter's map onto the first counter's grid, then averages: tiles combine
    exactly as with the first counter alone. The first counter's grid must be
    the coarsest, its stride a multiple of the others'.
    """

    head = "density"
    counts_any_size = True  # every part's density is summed onto the first's grid

    def __init__(self, counters: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(counters) < 2:
            raise ValueError(f"an average needs at least 2 counters, got {len(counters)}")
        self.counters = nn.ModuleList(counters)
        parts = cast("Sequence[_Part]", counters)
        first = int(parts[0].stride)
        for counter in parts[1:]:
            if first % int(counter.stride):
                raise ValueError(
                    f"counter strides must divide the first's ({first}), not {counter.stride}"
                )

    @property
    def stride(self) -> int:
        """Plane pixels per density cell (the first counter's)."""
        return int(cast("Sequence[_Part]", self.counters)[0].stride)

    def density(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-cell count and log of the mean per-cell variance, on the first's grid."""
        parts = cast("Sequence[_Part]", self.counters)
        dens, log_var = parts[0].density(x)
        grid, total, var = dens.shape[-2:], dens, log_var.exp()
        for counter in parts[1:]:
            d, lv = counter.density(x)
            factor = self.stride // int(counter.stride)
            total = total + sum_to_grid(d, grid, factor)
            var = var + sum_to_grid(lv.exp(), grid, factor)
        n = len(self.counters)
        return total / n, torch.log(var / n)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [counter(x) for counter in self.counters]
        count = torch.stack([c for c, _ in outs]).mean(0)
        var = torch.stack([lv.exp() for _, lv in outs]).mean(0)
        return count, torch.log(var)
