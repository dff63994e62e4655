"""Per-well totals: the counts of a well's images (its sites) summed, with an interval.

A screen images each well at several sites; the biologist's number is the
well's. The total is the sum of the sites' counts. Its standard deviation
adds the sites' stds with the within-well error correlation that the model
measured on its calibration data (:func:`celltally.calibration.fit_group_correlation`;
stored in its config as ``calibration.well_correlation``), and its interval
uses the model's own multiplier at the results' level, as each image's does.
Measured on held-out BBBC005 wells: ``benchmarks/wells.py``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path, PurePath
from typing import Any, cast

from celltally import io, naming
from celltally.calibration import EMPTY_HINT, total_std

__all__ = [
    "DEFAULT_CORRELATION",
    "WELL_COLUMNS",
    "aggregate_wells",
    "calibrated_correlation",
    "fewer_sites",
    "model_correlation",
    "read_results",
    "well_key",
    "well_totals",
    "write_wells",
]

#: Assumed when a model carries no measured within-well correlation (its
#: calibration images hold one image per well, as the ``nuclei`` model's do):
#: above the shipped ``bbbc005`` model's measured value, so intervals err wide.
DEFAULT_CORRELATION = 0.1

#: Columns of the per-well CSV, in order.
WELL_COLUMNS: list[str] = [
    "plate",
    "well",
    "stain",
    "images",
    "failed",
    "sites",
    "repeated_sites",
    "count",
    "std",
    "low",
    "high",
    "level",
    "mean_per_image",
    "model",
    "correlation",
    "warnings",
    "true_count",
    "error",
]

#: Columns a results CSV needs to be aggregated (``celltally count`` writes them).
REQUIRED_COLUMNS = ("file", "count", "std", "low", "high", "level", "model", "well")

#: Why a well may hold a site more than once (``repeated_sites``), as every warning of it
#: says: ``count --wells``, ``wells``, ``evaluate`` and its report.
REPEATED_SITES_CAUSE = (
    "the same image counted under two names, or two stains whose names carry no _w1/_w2?"
)


def well_key(name: str | Path) -> tuple[str, str, str] | None:
    """``(plate, well, stain)`` parsed from an image name, or None without a well.

    Images of different stains (channels) of one well are separate groups:
    they show the same cells, and adding them would count them twice. So are
    a time lapse's time points: the plate is :func:`celltally.naming.plate_label`'s,
    ``"Plate1 t02"``.
    """
    parsed = naming.parse_name(name)
    if parsed.well is None:
        return None
    plate = naming.plate_label(parsed.plate, parsed.time)  # a time lapse: per time point
    return (plate, parsed.well, "" if parsed.stain is None else str(parsed.stain))


#: A name that begins with two well-like tokens ('P01_B02_s1'): a plate named like a well?
_TWO_WELLS = re.compile(r"^(?P<first>[A-Z]{1,2}\d{1,2})_[A-Z]{1,2}\d{1,2}(?=[_.]|$)")


#: A well written without its leading zero ('Plate1_B3_s1'), which names do not give.
_UNPADDED_WELL = re.compile(r"(?:^|_)[A-P]\d(?=[_.]|$)")


def _unpadded_well(name: str) -> bool:
    """Whether ``name`` has no well but an unpadded well-like token ('B3')."""
    base = PurePath(name).name
    return naming.parse_name(base).well is None and bool(_UNPADDED_WELL.search(base))


def _two_wells(name: str) -> bool:
    """Whether the first of two leading well-like tokens is read as the well."""
    base = PurePath(name).name
    match = _TWO_WELLS.match(base)
    if match is None or naming.BBBC005_PATTERN.match(base):
        return False
    first = naming.parse_name(match["first"] + ".tif").well
    return first is not None and naming.parse_name(base).well == first


def _site(name: str) -> str:
    parsed = naming.parse_name(name)
    return "" if parsed.site is None else str(parsed.site)


def _place(row: Mapping[str, str]) -> tuple[tuple[str, str, str] | None, str]:
    """A results row's ``(plate, well, stain)`` (None without a well) and its site.

    Read from the file's name where it names a well, so rows an older celltally
    wrote (another reading of plates and channels) group with today's; else
    from the row's own columns (e.g. wells added by hand to a table of names
    that carry none).
    """
    name = row.get("file") or ""
    if (key := well_key(name)) is not None:
        return key, _site(name)
    if row.get("well"):
        return (row.get("plate") or "", row["well"], row.get("stain") or ""), row.get("site") or ""
    return None, _site(name)


def _plate_folders(
    images: Sequence[tuple[str, tuple[str, str, str] | None, str, tuple | None]],
) -> dict[str, str]:
    """Folder -> plate prefix, when folders are all that tell plates apart; else empty.

    ``images``: (file, (plate, well, stain), site, (count, std) or None if it
    failed). When one plate, well, site and stain comes from files in two
    folders whose counts differ (``PlateA/exp1_B02_s1_w1.tif``,
    ``PlateB/exp1_B02_s1_w1.tif``: other images), the names cannot tell the
    plates apart: every plate is then named after its folder as well
    ('PlateA/exp1'), the folder relative to the one holding them all. The
    same count and std twice is one image counted under two names (a copy):
    that is a repeated site, not another plate.
    """
    seen: dict[tuple, dict[str, set]] = {}
    for file, key, site, value in images:
        if key is not None:
            by_folder = seen.setdefault((*key, site), {})
            by_folder.setdefault(str(PurePath(file).parent), set()).add(value)
    apart = any(
        len(by_folder) > 1
        and len({v for values in by_folder.values() for v in values if v is not None}) > 1
        for by_folder in seen.values()
    )
    if not apart:
        return {}
    every = sorted({str(PurePath(f).parent) for f, key, _, _ in images if key is not None})
    one_kind = len({PurePath(f).is_absolute() for f in every}) == 1  # commonpath needs it
    common = os.path.commonpath(every) if one_kind else ""
    return {f: os.path.relpath(f, common) if common else f for f in every}


def _in_folder(
    key: tuple[str, str, str], file: str, folders: Mapping[str, str]
) -> tuple[str, str, str]:
    """``key`` with its plate named after the file's folder too (see :func:`_plate_folders`)."""
    if not folders:
        return key
    prefix = folders.get(str(PurePath(file).parent), "")
    plate = "/".join(part for part in (prefix, key[0]) if part and part != ".")
    return (plate, key[1], key[2])


