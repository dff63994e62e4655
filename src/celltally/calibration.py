"""Interval calibration (split-conformal, temperature scaling) and out-of-distribution flags."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: A one-dimensional run of numbers: a sequence or an array (each is read with ``np.asarray``).
Floats = Sequence[float] | np.ndarray


def conformal_scores(y_true: Floats, mean: Floats, std: Floats) -> np.ndarray:
    """Normalized nonconformity scores ``|y - mu| / sigma``, sorted ascending."""
    y = np.asarray(y_true, dtype=float)
    mu = np.asarray(mean, dtype=float)
    sigma = np.maximum(np.asarray(std, dtype=float), 1e-6)
    return np.sort(np.abs(y - mu) / sigma)


def conformal_rank(n: int, level: float) -> int:
    """``ceil((n + 1) level)``, the rank of the split-conformal quantile of ``n`` scores.

    Rounded to 9 decimals first: a float product such as ``75 * 0.68``
    (51.00000000000001) must not round up one rank too many.
    """
    return math.ceil(round((n + 1) * level, 9))


def conformal_quantile(scores: Floats, level: float) -> float:
    """Split-conformal multiplier: the ceil((n + 1) level) / n empirical quantile.

    With exchangeable calibration and test data, ``mu ± q * sigma`` covers
    the truth with probability >= ``level`` (Lei et al., 2018). Above the
    highest level ``n`` scores can promise, n / (n + 1), the conformal
    interval is unbounded and no finite multiplier carries the guarantee
    (:func:`beyond_calibration` says so in words). This then extrapolates
    with a Gaussian tail: the largest score (the multiplier at n / (n + 1))
    times ``z_level / z_(n/(n+1))``, or the temperature-scaled ``T z_level``
    (``T = sqrt(mean(score^2))``, see :func:`temperature_scale`) if wider; so
    the multiplier keeps growing with the level. Beyond the scores it is never
    below the model's own ``z_level`` either: a handful of small scores (a
    fine-tuning folder with one or two calibration images) must not narrow an
    interval that nothing measured supports (one score of 0.21 made the "95%"
    interval 0.62 sigma wide). Without scores: ``z_level``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    s = np.sort(np.asarray(scores, dtype=float))
    n = s.size
    if n == 0:
        return gaussian_quantile(level)
    rank = conformal_rank(n, level)
    if rank > n:
        z = gaussian_quantile(level)
        tail = float(s[-1]) * z / gaussian_quantile(n / (n + 1))
        temperature = float(np.sqrt(np.mean(s**2)))
        return max(tail, temperature * z, z)
    return float(s[max(rank, 1) - 1])  # rank 0 (a level under 1 / (n + 1)): the smallest


def beyond_calibration(
    calibration: Mapping[str, Any] | None, level: float, method: str | None = None
) -> str | None:
    """A one-line note when ``level`` exceeds what the conformal scores can promise, else None.

    ``n`` calibration scores support levels up to n / (n + 1) (0.95 needs 19);
    above it the interval is an extrapolation (see :func:`conformal_quantile`).
    """
    calibration = calibration or {}
    method = method or calibration.get("default", DEFAULT_METHOD)
    n = len(calibration.get("scores") or ())
    if method != "conformal" or n == 0 or conformal_rank(n, level) <= n:
        return None
    return (
        f"level {level:.12g} is above the {n / (n + 1):.3f} that the model's {n} "
        "calibration images can guarantee: its intervals extrapolate a Gaussian tail "
        f"(calibrate on {math.ceil(level / (1 - level) - 1e-9)} or more images for a "
        f"guaranteed {level:.12g})"
    )


def level_text(level: float) -> str:
    """A level as a percentage keeping its digits: 0.95 -> '95%', 0.9995 -> '99.95%'."""
    return f"{float(level) * 100:.8f}".rstrip("0").rstrip(".") + "%"


#: Highest interval level taken: nearer 1, 0.5 + level / 2 rounds to 1 in floating point.
MAX_LEVEL = 1.0 - 1e-9


def valid_level(level: float) -> bool:
    """Whether ``level`` is an interval level celltally computes: 0 < level <= MAX_LEVEL."""
    try:
        return 0.0 < float(level) <= MAX_LEVEL
    except (TypeError, ValueError):
        return False


