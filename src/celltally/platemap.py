"""Plate maps: per-well totals drawn on the plate's grid of wells.

A screen's layout effects (edge wells drying out, a dosing gradient, a
failed column) show at a glance on a plate map, and are easy to miss in a
table. :func:`plate_grids` places the rows of :func:`celltally.wells.aggregate_wells`
on each plate's grid (rows A, B, ... from the top, columns 1, 2, ... from
the left; the smallest standard plate format that holds every well named),
and :func:`plot_plate_maps` draws one map per plate and stain into a PNG
(matplotlib, Agg backend), marking wells with images that were flagged as
unlike the calibration data or could not be counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from celltally import io

__all__ = [
    "PLATE_FORMATS",
    "PlateGrid",
    "plate_grids",
    "plate_shape",
    "plot_plate_maps",
    "well_position",
]

#: Standard plate formats, (rows, columns), smallest first.
PLATE_FORMATS: tuple[tuple[int, int], ...] = (
    (2, 3),
    (3, 4),
    (4, 6),
    (6, 8),
    (8, 12),
    (16, 24),
    (32, 48),
)

_WELL = re.compile(r"^(?P<row>[A-Z]{1,2})(?P<column>\d{1,3})$")


def well_position(well: str) -> tuple[int, int]:
    """0-based (row, column) of a well name: 'A01' -> (0, 0), 'P24' -> (15, 23), 'AF48' -> (31, 47).

    Raises
    ------
    ValueError
        When ``well`` is not row letters followed by a column number.
    """
    match = _WELL.match(str(well).strip().upper())
    if match is None or int(match["column"]) < 1:
        raise ValueError(f"{well!r} is not a well name such as B03")
    letters = match["row"]
    row = 0
    for letter in letters:
        row = row * 26 + (ord(letter) - ord("A") + 1)
    return row - 1, int(match["column"]) - 1


@dataclass
class PlateGrid:
    """One plate and stain on its grid of wells.

    Attributes
    ----------
    plate, stain : as in the well rows ('' where the names carry none).
    values : (rows, columns) float array of the chosen value; NaN for wells
        with no row.
    flagged : (rows, columns) bool array: the well holds images flagged as
        unlike the calibration data (``warnings``).
    failed : (rows, columns) bool array: the well holds images that could not
        be counted (``failed``); its value covers only the others.
    repeated : (rows, columns) bool array: the well holds a site more than once
        (``repeated_sites``): its total counts it twice.
    """

    plate: str
    stain: str
    values: np.ndarray
    flagged: np.ndarray
    failed: np.ndarray
    repeated: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))

    @property
    def wells(self) -> int:
        """The plate format's number of wells (e.g. 96)."""
        return int(self.values.size)


def plate_shape(plate_format: int) -> tuple[int, int]:
    """(rows, columns) of a standard plate of ``plate_format`` wells; ValueError otherwise."""
    sizes = {r * c: (r, c) for r, c in PLATE_FORMATS}
    if plate_format not in sizes:
        raise ValueError(f"plate format must be one of {sorted(sizes)} wells, not {plate_format}")
    return sizes[plate_format]


def _format(rows: int, columns: int) -> tuple[int, int]:
    for shape in PLATE_FORMATS:
        if rows <= shape[0] and columns <= shape[1]:
            return shape
    return rows, columns


