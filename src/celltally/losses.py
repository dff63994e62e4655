"""Training losses: aleatoric Gaussian negative log-likelihood and total variation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F


def gaussian_nll(
    prediction: torch.Tensor,
    target: torch.Tensor,
    log_var: torch.Tensor,
    *,
    beta: float = 0.0,
) -> torch.Tensor:
    """Mean aleatoric loss ``0.5 * exp(-s) * (y - y_hat)**2 + 0.5 * s`` with ``s = log sigma**2``.

    This is Kendall & Gal's (2017) heteroscedastic loss, the Gaussian negative
    log-likelihood up to a constant. The paper's eq. (1) writes
    ``|y - y_hat| / (2 sigma) + log sigma**2``, which is not a likelihood (its
    minimiser is not sigma = |error|); we use the form it cites.

    ``beta`` > 0 gives beta-NLL (Seitzer et al., 2022): each term is weighted
    by ``sigma**(2 beta)`` (not differentiated), so the mean is not starved of
    gradient on the hard, high-variance examples; ``beta=0`` is the plain NLL.
    """
    loss = 0.5 * torch.exp(-log_var) * (target - prediction) ** 2 + 0.5 * log_var
    if beta:
        loss = loss * torch.exp(beta * log_var).detach()
    return loss.mean()


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels.

    A side of one pixel has no neighbours along it: that term is 0 (the mean of
    no differences was NaN, at the coarsest pyramid level of inputs under 32 px).
    """
    terms = [
        (image[..., 1:, :] - image[..., :-1, :]).abs(),
        (image[..., :, 1:] - image[..., :, :-1]).abs(),
    ]
    zero = image.new_zeros(())
    return sum((d.mean() if d.numel() else zero for d in terms), zero)


def segmentation_loss(
    outputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    target: torch.Tensor,
    *,
    tv_weight: float = 1e-3,
) -> torch.Tensor:
    """Sum over pyramid levels of aleatoric NLL + ``tv_weight`` * TV of the mask.

    ``target`` (N, 1, H, W) is area-averaged down to each level's size, so
    coarse levels learn the fraction of foreground in each of their pixels.
    """
    total = target.new_zeros(())
    for mask, log_var in outputs:
        level_target = F.adaptive_avg_pool2d(target, cast("tuple[int, int]", mask.shape[-2:]))
        total = (
            total + gaussian_nll(mask, level_target, log_var) + tv_weight * total_variation(mask)
        )
    return total
