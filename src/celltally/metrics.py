"""Count-accuracy and interval-coverage metrics, overall and per group."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["count_metrics", "format_table", "grouped_metrics", "json_ready"]

DEFAULT_COLUMNS: tuple[str, ...] = (
    "n",
    "mae",
    "rmse",
    "r2",
    "max_abs_error",
    "coverage",
    "mean_half_width",
)


def _as_vector(values: ArrayLike, name: str) -> np.ndarray:
    try:
        arr = np.array(values, dtype=np.float64)  # copy: inputs are never touched
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def count_metrics(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    low: ArrayLike | None = None,
    high: ArrayLike | None = None,
) -> dict[str, float]:
    """Accuracy of predicted counts, and coverage of prediction intervals.

    Parameters
    ----------
    y_true, y_pred : array_like
        True and predicted counts, 1-D, same non-zero length, finite.
    low, high : array_like, optional
        Lower and upper interval bounds per item (give both or neither), same length,
        with ``low <= high``.

    Returns
    -------
    dict of str to float
        ``n``, ``mae``, ``rmse``, ``r2`` (``1 - SS_res / SS_tot``; NaN if all true values
        are equal), ``max_abs_error`` and ``bias`` (mean of ``pred - true``). With
        intervals also ``coverage`` (fraction with ``low <= true <= high``),
        ``mean_interval_width`` (mean ``high - low``) and ``mean_half_width`` (mean
        ``high - pred``: the half-width of a symmetric interval before its ``low`` is
        clipped at 0, as ``CountResult.half_width``).

    Raises
    ------
    ValueError
        For empty, non-1-D, non-finite or length-mismatched inputs, only one of
        ``low``/``high``, or ``low > high``.

    Examples
    --------
    >>> m = count_metrics([1, 2, 3], [1, 3, 5])
    >>> m["mae"], m["max_abs_error"], m["r2"]
    (1.0, 2.0, -1.5)
    """
    true = _as_vector(y_true, "y_true")
    pred = _as_vector(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length ({true.size} vs {pred.size})")
    if true.size == 0:
        raise ValueError("cannot compute metrics of zero items")
    err = pred - true
    abs_err = np.abs(err)
    ss_res = float(np.sum(err**2))
    ss_tot = float(np.sum((true - true.mean()) ** 2))
    out: dict[str, float] = {
        "n": int(true.size),
        "mae": float(abs_err.mean()),
        "rmse": math.sqrt(ss_res / true.size),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
        "max_abs_error": float(abs_err.max()),
        "bias": float(err.mean()),
    }
    if (low is None) != (high is None):
        raise ValueError("give both low and high, or neither")
    if low is not None and high is not None:
        lo = _as_vector(low, "low")
        hi = _as_vector(high, "high")
        if lo.shape != true.shape or hi.shape != true.shape:
            raise ValueError(
                f"low/high lengths ({lo.size}, {hi.size}) differ from y_true ({true.size})"
            )
        if np.any(lo > hi):
            raise ValueError("some intervals have low > high")
        width = hi - lo
        out["coverage"] = float(np.mean((lo <= true) & (true <= hi)))
        out["mean_interval_width"] = float(width.mean())
        out["mean_half_width"] = float(np.mean(hi - pred))
    return out


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _sort_key(values: tuple[Any, ...]) -> tuple[tuple[int, Any], ...]:
    """Order group keys: numbers numerically, then strings, then None/other."""
    key: list[tuple[int, Any]] = []
    for v in values:
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            key.append((0, float(v)))
        elif isinstance(v, str):
            key.append((1, v))
        else:
            key.append((2, str(v)))
    return tuple(key)


def grouped_metrics(
    rows: Sequence[Mapping[str, Any]],
    *,
    by: Sequence[str],
    true_key: str = "true",
    pred_key: str = "count",
    low_key: str = "low",
    high_key: str = "high",
) -> dict[str, dict[str, float]]:
    """:func:`count_metrics` per group of rows, plus ``"all"`` for all rows.

    Parameters
    ----------
    rows : sequence of mapping
        One mapping per image, e.g. ``{"image": ..., "blur": 1, "true": 40, "count": 38.2,
        "low": 33.0, "high": 44.1}``. Rows whose true value is missing, ``None`` or NaN
        are ignored.
    by : sequence of str
        Keys whose value tuple defines a group (a missing key counts as ``None``).
    true_key, pred_key, low_key, high_key : str
        Keys of the true count, predicted count and interval bounds. Coverage metrics
        are reported for a group only when every row of it has both bounds.

    Returns
    -------
    dict of str to dict
        Groups named like ``"blur=1,stain=2"`` (sorted by key values, numbers
        numerically; a key a group lacks is left out of its name), followed by
        ``"all"``; only ``"all"`` when no row has any ``by`` key. Empty if no row
        has a true value.

    Raises
    ------
    ValueError
        If a used row lacks a finite prediction (see :func:`count_metrics`).
    """
    by = list(by)
    used = [row for row in rows if not _is_missing(row.get(true_key))]
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in used:
        groups.setdefault(tuple(row.get(k) for k in by), []).append(row)

    def metrics_of(group: list[Mapping[str, Any]]) -> dict[str, float]:
        missing_pred = [i for i, r in enumerate(group) if _is_missing(r.get(pred_key))]
        if missing_pred:
            raise ValueError(f"{len(missing_pred)} row(s) have no '{pred_key}' value")
        with_bounds = all(
            not _is_missing(r.get(low_key)) and not _is_missing(r.get(high_key)) for r in group
        )
        return count_metrics(
            [r[true_key] for r in group],
            [r[pred_key] for r in group],
            low=[r[low_key] for r in group] if with_bounds else None,
            high=[r[high_key] for r in group] if with_bounds else None,
        )

    result: dict[str, dict[str, float]] = {}
    if not used:
        return result
    # Images with none of the ``by`` keys (e.g. a user's folder, no BBBC names) form
    # no group of their own: "all" says everything.
    unlabelled = len(groups) == 1 and all(v is None for v in next(iter(groups)))
    if by and not unlabelled:
        for key in sorted(groups, key=_sort_key):
            # a key the names do not carry (no blur in 'Plate1_B03_s1_w1') is left out
            name = ",".join(f"{k}={v}" for k, v in zip(by, key, strict=True) if v is not None)
            name = name or ",".join(f"{k}=?" for k in by)
            result[name] = metrics_of(groups[key])
    result["all"] = metrics_of(used)
    return result


def _format_value(column: str, value: Any) -> str:
    if value is None:
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "nan"
    if column == "n" and number.is_integer():
        return str(int(number))
    if abs(number) >= 1000:
        return f"{number:.1f}"
    return f"{number:.3f}"


def format_table(
    metrics: Mapping[str, Mapping[str, float]],
    *,
    columns: Sequence[str] = DEFAULT_COLUMNS,
) -> str:
    """Render grouped metrics as a fixed-width text table.

    Parameters
    ----------
    metrics : mapping of str to mapping
        ``{group name: {metric: value}}``, e.g. the output of :func:`grouped_metrics`.
    columns : sequence of str
        Metrics to show, in order. Metrics absent from a group are shown as ``-``.

    Returns
    -------
    str
        A header line, a rule, and one line per group (no trailing newline). Group names
        are left-aligned, numbers right-aligned (``n`` as an integer, others with 3
        decimals).
    """
    header = ["group", *columns]
    body = [
        [str(group), *(_format_value(c, values.get(c)) for c in columns)]
        for group, values in metrics.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines.extend(line(r) for r in body)
    return "\n".join(lines)


def json_ready(value: Any) -> Any:
    """``value`` with numpy scalars made Python and NaN/inf made None (strict JSON).

    ``json.dumps`` writes NaN as a bare ``NaN``, which is not JSON (R² of a
    group with one image is NaN): JavaScript's ``JSON.parse`` refuses it.
    """
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