def gaussian_quantile(level: float) -> float:
    """Two-sided standard normal multiplier (1.96 for 0.95)."""
    # the standard library's inverse normal CDF: importing scipy.stats for it cost
    # about a second of every `celltally count` start-up
    return statistics.NormalDist().inv_cdf(0.5 + level / 2.0)


# -- compared alternatives and bookkeeping -------------------------------------

METHODS = ("conformal", "temperature", "gaussian")
DEFAULT_METHOD = "conformal"
RELIABILITY_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99)


def _arrays(y_true: Floats, mean: Floats, std: Floats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float).ravel()
    mu = np.asarray(mean, dtype=float).ravel()
    sigma = np.maximum(np.asarray(std, dtype=float).ravel(), 1e-6)
    if not y.size == mu.size == sigma.size:
        raise ValueError(f"y, mu and sigma differ in length: {y.size}, {mu.size}, {sigma.size}")
    if y.size == 0:
        raise ValueError("no calibration examples")
    return y, mu, sigma


def temperature_scale(y_true: Floats, mean: Floats, std: Floats) -> float:
    """The factor ``T`` on sigma that maximizes the Gaussian likelihood of ``y`` on a split.

    The negative log-likelihood ``sum log(T sigma_i) + (y_i - mu_i)^2 / (2 T^2 sigma_i^2)``
    is minimized in closed form by ``T = sqrt(mean(((y - mu) / sigma)^2))``:
    T > 1 means the model's sigma was over-confident, T < 1 under-confident.
    """
    y, mu, sigma = _arrays(y_true, mean, std)
    return float(np.sqrt(np.mean(((y - mu) / sigma) ** 2)))


def gaussian_nll(y_true: Floats, mean: Floats, std: Floats) -> float:
    """Mean Gaussian negative log-likelihood of ``y`` under ``N(mu, sigma^2)`` (with constant)."""
    y, mu, sigma = _arrays(y_true, mean, std)
    return float(np.mean(np.log(sigma) + 0.5 * ((y - mu) / sigma) ** 2 + 0.5 * np.log(2 * np.pi)))


def calibrate(
    y_true: Floats,
    mean: Floats,
    std: Floats,
    *,
    default: str = DEFAULT_METHOD,
) -> dict:
    """Fit every interval calibration on one held-out split; the block stored in a config.

    Parameters
    ----------
    y_true, mean, std : sequences of float
        True counts and the model's predicted mean and standard deviation on
        the calibration split (images the model was not trained on).
    default : {'conformal', 'temperature', 'gaussian'}
        The method :func:`interval_multiplier` uses when none is named.

    Returns
    -------
    dict
        ``default``, ``n``, ``scores`` (sorted ``|y - mu| / sigma``, for
        split-conformal), ``temperature`` (``T`` from :func:`temperature_scale`)
        and the calibration split's mean NLL before and after scaling.
    """
    if default not in METHODS:
        raise ValueError(f"unknown calibration method {default!r}; choose from {METHODS}")
    y, mu, sigma = _arrays(y_true, mean, std)
    scores = conformal_scores(y, mu, sigma)
    temperature = temperature_scale(y, mu, sigma)
    return {
        "method": "split-conformal on |y - mu| / sigma",
        "default": default,
        "n": int(scores.size),
        "scores": [round(float(v), 5) for v in scores],
        "temperature": round(temperature, 5),
        "nll_raw": round(gaussian_nll(y, mu, sigma), 5),
        "nll_temperature": round(gaussian_nll(y, mu, sigma * temperature), 5),
    }


#: Fewest calibration images whose temperature may make intervals narrower than sigma's.
MIN_TEMPERATURE_IMAGES = 20


