"""Evaluate a model on a labelled folder: per-image rows and grouped metrics."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from celltally import io, naming
from celltally.counter import CellCounter
from celltally.metrics import grouped_metrics
from celltally.transforms import DEFAULT_NORMALIZATION


def labelled_files(data: str | Path) -> list[tuple[Path, float]]:
    """(image path, true count) from ``counts.csv`` if present, else from ``_C<n>_`` names,
    else from the image's label image in ``labels/`` or ``masks/`` (its number of
    objects, as ``train`` counts it)."""
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
    paths = io.list_images([folder])
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
    for one in a sub-folder, so two sub-folders' ``a.tif`` stay two rows.
    """
    try:
        return Path(path).relative_to(Path(folder)).as_posix()
    except ValueError:
        return Path(path).name


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
    out; without it they are counted and named in ``seen``.

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
    ``seen`` says which, None for a held-out image).
    """
    counter = model if isinstance(model, CellCounter) else CellCounter.from_pretrained(model)
    pairs = labelled_files(data)
    folder = io.images_folder(data)
    labelled = {p.resolve() for p, _ in pairs}
    # unlabelled images: in the folders the labelled ones are in (counts.csv may name
    # sub-folders), not in others (masks/, a report's figures)
    listed: list[Path] = []
    for where in sorted({folder, *(p.parent for p, _ in pairs)}):
        try:
            listed += io.list_images([where])
        except io.InputError:  # no image directly in it
            pass
    unlabelled = [p for p in listed if p.resolve() not in labelled]
    if sites is not None:
        pairs = [(p, c) for p, c in pairs if naming.parse_name(p.name).site in sites]
        if not pairs:
            raise io.InputError(f"{data}: no labelled image from sites {sorted(sites)}")
    from celltally.uncertainty import seen_by_model

    keys = {p: image_key(p, folder) for p, _ in pairs}  # how each image's row names it
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
        "seen": seen_summary,
        "rows": rows,
    }


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
    keep += ("warnings", "failed")
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