def read_results(path: str | Path) -> list[dict[str, str]]:
    """Rows of a results CSV written by ``celltally count`` (:func:`celltally.batch.read_results`).

    Raises
    ------
    celltally.io.InputError
        The file is missing or lacks a column the totals need (one-line message).
    """
    from celltally.batch import _ENC_ERRORS, _ENCODING
    from celltally.batch import read_results as read_complete_rows

    path = Path(path)
    if not path.is_file():
        raise io.InputError(f"{path}: no such results file")
    try:  # as count writes it: a file name that is not UTF-8 kept byte for byte
        with path.open(newline="", encoding=_ENCODING, errors=_ENC_ERRORS) as handle:
            header = next(csv.reader(handle), [])
        header = [header[0].removeprefix("\ufeff"), *header[1:]] if header else []
    except (UnicodeDecodeError, csv.Error):
        raise io.InputError(f"{path}: not a celltally results CSV (not CSV text)") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise io.InputError(
            f"{path}: not a celltally results CSV (missing column(s) {', '.join(missing)})"
        )
    return read_complete_rows(path)


def _number(row: Mapping[str, str], column: str, source: str, *, minimum: float = 0.0) -> float:
    """The row's ``column`` as a finite number of at least ``minimum`` (InputError if not)."""
    try:
        value = float(row[column])
    except (TypeError, ValueError):
        raise io.InputError(
            f"{source}: {column} {row.get(column)!r} of {row.get('file')} is not a number"
        ) from None
    if not math.isfinite(value):
        raise io.InputError(f"{source}: {column} of {row.get('file')} is {value}")
    if value < minimum:
        raise io.InputError(
            f"{source}: {column} {row.get(column)} of {row.get('file')} is below {minimum:g}"
        )
    return value