def interval_multiplier(
    calibration: Mapping[str, Any] | None, level: float, method: str | None = None
) -> float:
    """Half-width of the ``level`` interval in units of sigma, by a stored calibration.

    ``'conformal'``: split-conformal quantile of the stored scores;
    ``'temperature'``: ``T`` times the Gaussian quantile; ``'gaussian'``: the
    raw Gaussian quantile (the model's sigma taken at its word). A method
    whose data are missing from ``calibration`` falls back to ``'gaussian'``.
    A temperature fitted on fewer than :data:`MIN_TEMPERATURE_IMAGES` images
    never narrows the interval (one image gave T = 0.32, and "95%" intervals
    that held 22 of 40 truths).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    calibration = calibration or {}
    method = method or calibration.get("default", DEFAULT_METHOD)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
    if method == "conformal" and calibration.get("scores"):
        return conformal_quantile(calibration["scores"], level)
    if method == "temperature" and calibration.get("temperature"):
        temperature = float(calibration["temperature"])
        n = int(calibration.get("n") or len(calibration.get("scores") or ()))
        if n < MIN_TEMPERATURE_IMAGES:
            temperature = max(temperature, 1.0)
        return temperature * gaussian_quantile(level)
    return gaussian_quantile(level)


def coverage(y_true: Floats, mean: Floats, std: Floats, multiplier: float) -> float:
    """Fraction of ``y`` inside ``mu ± multiplier * sigma``."""
    y, mu, sigma = _arrays(y_true, mean, std)
    return float(np.mean(np.abs(y - mu) <= multiplier * sigma))


def reliability(
    y_true: Floats,
    mean: Floats,
    std: Floats,
    calibration: Mapping[str, Any] | None,
    *,
    levels: Sequence[float] = RELIABILITY_LEVELS,
    methods: Sequence[str] = METHODS,
) -> dict[str, list[float]]:
    """Observed coverage at each nominal level, per method: the reliability diagram's data.

    Returns ``{"level": [...], method: [coverage, ...], ...}``.
    """
    out: dict[str, list[float]] = {"level": [float(v) for v in levels]}
    for method in methods:
        out[method] = [
            coverage(y_true, mean, std, interval_multiplier(calibration, lv, method))
            for lv in levels
        ]
    return out


def coverage_tolerance(level: float, n: int, *, sigmas: float = 4.0) -> float:
    """``sigmas`` binomial standard deviations of an observed coverage over ``n`` trials."""
    return sigmas * math.sqrt(level * (1.0 - level) / max(int(n), 1))


# -- several images of one well ------------------------------------------------


def fit_group_correlation(
    y_true: Floats,
    mean: Floats,
    std: Floats,
    groups: Sequence[Any],
) -> dict[str, Any] | None:
    """Correlation of the normalized errors of images in the same group (e.g. one well).

    The sites of one well share their biology, focus and density, so the
    model's errors on them lean the same way, and the error of a well's total
    is larger than independent errors would make it. The estimate is the
    mean product of the standardized errors ``z = (y - mu) / sigma / rms`` over
    all pairs of images in the same group (the moment estimator of an
    exchangeable correlation), clipped to [0, 1]. Groups named ``None`` are
    left out.

    Returns
    -------
    dict or None
        ``value``, ``groups`` (with two images or more), ``pairs`` and
        ``images``; None when no group holds two images.
    """
    y, mu, sigma = _arrays(y_true, mean, std)
    keys = list(groups)
    if len(keys) != y.size:
        raise ValueError(f"{len(keys)} group labels for {y.size} images")
    r = (y - mu) / sigma
    rms = float(np.sqrt(np.mean(r**2)))
    z = r / max(rms, 1e-12)
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            members.setdefault(key, []).append(i)
    products, pairs, used = 0.0, 0, 0
    for index in members.values():
        if len(index) < 2:
            continue
        zg = z[index]
        products += float(zg.sum() ** 2 - (zg**2).sum())  # sum over ordered pairs i != j
        pairs += len(index) * (len(index) - 1)
        used += 1
    if pairs == 0:
        return None
    return {
        "value": round(min(1.0, max(0.0, products / pairs)), 5),
        "groups": used,
        "pairs": pairs // 2,
        "images": int(sum(len(v) for v in members.values() if len(v) > 1)),
        "method": "mean product of standardized errors over pairs of images of one well",
    }


def total_std(std: Floats, correlation: float) -> float:
    """Standard deviation of a sum of counts whose errors correlate by ``correlation``.

    ``sqrt(sum_i s_i^2 + correlation * sum_{i != j} s_i s_j)``: independent
    errors at 0, a shared error at 1 (then the stds add up).
    """
    s = np.asarray(std, dtype=float)
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be between 0 and 1, got {correlation}")
    square = float((s**2).sum())
    return math.sqrt(square + correlation * (float(s.sum()) ** 2 - square))


#: Error correlation of the frames an image counted in tiles spans: about the shipped
#: ``bbbc005`` model's measured within-well correlation (0.099), and the value per-well
#: totals assume without one. A constant, not each model's fitted value: ``calibrate``
#: fits the intervals on sigmas counted before it fits its within-well correlation, so
#: counting must widen large images as calibration did.
FRAME_CORRELATION = 0.1


def parts_variance_factor(parts: float, correlation: float) -> float:
    """How much the variance of a sum of ``parts`` equal-std counts exceeds the variance
    of independent ones: ``1 + correlation * (parts - 1)`` (:func:`total_std` squared over
    the independent sum). 1 for one part or less: a frame's own sigma is calibrated as it is.

    An image counted in tiles sums frames' worth of density cells whose variances
    add as if independent, while the model's errors on neighbouring frames share
    their density, blur and stain, as the sites of a well do: on 6 x 8 mosaics of
    BBBC005 frames the independent sum's 95% intervals missed (user audit,
    2026-11-27; ``benchmarks/mosaics.py``).
    """
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be between 0 and 1, got {correlation}")
    return 1.0 + correlation * max(0.0, float(parts) - 1.0)


# -- out-of-distribution flags ------------------------------------------------

#: The per-image features whose calibration range decides the warning.
#: Measured on BBBC005 (a model calibrated on site 8, warnings on held-out
#: sites 9-10 and on strange inputs): the deep-feature distance flags 1% of the
#: held-out images and every noise, checkerboard, gradient and blank frame;
#: the mask std 2%. Two other candidates were measured and left out of the
#: warning: the count's own sigma / sqrt(count + 1) (4% of ordinary held-out
#: images, all near-empty frames) and a 3-member ensemble's spread (6%, and it
#: did not rise on noise); the spread is still reported in ``CountResult.ood``.
OOD_FEATURES = {
    "mask_std": "mean per-pixel mask uncertainty",
    "feature_distance": "distance of the image's deep features from the calibration images'",
}

#: Used when a model's config has no thresholds fitted on its calibration data:
#: deliberately loose, so only the clearly strange is flagged (a mean mask std
#: of 0.25 is far above the 0.19 that a BBBC005 model's strongest-blur images
#: reach). The other features depend too much on the model to have a
#: model-free limit.
FALLBACK_OOD_THRESHOLDS = {"mask_std": 0.25}
#: Below this ``contrast`` feature the normalization's empty-frame guard set the
#: scale (the frame's range is under 20 noise stds): such a frame is reported as
#: possibly empty. Of the real images, only BBBC039's one image of 0 nuclei comes
#: below 1 (0.43); no BBBC005 image does.
LOW_CONTRAST = 0.99
#: The words that end a low-contrast warning (the CLI counts the rows with them).
EMPTY_HINT = "the frame may hold no cells"
#: The words that open the warning of an image whose features are unlike the calibration's.
UNLIKE_HINT = "unlike the calibration images"
#: The words before the suggested ``--rescale`` factor (the whole factor, not one on top
#: of the factor counted at) in a warning that names the objects' size
#: (:func:`ood_warning`, :func:`suggested_rescale`).
SIZE_HINT = "another magnification? rescale by about"
#: Above this :func:`celltally.transforms.background_level` (the normalized image's median),
#: most of the frame is bright: dark objects on a bright background, not fluorescence.
BRIGHT_BACKGROUND = 0.75


def flagged_summary(warnings: Sequence[str]) -> dict[str, int]:
    """How many of the images' warnings flag them: ``unlike`` the model's calibration
    images, ``low_contrast`` (they may hold no cells), and ``images`` with either (a
    low-contrast frame alone is not "unlike")."""
    return {
        "images": sum(1 for w in warnings if UNLIKE_HINT in w or EMPTY_HINT in w),
        "unlike": sum(1 for w in warnings if UNLIKE_HINT in w),
        "low_contrast": sum(1 for w in warnings if EMPTY_HINT in w),
    }


def flagged_sentences(warnings: Sequence[str], *, of: str, see: str = "") -> tuple[str, str]:
    """What ``count``, ``evaluate`` and the report say of the flagged images: the sentence on
    those unlike the calibration images and the one on those that may hold no cells ('' for
    none). ``of``: "M images ..." after "N of"; ``see``: where the warnings are, said in
    brackets."""
    flagged = flagged_summary(warnings)
    unlike = (
        f"{flagged['unlike']} of {of} flagged as unlike the model's calibration images"
        + (f" ({see})" if see else "")
        + ": their intervals may not mean what they say"
        if flagged["unlike"]
        else ""
    )
    empty = (
        f"{flagged['low_contrast']} of {of} with so little contrast that they may hold no "
        f"cells (empty wells?{' ' + see if see else ''}): check them before trusting their "
        "counts"
        if flagged["low_contrast"]
        else ""
    )
    return unlike, empty


BRIGHT_HINT = (
    "most of the frame is bright: dark objects on a bright background (brightfield, or an "
    "inverted image)? celltally counts bright objects on a dark one: invert it first"
)


def ood_features(
    count: float,
    mask_std: np.ndarray,
    spread: float | None = None,
    feature_distance: float | None = None,
    contrast: float | None = None,
    size_ratio: float | None = None,
    background: float | None = None,
) -> dict[str, float]:
    """The out-of-distribution features of one image: ``OOD_FEATURES``, plus ``spread``
    (ensemble std of the members' counts / sqrt(count + 1)) when ``spread`` is given,
    ``contrast`` (:func:`celltally.transforms.contrast`) and ``background``
    (:func:`celltally.transforms.background_level`) when given, and with
    ``size_ratio`` (:func:`size_ratio`) it and ``size_shift``, the ratio or its
    inverse, whichever is above 1."""
    features = {"mask_std": float(np.mean(mask_std))}
    if spread is not None:
        features["spread"] = float(spread) / math.sqrt(max(float(count), 0.0) + 1.0)
    if feature_distance is not None:
        features["feature_distance"] = float(feature_distance)
    if contrast is not None:
        features["contrast"] = float(contrast)
    if background is not None:
        features["background"] = float(background)
    if size_ratio is not None:
        features["size_ratio"] = float(size_ratio)
        features["size_shift"] = max(float(size_ratio), 1.0 / float(size_ratio))
    return features


def feature_reference(
    embeddings: np.ndarray,
    *,
    classes: Sequence[Any] | None = None,
    shrinkage: float = 0.5,
) -> dict[str, np.ndarray]:
    """Mean and shrunk inverse covariance of the calibration images' deep features.

    ``embeddings`` is (n_images, d), e.g. :meth:`CellCounter.embed`. The
    covariance is shrunk towards ``trace / d`` times the identity by
    ``shrinkage`` so that it is invertible and stable with few images.

    With ``classes`` (one label per image, e.g. the stain), one Gaussian is
    fitted per class, as Lee et al. (2018) fit one per class: an image is then
    as far as its nearest class (:func:`feature_distance`). Each class needs 2
    or more images.

    Returns
    -------
    dict
        ``mean`` (k, d) and ``precision`` (k, d, d), one row per class (k = 1
        without ``classes``).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 embeddings as an (n, d) array, got shape {x.shape}")
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
    labels = np.zeros(len(x), int) if classes is None else np.asarray([str(c) for c in classes])
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} classes for {len(x)} embeddings")
    means, precisions = [], []
    for label in sorted(set(labels.tolist())):
        rows = x[labels == label]
        if len(rows) < 2:
            raise ValueError(f"class {label!r} has {len(rows)} embedding; each class needs 2")
        cov = np.cov(rows, rowvar=False).reshape(x.shape[1], x.shape[1])
        target = max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
        means.append(rows.mean(0))
        precisions.append(np.linalg.inv((1.0 - shrinkage) * cov + shrinkage * target))
    return {"mean": np.stack(means), "precision": np.stack(precisions)}