def _number(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def plate_grids(
    wells: Sequence[Mapping[str, Any]], *, value: str = "count", plate_format: int | None = None
) -> list[PlateGrid]:
    """Place per-well rows on their plates' grids, one grid per (plate, stain).

    Parameters
    ----------
    wells : rows with at least ``plate``, ``well``, ``stain`` and ``value``
        (:data:`celltally.wells.WELL_COLUMNS`; strings or numbers).
    value : the column to map, e.g. ``count`` (the well's total) or
        ``mean_per_image`` (the total over its sites, per site).
    plate_format : number of wells of every plate (6, 12, 24, 48, 96, 384 or
        1536); by default the smallest standard format that holds the wells named.

    Returns
    -------
    list of PlateGrid
        Sorted by plate, then stain. Each plate is shown in the smallest
        standard format (:data:`PLATE_FORMATS`) that holds every well named
        on it. A row whose well is not a well name is left out.
    """
    groups: dict[tuple[str, str], list[tuple[int, int, Mapping[str, Any]]]] = {}
    for row in wells:
        try:
            r, c = well_position(str(row["well"]))
        except ValueError:
            continue
        key = (str(row.get("plate") or ""), str(row.get("stain") or ""))
        groups.setdefault(key, []).append((r, c, row))
    extent: dict[str, tuple[int, int]] = {}  # one format per plate, whatever the stain
    for (plate, _), members in groups.items():
        r0, c0 = extent.get(plate, (0, 0))
        extent[plate] = (
            max(r0, *(r + 1 for r, _, _ in members)),
            max(c0, *(c + 1 for _, c, _ in members)),
        )
    forced = None if plate_format is None else plate_shape(plate_format)
    grids = []
    for (plate, stain), members in sorted(groups.items()):
        shape = forced or _format(*extent[plate])
        if extent[plate][0] > shape[0] or extent[plate][1] > shape[1]:
            raise ValueError(
                f"plate {plate or '(unnamed)'} has wells beyond a {plate_format}-well plate"
            )
        values = np.full(shape, np.nan)
        flagged = np.zeros(shape, dtype=bool)
        failed = np.zeros(shape, dtype=bool)
        repeated = np.zeros(shape, dtype=bool)
        for r, c, row in members:
            values[r, c] = _number(row.get(value))
            flagged[r, c] = _number(row.get("warnings")) > 0
            failed[r, c] = _number(row.get("failed")) > 0
            repeated[r, c] = bool(row.get("repeated_sites"))
        grids.append(
            PlateGrid(
                plate=plate,
                stain=stain,
                values=values,
                flagged=flagged,
                failed=failed,
                repeated=repeated,
            )
        )
    return grids


def _row_label(index: int) -> str:
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


def _label(value: float) -> str:
    """A well's number: one decimal below 10 (an error of -0.28 is '-0.3', not '-0')."""
    if abs(value) >= 9.95:
        return f"{value:.0f}"
    text = f"{value:.1f}"
    return "0" if text in ("0.0", "-0.0") else text


def plot_plate_maps(
    wells: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    value: str = "count",
    title: str | None = None,
    diverging: bool = False,
    plate_format: int | None = None,
    grey: str = "no image",
) -> Path:
    """Draw :func:`plate_grids`'s maps into one PNG, one panel per plate and stain.

    Each well is coloured by ``value`` on one colour scale shared by all
    panels (and, on plates of 96 wells or fewer, labelled with it); grey is
    a position with no row in ``wells`` (the legend says ``grey``). A well with
    images flagged as unlike the calibration data is outlined with a '!'; one
    with images that could not
    be counted gets an 'x' (its value covers only the others), and one holding a
    site more than once a '2' (its total counts that site twice). ``diverging``
    centres a red-blue scale on 0 (for signed values such as ``error``).
    Returns the path written.

    Raises
    ------
    ValueError
        When no row names a well, or a well lies beyond ``plate_format``.
    """
    import textwrap

    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    grids = plate_grids(wells, value=value, plate_format=plate_format)
    if not grids:
        raise ValueError("no row names a well (e.g. B03): nothing to map")
    finite = np.concatenate([g.values[np.isfinite(g.values)] for g in grids])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if diverging:
        reach = max(abs(low), abs(high)) or 1.0
        norm = Normalize(vmin=-reach, vmax=reach)
    else:
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1)
    cmap_name = "RdBu_r" if diverging else "viridis"
    cmap = colormaps[cmap_name].with_extremes(bad="#dddddd")  # no image: grey
    edge = "black" if diverging else "red"
    n = len(grids)
    columns = min(n, 2)
    panel_w = max(5.0, 0.32 * max(g.values.shape[1] for g in grids) + 1.8)
    panel_h = max(3.4, 0.32 * max(g.values.shape[0] for g in grids) + 1.4)
    width = panel_w * columns
    fig = Figure(figsize=(width, panel_h * math.ceil(n / columns) + 0.6), dpi=110)
    label = value.replace("_", " ")
    if value in ("count", "error", "mean_per_image", "std", "true_count"):
        label += " (cells)"

    def ink(grid: PlateGrid, r: int, c: int) -> str:
        """White on the darkest colours, else black."""
        v = grid.values[r, c]
        if not np.isfinite(v):
            return edge
        shade = float(norm(v))
        dark = abs(shade - 0.5) > 0.35 if diverging else shade < 0.35
        return "white" if dark else "black"

    for k, grid in enumerate(grids):
        ax = fig.add_subplot(math.ceil(n / columns), columns, k + 1)
        rows, cols = grid.values.shape
        image = ax.imshow(
            np.ma.masked_invalid(grid.values), cmap=cmap, norm=norm, interpolation="nearest"
        )
        if grid.wells <= 96:  # room for the numbers
            for r, c in zip(*np.nonzero(np.isfinite(grid.values)), strict=True):
                text = _label(float(grid.values[r, c]))
                ax.text(
                    c, r + 0.25, text, ha="center", va="center", fontsize=6, color=ink(grid, r, c)
                )
        twice = grid.repeated if grid.repeated.shape == grid.flagged.shape else grid.failed & False
        for r, c in zip(*np.nonzero(grid.flagged | grid.failed | twice), strict=True):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec=edge, lw=1.5))
            mark = (
                ("!" if grid.flagged[r, c] else "")
                + ("x" if grid.failed[r, c] else "")
                + ("2" if twice[r, c] else "")
            )
            ax.text(
                c,
                r - 0.15,
                mark,
                ha="center",
                va="center",
                fontsize=8,
                weight="bold",
                color=ink(grid, r, c),
            )
        step = 1 if cols <= 24 else 2
        ax.set_xticks(range(0, cols, step), [str(c + 1) for c in range(0, cols, step)])
        ax.set_yticks(range(0, rows, step), [_row_label(r) for r in range(0, rows, step)])
        ax.tick_params(labelsize=7, top=True, labeltop=True, bottom=False, labelbottom=False)
        name = " · ".join(
            part
            for part in (grid.plate or "plate", f"stain {grid.stain}" if grid.stain else "")
            if part
        )
        ax.set_title(f"{name} ({grid.wells}-well)", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    flagged = sum(int(g.flagged.sum()) for g in grids)
    failed = sum(int(g.failed.sum()) for g in grids)
    legend = [f"grey: {grey}"]
    if flagged:
        legend.append(f"!: {flagged} well(s) with images flagged as unlike the calibration data")
    if failed:
        legend.append(f"x: {failed} well(s) with images that could not be counted")
    if doubled := sum(int(g.repeated.sum()) for g in grids):
        legend.append(f"2: {doubled} well(s) holding a site more than once (counted twice)")
    chars = int(width * 14)  # characters that fit across the figure at this font size
    fig.suptitle(textwrap.fill(title or f"{label} per well", chars), fontsize=10)
    fig.text(0.5, 0.01, textwrap.fill("; ".join(legend), chars), ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return io.save_figure(fig, out)  # the path returned is the file written
