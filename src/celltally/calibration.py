"""Interval calibration: split-conformal quantiles of the normalized error |y - mu| / sigma."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def conformal_scores(
    y_true: Sequence[float], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Normalized nonconformity scores ``|y - mu| / sigma``, sorted ascending."""
    y = np.asarray(y_true, dtype=float)
    mu = np.asarray(mean, dtype=float)
    sigma = np.maximum(np.asarray(std, dtype=float), 1e-6)
    return np.sort(np.abs(y - mu) / sigma)


def conformal_quantile(scores: Sequence[float], level: float) -> float:
    """Split-conformal multiplier: the ceil((n + 1) level) / n empirical quantile.

    With exchangeable calibration and test data, ``mu ± q * sigma`` covers
    the truth with probability >= ``level`` (Lei et al., 2018). Falls back to
    the Gaussian quantile when there are too few scores for the level.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    s = np.sort(np.asarray(scores, dtype=float))
    n = s.size
    rank = math.ceil((n + 1) * level)
    if n == 0 or rank > n:
        return gaussian_quantile(level)
    return float(s[rank - 1])


def gaussian_quantile(level: float) -> float:
    """Two-sided standard normal multiplier (1.96 for 0.95)."""
    return float(stats.norm.ppf(0.5 + level / 2.0))