def feature_distance(embeddings: np.ndarray, reference: Mapping[str, np.ndarray]) -> np.ndarray:
    """Mahalanobis distance of each row of ``embeddings`` (n, d) from ``reference``.

    Lee et al. (2018): distance in a network's feature space detects inputs
    unlike the training data far better than the network's own confidence.
    A reference of several classes (:func:`feature_reference`) gives each row
    its distance from the nearest; a reference saved before classes existed
    (a (d,) mean) is one class.
    """
    x = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    d = x.shape[1]
    means = np.asarray(reference["mean"], dtype=np.float64).reshape(-1, d)
    precisions = np.asarray(reference["precision"], dtype=np.float64).reshape(-1, d, d)
    squared = [
        np.einsum("ij,jk,ik->i", x - mean, precision, x - mean)
        for mean, precision in zip(means, precisions, strict=True)
    ]
    return np.sqrt(np.maximum(np.min(squared, axis=0), 0.0))


def feature_classes(labels: Sequence[Any], *, min_images: int) -> list[str] | None:
    """``labels`` (one per calibration image, e.g. its stain) as feature classes, or None.

    Classes only where every image has a label, there are 2 or more, and each
    has ``min_images`` or more images; otherwise one Gaussian fits all.
    """
    if not labels or any(label is None for label in labels):
        return None
    names = [str(label) for label in labels]
    sizes = [names.count(name) for name in set(names)]
    return names if len(sizes) >= 2 and min(sizes) >= min_images else None


