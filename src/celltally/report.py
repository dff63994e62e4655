"""The evaluation report: an HTML page with plots and a gallery of the failures.

``celltally evaluate DATA --report DIR`` writes ``DIR/index.html`` beside PNG
plots (matplotlib, Agg backend; plain HTML, no JavaScript):

- predicted vs true count with the interval of every image;
- error (and coverage) by blur, stain and true count;
- the reliability diagram: observed coverage vs nominal level, for each
  interval calibration the model stores (split-conformal, temperature, raw);
- the failures (truth outside the interval), each with its Figure 4
  explanation panel, grouped by the causes the paper names as far as they can
  be measured on the image (see :func:`image_measures`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from celltally import io
from celltally.calibration import (
    RELIABILITY_LEVELS,
    flagged_sentences,
    flagged_summary,
    level_text,
    reliability,
)
from celltally.wells import REPEATED_SITES_CAUSE

if TYPE_CHECKING:  # pragma: no cover
    from celltally.counter import CellCounter

__all__ = [
    "CAUSES",
    "REPORT_FIGURES",
    "assign_causes",
    "check_report_folder",
    "image_measures",
    "plot_errors_by_group",
    "plot_pred_vs_true",
    "plot_reliability",
    "report_outputs",
    "write_report",
]

#: Failure causes the paper names, with the measure used and its direction:
#: (row key, True when a larger value is worse, description).
CAUSES: dict[str, tuple[str, bool, str]] = {
    "overlap": (
        "cells_per_object",
        True,
        "cell overlap: many predicted cells per connected object of the thresholded image",
    ),
    "focus": (
        "sharpness",
        False,
        "bad focus: low edge sharpness (steepest gradients / intensity range)",
    ),
    "shape": (
        "solidity",
        False,
        "irregular shapes: low solidity (area / convex hull area) of the objects",
    ),
}
NO_CAUSE = "none measured"
#: A failure is put under a cause when its measure is worse than this fraction
#: of all the evaluated images.
CAUSE_RANK = 0.8
_MIN_OBJECT_AREA = 10


def image_measures(image: np.ndarray, count: float) -> dict[str, float]:
    """Focus, overlap and shape measures of one raw 2-D image and its predicted count.

    Parameters
    ----------
    image : np.ndarray
        The raw image (any dtype); not modified.
    count : float
        The predicted count.

    Returns
    -------
    dict
        ``sharpness``: the 99.5th percentile of the Sobel gradient magnitude
        divided by the 5-99.5 percentile intensity range (scale-free; low when
        blurred: on BBBC005 it orders F1 > F23 > F48 within each stain, where the
        variance of the Laplacian only separates F1 from the rest); NaN for a frame
        without contrast, whose focus cannot be measured.
        ``objects``: connected components (>= 10 px) of the Otsu foreground.
        ``cells_per_object``: ``count / max(objects, 1)`` (high when cells
        touch or overlap). ``solidity``: area-weighted mean of the objects'
        area / convex-hull area (low for irregular shapes and for clumps); 1
        when there is no object.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    array = np.asarray(image, dtype=np.float64)
    variance = float(array.var())
    low, high = np.percentile(array, [5, 99.5])
    gradient = np.abs(ndimage.sobel(array, 0)) + np.abs(ndimage.sobel(array, 1))
    span = float(high - low)
    # a frame without contrast (empty) has no focus to measure: NaN, never "bad focus"
    sharpness = float(np.percentile(gradient, 99.5)) / span if span > 0 else math.nan
    objects, solidity = 0, 1.0
    if variance > 0:
        foreground = array > threshold_otsu(array)
        regions = [
            r for r in regionprops(label(foreground, connectivity=2)) if r.area >= _MIN_OBJECT_AREA
        ]
        objects = len(regions)
        if regions:
            areas = np.array([r.area for r in regions], dtype=float)
            solidity = float(np.average([r.solidity for r in regions], weights=areas))
    return {
        "sharpness": round(sharpness, 6),
        "objects": objects,
        "cells_per_object": round(float(count) / max(objects, 1), 4),
        "solidity": round(solidity, 4),
    }