def _check_rows(rows: Sequence[Mapping[str, str]], source: str) -> None:
    """Refuse what no ``celltally count`` run writes: a file twice (by one model at one
    level: the web page's CSV may hold an image counted by two), a level outside (0, 1)."""
    seen: set[tuple[str, str, str]] = set()
    for number, row in enumerate(rows, start=1):
        name = row.get("file") or ""
        if None in row.values():  # csv.DictReader's filler for missing fields
            raise io.InputError(
                f"{source}: data row {number} ({name}) has fewer fields than the header"
            )
        key = (name, row.get("model") or "", row.get("level") or "")
        if key in seen:
            raise io.InputError(
                f"{source}: {name} has more than one row (a results file lists each image "
                "once; totals would count it twice)"
            )
        seen.add(key)
        level = row.get("level")
        if level not in (None, ""):
            try:
                ok = 0.0 < float(level) < 1.0
            except ValueError:
                ok = False
            if not ok:
                raise io.InputError(
                    f"{source}: level {level!r} of {name} is not a number between 0 and 1"
                )


def model_correlation(
    model: str | Path, *, epistemic: bool = False, name: str | None = None
) -> tuple[float, str]:
    """The within-well error correlation a model measured, and where the value comes from.

    ``model`` is a shipped model's name or a model folder; ``name`` is how
    the note calls it (default: ``model``). With ``epistemic`` the value
    measured for the ensemble's counts is used where the model has one, else
    the model's own. Falls back to :data:`DEFAULT_CORRELATION` when the model
    is unknown here or its config has no ``calibration.well_correlation``.
    """
    from celltally.model_folder import read_model_config, resolve_model

    name = str(model) if name is None else name
    try:
        config = read_model_config(resolve_model(model))
    except (io.InputError, OSError, ValueError) as err:
        why = "model not found" if "no such model" in str(err) else str(err)
        return DEFAULT_CORRELATION, f"assumed ({name}: {why})"
    value, fitted = block_correlation(config.get("calibration"), epistemic=epistemic)
    if not fitted:
        return value, f"assumed ({name} has no measured value)"
    return value, f"measured by {name} on {fitted['groups']} calibration wells"


def block_correlation(
    calibration: Mapping[str, Any] | None, *, epistemic: bool = False
) -> tuple[float, Mapping[str, Any] | None]:
    """:func:`calibrated_correlation` of a model's whole ``calibration`` block.

    With ``epistemic``, the ensemble's sub-block's value where it has one,
    else the model's own (the ensemble's errors are those of a mean of similar
    counters, so they share the same wells' density and focus).
    """
    calibration = calibration or {}
    if epistemic:
        value, fitted = calibrated_correlation(calibration.get("epistemic"))
        if fitted:
            return value, fitted
    return calibrated_correlation(calibration)


def calibrated_correlation(
    calibration: Mapping[str, Any] | None,
) -> tuple[float, Mapping[str, Any] | None]:
    """The within-well correlation of a model's ``calibration`` block, and its fit record.

    :data:`DEFAULT_CORRELATION` and None when the block has none.
    """
    fitted = (calibration or {}).get("well_correlation")
    return (float(fitted["value"]) if fitted else DEFAULT_CORRELATION), fitted


def fewer_sites(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], int]]:
    """Wells with fewer images (counted + failed) than most wells of their plate and stain.

    Each with that usual number: a site that was never imaged or never given to
    ``count`` leaves no trace but a smaller total (failed images are already
    in the ``failed`` column).
    """
    from collections import Counter

    def taken(row: Mapping[str, Any]) -> int:
        return int(row.get("images") or 0) + int(row.get("failed") or 0)

    def plate(row: Mapping[str, Any]) -> tuple:
        return (row.get("plate"), row.get("stain"), row.get("model"))

    tallies: dict[tuple, Counter[int]] = {}
    for row in rows:
        tallies.setdefault(plate(row), Counter())[taken(row)] += 1
    usual = {key: tally.most_common(1)[0][0] for key, tally in tallies.items()}
    return [(r, usual[plate(r)]) for r in rows if taken(r) < usual[plate(r)]]