def _fold_index(keys: Sequence[Any], folds: int) -> np.ndarray:
    """Fold number of each item: ``min(folds, number of distinct keys)`` folds, whole keys
    at a time (single items when one key holds all items but one or none: holding it
    out would leave fewer than 2 to fit on)."""
    keys = [str(k) for k in keys]
    largest = max((keys.count(k) for k in set(keys)), default=0)
    if len(keys) - largest < 2:  # held out, the largest would leave under 2 to fit on
        keys = [str(i) for i in range(len(keys))]
    order = {key: i for i, key in enumerate(sorted(set(keys)))}
    k = min(folds, len(order))
    if k < 2:
        raise ValueError("need 2 or more images to cross-fit")
    return np.array([order[key] % k for key in keys])


def _groups_and_classes(
    n: int, groups: Sequence[Any] | None, classes: Sequence[Any] | None, *, what: str
) -> tuple[list[Any], np.ndarray | None]:
    """The fold keys of ``n`` items (their ``groups``, else each its own) and their class
    labels as strings (None without ``classes``); ValueError when a length is not ``n``."""
    keys = list(range(n)) if groups is None else list(groups)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} groups for {n} {what}")
    labels = None if classes is None else np.asarray([str(c) for c in classes])
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} classes for {n} {what}")
    return keys, labels


