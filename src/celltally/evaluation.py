"""Evaluate a model on a labelled folder: per-image rows and grouped metrics."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from celltally import io, naming
from celltally.calibration import flagged_summary
from celltally.counter import CellCounter
from celltally.metrics import grouped_metrics
from celltally.transforms import DEFAULT_NORMALIZATION


def _outputs(folder: Path, outputs: Iterable[str | Path]) -> tuple[frozenset[str], frozenset[str]]:
    """(files, folders) of ``outputs``, their links resolved (``os.path.realpath``).

    A folder that is, or holds, the images' folder (the report written into the
    data folder, or named through a link to it) is no folder to leave out: only
    its files named in ``outputs`` are.
    """
    here = os.path.realpath(folder)
    files, folders = set(), set()
    for path in outputs:
        name = os.path.realpath(path)
        files.add(name)
        if here != name and not here.startswith(name + os.sep):
            folders.add(name)
    return frozenset(files), frozenset(folders)


def _kept(paths: Iterable[Path], outputs: tuple[frozenset[str], frozenset[str]]) -> list[Path]:
    """``paths`` less those that are, or lie in, a run's outputs (:func:`_outputs`)."""
    files, folders = outputs
    if not files:
        return list(paths)
    return [
        p
        for p in paths
        if (name := os.path.realpath(p)) not in files
        and not any(name.startswith(f + os.sep) for f in folders)
    ]


def _figures_only(folder: str | Path) -> bool:
    """Whether every image directly in ``folder`` is a figure celltally wrote (a report's)."""
    try:
        return all(io.is_own_figure(p) for p in io.iter_images([folder]))
    except io.InputError:  # cannot be listed
        return False


def _no_images(data: Path, folder: Path, err: io.InputError) -> io.InputError:
    """``err`` (a folder without images), said for ``evaluate``: it has no --recursive."""
    if not folder.is_dir():
        return err
    try:  # the first image in a sub-folder, if any
        first = next(iter(io.iter_images([folder], recursive=True)), None)
    except io.InputError:
        first = None
    if first is None:
        return err
    sub = first.relative_to(folder)
    return io.InputError(
        f"{data}: folder contains no TIFF/PNG/JPEG images of its own, but its sub-folder "
        f"'{sub.parts[0]}' has: evaluate {folder / sub.parts[0]}, or name the images of the "
        f"sub-folders in a counts.csv (names relative to {folder}, e.g. {sub.as_posix()})",
        str(data),
    )


def labelled_files(
    data: str | Path, *, exclude: Iterable[str | Path] = ()
) -> list[tuple[Path, float]]:
    """(image path, true count) from ``counts.csv`` if present, else from ``_C<n>_`` names,
    else from the image's label image in ``labels/`` or ``masks/`` (its number of
    objects, as ``train`` counts it). ``exclude``: files and folders a run writes (a
    report's), never taken for images of the folder (see :func:`evaluate_folder`)."""
    data = Path(data)
    if data.is_file():
        raise io.InputError(f"{data}: a file; evaluate takes a folder of images")
    folder = io.images_folder(data)
    csv_path = io.counts_csv(data)
    if csv_path.exists():
        table = io.read_counts_csv(csv_path)
        if not table:
            raise io.InputError(f"{csv_path}: lists no images (a header and no rows)")
        pairs = [(folder / name, float(c)) for name, c in table.items()]
        missing = [name for name in table if not (folder / name).exists()]
        if missing:
            raise io.InputError(
                f"{csv_path}: lists {missing[0]}, but {folder / missing[0]} does not exist "
                "(names are relative to the images' folder)"
            )
        return pairs
    try:
        paths = _kept(io.list_images([folder]), _outputs(folder, exclude))
    except io.InputError as err:
        raise _no_images(data, folder, err) from None
    named = [naming.parse_name(path.name).count for path in paths]
    if unnamed := [i for i, c in enumerate(named) if c is None]:
        from celltally.datasets import counts_from_label_masks

        # as `train` counts them: the label images' objects
        for i, count in counts_from_label_masks(data, paths, wanted=unnamed).items():
            named[i] = count
    pairs = [(path, float(c)) for path, c in zip(paths, named, strict=True) if c is not None]
    if not pairs:
        raise io.InputError(
            f"{data}: no counts.csv, no image name carries _C<count>_, and no label image "
            "(labels/ or masks/) gives a count"
        )
    return pairs