def aggregate_wells(
    rows: Iterable[Mapping[str, str]],
    *,
    correlation: float | Mapping[str, float],
    failed: Iterable[str] = (),
    source: str = "results",
) -> tuple[list[dict[str, Any]], int]:
    """Sum a results table's counts per (plate, well, stain), with a combined interval.

    Parameters
    ----------
    rows : iterable of mappings
        Rows of a results CSV (:func:`read_results`); the well comes from the
        ``plate``, ``well`` and ``stain`` columns, else from the file name.
    correlation : float or mapping of model name to float
        Within-well correlation of the images' errors (0 independent, 1 shared).
    failed : iterable of str
        Files that could not be counted (a run's errors CSV): each well says
        how many of its images are missing from its total (``failed``), and a
        well whose every image failed still gets a row, with no count.
    source : str
        Named in error messages (the results file).

    Returns
    -------
    wells : list of dict
        One row per well (keys :data:`WELL_COLUMNS`), sorted by plate, well, stain.
    skipped : int
        Images without a well in their name (not in any total).

    Notes
    -----
    The total's half-width is the model's interval multiplier at the rows'
    level (``(high - count) / std``, pooled over all rows of that model and
    level, as the CSV's rounding would otherwise distort it) times :func:`total_std` of the
    sites' stds: exact for Gaussian errors with that correlation. The multiplier
    keeps single images' tail shape, while a sum over many sites tends to a
    Gaussian (``docs/uncertainty.md``, "Per-well totals", compares the two);
    measured against real held-out wells in ``benchmarks/wells.py``.
    """
    # values as a results CSV holds them (text), whatever the caller built the rows from
    rows = [{k: v if v is None else str(v) for k, v in r.items()} for r in rows]
    # the web page's CSV keeps an image it could not count as a row with a 'problem'
    # and no count: a failed image, as `count`'s errors file lists them
    unread = [r for r in rows if r.get("problem") and not r.get("count")]
    if unread:
        rows = [r for r in rows if not (r.get("problem") and not r.get("count"))]
        counted = {r.get("file") for r in rows}  # failed once, then counted when dropped again
        failed = [*failed, *(r.get("file") or "" for r in unread if r.get("file") not in counted)]
    _check_rows(rows, source)
    placed = [(row, *_place(row)) for row in rows]
    failed = list(failed)
    folders = _plate_folders(
        [
            (row.get("file") or "", key, site, (row.get("count"), row.get("std")))
            for row, key, site in placed
        ]
        + [(name, well_key(name), _site(name), None) for name in failed]
    )
    groups: dict[tuple, list[Mapping[str, str]]] = {}
    sites_of: dict[tuple, list[str]] = {}
    skipped = 0
    for row, key, site in placed:
        if key is None:
            skipped += 1
            continue
        key = _in_folder(key, row.get("file") or "", folders)
        if folders:  # the plate column says which folder's plate it is
            cast("dict[str, str]", row)["plate"] = key[0]  # a copy made above
        group = (row.get("model") or "", row.get("level") or "", *key)
        groups.setdefault(group, []).append(row)
        sites_of.setdefault(group, []).append(site)
    missing: dict[tuple, int] = {}
    for name in failed:
        if (key := well_key(name)) is not None:
            key = _in_folder(key, name, folders)
            missing[key] = missing.get(key, 0) + 1
    # One interval multiplier per model and level: (high - count) / std is the same for
    # every row, but the CSV rounds count and high to 0.01 and std to 0.001, so it is
    # pooled over all of them, sum(high - count) / sum(std), where rounding weighs least.
    spread: dict[tuple[str, str], list[float]] = {}
    numbers: dict[tuple, tuple[list[float], list[float]]] = {}  # each group's counts, stds
    for group, members in groups.items():
        pooled = spread.setdefault(group[:2], [0.0, 0.0])
        counts, stds = numbers.setdefault(group, ([], []))
        for r in members:
            count_r, std_r = _number(r, "count", source), _number(r, "std", source)
            high_r = _number(r, "high", source, minimum=count_r)  # high below count: damaged
            counts.append(count_r)
            stds.append(std_r)
            if std_r > 0:
                pooled[0] += high_r - count_r
                pooled[1] += std_r
    wells = []
    for group, members in sorted(groups.items()):
        model, level, plate, well, stain = group
        rho = (
            correlation
            if isinstance(correlation, Real)
            else cast("Mapping[str, float]", correlation)[model]
        )
        counts, stds = numbers[group]
        width, std_sum = spread[(model, level)]
        multiplier = width / std_sum if std_sum > 0 else 0.0
        total = sum(counts)
        if not math.isfinite(total):
            raise io.InputError(f"{source}: the counts of well {well} add up to {total}")
        std = total_std(stds, float(rho))
        half = multiplier * std
        # a frame that may hold no cells (low contrast) may add 0, as its own interval
        # (down to 0) allows: the total's low end makes room for that too
        empty = sum(
            c
            for r, c in zip(members, counts, strict=True)
            if EMPTY_HINT in (r.get("warning") or "")
        )
        truths = [r.get("true_count") for r in members]
        known = all(t not in (None, "") for t in truths)
        truth = sum(float(cast(str, t)) for t in truths) if known else None
        sites = sorted(set(sites_of[group]) - {""}, key=_site_order)
        # the same site twice (counted again under another name, a copy, a link)
        # is summed twice: said, not hidden
        repeated = [s for s in sites if sites_of[group].count(s) > 1]
        wells.append(
            {
                "plate": plate,
                "well": well,
                "stain": stain,
                "images": len(members),
                "failed": missing.get((plate, well, stain), 0),  # in every model's total
                "sites": ";".join(sites),
                "repeated_sites": ";".join(repeated),
                "count": round(total, 2),
                "std": round(std, 3),
                "low": round(max(0.0, total - half - empty), 2),
                "high": round(total + half, 2),
                "level": level,
                "mean_per_image": round(total / len(members), 2),
                "model": model,
                "correlation": round(float(rho), 4),
                "warnings": sum(1 for r in members if r.get("warning")),
                "true_count": "" if truth is None else round(truth, 2),
                "error": "" if truth is None else round(total - truth, 2),
            }
        )
    totalled = {(w["plate"], w["well"], w["stain"]) for w in wells}
    for (plate, well, stain), n in missing.items():  # wells with no image counted
        if (plate, well, stain) not in totalled:
            wells.append({"plate": plate, "well": well, "stain": stain, "images": 0, "failed": n})
    wells.sort(key=lambda w: (w["plate"], w["well"], w["stain"]))
    return wells, skipped


