"""Feature Pyramid Network segmenter with a per-pixel aleatoric head.

Follows Hernández, Sultan & Pande (2018), section 3.1: a down-sampling path
that halves the image four times, an up-sampling path joined to it by 3x3
lateral cross-links, and at every pyramid level a head of three 3x3
convolutions (batch norm before all but the last) that predicts a foreground
mask and, as a twin output, its per-pixel log-variance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Head(nn.Module):
    """Three 3x3 convs (widths ``hidden`` + 2): channel 0 = mask logit, 1 = log-variance.

    The paper's 'twin head' is realised as a second output channel of the last
    convolution, so mean and variance share the two hidden convolutions.
    """

    def __init__(self, in_channels: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in hidden:
            layers.append(_conv_bn_relu(channels, width))
            channels = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.out(self.body(x))
        return torch.sigmoid(y[:, :1]), y[:, 1:].clamp(-12.0, 8.0)  # finite exp() early on


class FPN(nn.Module):
    """Foreground segmenter with mean and log-variance outputs at 4 scales.

    Parameters
    ----------
    in_channels : int
        Channels of the input image (1 for grey-level microscopy).
    encoder : sequence of int
        Width of each down-sampling level; its length is the number of levels.
        Level ``i`` works at ``1 / 2**(i + 1)`` of the input size.
    lateral : int
        Filters of the 3x3 lateral cross-links (128 in the paper).
    head : sequence of int
        Widths of the hidden convolutions of each level's head ((256, 256) in
        the paper); a final 3x3 conv gives mask and log-variance.

    Notes
    -----
    ``forward`` returns a list of ``(mask, log_var)`` pairs, finest level first
    (half the input size, the 'largest mask' the counter reads). With
    ``levels=1`` only the finest head runs, which is all inference needs.
    """

    def __init__(
        self,
        in_channels: int = 1,
        encoder: Sequence[int] = (64, 128, 256, 512),
        lateral: int = 128,
        head: Sequence[int] = (256, 256),
    ) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        channels = in_channels
        for width in encoder:
            self.down.append(
                nn.Sequential(_conv_bn_relu(channels, width), _conv_bn_relu(width, width))
            )
            channels = width
        self.lateral = nn.ModuleList(nn.Conv2d(w, lateral, 3, padding=1) for w in encoder)
        self.heads = nn.ModuleList(_Head(lateral, head) for _ in encoder)

    @property
    def num_levels(self) -> int:
        return len(self.down)

    def forward(
        self, x: torch.Tensor, levels: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        features = []
        for block in self.down:
            x = F.max_pool2d(block(x), 2)
            features.append(x)
        pyramid: list[torch.Tensor] = []
        top: torch.Tensor | None = None
        for feat, lateral in zip(reversed(features), reversed(self.lateral), strict=True):
            p = lateral(feat)
            if top is not None:
                p = p + F.interpolate(top, size=p.shape[-2:], mode="nearest")
            pyramid.append(p)
            top = p
        pyramid.reverse()
        levels = self.num_levels if levels is None else levels
        return [head(p) for head, p in zip(self.heads[:levels], pyramid[:levels], strict=True)]