def image_key(path: str | Path, folder: str | Path) -> str:
    """How an evaluation row names an image: its path relative to the images' folder.

    The bare file name for an image directly in it (as before), ``sub/a.tif``
    for one in a sub-folder, so two sub-folders' ``a.tif`` stay two rows. An
    image elsewhere (an absolute path in ``counts.csv``) keeps its full path:
    ``/x/sub/a.tif`` and ``/x/sub2/a.tif`` are two rows, not one name twice.
    """
    path, folder = Path(path), Path(folder)
    for inside, base in ((path, folder), (Path(os.path.abspath(path)), os.path.abspath(folder))):
        try:
            return inside.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def made_with_text(seen: Mapping[str, Any] | None, *, model: str = "the model") -> str:
    """'N image(s) the model was made with (a trained on, b calibrated on, as its
    config.json records)' of :func:`evaluate_folder`'s ``seen``; '' when there are none.
    ``model`` names the model in it ('model nuclei')."""
    if not seen or not (n := seen.get("training", 0) + seen.get("calibration", 0)):
        return ""
    return (
        f"{n} image(s) {model} was made with ({seen['training']} trained on, "
        f"{seen['calibration']} calibrated on, as its config.json records)"
    )


def evaluate_folder(
    data: str | Path,
    *,
    model: str | Path | CellCounter = "bbbc005",
    level: float = 0.95,
    sites: Collection[int] | None = None,
    held_out: bool = False,
    progress: bool = False,
    exclude: Collection[str | Path] = (),
) -> dict[str, Any]:
    """Count every labelled image of ``data`` and measure the errors and intervals.

    ``data`` holds images with ``counts.csv``, or BBBC-style names carrying
    ``_C<n>_`` (see :func:`labelled_files`). ``model`` is a shipped model
    name, a model folder, or a :class:`~celltally.counter.CellCounter` (used
    as it is, e.g. with ``epistemic=True``). ``sites``, if given, keeps only
    the images whose names parse to one of these site numbers (e.g. ``{9,
    10}``, BBBC005's held-out sites); none left is an error. With
    ``held_out``, images the model's config records as its training or
    calibration images (:func:`celltally.uncertainty.seen_by_model`) are left
    out; without it they are counted and named in ``seen``. ``exclude``: files
    and folders this run writes (the report's, :func:`celltally.report.report_outputs`),
    never taken for images of the folder, as a report written into it would be.

    Returns a dict with ``model`` (its name), ``data``, ``level``,
    ``calibration`` (the interval method used), ``epistemic``, ``metrics``
    (overall 'all' and per 'blur=..,stain=..' group: MAE, RMSE, R², max
    |error|, coverage, interval width), ``wells`` (:func:`well_metrics`:
    per-well totals' errors and coverage, None when no well has two images),
    ``errors`` (one message per image that could not be counted), ``rows``
    (per image: file, true, count, std, low, high, blur, stain, warning) and
    ``unlabelled`` (images of the folder left out for want of a true count)
    and ``seen`` ({"training": n, "calibration": n, "left_out": held_out}: the
    images counted, or left out, that the model was made with; each row's
    ``seen`` says which, None for a held-out image). Also ``counts_csv`` (the
    file the true counts came from, None when names or label images gave them),
    ``unsearched`` (sub-folders holding images that were not looked at),
    ``flagged`` (:func:`celltally.calibration.flagged_summary`) and ``level_note`` (why ``level`` is
    beyond what the calibration guarantees, else None).
    """
    counter = model if isinstance(model, CellCounter) else CellCounter.from_pretrained(model)
    pairs = labelled_files(data, exclude=exclude)
    folder = io.images_folder(data)
    csv_path = io.counts_csv(data)
    outputs = _outputs(folder, exclude)
    labelled = {p.resolve() for p, _ in pairs}
    # unlabelled images: in the folders the labelled ones are in (counts.csv may name
    # sub-folders), not in others (masks/, a report's figures)
    listed: list[Path] = []
    unsearched: list[str] = []  # sub-folders of the folder with images of their own
    wheres = sorted({folder, *(p.parent for p, _ in pairs)})
    for where in wheres:
        try:
            found = io.iter_images(
                [where],
                exclude=sorted(outputs[1]),
                unsearched=unsearched if where == folder else None,
            )
            listed += _kept(sorted(found, key=str), outputs)
        except io.InputError:  # no image directly in it
            pass
    searched = {os.path.realpath(w) for w in wheres}  # counts.csv names images there
    unsearched = [
        s for s in unsearched if os.path.realpath(s) not in searched and not _figures_only(s)
    ]
    # an earlier report's figures (written into the folder) are no images left out
    unlabelled = [p for p in listed if p.resolve() not in labelled and not io.is_own_figure(p)]
    if sites is not None:
        pairs = [(p, c) for p, c in pairs if naming.parse_name(p.name).site in sites]
        if not pairs:
            raise io.InputError(f"{data}: no labelled image from sites {sorted(sites)}")
    from celltally.uncertainty import seen_by_model

    keys = {p: image_key(p, folder) for p, _ in pairs}  # how each image's row names it
    named: set[str] = set()
    for path, _ in pairs:  # 'a.tif' and its absolute path: one image, not two rows
        if (key := keys[path]) in named:
            raise io.InputError(
                f"{csv_path}: lists {key} twice (by its name and its full path?); list each "
                "image once"
            )
        named.add(key)
    seen = seen_by_model(counter.config, list(keys.values()), folder=data)
    roles = list(seen.values())
    seen_summary = {
        "training": roles.count("training"),
        "calibration": roles.count("calibration"),
        "left_out": held_out,
    }
    if held_out:
        pairs = [(p, c) for p, c in pairs if keys[p] not in seen]
        if not pairs:
            raise io.InputError(
                f"{data}: every labelled image is one model {counter.name} was trained or "
                "calibrated on (its config.json says so): none is held out"
            )
    truth = dict(pairs)
    rows, errors, failed = [], [], []
    results = counter.count_paths([p for p, _ in pairs], level=level)
    for path, result in tqdm(
        results, total=len(pairs), disable=None if progress else True, unit="img"
    ):
        if isinstance(result, Exception):
            errors.append(str(result))
            failed.append(keys[path])
            continue
        meta = result.metadata
        rows.append(
            {
                "file": keys[path],
                "true": truth[path],
                "count": round(result.count, 3),
                "std": round(result.std, 3),
                "low": round(result.low, 3),
                "high": round(result.high, 3),
                "blur": meta.get("blur"),
                "stain": meta.get("stain"),
                "warning": result.warning,
                "seen": seen.get(keys[path]),
            }
        )
    if not rows:
        raise io.InputError(f"{data}: no image could be counted ({errors[0] if errors else ''})")
    return {
        "model": counter.name,
        "data": str(data),
        "level": level,
        "calibration": counter.calibration_used,  # the interval method the figures used
        "epistemic": bool(counter.epistemic),
        "normalization": {**DEFAULT_NORMALIZATION, **counter.norm},  # as counted
        "metrics": grouped_metrics(rows, by=("blur", "stain")),
        "wells": well_metrics(rows, counter=counter, failed=failed),
        "errors": errors,
        "unlabelled": [str(p) for p in unlabelled],
        "counts_csv": str(csv_path) if csv_path.exists() else None,
        "unsearched": unsearched,
        "seen": seen_summary,
        "flagged": flagged_summary([r.get("warning") or "" for r in rows]),
        "level_note": counter.level_note(level),
        "rows": rows,
    }