def _rank(values: np.ndarray, value: float, larger_is_worse: bool) -> float:
    """Fraction of ``values`` that are strictly better than ``value``."""
    better = values < value if larger_is_worse else values > value
    return float(np.mean(better))


def assign_causes(
    rows: Sequence[Mapping[str, Any]], failures: Sequence[Mapping[str, Any]]
) -> dict[str, list[tuple[Mapping[str, Any], dict[str, float]]]]:
    """Group failures by their most extreme measured cause.

    Each failure's measures are ranked against all ``rows`` (fraction of images
    with a better value); the failure goes under the cause of highest rank if
    that rank is at least ``CAUSE_RANK``, else under ``NO_CAUSE``.

    Returns
    -------
    dict
        cause -> list of (failure row, {cause: rank}), causes in ``CAUSES`` order.
    """
    columns = {  # measured values only (NaN: no measure, e.g. the focus of an empty frame)
        cause: np.array([v for r in rows if key in r if math.isfinite(v := float(r[key]))])
        for cause, (key, _, _) in CAUSES.items()
    }
    groups: dict[str, list] = {cause: [] for cause in [*CAUSES, NO_CAUSE]}
    for row in failures:
        ranks = {
            cause: _rank(columns[cause], float(row[key]), worse)
            for cause, (key, worse, _) in CAUSES.items()
            if key in row and columns[cause].size and math.isfinite(float(row[key]))
        }
        best = max(ranks, key=ranks.__getitem__) if ranks else None
        cause = best if best is not None and ranks[best] >= CAUSE_RANK else NO_CAUSE
        groups[cause].append((row, ranks))
    return {k: v for k, v in groups.items() if v}


# -- plots ---------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _sharpness_text(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "none (no contrast)"


def _outside(row: Mapping[str, Any]) -> bool:
    return not float(row["low"]) <= float(row["true"]) <= float(row["high"])


def plot_pred_vs_true(rows: Sequence[Mapping[str, Any]], path: str | Path, *, level: float) -> Path:
    """Predicted vs true count, with each image's interval as an error bar; images the
    model was made with (a row's ``seen``) ringed by an open circle."""
    fig = _figure(6.0, 5.5)
    ax = fig.subplots()
    true = np.array([float(r["true"]) for r in rows])
    pred = np.array([float(r["count"]) for r in rows])
    low = np.array([float(r["low"]) for r in rows])
    high = np.array([float(r["high"]) for r in rows])
    miss = np.array([_outside(r) for r in rows], dtype=bool)
    # A small deterministic jitter separates the images that share a true count.
    jitter = (np.arange(len(rows)) % 7 - 3) * 0.12 * max(1.0, np.ptp(true) / 100)
    for sel, colour, name in ((~miss, "tab:blue", "inside"), (miss, "tab:red", "outside")):
        if sel.any():
            ax.errorbar(
                true[sel] + jitter[sel],
                pred[sel],
                yerr=[pred[sel] - low[sel], high[sel] - pred[sel]],
                fmt="o",
                ms=2.5,
                lw=0.6,
                color=colour,
                alpha=0.7,
                label=f"truth {name} the interval ({int(sel.sum())})",
            )
    seen = np.array([bool(r.get("seen")) for r in rows], dtype=bool)
    if seen.any():
        ax.plot(
            true[seen] + jitter[seen],
            pred[seen],
            "o",
            mfc="none",
            mec="black",
            ms=7,
            mew=0.8,
            label=f"trained or calibrated on ({int(seen.sum())})",
        )
    top = float(max(true.max(), high.max()) * 1.05 + 1)
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="predicted = true")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("true count (cells)")
    ax.set_ylabel(f"predicted count (cells; {level_text(level)} interval)")
    ax.legend(loc="upper left", fontsize=8)
    return io.save_figure(fig, path)  # marked: a later report may write over it


def _count_bins(true: np.ndarray, bins: int = 6) -> list[tuple[float, float]]:
    edges = np.unique(np.quantile(true, np.linspace(0, 1, bins + 1)))
    if edges.size < 2:
        return [(float(true.min()), float(true.max()))]
    return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _group_stats(rows: Sequence[Mapping[str, Any]], key: Callable[[Mapping], Any]) -> list[tuple]:
    groups: dict[Any, list] = {}
    for r in rows:
        k = key(r)
        if k is not None:
            groups.setdefault(k, []).append(r)
    out = []
    for k in sorted(groups, key=lambda v: (isinstance(v, str), v)):
        g = groups[k]
        err = np.array([abs(float(r["count"]) - float(r["true"])) for r in g])
        cover = float(np.mean([not _outside(r) for r in g]))
        out.append((k, float(err.mean()), cover, len(g)))
    return out