def _site_order(site: str) -> tuple[int, str]:
    return (int(site), site) if site.isdigit() else (1 << 30, site)


def write_wells(path: str | Path, wells: Sequence[Mapping[str, Any]]) -> Path:
    """Write per-well rows (:data:`WELL_COLUMNS`) as CSV, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.DictWriter(handle, fieldnames=WELL_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in wells:
                writer.writerow({c: row.get(c, "") for c in WELL_COLUMNS})
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _failed_files(results: str | Path, rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Files in the run's errors CSV (``<results stem>.errors.csv``) not counted since."""
    from celltally.batch import _ENC_ERRORS, output_paths

    errors = output_paths(results).errors
    if not errors.is_file():
        return []
    counted = {r.get("file") for r in rows}
    # utf-8-sig: a file re-saved by a spreadsheet starts with a byte-order mark
    with errors.open(newline="", encoding="utf-8-sig", errors=_ENC_ERRORS) as handle:
        listed = [r.get("file") or "" for r in csv.DictReader(handle)]
    return [name for name in listed if name and name not in counted]


def _manifest_model(results: str | Path) -> tuple[dict[str, str], bool]:
    """{model name: its folder} and the --epistemic flag from a results CSV's manifest."""
    from celltally.batch import output_paths

    try:
        manifest = json.loads(output_paths(Path(results)).manifest.read_text())
        model = manifest["model"]
        options = manifest.get("settings", {}).get("counter_options") or {}
        folder = Path(model["folder"])
        where = {str(model["name"]): str(folder)} if (folder / "config.json").exists() else {}
        return where, bool(options.get("epistemic"))
    except (OSError, ValueError, KeyError, TypeError):
        return {}, False