def unlabelled_text(evaluation: Mapping[str, Any]) -> str:
    """'N image(s) of the folder left out: no true count (why; e.g. NAME)' of an
    :func:`evaluate_folder` result; '' when none was left out."""
    unlabelled = evaluation.get("unlabelled") or []
    if not unlabelled:
        return ""
    if evaluation.get("counts_csv"):  # names and label images are not read beside it
        why = (
            f"not in {Path(evaluation['counts_csv']).name}, which gives every true count "
            "when present: _C<n>_ in names and label images are not read"
        )
    else:
        why = "no _C<n>_ in the name, no label image"
    return (
        f"{len(unlabelled)} image(s) of the folder left out: no true count ({why}; e.g. "
        f"{Path(unlabelled[0]).name})"
    )


def unsearched_text(evaluation: Mapping[str, Any]) -> str:
    """The sub-folders with images that were not looked at, and how to evaluate them
    ('' when none): ``evaluate`` reads a folder's own images (and those counts.csv names)."""
    unsearched = evaluation.get("unsearched") or []
    if not unsearched:
        return ""
    more = len(unsearched) - 1
    return (
        f"sub-folder {unsearched[0]}"
        + (f" (and {more} more)" if more else "")
        + " holds images that were not searched: evaluate reads the folder's own images "
        "(and those counts.csv names); evaluate the sub-folder itself, or list every image, "
        "the folder's own too, in a counts.csv (names relative to the folder, e.g. "
        f"{Path(unsearched[0]).name}/a.tif)"
    )