def _fold_rest(labels: np.ndarray | None, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The images a fold's reference is fitted on, and their classes (None: one class).

    Classes that keep 2 or more images in ``rest``; where none does, all of
    ``rest`` as one class.
    """
    if labels is None:
        return rest, None
    kept = [c for c in set(labels[rest].tolist()) if np.sum(labels[rest] == c) >= 2]
    if not kept:
        return rest, None
    rest = rest & np.isin(labels, kept)
    return rest, labels[rest]


def held_out_distances(
    embeddings: np.ndarray,
    *,
    groups: Sequence[Any] | None = None,
    classes: Sequence[Any] | None = None,
    folds: int = 20,
    shrinkage: float = 0.5,
) -> np.ndarray:
    """Each image's feature distance from a reference fitted without it (cross-fitting).

    A threshold set on the distances of the very images the reference was fitted
    on is too low: those distances are biased small (with 20 images of 96
    features, a 99th-percentile threshold flagged 69% of new images like them;
    measured on Gaussian features, 2026-11-27). So the images are split into
    ``min(folds, number of groups)`` folds (one image per fold when there are no
    more), whole ``groups`` at a time (a scene's images err together), and each
    fold is measured against :func:`feature_reference` of the others (of their
    ``classes`` with 2 or more images there, when ``classes`` is given; one
    Gaussian of them where no class has 2). With all
    images in one group (a time-lapse of one field) the folds are single images.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    keys, labels = _groups_and_classes(n, groups, classes, what="embeddings")
    if n < 2:
        raise ValueError("need 2 or more images to cross-fit feature distances")
    fold = _fold_index(keys, folds)
    out = np.empty(n)
    for f in range(int(fold.max()) + 1):
        held = fold == f
        rest, fold_classes = _fold_rest(labels, ~held)
        reference = feature_reference(
            x[rest],
            classes=None if fold_classes is None else fold_classes.tolist(),
            shrinkage=shrinkage,
        )
        out[held] = feature_distance(x[held], reference)
    return out


#: Least foreground (summed mask probability, mask px) on which :func:`object_size` is measured.
MIN_SIZE_AREA = 30.0
#: A warning names the object size as a likely cause only beyond this factor (either way)
#: or the calibration images' held-out 99th percentile, whichever is larger: on BBBC005
#: calibration sites 1-2 true-scale central-half crops were up to 1.25x off their
#: frames (fewer, cut objects), frames at another magnification 1.4x and more.
MIN_SIZE_SHIFT = 1.25


def object_size(mask: np.ndarray, *, min_area: float = MIN_SIZE_AREA) -> tuple[float, float] | None:
    """The mask's foreground fraction and log mean object width; None with too little foreground.

    Width is 2 x area / boundary length (a disc's radius) in mask px, the
    boundary counted as the pixel edges between foreground and background
    (probability above 0.5) inside the image, so the image's own border adds
    none (a crop is measured like its frame). Cells that overlap merge into
    wider blobs, so the width grows with the foreground fraction;
    :func:`size_reference` models that. An image at another magnification
    shows its objects proportionally wider or narrower at the same fraction.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {m.shape}")
    area = float(m.sum(dtype=np.float64))  # no float64 copy of a whole-well mask
    fg = m > 0.5
    edges = np.count_nonzero(fg[1:] != fg[:-1]) + np.count_nonzero(fg[:, 1:] != fg[:, :-1])
    if not area >= min_area or edges == 0:  # `not >=`: NaN too
        return None
    return area / m.size, math.log(2.0 * np.count_nonzero(fg) / edges)


def size_reference(
    fractions: Floats, log_sizes: Floats, *, classes: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Per class, log object width as a quadratic in foreground fraction (:func:`object_size`).

    Returns a JSON-ready dict: ``classes`` (labels, or None for one class),
    ``coef`` (one ``np.polyfit`` row per class, highest power first) and
    ``fraction`` (each class's fitted range, outside which the curve is held
    flat). Each class needs 2 or more images (a line with 2, a quadratic with 3+).
    """
    x, y = np.asarray(fractions, dtype=float), np.asarray(log_sizes, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"{x.size} fractions for {y.size} sizes")
    labels = np.zeros(len(x), int) if classes is None else np.asarray([str(c) for c in classes])
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} classes for {len(x)} sizes")
    names = sorted(set(labels.tolist()))
    coef, ranges = [], []
    for label in names:
        xs, ys = x[labels == label], y[labels == label]
        if len(xs) < 2:
            raise ValueError(f"class {label!r} has {len(xs)} sized image; each class needs 2")
        degree = 2 if len(xs) >= 3 and np.ptp(xs) > 0 else 0 if np.ptp(xs) == 0 else 1
        fit = np.polyfit(xs, ys, degree)
        coef.append([round(float(c), 6) for c in np.pad(fit, (3 - len(fit), 0))])
        ranges.append([round(float(xs.min()), 6), round(float(xs.max()), 6)])
    return {"classes": None if classes is None else names, "coef": coef, "fraction": ranges}


def size_shifts(fraction: float, log_size: float, reference: Mapping[str, Any]) -> list[float]:
    """An image's log object width minus each class's curve at its fraction (held flat
    outside the fitted range), in the order of ``reference["classes"]``."""
    return [
        log_size - float(np.polyval(c, np.clip(fraction, lo, hi)))
        for c, (lo, hi) in zip(reference["coef"], reference["fraction"], strict=True)
    ]


def size_ratio(
    fraction: float,
    log_size: float,
    reference: Mapping[str, Any],
    *,
    label: Any = None,
) -> float | None:
    """An image's object width over the expected width at its foreground fraction.

    Above 1: objects wider than in the calibration images (an enlarged image);
    below 1: narrower. With ``label`` (the image's class, e.g. the stain its
    file name gives) among the reference's classes, against that class's
    curve. Otherwise against the nearest curve, but only when the image is
    wider than every class's curve or narrower than every one; between two
    (a w1 frame of nuclei enlarged to the w2 cell bodies' width, or a w2
    frame shrunk to the nuclei's) it could be either, and the answer is None.
    """
    classes = reference.get("classes")
    shifts = size_shifts(fraction, log_size, reference)
    if classes and label is not None and str(label) in classes:
        return math.exp(shifts[classes.index(str(label))])
    if min(shifts) < 0 < max(shifts):
        return None
    return math.exp(min(shifts, key=abs))


def held_out_size_ratios(
    fractions: Floats,
    log_sizes: Floats,
    *,
    groups: Sequence[Any] | None = None,
    classes: Sequence[Any] | None = None,
    folds: int = 20,
) -> np.ndarray:
    """Each image's :func:`size_ratio` against curves fitted without its fold (by ``groups``).

    As :func:`held_out_distances` does for the deep features: in-sample ratios
    would set the threshold too low. Each image is measured against its own
    class's curve; in a fold where its class keeps fewer than 2 images, as
    :func:`size_ratio` measures an image of no known class (all images as one
    class where no class keeps 2). NaN where that gives no ratio.
    """
    x, y = np.asarray(fractions, dtype=float), np.asarray(log_sizes, dtype=float)
    n = len(x)
    if len(y) != n:
        raise ValueError(f"{len(y)} sizes for {n} fractions")
    keys, labels = _groups_and_classes(n, groups, classes, what="sizes")
    if n < 3:
        raise ValueError("need 3 or more sized images to cross-fit size ratios")
    fold = _fold_index(keys, folds)
    own = [None] * n if labels is None else labels.tolist()
    out = np.empty(n)
    for f in range(int(fold.max()) + 1):
        held = fold == f
        rest, fold_classes = _fold_rest(labels, fold != f)  # 2 or more: _fold_index
        reference = size_reference(
            x[rest], y[rest], classes=None if fold_classes is None else fold_classes.tolist()
        )
        for i in np.flatnonzero(held):
            ratio = size_ratio(x[i], y[i], reference, label=own[i])
            out[i] = np.nan if ratio is None else ratio
    return out


def ood_thresholds(
    features: Sequence[Mapping[str, float]], *, quantile: float = 0.99
) -> dict[str, Any]:
    """The ``quantile`` of each feature over the calibration images: above it is unusual.

    ``features`` is one dict per calibration image (from :func:`ood_features`).
    """
    if not features:
        raise ValueError("no calibration images to set out-of-distribution thresholds on")
    names = [k for k in OOD_FEATURES if all(k in f for f in features)]
    out: dict[str, Any] = {"quantile": quantile, "n": len(features)}
    for name in names:
        values = np.asarray([f[name] for f in features], dtype=float)
        out[name] = round(float(np.quantile(values, quantile)), 6)
    return out


def suggested_rescale(warning: str) -> float | None:
    """The ``--rescale`` factor a warning suggests (:data:`SIZE_HINT`), or None."""
    _, found, rest = (warning or "").partition(SIZE_HINT + " ")
    words = rest.split()
    if not found or not words:
        return None
    try:
        factor = float(words[0].rstrip(";,)"))
    except ValueError:
        return None
    return factor if math.isfinite(factor) and factor > 0 else None


def ood_warning(
    features: Mapping[str, float],
    thresholds: Mapping[str, Any] | None,
    *,
    rescale: float | None = 1.0,
) -> str:
    """A one-line warning naming each feature above its threshold; ``''`` when none is.

    Without fitted ``thresholds`` the loose ``FALLBACK_OOD_THRESHOLDS`` apply.
    A warning of an image whose objects look wider or narrower than the
    calibration images' (``size_shift`` beyond its limit) ends with that and
    the factor to count at, ``rescale / size_ratio``: ``rescale`` is the
    factor the image was counted at (None: a counter that cannot rescale;
    then the size is named without a factor).
    """
    fitted = bool(thresholds)
    limits: Mapping[str, Any] = thresholds if thresholds else FALLBACK_OOD_THRESHOLDS
    where = (
        f"calibration {100 * float(limits.get('quantile', 0.99)):g}th pct" if fitted else "default"
    )
    parts = [
        f"{OOD_FEATURES[name]} {value:.3g} > {float(limits[name]):.3g}"
        for name, value in features.items()
        if name in OOD_FEATURES and limits.get(name) is not None and value > float(limits[name])
    ]
    text = f"{UNLIKE_HINT} ({'; '.join(parts)}; {where} limit)" if parts else ""
    ratio = features.get("size_ratio")
    beyond = limits.get("size_shift")
    bright = features.get("background", 0.0) > BRIGHT_BACKGROUND
    if text and bright:  # the likelier cause: its objects' size would send one astray
        text += f"; {BRIGHT_HINT}"
    elif text and ratio and beyond is not None and features.get("size_shift", 0.0) > float(beyond):
        # the size names a likely cause of a warning; alone it raises none (not adopted:
        # on BBBC005 calibration sites it added false alarms on true-scale crops,
        # docs/uncertainty.md)
        from celltally.scale import MAX_RESCALE

        text += f"; its objects look {ratio:.2g}x as wide as the calibration images'"
        factor = None if rescale is None else rescale / ratio
        if factor is not None and 1.0 / MAX_RESCALE <= factor <= MAX_RESCALE:
            now = f" (counted at {rescale:.3g})" if rescale != 1.0 else ""
            text += f": {SIZE_HINT} {factor:.2g}{now}"
    contrast = features.get("contrast")
    if contrast is not None and contrast < LOW_CONTRAST:
        empty = f"low contrast (range {contrast:.2f} of the empty-frame floor): {EMPTY_HINT}"
        text = f"{empty}; {text}" if text else empty
    return text