def _located(
    results: str | Path, rows: Sequence[Mapping[str, str]], failed: Sequence[str]
) -> tuple[list[dict[str, str]], list[str]]:
    """Rows (copies) and failed files with each file where it is (:func:`io.file_identity`).

    A results CSV names files relative to the folder each run worked in
    (:func:`celltally.batch.absolute_files`), so ``plate/a.tif`` written from two
    folders is two images, and ``sp/PlateA/a.tif`` and ``/abs/sp/PlateA/b.tif``
    are in one folder.
    """
    from celltally.batch import absolute_files

    files = absolute_files(results, [r.get("file") or "" for r in rows])
    if files is None:  # not written by count: the names as written
        return [dict(r) for r in rows], list(failed)
    where = [io.file_identity(f) if f else f for f in files]
    failed_files = absolute_files(results, failed, last=True) or []
    failed = [io.file_identity(f) if f else f for f in failed_files]
    return [{**r, "file": w} for r, w in zip(rows, where, strict=True)], failed


def well_totals(
    results: str | Path,
    out: str | Path,
    *,
    correlation: float | None = None,
    require_wells: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], int, dict[str, str]]:
    """Read a results CSV, total it per well and write ``out``: the ``celltally wells`` job.

    ``correlation`` None takes each model's measured value
    (:func:`model_correlation`). With ``require_wells``, a results CSV in which
    no image name (counted or failed) carries a well raises InputError before
    ``out`` is written. ``warn`` is told of a last row left out (see
    :func:`celltally.batch.read_results`). Returns the well rows, the number of
    images without a well, and where each model's correlation came from.
    """
    from celltally.batch import run_files, torn_tail

    if Path(out).resolve() in run_files(results):
        raise io.InputError(f"--out {out}: is the results being read ({results}); name another")
    if Path(out).is_dir() or Path(out).suffix.lower() in io.IMAGE_SUFFIXES:
        raise io.InputError(f"--out {out}: must be a CSV file (e.g. wells.csv)")
    rows = read_results(results)
    for misread, problem in (
        (
            _two_wells,
            "begin with two well-like names (e.g. {}): the first is read as the well; if it "
            "names the plate, name plates otherwise (e.g. Plate01) or the wells merge",
        ),
        (
            _unpadded_well,
            "hold a well without its leading zero (e.g. {}): wells are read with two digits "
            "(B03, not B3), so these are left out; rename them to total them",
        ),
    ):
        names = [name for r in rows if misread(name := r.get("file") or "")]
        if warn is not None and names:
            warn(f"{len(names)} file name(s) " + problem.format(PurePath(names[0]).name))
    if warn is not None and torn_tail(results):
        warn(
            f"the last line of {results} has no line end: left out, as a row a run was "
            "writing or cut short (if you edited the file, end it with a newline)"
        )
    names = sorted({r.get("model") or "" for r in rows})
    if correlation is not None:
        if not 0.0 <= correlation <= 1.0:
            raise io.InputError(f"--correlation must be between 0 and 1, got {correlation}")
        values = dict.fromkeys(names, float(correlation))
        notes = dict.fromkeys(names, "given")
    else:
        # the run's manifest names the model folder and whether --epistemic was on:
        # a model trained elsewhere is then found whatever the working directory
        where, epistemic = _manifest_model(results)
        found = {
            name: model_correlation(where.get(name, name), epistemic=epistemic, name=name)
            for name in names
        }
        values = {name: v for name, (v, _) in found.items()}
        notes = {name: note for name, (_, note) in found.items()}
    failed = _failed_files(results, rows)
    rows, failed = _located(results, rows, failed)
    wells, skipped = aggregate_wells(rows, correlation=values, failed=failed, source=str(results))
    if require_wells and not wells:
        raise io.InputError(
            f"{results}: no file name carries a well (such as Plate1_B03_s1_w1.tif or "
            "SIMCEPImages_B03_...): nothing to total per well",
            results,
        )
    write_wells(out, wells)
    return wells, skipped, notes