def well_metrics(
    rows: list[dict[str, Any]], *, counter: CellCounter, failed: Sequence[str] = ()
) -> dict[str, Any] | None:
    """Errors and interval coverage of per-well totals (wells of two images or more).

    The totals are :func:`celltally.wells.aggregate_wells`'s, with the
    within-well correlation the model measured (else the default). ``failed``:
    names of images that could not be counted (each well row says how many of
    its images its total lacks). None when no well in the names holds two images.
    """
    from celltally.wells import aggregate_wells, block_correlation

    rho, fitted = block_correlation(
        counter.config.get("calibration"), epistemic=bool(counter.members)
    )
    table = [
        {
            "file": r["file"],
            "count": str(r["count"]),
            "std": str(r["std"]),
            "high": str(r["high"]),
            "true_count": str(r["true"]),
            "model": counter.name,
            "level": "",
            "warning": r.get("warning") or "",
        }
        for r in rows
    ]
    totals = aggregate_wells(table, correlation=rho, failed=failed)[0]
    wells = [w for w in totals if w["images"] >= 2]
    if not wells:
        return None
    keep: tuple[str, ...]
    keep = ("plate", "well", "stain", "images", "count", "low", "high", "true_count", "error")
    keep += ("warnings", "failed", "sites", "repeated_sites")  # a site twice: said, as count's
    return {
        **summarize_wells(wells),
        "correlation": rho,
        "correlation_source": "measured" if fitted else "assumed",
        "rows": [{k: w.get(k) for k in keep} for w in wells],
    }


def summarize_wells(wells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MAE, max |error|, interval coverage and mean half-width of per-well totals.

    ``wells``: rows of :func:`celltally.wells.aggregate_wells` whose true totals are known.
    """
    error = np.array([w["error"] for w in wells], dtype=float)
    inside = [w["low"] <= w["true_count"] <= w["high"] for w in wells]
    return {
        "n_wells": len(wells),
        "images_per_well": float(np.mean([w["images"] for w in wells])),
        "mae": float(np.abs(error).mean()),
        "max_abs_error": float(np.abs(error).max()),
        "coverage": float(np.mean(inside)),
        "mean_half_width": float(np.mean([w["high"] - w["count"] for w in wells])),
    }