def plot_errors_by_group(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Mean |error| (bars) and interval coverage (labels) by blur, stain and true-count bin."""
    true = np.array([float(r["true"]) for r in rows])
    bins = _count_bins(true)

    # bins (a, b] after the first [a, b]: labelled so that no two share an edge
    labels = [f"{a:.3g}-{b:.3g}" if i == 0 else f">{a:.3g}-{b:.3g}" for i, (a, b) in
              enumerate(bins)]  # fmt: skip

    def count_bin(r: Mapping[str, Any]) -> str:
        t = float(r["true"])
        for i, (_, b) in enumerate(bins):
            if t <= b or i == len(bins) - 1:
                return labels[i]
        return ""  # pragma: no cover

    order = {label: i for i, label in enumerate(labels)}
    panels = [
        ("blur", _group_stats(rows, lambda r: r.get("blur"))),
        ("stain", _group_stats(rows, lambda r: r.get("stain"))),
        ("true count", sorted(_group_stats(rows, count_bin), key=lambda s: order[s[0]])),
    ]
    fig = _figure(12.0, 3.8)
    for ax, (name, stats) in zip(fig.subplots(1, 3), panels, strict=True):
        if not stats:
            ax.text(0.5, 0.5, f"no {name} in the file names", ha="center", va="center")
            ax.set_axis_off()
            continue
        labels = [str(s[0]) for s in stats]
        bars = ax.bar(labels, [s[1] for s in stats], color="tab:blue")
        for bar, (_, _, cover, n) in zip(bars, stats, strict=True):
            ax.annotate(
                f"{cover:.0%}\nn={n}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xlabel(name)
        ax.set_ylabel("mean |error| (cells)")
        ax.margins(y=0.25)
        ax.tick_params(axis="x", labelsize=7, rotation=30 if name == "true count" else 0)
    fig.suptitle("error by group (labels: coverage of the interval, images)", fontsize=10)
    return io.save_figure(fig, path)  # marked: a later report may write over it


def plot_reliability(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "reliability of the intervals",
    n: int | None = None,
) -> Path:
    """Observed vs nominal coverage, one line per method (``curves`` from ``reliability``).

    With ``n`` (images), a band of ±2 binomial standard deviations around the
    diagonal shows the scatter expected of a perfectly calibrated interval.
    """
    levels = np.asarray(curves["level"], dtype=float)
    fig = _figure(5.0, 5.0)
    ax = fig.subplots()
    if n:
        band = 2 * np.sqrt(levels * (1 - levels) / n)
        ax.fill_between(
            levels,
            levels - band,
            levels + band,
            color="0.85",
            label=f"±2 sd, if the {n} images were independent",
        )
    ax.plot([0.45, 1.0], [0.45, 1.0], "k--", lw=0.8, label="ideal")
    styles = {"conformal": "o-", "temperature": "s-", "gaussian": "^-"}
    for method, values in curves.items():
        if method != "level":
            ax.plot(levels, values, styles.get(method, "x-"), ms=4, label=method)
    ax.set_xlim(0.45, 1.0)
    lowest = float(np.min([v for k, v in curves.items() if k != "level"]))
    ax.set_ylim(min(0.45, lowest - 0.03), 1.01)  # room for the markers at both ends
    ax.set_xlabel("nominal level")
    ax.set_ylabel("observed coverage")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return io.save_figure(fig, path)  # marked: a later report may write over it


# -- the folder ----------------------------------------------------------------

#: The figures :func:`write_report` writes beside ``index.html`` (``plate_error.png`` only
#: when the wells sit on a plate grid); the explanation panels go into ``failures/``.
REPORT_FIGURES = ("pred_vs_true.png", "error_by_group.png", "reliability.png", "plate_error.png")
#: How every report page begins its title: how a page celltally wrote is told from another.
_PAGE_TITLE = "<title>celltally evaluation:"


def report_outputs(out_dir: str | Path) -> list[Path]:
    """The folder, page, figures and ``failures/`` that :func:`write_report` writes.

    ``evaluate`` never takes them for images of the data folder
    (:func:`celltally.evaluation.evaluate_folder`'s ``exclude``).
    """
    out = Path(out_dir)
    return [out, out / "index.html", *(out / name for name in REPORT_FIGURES), out / "failures"]


def _own_page(path: Path) -> bool:
    """Whether ``path`` is a report page celltally wrote (its title)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return _PAGE_TITLE in head


def _own_report_figure(path: Path, *, within: str = "") -> bool:
    """Whether ``path`` is a figure celltally wrote: its mark, or (a report written before
    the report marked its figures) the celltally page shows it: the page beside it, or for
    a panel (``within="failures/"``) the page in the folder above."""
    if io.is_own_figure(path):
        return True
    page = (path.parent.parent if within else path.parent) / "index.html"
    if not page.is_file() or not _own_page(page):
        return False
    shown = f"<img src='{within}{path.name}'"
    return shown in page.read_text(encoding="utf-8", errors="replace")


def check_report_folder(out_dir: str | Path) -> list[Path]:
    """Refuse a report folder where :func:`write_report` would write over what is not its own.

    Parameters
    ----------
    out_dir : path
        The report folder (need not exist).

    Returns
    -------
    list of Path
        The report figures (:data:`REPORT_FIGURES`) already there, all celltally's:
        written over, or removed when a run does not write them again.

    Raises
    ------
    celltally.io.InputError
        One line naming the file: ``out_dir`` is a file, ``index.html`` is a folder or
        a page celltally did not write, ``failures`` is a file, or a figure's name is
        taken by a folder or by an image celltally did not write.
    """
    out = Path(out_dir)
    if not out.exists():
        return []
    if not out.is_dir():
        raise io.InputError(f"{out}: is a file; give a folder for the report", str(out))
    again = "give another report folder, or move it first"
    page = out / "index.html"
    if page.is_dir():
        raise io.InputError(f"{page}: is a folder, where the report writes its page; {again}")
    if page.exists() and not _own_page(page):
        raise io.InputError(f"{page}: exists and is not a report celltally wrote; {again}")
    panels = out / "failures"
    if panels.exists() and not panels.is_dir():
        raise io.InputError(
            f"{panels}: is a file, where the report writes its folder of failures' panels; {again}"
        )
    found = []
    for path in (out / name for name in REPORT_FIGURES):
        if path.is_dir():
            raise io.InputError(f"{path}: is a folder, where the report writes a figure; {again}")
        if path.exists():
            if not _own_report_figure(path):
                raise io.InputError(
                    f"{path}: exists and is not a figure celltally wrote (an image of "
                    f"yours?); {again}"
                )
            found.append(path)
    return found


# -- the page ------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1300px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
.failure { margin: 1em 0 2em; }
.note { color: #555; font-size: 0.9em; }
.warn { background: #fff4e5; border-left: 4px solid #b54708; padding: 0.5em 0.8em; }
"""

_METRIC_COLUMNS = ("n", "mae", "rmse", "r2", "max_abs_error", "coverage", "mean_half_width")
#: Column headings of the metrics table, with units.
_METRIC_HEADINGS = {
    "n": "images",
    "mae": "MAE (cells)",
    "rmse": "RMSE (cells)",
    "r2": "R²",
    "max_abs_error": "max |error| (cells)",
    "coverage": "truths inside the interval",
    "mean_half_width": "mean half-width (cells)",
}


def _interval_digits(row: Mapping[str, Any]) -> int:
    """Decimals (1-3) it takes for a missed truth to show outside the printed interval."""
    true, low, high = float(row["true"]), float(row["low"]), float(row["high"])
    for digits in (1, 2, 3):
        if round(low, digits) > true or round(high, digits) < true:
            return digits
    return 3


def _interval_text(row: Mapping[str, Any]) -> str:
    """'12.3 [10.1, 14.5]' with as many decimals (1-3) as it takes to show the truth outside."""
    digits = _interval_digits(row)
    count, low, high = float(row["count"]), float(row["low"]), float(row["high"])
    return f"{count:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"  # e.g. R² of a group whose images all have one count
    if isinstance(value, float):
        return f"{value:.3f}"
    return _esc(value)


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    head = "".join(
        f"<th>{_esc(_METRIC_HEADINGS.get(c, c))}</th>" for c in ("group", *_METRIC_COLUMNS)
    )
    body = "".join(
        "<tr>"
        + f"<td>{_esc(group)}</td>"
        + "".join(f"<td>{_fmt(values.get(c, '-'))}</td>" for c in _METRIC_COLUMNS)
        + "</tr>"
        for group, values in metrics.items()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _safe_stem(name: str, used: set[str]) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(name).stem) or "image"
    candidate, k = stem, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}"
    used.add(candidate)
    return candidate


def _not_counted(errors: Sequence[str]) -> str:
    """The images that could not be counted, each with its reason: left out of every figure."""
    if not errors:
        return ""
    items = "".join(f"<li>{_esc(message)}</li>" for message in errors)
    return (
        f"<h2>Images not counted ({len(errors)})</h2><p class='note'>They are in no figure "
        f"or total below (a well's total leaves them out).</p><ul>{items}</ul>"
    )


def _plate_error_map(wells: Mapping[str, Any] | None, out_dir: Path) -> str:
    """A plate map of the per-well totals' errors, when the wells sit on a plate grid."""
    from celltally.platemap import plate_grids, plot_plate_maps

    rows = (wells or {}).get("rows") or []
    if not plate_grids(rows, value="error"):  # no well name sits on a plate grid
        return ""
    plot_plate_maps(
        rows,
        out_dir / "plate_error.png",
        value="error",
        diverging=True,
        title="error of each well's total (counted - true)",
        grey="no well total (no image, or one: wells of 2 or more images are totalled)",
    )
    return (
        "<p class='note'>Where on the plate the totals err: red wells counted high, "
        "blue low.</p><img src='plate_error.png' alt='plate map of per-well errors'>"
    )


def _wells_section(wells: Mapping[str, Any] | None, level: float) -> str:
    """Per-well totals (wells of two images or more), when the names give wells."""
    if not wells:
        return ""
    return (
        "<h2>Per-well totals</h2>"
        f"<p>{wells['n_wells']} wells of {wells['images_per_well']:.1f} images on average: "
        "each well's counts summed, the interval from the sites' stds with a within-well "
        f"error correlation of {wells['correlation']:.3f} ({_esc(wells['correlation_source'])})."
        "</p><table><tr><th>MAE</th><th>max |error|</th>"
        f"<th>inside the {level_text(level)} interval</th><th>mean half-width</th></tr>"
        f"<tr><td>{wells['mae']:.2f}</td><td>{wells['max_abs_error']:.2f}</td>"
        f"<td>{wells['coverage']:.1%}</td><td>{wells['mean_half_width']:.2f}</td></tr></table>"
        + _repeated_sites(wells)
    )


def _repeated_sites(wells: Mapping[str, Any]) -> str:
    """A warning naming the wells that hold a site twice (summed twice, as ``count`` says)."""
    repeated = [w for w in wells.get("rows") or [] if w.get("repeated_sites")]
    if not repeated:
        return ""
    named = ", ".join(
        f"{'/'.join(p for p in (w.get('plate'), w['well']) if p)} (site "
        f"{str(w['repeated_sites']).replace(';', ', ')})"
        for w in repeated
    )
    return (
        f"<p class='warn'><strong>{len(repeated)} well(s) hold a site more than once</strong> "
        f"({REPEATED_SITES_CAUSE}): their totals count it twice: "
        f"{_esc(named)}.</p>"
    )


def _level_note(evaluation: Mapping[str, Any]) -> str:
    """The note when the level is above what the model's calibration guarantees."""
    note = evaluation.get("level_note")
    if not note:
        return ""
    return f"<p class='warn'><strong>Level beyond the calibration:</strong> {_esc(note)}.</p>"


def _flagged_banner(evaluation: Mapping[str, Any]) -> str:
    """How many images the model flagged (as ``evaluate`` prints it), above the figures."""
    rows = evaluation.get("rows") or []
    of = f"{len(rows)} images"
    said = [s for s in flagged_sentences([r.get("warning") or "" for r in rows], of=of) if s]
    if not said:
        return ""
    return (
        f"<p class='warn'><strong>Flagged images:</strong> {_esc('; '.join(said))}. The "
        "figures below include them; <a href='#flagged'>they are listed at the end</a>.</p>"
    )


def _flagged_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every flagged image (its row's warning), with its truth and interval."""
    flagged = [r for r in rows if flagged_summary([r.get("warning") or ""])["images"]]
    if not flagged:
        return ""
    body = "".join(
        f"<tr><td>{_esc(r['file'])}</td><td>{float(r['true']):g}</td>"
        f"<td>{_interval_text(r)}</td><td>{'no' if _outside(r) else 'yes'}</td>"
        f"<td style='text-align:left'>{_esc(r['warning'])}</td></tr>"
        for r in flagged
    )
    return (
        f"<h2 id='flagged'>Flagged images ({len(flagged)} of {len(rows)})</h2>"
        "<p class='note'>Images unlike the model's calibration images, or with so little "
        "contrast that they may hold no cells: their counts and intervals are less to be "
        "trusted, whether or not the truth fell inside.</p>"
        "<table><tr><th>flagged image</th><th>true</th><th>predicted [interval]</th>"
        f"<th>truth inside</th><th>warning</th></tr>{body}</table>"
    )


def _left_out(evaluation: Mapping[str, Any], folder: Path, shown: int = 20) -> str:
    """The folder's images left out for want of a true count, and sub-folders not searched."""
    from celltally.evaluation import image_key, unlabelled_text, unsearched_text

    parts = []
    if text := unlabelled_text(evaluation):
        unlabelled = evaluation.get("unlabelled") or []
        names = ", ".join(image_key(p, folder) for p in unlabelled[:shown])
        more = len(unlabelled) - shown
        parts.append(
            f"<p class='note'>{_esc(text)}. They are in no figure below: "
            f"{_esc(names)}"
            + (f" and {more} more ('unlabelled' in the evaluation's JSON)" if more > 0 else "")
            + ".</p>"
        )
    if text := unsearched_text(evaluation):
        parts.append(f"<p class='note'>Not searched: {_esc(text)}.</p>")
    return "".join(parts)


def _made_line(evaluation: Mapping[str, Any]) -> str:
    """'Made DATE by celltally VERSION; normalization ...': where the figures come from."""
    import datetime

    from celltally import __version__

    norm = evaluation.get("normalization") or {}
    shown = ", ".join(f"{k} {v}" for k, v in norm.items())
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"<p class='note'>Made {_esc(when)} by celltally {_esc(__version__)}"
        + (f"; normalization: {_esc(shown)}" if shown else "")
        + ".</p>"
    )


def _seen_banner(seen: Mapping[str, Any] | None, model: str) -> str:
    """A warning when images the model was made with are among those evaluated, or a note
    of how many ``--held-out`` left out (:func:`celltally.uncertainty.seen_by_model`)."""
    from celltally.evaluation import made_with_text

    what = _esc(made_with_text(seen, model=f"model {model}"))
    if not what:
        return ""
    if seen and seen.get("left_out"):
        return f"<p class='note'>Held out: {what} were left out (--held-out).</p>"
    return (
        f"<p class='warn'><strong>Not held-out figures:</strong> {what} are among those "
        "evaluated, so their errors and coverage flatter the model; the plots mark them "
        "with open circles. <code>celltally evaluate ... --held-out</code> leaves them "
        "out.</p>"
    )


def write_report(
    evaluation: Mapping[str, Any],
    out_dir: str | Path,
    *,
    counter: CellCounter,
    data: str | Path,
    max_failures: int = 24,
    levels: Sequence[float] = RELIABILITY_LEVELS,
    progress: bool = False,
) -> Path:
    """Write ``out_dir/index.html`` and its PNGs for an evaluation.

    Parameters
    ----------
    evaluation : mapping
        What :func:`celltally.evaluation.evaluate_folder` returns (``rows`` with
        ``file``, ``true``, ``count``, ``std``, ``low``, ``high``, ``blur``,
        ``stain``; ``metrics``; ``level``). Not modified.
    out_dir : path
        Created if missing; an earlier report's files are overwritten (its figures that
        this one does not draw are removed), but nothing else
        (:func:`check_report_folder`).
    counter : CellCounter
        The model that was evaluated (explanations and calibration come from it).
    data : path
        The evaluated folder: images are found by the rows' file names.
    max_failures : int
        At most this many failures get an explanation panel, the worst first
        (largest error in units of the interval's half-width); the rest are listed.
    levels : sequence of float
        Nominal levels of the reliability diagram.

    Returns
    -------
    Path
        The ``index.html`` written.
    """
    from tqdm.auto import tqdm

    from celltally.evaluation import image_key, labelled_files
    from celltally.explain import explain_image, explanation_figure

    out = Path(out_dir)
    earlier = check_report_folder(out)  # before anything is written: refused, or all ours
    (out / "failures").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()  # panel names; never one of a file celltally did not write
    for old in (out / "failures").glob("*.png"):  # an earlier report's panels, not this one's
        if _own_report_figure(old, within="failures/"):
            old.unlink()
        else:
            used.add(old.stem)
    level = float(evaluation["level"])
    folder = io.images_folder(data)
    paths = {image_key(p, folder): p for p, _ in labelled_files(data, exclude=report_outputs(out))}
    rows = []
    for row in tqdm(
        evaluation["rows"], desc="measures", disable=None if progress else True, unit="img"
    ):
        path = paths.get(row["file"])
        if path is None:
            raise io.InputError(f"{data}: {row['file']} is in the evaluation but not in the folder")
        rows.append({**row, **image_measures(counter.read(path), float(row["count"]))})
    if not rows:
        raise ValueError("the evaluation has no rows to report")

    plot_pred_vs_true(rows, out / "pred_vs_true.png", level=level)
    plot_errors_by_group(rows, out / "error_by_group.png")
    y = [float(r["true"]) for r in rows]
    mu = [float(r["count"]) for r in rows]
    sigma = [float(r["std"]) for r in rows]
    curves = reliability(y, mu, sigma, counter.calibration, levels=levels)
    plot_reliability(curves, out / "reliability.png", n=len(rows))
    plate_map = _plate_error_map(evaluation.get("wells"), out)
    drawn = {"pred_vs_true.png", "error_by_group.png", "reliability.png"}
    drawn |= {"plate_error.png"} if plate_map else set()

    def severity(r: Mapping[str, Any]) -> float:
        half = max(float(r["high"]) - float(r["count"]), 1e-6)  # before low's clip at 0
        return abs(float(r["count"]) - float(r["true"])) / half

    failures = sorted((r for r in rows if _outside(r)), key=severity, reverse=True)
    shown = failures[:max_failures]
    groups = assign_causes(rows, shown)
    panels: dict[str, str] = {}
    not_drawn: dict[str, str] = {}  # a panel that cannot be made (too large): said, and the
    # rest of the report is still written
    for row in tqdm(shown, desc="explanations", disable=None if progress else True, unit="img"):
        try:
            expl = explain_image(
                counter, paths[row["file"]], true_count=float(row["true"]), level=level
            )
        except io.InputError as err:
            not_drawn[row["file"]] = str(err)
            continue
        name = f"failures/{_safe_stem(row['file'], used)}.png"
        explanation_figure(expl, out / name)
        panels[row["file"]] = name

    reliability_rows = "".join(
        f"<tr><td>{lv:.3g}</td>"
        + "".join(f"<td>{curves[m][i]:.3f}</td>" for m in curves if m != "level")
        + "</tr>"
        for i, lv in enumerate(curves["level"])
    )
    methods = [m for m in curves if m != "level"]
    default = evaluation.get("calibration") or counter.calibration_used
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>celltally evaluation: {_esc(evaluation.get('model', counter.name))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Evaluation of model {_esc(evaluation.get('model', counter.name))}</h1>",
        f"<p>Data: <code>{_esc(Path(str(evaluation.get('data', data))).resolve())}</code>; "
        f"{len(rows)} images; "
        f"intervals at {level_text(level)} (calibration used: {_esc(default)}"
        f"{', with the ensemble' if counter.epistemic else ''}).</p>",
        _made_line(evaluation),
        _level_note(evaluation),
        _seen_banner(evaluation.get("seen"), counter.name),
        _flagged_banner(evaluation),
        _left_out(evaluation, folder),
        _not_counted(evaluation.get("errors") or []),
        "<h2>Accuracy and coverage</h2>",
        _metrics_table(evaluation.get("metrics", {})),
        "<h2>Predicted vs true</h2><img src='pred_vs_true.png' alt='predicted vs true'>",
        "<h2>Error by blur, stain and count</h2>",
        "<img src='error_by_group.png' alt='error by group'>",
        "<h2>Reliability diagram</h2>",
        "<p class='note'>Observed coverage of the interval at each nominal level. "
        "conformal: split-conformal quantile of |y - mu| / sigma on the calibration split; "
        "temperature: sigma scaled by T fitted by maximum likelihood on the same split; "
        "gaussian: the model's sigma taken at its word.</p>",
        "<img src='reliability.png' alt='reliability diagram'>",
        "<table><tr><th>nominal</th>"
        + "".join(f"<th>{_esc(m)}</th>" for m in methods)
        + f"</tr>{reliability_rows}</table>",
        _wells_section(evaluation.get("wells"), level),
        plate_map,
        f"<h2>Failures: truth outside the {level_text(level)} interval "
        f"({len(failures)} of {len(rows)})</h2>",
        "<p class='note'>Each failure is put under the cause whose measure is most extreme "
        f"among all {len(rows)} evaluated images, if worse than {CAUSE_RANK:.0%} of them "
        "(the percentages are those ranks). Measures: "
        + "; ".join(_esc(desc) for _, _, desc in CAUSES.values())
        + ". They are correlated (blur also merges cells), so read them as leads, "
        "not diagnoses.</p>",
    ]
    if not failures:
        parts.append(f"<p>None: every truth lies inside its {level_text(level)} interval.</p>")
    if len(failures) > len(shown):
        parts.append(
            f"<p class='note'>The {len(shown)} worst failures are shown; "
            f"{len(failures) - len(shown)} more are listed in the table below.</p>"
        )
    titles = {cause: desc for cause, (_, _, desc) in CAUSES.items()}
    titles[NO_CAUSE] = "no measured cause stands out"
    for cause, members in groups.items():
        parts.append(f"<h3>{_esc(titles[cause])} ({len(members)})</h3>")
        for row, ranks in members:
            rank_text = ", ".join(f"{c} {v:.0%}" for c, v in ranks.items())
            warn = f"; warning: {_esc(row['warning'])}" if row.get("warning") else ""
            known = "".join(  # what the name says: no 'blur None' for names without one
                f"{key} {_esc(row[key])}, " for key in ("blur", "stain") if row.get(key) is not None
            )
            parts.append(
                "<div class='failure'>"
                f"<p><b>{_esc(row['file'])}</b>: true {row['true']:g}, predicted "
                f"{_interval_text(row)}; {known}"
                f"sharpness {_sharpness_text(row['sharpness'])}, cells/object "
                f"{row['cells_per_object']:.2f}, solidity {row['solidity']:.3f}; worse than: "
                f"{_esc(rank_text)}{warn}</p>"
                + (
                    f"<img src='{_esc(panels[row['file']])}' alt='explanation of "
                    f"{_esc(row['file'])}'>"
                    if row["file"] in panels
                    else f"<p class='note'>No panel: {_esc(not_drawn[row['file']])}</p>"
                )
                + "</div>"
            )
    rest = failures[len(shown) :]
    if rest:
        parts.append("<table><tr><th>file</th><th>true</th><th>count</th><th>low</th>")
        parts.append("<th>high</th></tr>")
        parts += [
            f"<tr><td>{_esc(r['file'])}</td><td>{r['true']:g}</td>"
            + "".join(
                f"<td>{float(r[k]):.{_interval_digits(r)}f}</td>" for k in ("count", "low", "high")
            )
            + "</tr>"
            for r in rest
        ]
        parts.append("</table>")
    parts.append(_flagged_section(evaluation["rows"]))
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts) + "\n", encoding="utf-8")
    for old in earlier:  # an earlier report's figure this one does not draw (plate_error.png)
        if old.name not in drawn:
            old.unlink(missing_ok=True)
    return index
