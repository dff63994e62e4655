"""Command line: each command only parses arguments and calls the library."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer

#: Largest --seed (NumPy's seeds are 32-bit).
SEED_MAX = 2**32 - 1

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Count cells in microscopy images, with calibrated 95% intervals.",
    pretty_exceptions_enable=False,
    # plain help: typer's rich panels print on/off flags with a "<bool>" type, as if
    # they took a value
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from celltally import __version__

        typer.echo(f"celltally {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Count cells in microscopy images, with calibrated 95% intervals."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``kill``), handled as Ctrl-C is: work done is kept."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one, during the clean-up, kills
    raise Terminated


def _no_op() -> None:
    return None


def _sigterm_as_interrupt() -> Callable[[], None]:
    """While a job that cleans up (count, train, simulate) runs, SIGTERM is Ctrl-C.

    (:class:`Terminated`, a KeyboardInterrupt.)

    Only where SIGTERM has its default action (a caller that ignores or handles
    it keeps its way) and in the main thread. Returns the function that puts
    the default back.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        return _no_op
    signal.signal(signal.SIGTERM, _on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return restore


def _other_rank(rank: str | None) -> bool:
    """Whether ``rank`` (torchrun's ``RANK``) names a process other than rank 0."""
    return rank not in (None, "", "0")


def fail(message: str | BaseException, code: int = 2, *, rank: str | None = None) -> NoReturn:
    """Print a one-line error and exit non-zero (no traceback).

    An ``OSError`` (an output path under a file, a folder where a file goes, no
    permission) is told as ``path: reason``. Under torchrun (``rank``, from
    ``RANK``) every process but rank 0 names its rank, so N copies of one
    error read as one error said by N processes.
    """
    if isinstance(message, OSError) and message.strerror:
        # a rename names its target second: that is the path the user gave
        where = message.filename2 or message.filename or ""
        message = f"{where}: {message.strerror.lower()}" if where else message.strerror
    who = f"rank {rank}: " if _other_rank(rank) else ""
    typer.echo(f"{who}error: {message}", err=True)
    raise typer.Exit(code)


#: Figure formats of --plate-map and explain --out (matplotlib's common ones).
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".tif", ".tiff")


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def _check_output(
    path: Path | None,
    option: str,
    *,
    folder: bool,
    image: bool = False,
    table: str = ".csv",
    beside: bool = False,
) -> None:
    """Fail now, before any work, if ``path`` cannot be written as a file (or folder).

    Nothing is created or removed: a folder where a file goes, a file where a
    folder goes, a path under a file, or a parent without write permission is
    refused; so is a table's path with an image suffix (it could be an input),
    unless the output is an ``image`` (a figure); a figure may replace only a
    figure (:func:`celltally.io.is_own_figure`), never another image file.
    ``table`` is the suffix a table output takes, named in that refusal.
    ``beside``: files are also written next to it (count's errors file and
    manifest), so an existing file's folder must be writable too.
    """
    import os

    from celltally.io import IMAGE_SUFFIXES

    if path is None:
        return
    if folder and path.exists() and not path.is_dir():
        fail(f"{option} {path}: is a file; give a folder")
    if not folder:
        if path.is_dir():
            fail(f"{option} {path}: is a folder; give a file name")
        if not image and path.suffix.lower() in IMAGE_SUFFIXES:
            fail(f"{option} {path}: names an image file; give a {table} name")
    if image:
        from celltally.io import figure_path, is_own_figure

        written = figure_path(path)  # a name without a suffix is written as NAME.png
        if written.is_file() and written.suffix.lower() in (*IMAGE_SUFFIXES, ".pdf", ".svg"):
            if not is_own_figure(written):  # e.g. another image of the folder being counted
                where = f"{option} {path}: " + ("" if written == path else f"{written} ")
                fail(
                    f"{where}exists and is not a figure celltally wrote (an image to "
                    "count, or a figure of yours?); name a new file, or delete it first "
                    "(figures written before "
                    "celltally marked its figures, 2026-11-27, are refused too)"
                )
    if not folder and path.exists():  # written in place: the file's own permission counts
        if not os.access(path, os.W_OK):
            fail(f"{option} {path}: no permission to write it")
        if not beside:
            return
    existing = _nearest_existing(path if folder else path.parent)
    if not existing.is_dir():
        fail(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{option} {path}: no permission to write in {existing}")


def _check_own_table(path: Path | None, option: str, columns: Sequence[str]) -> None:
    """Fail now if ``path`` is an existing file that is not a table celltally wrote: its
    header must begin with ``columns`` (a rerun writes over its own, never a user's)."""
    if path is None or not path.is_file():
        return
    try:
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
            header = next(csv.reader(handle), [])
    except OSError as err:
        fail(f"{option} {path}: cannot be read ({err.strerror or err})")
    if header[: len(columns)] != list(columns):
        fail(
            f"{option} {path}: exists and is not a table celltally wrote (its header is not "
            f"{','.join(columns[:3])},...); name a new file, or delete it first"
        )


def _silent(_: str) -> None:
    return None


def _test_figures(test: dict) -> str:
    """'(N images): MAE .., max error .., R² .., 95% interval coverage ..' of a metrics block."""
    nan = float("nan")
    return (
        f"({int(test.get('n', 0))} images): MAE {test.get('mae', nan):.2f}, "
        f"max error {test.get('max_abs_error', nan):.1f}, R² {test.get('r2', nan):.3f}, "
        f"95% interval coverage {test.get('coverage', nan):.1%}"
    )


def _interrupted(what: str) -> NoReturn:
    """Ctrl-C: one line on stderr saying what is kept, exit status 130 (SIGTERM: 143)."""
    if isinstance(sys.exc_info()[1], Terminated):  # e.g. SLURM's time limit
        typer.echo(f"terminated (SIGTERM): {what}", err=True)
        raise typer.Exit(143) from None
    typer.echo(f"interrupted: {what}", err=True)
    raise typer.Exit(130) from None


def _clear_demo_plate(plate: Path) -> None:
    """Remove the files an earlier ``demo`` simulated into ``plate`` (and nothing else)."""
    from celltally.simulate import FILENAME_PATTERN, PLATE_FOLDERS

    for sub in PLATE_FOLDERS:
        if (plate / sub).is_dir():
            for path in (plate / sub).iterdir():
                if path.is_file() and FILENAME_PATTERN.match(path.name):
                    path.unlink()
    (plate / "counts.csv").unlink(missing_ok=True)


def _collective_error(err: BaseException) -> bool:
    """Whether ``err`` is torch.distributed's own: a collective that broke because another
    process failed or left (gloo and NCCL raise plain RuntimeErrors as well)."""
    import torch.distributed as dist

    text = str(err)
    # DistError since torch 2.1; torch 2.0's collectives raise plain RuntimeErrors
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        mark in text for mark in ("gloo", "NCCL", "Connection closed by peer", "c10d")
    )


def _user_errors():
    from celltally import io

    return (io.InputError, io.ImageReadError, ValueError, OSError)


def _image_options(
    model: str,
    *,
    channel: int | None,
    norm_low: float | None,
    norm_high: float | None,
    no_norm: bool,
    pixel_size: float | None,
    diameter: float | None,
    tile: int | None,
    background: str | None = None,
    rescale: float | None = None,
) -> dict:
    """``CellCounter`` keywords for the reading, normalization and scale flags (only those set)."""
    from celltally.model_folder import read_model_config, resolve_model
    from celltally.tiling import merge_normalization

    options: dict = {}
    if channel is not None:
        options["channel"] = channel
    if no_norm or norm_low is not None or norm_high is not None or background is not None:
        config = read_model_config(resolve_model(model))
        options["norm"] = merge_normalization(
            config.get("normalization"),
            low=norm_low,
            high=norm_high,
            disable=no_norm,
            background=background,
        )
        own = (config.get("normalization") or {}).get("background", "none")
        if background is not None and background != own:
            typer.echo(
                f"note: --background {background}: the model's intervals and out-of-"
                f"distribution checks were calibrated with background {own}; for intervals "
                f"that hold, calibrate a copy: celltally calibrate --model {model} --data "
                f"FOLDER --background {background} --out NEW",
                err=True,
            )
        own_norm = merge_normalization(config.get("normalization"))
        if {"background": "none", **options["norm"]} == {"background": "none", **own_norm}:
            del options["norm"]  # the model's own settings, repeated: the same run
    if pixel_size is not None:
        options["pixel_size"] = pixel_size
    if diameter is not None:
        options["diameter"] = diameter
    if rescale is not None and rescale != 1.0:  # 1: the model's own scale, as without it
        options["rescale"] = rescale
    if tile is not None:
        if tile < 32 or tile % 32:
            raise ValueError(f"--tile must be a positive multiple of 32, got {tile}")
        options["tile"] = tile  # the model's own rule (stride, margin): CellCounter checks it
    return options


#: ``--channel``, the same on every command that reads images.
ChannelOption = Annotated[
    int | None,
    typer.Option(
        help="Channel (0-based) of multi-channel images (e.g. OME-TIFF); required when "
        "a (C, Y, X) file's channels differ, unless the model records the channel it was "
        "trained on (celltally models). RGB without it: the mean of the colours (one stain "
        "in grey or one colour; a composite of stains, or a table such as 'fire', needs it)."
    ),
]


#: ``--threads`` on the commands that run a network over many images.
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="torch threads (default one per core; on a busy CPU 1 may be faster: measure)."
    ),
]


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


#: Normalization, scale and tiling flags, the same on ``count`` and ``evaluate``.
NormLowOption = Annotated[
    float | None, typer.Option(help="Lower normalization percentile (default: the model's).")
]
NormHighOption = Annotated[
    float | None, typer.Option(help="Upper normalization percentile (default: the model's).")
]
NoNormOption = Annotated[
    bool,
    typer.Option("--no-norm", help="No intensity normalization (images already scaled 0-1)."),
]
CalibrationOption = Annotated[
    str | None,
    typer.Option(
        help="Interval method: conformal, temperature or gaussian (default: the model's, "
        "conformal for the shipped ones)."
    ),
]
BackgroundOption = Annotated[
    str | None,
    typer.Option(
        help="Subtract a smooth background (uneven illumination, vignetting) before "
        "normalizing: quadratic, or none (default: the model's, as celltally models shows it)."
    ),
]
PixelSizeOption = Annotated[
    float | None,
    typer.Option(
        help="Pixel size of the images, um: rescales them to the model's scale (needs a "
        "model that records its pixel size, as train --pixel-size does; no shipped model "
        "does: use --rescale or --diameter)."
    ),
]
DiameterOption = Annotated[
    float | None,
    typer.Option(
        help="Typical cell/nucleus diameter in the images, px: rescales them to the model's "
        "scale (needs a model that records one: nuclei, 28.3 px; leave it out at the "
        "model's own magnification)."
    ),
]
RescaleOption = Annotated[
    float | None,
    typer.Option(
        help="Resize the images by this factor before counting (any model with a density "
        "head, as every shipped one): 2 for "
        "images binned 2 x 2 or taken at half the model's magnification (cells half as wide "
        "as in its training images), 0.5 for twice it."
    ),
]
TileOption = Annotated[
    int | None,
    typer.Option(
        help="Window side (model px) for images larger than one frame "
        "(default: the model's, else 512)."
    ),
]


def _check_level(level: float) -> None:
    from celltally.calibration import MAX_LEVEL, valid_level

    if not valid_level(level):
        fail(
            f"--level must be between 0 and 1 (0.95 for a 95% interval; at most "
            f"{MAX_LEVEL:.9f}), got {level}"
        )


def _interval_options(epistemic: bool, calibration: str | None, model: str | None = None) -> dict:
    """``CellCounter.from_pretrained`` keywords for the interval flags (only those set).

    A ``calibration`` that is ``model``'s own default is left out: the same run as
    without it (a resume with it spelt out was refused as another setting).
    """
    options: dict = {}
    if epistemic:
        options["epistemic"] = True
    if calibration is not None:
        options["calibration"] = calibration
        if model is not None:
            from celltally.calibration import DEFAULT_METHOD
            from celltally.model_folder import read_model_config, resolve_model

            try:
                own = (read_model_config(resolve_model(model)).get("calibration") or {}).get(
                    "default", DEFAULT_METHOD
                )
            except (OSError, ValueError):
                own = None  # an unknown model: its own error comes when it is loaded
            if calibration == own:
                del options["calibration"]
    return options


@app.command(
    help="Count cells in images; append one CSV row per image as it is counted (resumable)."
    "\n\nRows are in processing order. Unreadable images are listed at the end (exit status "
    "1). Beside OUT (say results.csv): results.errors.csv lists them (an earlier run's stay "
    "listed, and the exit status 1, until their files are counted or deleted), "
    "results.manifest.json records the model and settings."
)
def count(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="CSV file for the results. Rerunning with the same --out resumes: images "
            "already in it are skipped.",
        ),
    ] = Path("results.csv"),
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "bbbc005",
    level: Annotated[float, typer.Option(help="Interval level, e.g. 0.95.")] = 0.95,
    save_masks: Annotated[
        Path | None, typer.Option(help="Folder for mask PNGs and uncertainty TIFFs.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per network batch.")] = 16,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Start --out again instead of resuming it.")
    ] = False,
    dask: Annotated[
        str | None,
        typer.Option(
            help="Run on a Dask cluster: scheduler address (tcp://host:8786) or local:N "
            "(N one-thread worker processes here).",
        ),
    ] = None,
    chunk_size: Annotated[
        int | None, typer.Option(help="Images per Dask task (default 2 x batch size).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch threads here (default one per core; on a busy CPU 1 may be faster)."
        ),
    ] = None,
    read_threads: Annotated[
        int,
        typer.Option(
            help="Threads reading images ahead of the network, per process or Dask worker "
            "(0: read in the counting thread, for strictly one-core jobs).",
        ),
    ] = 2,
    epistemic: Annotated[
        bool,
        typer.Option(
            help="Count with the model's ensemble (ensemble_<k> files): the mean of its "
            "counters, their spread added to the std."
        ),
    ] = False,
    calibration: CalibrationOption = None,
    channel: ChannelOption = None,
    norm_low: NormLowOption = None,
    norm_high: NormHighOption = None,
    no_norm: NoNormOption = False,
    background: BackgroundOption = None,
    pixel_size: PixelSizeOption = None,
    diameter: DiameterOption = None,
    rescale: RescaleOption = None,
    tile: TileOption = None,
    save_labels: Annotated[
        Path | None,
        typer.Option(
            help="Folder for per-object output: <stem>_labels.tif (instances), "
            "<stem>_objects.csv (label, centroid, area), <stem>_overlay.png (a dot per cell); "
            "also the masks (<stem>_mask.png, <stem>_mask_std.tif) unless --save-masks names "
            "another folder."
        ),
    ] = None,
    table_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="celltally, or cellprofiler: also write <out stem>_Image.csv with "
            "ImageNumber, FileName, PathName, Metadata_Plate/Well/Site/Channel, Count, Count_Low, "
            "Count_High, Count_Std, Warning.",
        ),
    ] = "celltally",
    wells: Annotated[
        Path | None,
        typer.Option(
            help="Also write per-well totals here: the sites of each plate/well/stain "
            "summed, with an interval (see `celltally wells`).",
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar (when writing to a terminal).")
    ] = True,
) -> None:
    """Count cells in images into a resumable CSV (help text: the decorator's)."""
    from celltally.batch import read_results, run_batch, with_absolute_files

    def note(message: str) -> None:
        typer.echo(message, err=True)

    if table_format not in ("celltally", "cellprofiler"):
        fail(f"--format must be celltally or cellprofiler, not {table_format!r}")
    if save_labels is not None and save_masks is None:
        save_masks = save_labels  # the per-object pass reads the masks from there
    from celltally.batch import run_files

    # the files this run writes besides --out's own: none may be another's
    taken = run_files(out)
    if table_format == "cellprofiler":
        taken.add(out.with_name(f"{out.stem}_Image.csv").resolve())
    for option, path in (("--wells", wells), ("--save-labels", save_labels)):
        if path is not None and path.resolve() in taken:
            fail(f"{option} {path}: is one of this run's output files (--out {out}); name another")
    _check_output(out, "--out", folder=False, beside=True)  # + its errors file, manifest
    _check_output(wells, "--wells", folder=False)
    from celltally.objects import CELLPROFILER_COLUMNS
    from celltally.wells import WELL_COLUMNS

    _check_own_table(wells, "--wells", WELL_COLUMNS)  # a user's CSV was written over
    if table_format == "cellprofiler":
        table = out.with_name(f"{out.stem}_Image.csv")
        _check_own_table(table, "--format cellprofiler", CELLPROFILER_COLUMNS)
    _check_output(save_labels, "--save-labels", folder=True)  # first: it may set --save-masks
    _check_output(save_masks, "--save-masks", folder=True)
    restore_sigterm: Callable[[], None] = _no_op
    try:  # (inside: a SIGTERM the moment it is taken over is caught too)
        restore_sigterm = _sigterm_as_interrupt()
        options = _interval_options(epistemic, calibration, model)
        options.update(
            _image_options(
                model,
                channel=channel,
                norm_low=norm_low,
                norm_high=norm_high,
                no_norm=no_norm,
                background=background,
                pixel_size=pixel_size,
                diameter=diameter,
                rescale=rescale,
                tile=tile,
            )
        )
        summary = run_batch(
            paths,
            out=out,
            model=model,
            level=level,
            batch_size=batch_size,
            save_masks=save_masks,
            recursive=recursive,
            overwrite=overwrite,
            dask=dask,
            chunk_size=chunk_size,
            threads=threads,
            read_threads=read_threads,
            progress=progress,
            log=note,
            counter_options=options,
            exclude=[save_labels] if save_labels is not None else [],
        )
        rows = read_results(out) if out.exists() else []  # this run's and earlier runs'
        if save_labels is not None:
            from celltally.io import file_identity, iter_images, output_root
            from celltally.objects import save_objects_for_rows

            root = summary.output_root or output_root(paths)
            # rows an earlier run wrote for other inputs have no masks from this one
            inputs = {
                file_identity(p)
                for p in iter_images(
                    paths, recursive=recursive, exclude=[d for d in (save_masks, save_labels) if d]
                )
            }
            # each row's file from the folder its run worked in, however spelt (links)
            mine = [r for r in with_absolute_files(out, rows) if file_identity(r["file"]) in inputs]
            assert save_masks is not None  # --save-labels sets it when not given
            from celltally.model_folder import read_model_config, recorded_channel, resolve_model

            n = save_objects_for_rows(
                mine,
                masks_dir=save_masks,
                out_dir=save_labels,
                root=root,
                channel=channel,
                default_channel=recorded_channel(read_model_config(resolve_model(model))),
            )
            typer.echo(f"per-object labels, tables and overlays of {n} image(s) -> {save_labels}")
            if other := len(rows) - len(mine):
                typer.echo(
                    f"{other} earlier row(s) of {out} are not among this run's images: no "
                    "labels for them (count them with --save-labels to get them)"
                )
        if table_format == "cellprofiler":
            from celltally.objects import write_cellprofiler_csv

            # CellProfiler's PathName is absolute: each row's folder from where its run worked
            placed = with_absolute_files(out, rows)
            table = write_cellprofiler_csv(out.with_name(f"{out.stem}_Image.csv"), placed)
            typer.echo(f"CellProfiler-style per-image table -> {table}")
        if wells is not None:
            _echo_wells(out, wells, None)
    except _user_errors() as err:
        fail(err)
    except KeyboardInterrupt:
        _interrupted(
            f"the rows written so far are kept in {out}; run the same command again to count "
            "the rest"
        )
    finally:
        restore_sigterm()
    total = summary.counted + summary.failed
    skipped = f" ({summary.skipped} already in {out}, skipped)" if summary.skipped else ""
    if summary.masks_only:
        skipped += f"; {summary.masks_only} of those counted again for their missing masks"
    rate = f", {summary.counted / summary.seconds:.1f} img/s" if summary.counted > 1 else ""
    took = f" in {summary.seconds:.1f} s{rate}" if summary.counted and summary.seconds > 0 else ""
    if total == 0 and summary.skipped and not summary.masks_only:
        typer.echo(f"nothing new to count: all {summary.skipped} images are already in {out}")
    else:
        typer.echo(f"counted {summary.counted} of {total} images{skipped}{took} -> {out}")
    _echo_warnings([r.get("warning") or "" for r in rows], f"in {out}", "column 'warning'")
    if summary.unsearched:
        more = len(summary.unsearched) - 1
        typer.echo(
            f"note: sub-folder {summary.unsearched[0]}"
            + (f" (and {more} more)" if more else "")
            + " holds images that were not searched; --recursive counts them too",
            err=True,
        )
    if summary.unread:
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in summary.unread.items())
        typer.echo(
            f"note: {sum(summary.unread.values())} file(s) in formats celltally does not read "
            f"were left out ({kinds}); export them as TIFF to count them",
            err=True,
        )
    if summary.failed:
        for message in summary.errors:
            typer.echo(f"error: {message}", err=True)
        more = summary.failed - len(summary.errors)
        if more:
            typer.echo(f"... and {more} more", err=True)
        typer.echo(
            f"{summary.failed} file(s) could not be read (listed in {summary.errors_file})",
            err=True,
        )
    if summary.earlier_failed:
        typer.echo(
            f"warning: {summary.earlier_failed} image(s) that an earlier run could not read "
            f"were not among this run's inputs: still listed in {summary.errors_file} and "
            "missing from the results (count them again, or remove the files)",
            err=True,
        )
    if summary.unlisted:
        more = len(summary.unlisted) - 1
        typer.echo(
            f"error: cannot list {summary.unlisted[0]}"
            + (f" (and {more} more sub-folder(s))" if more else "")
            + "; the images there were not counted: make it readable and run the same "
            "command again to count them",
            err=True,
        )
    if summary.failed or summary.earlier_failed or summary.unlisted:
        raise typer.Exit(1)


def _echo_warnings(warnings: Sequence[str], where: str, see: str) -> None:
    """How many images were flagged unlike the calibration images, and how many low-contrast.

    Each kind is counted apart: a low-contrast frame alone is not "unlike".
    ``where`` follows "N of M images" (e.g. "in results.csv"), ``see`` says where
    the warnings are.
    """
    import statistics

    from celltally.calibration import flagged_sentences, suggested_rescale

    of = f"{len(warnings)} images{' ' + where if where else ''}"
    unlike, empty = flagged_sentences(warnings, of=of, see=see)
    if unlike:
        typer.echo(unlike)
    if factors := [f for w in warnings if (f := suggested_rescale(w)) is not None]:
        typical = statistics.median(factors)
        typer.echo(
            f"{len(factors)} of them have objects wider or narrower than the calibration "
            "images' (their warnings say how much): if they were taken at another "
            f"magnification, count them again with --rescale {typical:.2g} (the median of "
            "their factors; or --diameter)"
        )
    if empty:
        typer.echo(empty)


def _fmt_number(value: object) -> str:
    try:
        return f"{float(value):.3f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"


def _echo_wells(
    results: Path,
    out: Path,
    correlation: float | None,
    plate_map: Path | None = None,
    map_value: str = "count",
    plate_format: int | None = None,
    *,
    strict: bool = False,
) -> None:
    """Write and report per-well totals; ``strict``: no well in the names is an error."""
    from celltally.platemap import plate_shape
    from celltally.wells import REPEATED_SITES_CAUSE, fewer_sites, well_totals

    if map_value not in ("count", "mean_per_image"):
        raise ValueError(f"--map-value must be count or mean_per_image, not {map_value!r}")
    if plate_format is not None:
        try:
            plate_shape(plate_format)
        except ValueError as err:
            raise ValueError(f"--plate-format: {err}") from None
    rows, skipped, notes = well_totals(
        results,
        out,
        correlation=correlation,
        require_wells=strict,
        warn=lambda text: typer.echo(f"warning: {text}", err=True),
    )
    value = {r.get("model"): r.get("correlation") for r in rows if r.get("correlation") != ""}
    used = "; ".join(f"{m or '?'} {_fmt_number(value.get(m))}, {note}" for m, note in notes.items())
    if not rows:
        typer.echo(f"warning: no file name in {results} carries a well: no well totals", err=True)
    parts = [f"within-well correlation {used}"] if used else []
    if skipped:
        parts.append(f"{skipped} image(s) without a well in the name left out")
    said = f" ({'; '.join(parts)})" if parts else ""
    typer.echo(f"{len(rows)} well total(s) -> {out}{said}")
    if repeated := sum(1 for r in rows if r.get("repeated_sites")):
        typer.echo(
            f"warning: {repeated} well(s) hold a site more than once (column "
            f"'repeated_sites'; {REPEATED_SITES_CAUSE}): their totals count it twice",
            err=True,
        )
    if short := fewer_sites(rows):
        row, usual = short[0]
        typer.echo(
            f"warning: {len(short)} well(s) have fewer images than most wells of their plate "
            f"(e.g. {row['well']}: {int(row['images']) + int(row['failed'] or 0)} of {usual}; "
            "column 'sites'): their totals cover fewer sites",
            err=True,
        )
    partial = sum(1 for r in rows if r.get("failed"))
    if partial:
        typer.echo(
            f"warning: {partial} well(s) include images that could not be counted "
            "(column 'failed'): their totals cover only the images that were",
            err=True,
        )
    if plate_map is not None:
        from celltally.platemap import plot_plate_maps

        drawn = plot_plate_maps(rows, plate_map, value=map_value, plate_format=plate_format)
        typer.echo(f"plate map -> {drawn}")


@app.command()
def wells(
    results: Annotated[Path, typer.Argument(help="Results CSV written by `celltally count`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV for the totals.")] = Path(
        "wells.csv"
    ),
    correlation: Annotated[
        float | None,
        typer.Option(
            help="Within-well correlation of the images' errors, 0-1 (default: the value the "
            "model measured on its calibration wells, else 0.1).",
        ),
    ] = None,
    plate_map: Annotated[
        Path | None,
        typer.Option(
            help="Also draw the totals on each plate's grid of wells into this PNG (wells "
            "with flagged or uncounted images outlined red).",
        ),
    ] = None,
    map_value: Annotated[
        str,
        typer.Option(help="What the plate map shows: count (the well's total) or mean_per_image."),
    ] = "count",
    plate_format: Annotated[
        int | None,
        typer.Option(
            help="Wells per plate for the map (6, 12, 24, 48, 96, 384, 1536; default: the "
            "smallest that holds the wells named)."
        ),
    ] = None,
) -> None:
    """Per-well totals: the sites of each plate/well/stain summed, with their interval.

    The well comes from the file names (e.g. plate_B03_s2_w1.tif). The total's std
    combines the sites' stds with the within-well error correlation; the interval
    uses the model's multiplier at the results' level.
    """
    if plate_map is not None:
        if plate_map.suffix.lower() not in FIGURE_SUFFIXES + ("",):
            fail(f"--plate-map {plate_map}: give a figure file ({', '.join(FIGURE_SUFFIXES)})")
        if plate_map.resolve() == out.resolve():
            fail(f"--plate-map {plate_map}: is the totals file (--out); name another")
    _check_output(plate_map, "--plate-map", folder=False, image=True)
    from celltally.wells import WELL_COLUMNS

    _check_own_table(out, "--out", WELL_COLUMNS)
    try:
        _echo_wells(results, out, correlation, plate_map, map_value, plate_format, strict=True)
    except _user_errors() as err:
        fail(err)


@app.command()
def evaluate(
    data: Annotated[
        Path,
        typer.Argument(
            help="Folder: images + counts.csv, BBBC005 names (_C<n>_), or label images in labels/."
        ),
    ],
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "bbbc005",
    out: Annotated[Path, typer.Option(help="JSON file for the metrics.")] = Path("evaluation.json"),
    level: Annotated[float, typer.Option(help="Interval level.")] = 0.95,
    sites: Annotated[
        str | None,
        typer.Option(help="Only these sites, e.g. '9,10' or '1-8' (BBBC005 held-out: 9-10)."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Folder for an HTML report: plots, reliability diagram, failures."),
    ] = None,
    held_out: Annotated[
        bool,
        typer.Option(
            "--held-out",
            help="Leave out the images the model was trained or calibrated on (as its "
            "config.json records them), so the figures are held-out ones.",
        ),
    ] = False,
    epistemic: Annotated[
        bool,
        typer.Option(
            help="Count with the model's ensemble (ensemble_<k> files): their mean, their "
            "spread in the interval."
        ),
    ] = False,
    calibration: CalibrationOption = None,
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar (when writing to a terminal).")
    ] = True,
    channel: ChannelOption = None,
    norm_low: NormLowOption = None,
    norm_high: NormHighOption = None,
    no_norm: NoNormOption = False,
    background: BackgroundOption = None,
    pixel_size: PixelSizeOption = None,
    diameter: DiameterOption = None,
    rescale: RescaleOption = None,
    tile: TileOption = None,
    threads: ThreadsOption = None,
) -> None:
    """MAE, RMSE, R², max error, interval coverage and width, overall and per blur x stain."""
    from celltally.counter import CellCounter
    from celltally.evaluation import (
        evaluate_folder,
        made_with_text,
        unlabelled_text,
        unsearched_text,
    )
    from celltally.metrics import format_table

    _check_level(level)
    _check_output(out, "--out", folder=False, table=".json")
    if out.suffix.lower() != ".json":  # e.g. the data's own counts.csv: never written over
        fail(f"--out {out}: give a .json name (evaluate writes its metrics as JSON)")
    _check_output(report, "--report", folder=True)
    outputs: list[Path] = []  # never taken for images: a report written into the data folder
    try:
        if report is not None:
            from celltally.report import check_report_folder, report_outputs

            check_report_folder(report)  # before counting: never over a file of the user's
            outputs = report_outputs(report)
        _set_threads(threads)
        site_set = _site_numbers(sites) if sites else None
        options = _image_options(
            model,
            channel=channel,
            norm_low=norm_low,
            norm_high=norm_high,
            no_norm=no_norm,
            background=background,
            pixel_size=pixel_size,
            diameter=diameter,
            rescale=rescale,
            tile=tile,
        )
        counter = CellCounter.from_pretrained(
            model, epistemic=epistemic, calibration=calibration, **options
        )
        if (level_note := counter.level_note(level)) is not None:
            typer.echo(f"note: {level_note}", err=True)
        result = evaluate_folder(
            data,
            model=counter,
            level=level,
            sites=site_set,
            held_out=held_out,
            progress=progress,
            exclude=outputs,
        )
    except _user_errors() as err:
        fail(err)
    typer.echo(format_table(result["metrics"]))
    if made_with := made_with_text(result["seen"]):
        if held_out:
            typer.echo(f"left out {made_with}")
        else:
            typer.echo(
                f"warning: {made_with}: their errors and coverage are not held-out figures "
                "(--held-out leaves them out)",
                err=True,
            )
    from celltally.calibration import level_text

    if wells := result.get("wells"):
        typer.echo(
            f"per-well totals ({wells['n_wells']} wells of {wells['images_per_well']:.1f} images, "
            f"{wells['correlation_source']} within-well correlation {wells['correlation']:.3f}): "
            f"MAE {wells['mae']:.2f}, max {wells['max_abs_error']:.2f}, "
            f"{level_text(level)} coverage {wells['coverage']:.1%}, "
            f"mean half-width {wells['mean_half_width']:.2f}"
        )
        if repeated := sum(1 for r in wells["rows"] if r.get("repeated_sites")):
            from celltally.wells import REPEATED_SITES_CAUSE

            typer.echo(  # as `count --wells` says it
                f"warning: {repeated} well(s) hold a site more than once ('repeated_sites' "
                f"in their well rows in {out}; {REPEATED_SITES_CAUSE}): their totals count it "
                "twice",
                err=True,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    from celltally.metrics import json_ready

    out.write_text(json.dumps(json_ready(result), indent=2) + "\n")
    if left_out := unlabelled_text(result):
        typer.echo(left_out)
    if unsearched := unsearched_text(result):
        typer.echo(f"note: {unsearched}", err=True)
    warnings = [r.get("warning") or "" for r in result["rows"]]
    _echo_warnings(warnings, "", f"'warning' in their rows in {out}")
    typer.echo(f"metrics -> {out}")
    if report is not None:
        from celltally.report import write_report

        try:
            index = write_report(result, report, counter=counter, data=data, progress=progress)
        except _user_errors() as err:
            fail(err)
        typer.echo(f"report -> {index}")
    if errors := result.get("errors"):
        for message in errors:
            typer.echo(f"error: {message}", err=True)
        n = len(errors) + len(result["rows"])
        typer.echo(
            f"{len(errors)} of {n} images could not be counted; the metrics above are of the "
            f"other {len(result['rows'])}",
            err=True,
        )
        raise typer.Exit(1)


def _site_numbers(text: str) -> set[int]:
    """``--sites``: '9,10', '1-8' or '1-4,9' -> the site numbers."""
    from celltally import io

    found: set[int] = set()
    for part in text.split(","):
        bounds = part.strip().split("-")
        try:
            lo, hi = int(bounds[0]), int(bounds[-1])
        except ValueError:
            lo = hi = -1
        if len(bounds) > 2 or lo < 0 or hi < lo:
            raise io.InputError(f"--sites: expected numbers like '9,10' or '1-8', got {text!r}")
        found.update(range(lo, hi + 1))
    return found


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    images: Annotated[int, typer.Option(help="Number of scenes.")] = 24,
    counts: Annotated[str, typer.Option(help="Count range 'lo-hi' or one number.")] = "1-100",
    blur: Annotated[str, typer.Option(help="Blur levels, e.g. '1,23,48'.")] = "1,23,48",
    stain: Annotated[str, typer.Option(help="Stains, '1', '2' or '1,2'.")] = "1,2",
    seed: Annotated[
        int, typer.Option(min=0, max=SEED_MAX, help="Random seed (same seed, same bytes).")
    ] = 0,
    size: Annotated[
        str,
        typer.Option(
            help="WIDTHxHEIGHT. Cells and blur scale with the frame (another magnification, "
            "the same field of view): 348x260 holds the same cells at half the width and height."
        ),
    ] = "696x520",
    bit_depth: Annotated[int, typer.Option(help="8 or 16.")] = 8,
    workers: Annotated[int, typer.Option(help="Processes.")] = 1,
) -> None:
    """Write a simulated BBBC005-style plate: TIFFs, masks, labels and counts.csv."""
    from celltally.simulate import parse_count_range, simulate_plate

    restore_sigterm: Callable[[], None] = _no_op
    try:
        # SIGTERM as Ctrl-C: the plate's staging folder is removed, not left behind
        restore_sigterm = _sigterm_as_interrupt()
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            fail(f"--size must be WIDTHxHEIGHT in pixels, e.g. 696x520, got {size!r}")
        try:
            blur_levels = [int(b) for b in blur.split(",")]
            stain_ids = [int(s) for s in stain.split(",")]
        except ValueError:
            fail("--blur and --stain take whole numbers separated by commas, e.g. 1,23,48")
        folder = simulate_plate(
            out,
            images=images,
            counts=parse_count_range(counts),
            blurs=blur_levels,
            stains=stain_ids,
            seed=seed,
            size=(height, width),
            bit_depth=bit_depth,
            workers=workers,
            progress=True,
        )
    except _user_errors() as err:
        fail(err)
    except KeyboardInterrupt:
        _interrupted(
            f"the plate in {out} was not finished (a new folder is made only when whole); "
            "run the same command again"
        )
    finally:
        restore_sigterm()
    written = sum(1 for _ in (folder / "images").iterdir()) if (folder / "images").is_dir() else 0
    typer.echo(
        f"simulated {images} scene(s) as {written} images (every blur x stain) -> "
        f"{folder / 'images'}; counts in {folder / 'counts.csv'}, masks and labels beside them"
    )


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    bbbc005: Annotated[
        Path | None, typer.Option(help="Real BBBC005 folder (split by site: 1-7/8/9-10).")
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder(s) of images with counts.csv and/or masks/ or labels/ (label images "
            "give counts, as masks/ give foreground); repeat --data for several."
        ),
    ] = None,
    simulated: Annotated[int, typer.Option(help="Simulated training scenes to add.")] = 0,
    preset: Annotated[
        str | None,
        typer.Option(help="'small' (CPU default) or 'paper', for a new model (not with --from)."),
    ] = None,
    stage: Annotated[
        str,
        typer.Option(help="both, segmenter or counter (counter needs --from: a segmenter)."),
    ] = "both",
    from_model: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Fine-tune: start from this model (a shipped name, e.g. nuclei, or a folder).",
        ),
    ] = None,
    seg_epochs: Annotated[
        int | None,
        typer.Option(help="Segmenter epochs (default: the preset's, or --from's); 0 keeps it."),
    ] = None,
    count_epochs: Annotated[
        int | None,
        typer.Option(help="Counter epochs (default: the preset's, or --from's); 0 keeps it."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Resume from checkpoints in --out.")] = False,
    workers: Annotated[int, typer.Option(help="Processes for simulation.")] = 2,
    cache: Annotated[Path | None, typer.Option(help="Cache folder for prepared data.")] = None,
    channel: Annotated[
        int | None,
        typer.Option(
            help="Channel (0-based) of multi-channel training images. Recorded in the new "
            "model: count, evaluate, explain, calibrate and the web page then read this plane "
            "of stain-plane files by default (train itself does not take it from --from)."
        ),
    ] = None,
    pixel_size: Annotated[
        float | None,
        typer.Option(
            help="Pixel size of the --data images, um: recorded in the model, so that "
            "count --pixel-size can rescale other images to it."
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option(help="Show progress bars (when writing to a terminal).")
    ] = True,
    threads: ThreadsOption = None,
) -> None:
    """Train segmenter then counter (as in the paper) and write a model folder.

    Fine-tune on your own images with --data FOLDER --from MODEL: FOLDER holds the
    images and counts.csv (image,count) and/or masks/ or labels/ of the same names.

    Data-parallel on N processes (GPUs, or CPU with gloo), batch size per process:
    torchrun --nproc_per_node N -m celltally.cli train ...
    """
    from celltally import distributed
    from celltally.training_data import build_and_fit

    rank = os.environ.get("RANK")  # under torchrun: each process reports, naming its rank
    for option, value in (
        ("--seg-epochs", seg_epochs),
        ("--count-epochs", count_epochs),
        ("--simulated", simulated),
    ):
        if value is not None and value < 0:
            fail(f"{option} must be 0 or more, got {value}", rank=rank)
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file; train writes a model folder", rank=rank)
    restore_sigterm: Callable[[], None] = _no_op
    try:
        restore_sigterm = _sigterm_as_interrupt()
        _set_threads(threads)
        # Under torchrun (WORLD_SIZE > 1) this is data-parallel training; rank 0 writes.
        with distributed.session():
            main = distributed.is_main()
            build_and_fit(
                out=out,
                bbbc005=bbbc005,
                folders=data or [],
                simulated=simulated,
                preset=preset,
                stages=stage,
                from_model=from_model,
                seg_epochs=seg_epochs,
                count_epochs=count_epochs,
                seed=seed,
                resume=resume,
                workers=workers,
                cache=cache,
                progress=progress and main,
                log=typer.echo if main else _silent,
                channel=channel,
                pixel_size=pixel_size,
            )
    except _user_errors() as err:
        fail(err, rank=rank)
    except RuntimeError as err:
        if not distributed.launched() or not _collective_error(err):
            raise  # e.g. out of memory, or a bug: its traceback is needed
        # under torchrun, a process whose partner failed (its own error said above) or
        # left sees its collective break: one line, not gloo's traceback
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        fail(f"stopped: a collective with the other processes failed ({first})", rank=rank)
    except KeyboardInterrupt:
        if _other_rank(rank):  # rank 0 says what is kept, for all of them
            raise typer.Exit(143 if isinstance(sys.exc_info()[1], Terminated) else 130) from None
        checkpoints = out / "checkpoints"
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            _interrupted(
                f"{out} keeps its checkpoints; run the same command with --resume to go on"
            )
        _interrupted("before any training was saved: run the same command again to start")
    finally:
        restore_sigterm()


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the plate and CSV.")] = Path(
        "celltally-demo"
    ),
    images: Annotated[int, typer.Option(help="Simulated scenes on the plate.")] = 12,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Random seed of the plate.")] = 7,
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "bbbc005",
) -> None:
    """The built-in default job: simulate a small plate, count it, compare with the truth."""
    from celltally.batch import COUNT_COLUMNS, result_row
    from celltally.counter import CellCounter
    from celltally.evaluation import labelled_files
    from celltally.metrics import count_metrics
    from celltally.simulate import simulate_plate

    _check_output(out, "--out", folder=True)
    try:
        counter = CellCounter.from_pretrained(model)
        _clear_demo_plate(out / "plate")  # another --seed or --images writes other names
        plate = simulate_plate(
            out / "plate",
            images=images,
            counts=(1, 100),
            blurs=(1, 23, 48),
            stains=(1, 2),
            seed=seed,
        )
    except _user_errors() as err:
        fail(err)
    pairs = labelled_files(plate)
    truth = {path: c for path, c in pairs}
    csv_path = out / "results.csv"
    typer.echo(f"{'image':<44} {'true':>5} {'count ± 95% interval':>22}  inside")
    rows = []
    with csv_path.open("w", newline="") as handle:
        # the columns `count` writes, so `celltally wells` takes this file as it takes
        # a results CSV
        writer = csv.DictWriter(handle, fieldnames=COUNT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for path, res in counter.count_paths([p for p, _ in pairs]):
            if isinstance(res, Exception):
                fail(str(res), code=1)
            true = truth[path]
            half = res.half_width  # before low is clipped at 0
            inside = res.low <= true <= res.high
            rows.append((true, res.count, res.low, res.high))
            row = result_row(path, res, model_name=counter.name)
            writer.writerow({**row, "true_count": f"{true:g}", "error": f"{res.count - true:.2f}"})
            typer.echo(
                f"{path.name:<44} {true:>5.0f} {res.count:>11.1f} ± {half:<8.1f}  "
                f"{'yes' if inside else 'NO'}"
            )
    t, p, lo, hi = (list(c) for c in zip(*rows, strict=True))
    m = count_metrics(t, p, low=lo, high=hi)
    typer.echo(
        f"{len(rows)} images: mean |error| {m['mae']:.2f} cells, max {m['max_abs_error']:.2f}, "
        f"{m['coverage']:.0%} of truths inside their 95% intervals -> {csv_path}"
    )


def _counter_heads(counter: dict) -> str:
    """'density', or 'density averaged with unet' for a model whose counters are averaged."""
    others = [o.get("head", "fc") for o in counter.get("average_with") or []]
    head = counter.get("head", "fc")
    return f"{head} averaged with {', '.join(others)}" if others else head


def _scale_text(config: dict) -> str:
    """'frame 696 x 520 px; objects about 28.3 px across (--diameter); ...' of a model."""
    from celltally.scale import model_scale

    scale = model_scale(config)
    height, width = scale.native_size
    parts = [f"frame {width} x {height} px (width x height)"]
    if scale.object_diameter_px is not None:
        parts.append(f"objects about {scale.object_diameter_px:g} px across (--diameter)")
    if scale.pixel_size_um is not None:
        parts.append(f"pixels of {scale.pixel_size_um:g} um (--pixel-size)")
    return "; ".join(parts)


def _normalization_text(norm: dict) -> str:
    method = norm.get("method", "percentile")
    if method != "percentile":
        return method
    text = f"percentiles {norm.get('low', 0.5)}-{norm.get('high', 99.95)}"
    background = norm.get("background", "none")
    return text + (f", {background} background subtracted first" if background != "none" else "")


@app.command()
def models(
    folders: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Model folders to describe (default: the shipped models).", show_default=False
        ),
    ] = None,
) -> None:
    """List the shipped models (or the model folders given), what they were trained on,
    and their measured figures."""
    from celltally.model_folder import (
        DEFAULT_MODEL,
        WEIGHTS_DIR,
        available_models,
        ensemble_files,
        held_out_figures,
        is_shipped,
        model_use,
        read_model_config,
        resolve_model,
    )

    places = [(name, WEIGHTS_DIR / name) for name in available_models()]
    if folders:
        places = [(str(folder), folder) for folder in folders]
    for name, place in places:
        try:
            place = resolve_model(str(place))  # a shipped model's name, or a folder
            config = read_model_config(place)
        except _user_errors() as err:
            fail(err)
        test = held_out_figures(config)
        data = config.get("training", {}).get("data") or ["not recorded"]
        height, width = config.get("input_size", ("?", "?"))
        members = len(ensemble_files(place))
        default = " (default)" if not folders and name == DEFAULT_MODEL else ""
        use = model_use(place.name) if is_shipped(place) else ""
        lines = [
            f"{name}{default}" + (f": for {use}" if use else ""),
            f"  preset {config.get('preset')}, input {width} x {height} px, counter head "
            f"{_counter_heads(config.get('counter', {}))}"
            + (f"; {members + 1} counters with --epistemic" if members else "")
            + (
                " (untrained: a --stage segmenter model, it cannot count yet)"
                if config.get("untrained_counter")
                else ""
            ),
            f"  input normalization: {_normalization_text(config.get('normalization') or {})}",
            f"  scale: {_scale_text(config)}",
            *(
                [
                    f"  reads channel {config['channel']} of multi-channel files (the one it "
                    "was trained on; --channel picks another)"
                ]
                if config.get("channel") is not None
                else []
            ),
            "  trained on:",
            *(f"    - {item}" for item in ([data] if isinstance(data, str) else data)),
            f"  held-out test {_test_figures(test)}"
            if test
            else "  held-out test: not measured for this folder"
            + (
                f"; the model it was copied from, before this calibration: {_test_figures(first)}"
                if (first := config.get("metrics_of_original", {}).get("test", {}).get("all"))
                else ""
            ),
        ]
        training = config.get("training") or {}
        if start := training.get("from"):
            lines.insert(lines.index("  trained on:"), f"  fine-tuned from: {start}")
        if compared := training.get("compared_with_start"):
            lines.append(
                f"  on its {compared['n']} calibration image(s) (held out of fine-tuning): "
                f"MAE {compared['mae_new']:.2f}, the starting model {compared['mae_start']:.2f}"
            )
        ensemble = held_out_figures(config, epistemic=True)
        if ensemble:
            lines.append(
                f"  with --epistemic: MAE {ensemble['mae']:.2f}, max error "
                f"{ensemble['max_abs_error']:.1f}, 95% interval coverage {ensemble['coverage']:.1%}"
            )
        calib = config.get("calibration", {})
        for block, label in ((calib, ""), (calib.get("epistemic", {}), " with --epistemic")):
            if "count_scale" in block:
                lines.append(
                    f"  counts{label} multiplied by {block['count_scale']:.4f} "
                    "(a correction fitted on the calibration images)"
                )
        if calib.get("n"):
            lines.append(
                f"  intervals: {calib.get('default', 'conformal')}, calibrated on "
                f"{calib['n']} image(s)"
            )
        wells = calib.get("well_correlation")
        if wells:
            lines.append(
                f"  per-well totals: within-well error correlation {wells['value']:.3f} "
                f"(measured on {wells['groups']} calibration wells)"
            )
        typer.echo("\n".join(lines) + "\n")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind (localhost by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "bbbc005",
    max_files: Annotated[int, typer.Option(help="Most files in one upload request.")] = 32,
    max_mb: Annotated[float, typer.Option(help="Largest single upload, in MB.")] = 32.0,
    saliency: Annotated[
        bool, typer.Option(help="Compute saliency maps by default (one backward pass each).")
    ] = True,
    threads: Annotated[
        int | None, typer.Option(help="PyTorch threads (default: PyTorch's choice).")
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="Another host name a server on 127.0.0.1 answers to (repeatable): a "
            "reverse proxy's, which must pass the Host header on with its port (nginx: "
            "proxy_set_header Host $http_host).",
        ),
    ] = None,
) -> None:
    """Serve the web page and JSON API (POST /api/count, GET /api/models, /docs)."""
    from celltally.web import serve as run_server

    if not 1 <= port <= 65535:
        fail(f"--port must be between 1 and 65535, got {port}")
    if max_files < 1:
        fail(f"--max-files must be at least 1, got {max_files}")
    if not (math.isfinite(max_mb) and max_mb * 2**20 >= 1):
        fail(f"--max-mb must be a positive number of megabytes (at least one byte), got {max_mb:g}")
    try:
        run_server(
            host=host,
            port=port,
            model=model,
            max_files=max_files,
            max_mb=max_mb,
            saliency=saliency,
            threads=threads,
            allowed_hosts=allowed_host or (),
        )
    except OSError as err:
        fail(err)
    except _user_errors() as err:
        fail(err)


@app.command()
def explain(
    image: Annotated[Path, typer.Argument(help="One image file.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Figure file (.png, .pdf, .svg, .jpg or .tif; no suffix: .png)."
        ),
    ] = Path("explanation.png"),
    model: Annotated[str, typer.Option(help="Shipped model name or model folder.")] = "bbbc005",
    true: Annotated[
        float | None,
        typer.Option(
            "--true",
            help="True count: saliency of the loss against it "
            "(default: the _C<n>_ count of a BBBC-style file name, if any).",
        ),
    ] = None,
    level: Annotated[float, typer.Option(help="Interval level of the title.")] = 0.95,
    image_saliency: Annotated[
        bool, typer.Option(help="Add a panel: saliency w.r.t. the input image.")
    ] = False,
    epistemic: Annotated[
        bool,
        typer.Option(
            help="Explain the count of the model's ensemble, as count --epistemic gives it "
            "(saliency of the members' mean count)."
        ),
    ] = False,
    calibration: CalibrationOption = None,
    channel: ChannelOption = None,
    norm_low: NormLowOption = None,
    norm_high: NormHighOption = None,
    no_norm: NoNormOption = False,
    background: BackgroundOption = None,
    pixel_size: PixelSizeOption = None,
    diameter: DiameterOption = None,
    rescale: RescaleOption = None,
    tile: TileOption = None,
) -> None:
    """The paper's Figure 4 panel: input, mask, mask uncertainty, saliency of the count."""
    from celltally import io
    from celltally.counter import CellCounter
    from celltally.explain import MAX_TRUE_COUNT, explain_image, explanation_figure
    from celltally.naming import parse_name

    _check_level(level)
    if true is not None and not (math.isfinite(true) and 0 <= true <= MAX_TRUE_COUNT):
        fail(f"--true must be a count from 0 to {MAX_TRUE_COUNT:g}, got {true}")
    if out.is_dir():
        fail(f"--out {out}: is a folder; give a file name such as {out / 'explanation.png'}")
    if out.resolve() == image.resolve():
        fail(f"--out {out}: is the image being explained; name another file")
    out = io.figure_path(out)
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        fail(f"--out {out}: give a figure file ({', '.join(FIGURE_SUFFIXES)})")
    _check_output(out, "--out", folder=False, image=True)
    named = parse_name(image.name).count if true is None else None
    true = true if named is None else float(named)
    if true is not None:
        true += 0.0  # --true -0 printed "truth -0"
    try:
        # the image options of `count`, so a panel explains the count that command gave
        options = _image_options(
            model,
            channel=channel,
            norm_low=norm_low,
            norm_high=norm_high,
            no_norm=no_norm,
            background=background,
            pixel_size=pixel_size,
            diameter=diameter,
            rescale=rescale,
            tile=tile,
        )
        options.update(_interval_options(epistemic, calibration))
        counter = CellCounter.from_pretrained(model, **options)
        if (level_note := counter.level_note(level)) is not None:
            typer.echo(f"note: {level_note}", err=True)
        expl = explain_image(counter, image, true_count=true, level=level)
        written = explanation_figure(expl, out, image_saliency=image_saliency)
    except _user_errors() as err:
        fail(err)
    source = ", from the file name" if named is not None else ""  # _C0_ is a name's count too
    truth = "" if true is None else f" (truth {true:g}{source})"
    warn = f"; warning: {expl.result.warning}" if expl.result.warning else ""
    typer.echo(f"{image}: {expl.result}{truth}{warn} -> {written}")


def _held_out(
    model: str,
    bbbc005: Path | None,
    data: list[Path] | None,
    *,
    out: Path | None,
    background: str | None = None,
    build: Path | None = None,
    **kw,
):
    """(folder to write, (train, calibration)) for ``calibrate`` and ``ensemble``.

    Both rewrite a model folder. A shipped model is never rewritten: with
    ``--out`` the model is copied first (once the data have loaded) into
    ``build``, the folder that becomes ``out`` when the command succeeds
    (:func:`_built_whole`).
    ``background`` (calibrate's ``--background``, only with ``--out``) sets the
    copy's background subtraction; the data are prepared with it.
    """
    import shutil

    from celltally import io
    from celltally.model_folder import UNFINISHED, WEIGHTS_DIR, read_model_config, resolve_model
    from celltally.train import write_config
    from celltally.uncertainty import held_out_sets

    folder = resolve_model(model)
    if (folder / UNFINISHED).exists():  # its copy would be unusable too, and say --resume
        raise io.InputError(
            f"{folder}: a train run stopped before this model was finished; finish it with "
            "the same celltally train command and --resume, then calibrate it"
        )
    if out is None and folder.resolve().is_relative_to(WEIGHTS_DIR.resolve()):
        raise io.InputError(
            f"{model} is shipped inside celltally and is not rewritten: give --out FOLDER "
            "to write a copy there"
        )
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise io.InputError(f"{out}: already exists; --out takes a new folder", out)
    config = read_model_config(folder)
    if bbbc005 is None and not data:
        raise ValueError("no data: give --bbbc005 or --data")
    if background is not None:
        from celltally.tiling import merge_normalization

        if out is None:
            raise io.InputError("--background changes the model: give --out for the new copy")
        normalization = config.get("normalization")
        training = {k: v for k, v in (config.get("training") or {}).items() if k != "background"}
        training["background"] = {
            "what": f"celltally calibrate --background {background}: the copy subtracts "
            f"{'a quadratic background' if background == 'quadratic' else 'no background'} "
            "before normalizing, and its intervals and OOD checks were calibrated so",
        }
        config = {
            **{k: v for k, v in config.items() if k != "metrics_before_background"},
            "normalization": merge_normalization(normalization, background=background),
            "training": training,
        }
    sets = held_out_sets(config, bbbc005=bbbc005, folders=data or [], **kw)
    if out is None and build is not None:  # rewritten in place: built in a hidden copy first
        # not the training state, a running train's lock, or the copy itself
        shutil.copytree(
            folder, build, ignore=shutil.ignore_patterns("checkpoints", ".train.lock", ".partial")
        )
        return build, sets
    if out is not None:
        build = build or out
        # not a killed in-place run's leftover copy, nor a running train's lock
        shutil.copytree(
            folder,
            build,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".partial", ".train.lock"),
        )
        # the copy is a model of its own: named after its folder, as `train` names one
        copied = {**config, "copied_from": config.get("name", model), "name": out.name}
        # the original's measured figures do not describe a recalibrated or re-ensembled copy
        if "metrics" in copied:
            copied["metrics_of_original"] = copied.pop("metrics")
        write_config(build, copied)
        kw.get("log", print)(f"copying model {model} to {out} (model name {out.name})")
        folder = build
    return folder, sets


def _command_line() -> str:
    """This celltally command as it was typed (for a model's config.json)."""
    import shlex
    import sys

    return "celltally " + shlex.join(sys.argv[1:])


def _record_ensemble(folder: Path, *, simulated: int, seed: int) -> None:
    """Add to the model's ensemble record the command, and how its scenes were drawn,
    to make the members again."""
    from celltally.model_folder import read_model_config
    from celltally.train import write_config
    from celltally.uncertainty import ENSEMBLE_SCENE_SEED

    config = read_model_config(folder)
    made = config["training"]["ensemble"]
    made["command"] = _command_line()
    if simulated > 0:
        made["simulated_scenes"] = {"n": simulated, "seed": seed + ENSEMBLE_SCENE_SEED}
    write_config(folder, config)


def _record_calibration(
    folder: Path,
    *,
    cal_sources: list[Path],
    bbbc005: Path | None,
    n: int,
    names: Sequence[str] = (),
) -> None:
    """Say in the model's config what its intervals were last calibrated on, and how."""
    from celltally.model_folder import read_model_config
    from celltally.train import write_config

    config = read_model_config(folder)
    sources = [str(Path(f).resolve()) for f in cal_sources]
    if bbbc005 is not None:
        sources.append(f"BBBC005 {Path(bbbc005).resolve()}: the calibration sites in this config")
    config.setdefault("training", {})["calibrated"] = {
        "command": _command_line(),
        "data": sources,
        "n": n,
        "note": "the intervals and OOD checks were refitted on these images; the training "
        "record above describes how the weights were made",
        **({"names": list(names)} if names else {}),
    }
    write_config(folder, config)


@contextlib.contextmanager
def _built_whole(out: Path | None, *, model: str | None = None) -> Iterator[Path | None]:
    """Where to build the model folder ``out``: a hidden sibling, renamed to ``out`` at the end.

    A copy that failed, or whose command was killed, never passes for a finished
    model (a half-calibrated ``config.json`` would look complete); the next run
    clears what a killed one left and is not blocked by it. Without ``out`` the
    ``model`` folder itself is rewritten the same way: built in a hidden copy,
    whose files replace the folder's only when the command has succeeded.
    """
    import shutil

    from celltally.model_folder import check_new_model_folder

    # a copy is built beside it; a folder rewritten in place, inside itself (same disk,
    # same permissions, whatever path or link named it)
    if out is not None:
        if not out.resolve().name or out.resolve() == Path.cwd().resolve():
            # "." or "": the folder the command runs in, which the copy would replace
            fail(f"--out {out}: is the folder you are in; name a new folder for the model")
        try:
            check_new_model_folder(out)
        except _user_errors() as err:
            fail(err)
        partial = out.with_name(f".{out.name}.partial")
    else:
        from celltally.model_folder import WEIGHTS_DIR, resolve_model

        try:
            found = resolve_model(model) if model is not None else None
        except _user_errors():
            found = None  # _held_out says what is wrong with it
        if found is None or found.resolve().is_relative_to(WEIGHTS_DIR.resolve()):
            yield None
            return
        target = found.resolve()
        partial = target / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not partial.exists():
        return
    if out is not None:
        partial.replace(out)
        return
    # in place: the files the command wrote replace the folder's, those it removed go
    built = {path.name for path in partial.iterdir() if path.is_file()}
    try:
        for name in built:
            (partial / name).replace(target / name)
        for path in list(target.iterdir()):
            if path.is_file() and path.name not in built and path.name != ".train.lock":
                path.unlink()  # e.g. ood.safetensors, when the new calibration has too few images
    except OSError as err:
        fail(f"{target}: could not put the new files in place ({err.strerror})")
    finally:
        shutil.rmtree(partial, ignore_errors=True)


OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Write into a copy of the model in this new folder (needed for a shipped model).",
    ),
]


@app.command()
def calibrate(
    model: Annotated[
        str, typer.Option(help="Model folder (its config.json is rewritten; see --out).")
    ],
    bbbc005: Annotated[
        Path | None,
        typer.Option(help="Real BBBC005 folder: calibrates on the model's own sites."),
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder(s) of images + counts.csv: a folder the model was trained on gives its "
            "held-out part (scene split), any other folder all its images (but those "
            "named as the model's training images)."
        ),
    ] = None,
    quantile: Annotated[
        float, typer.Option(help="OOD threshold: this quantile of the calibration images.")
    ] = 0.99,
    count_scale: Annotated[
        list[str] | None,
        typer.Option(
            help="Also correct the counts of this block ('plain' or 'epistemic', repeatable) "
            "by a factor sum(true) / sum(counted) fitted on the calibration split."
        ),
    ] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache folder for prepared data.")] = None,
    channel: ChannelOption = None,
    background: Annotated[
        str | None,
        typer.Option(
            help="Write a copy (--out) that subtracts a smooth background before normalizing "
            "(quadratic, or none), calibrated with it."
        ),
    ] = None,
    out: OutOption = None,
) -> None:
    """Refit the intervals (conformal, temperature) and OOD thresholds on a held-out split."""
    from celltally.uncertainty import COUNT_SCALE_BLOCKS, calibrate_model

    if not 0.0 < quantile < 1.0:
        fail(f"--quantile must be between 0 and 1 (0.99: the 99th percentile), got {quantile}")
    if unknown := sorted(set(count_scale or ()) - set(COUNT_SCALE_BLOCKS)):
        fail(f"--count-scale {unknown[0]!r}: choose plain or epistemic")
    with _built_whole(out, model=model) as build:
        try:
            folder, (_, cal) = _held_out(
                model,
                bbbc005,
                data,
                cache=cache,
                log=typer.echo,
                channel=channel,
                out=out,
                build=build,
                background=background,
                unseen_folders_calibrate=True,
            )
            if cal is None:
                fail("the data gave no calibration images")
            calibrate_model(
                folder, cal, quantile=quantile, count_scale=count_scale or (), log=typer.echo
            )
            from celltally.datasets import source_file

            _record_calibration(
                folder,
                cal_sources=data or [],
                bbbc005=bbbc005,
                n=len(cal),
                # the user's images by name, as train records its own: evaluate --held-out
                names=[str(m["name"]) for m in cal.meta if source_file(m) is not None],
            )
        except _user_errors() as err:
            fail(err)
    if out is not None:
        typer.echo(f"calibrated copy -> {out}")


@app.command()
def ensemble(
    model: Annotated[str, typer.Option(help="Model folder to add counter heads to.")],
    bbbc005: Annotated[
        Path | None,
        typer.Option(help="Real BBBC005: the model's own site split."),
    ] = None,
    data: Annotated[
        list[Path] | None, typer.Option(help="Folder(s) of images + counts.csv (scene split).")
    ] = None,
    simulated: Annotated[int, typer.Option(help="Simulated training scenes to add.")] = 0,
    members: Annotated[int, typer.Option(help="Ensemble size, the model's counter included.")] = 4,
    epochs: Annotated[int | None, typer.Option(help="Counter epochs per member.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes for simulation.")] = 2,
    cache: Annotated[Path | None, typer.Option(help="Cache folder for prepared data.")] = None,
    channel: ChannelOption = None,
    progress: Annotated[
        bool, typer.Option(help="Show progress bars (when writing to a terminal).")
    ] = True,
    out: OutOption = None,
) -> None:
    """Train extra counter heads (epistemic ensemble, used by --epistemic) and recalibrate."""
    from celltally.uncertainty import train_ensemble

    if members < 2:
        fail(f"--members must be at least 2, got {members}")
    if seed + members - 1 > SEED_MAX:  # member k is seeded with seed + k
        fail(f"--seed must be at most {SEED_MAX - members + 1} with {members} members")
    if epochs is not None and epochs < 1:
        fail(f"--epochs must be at least 1 (each member is trained), got {epochs}")
    if simulated < 0:
        fail(f"--simulated must be 0 or more, got {simulated}")
    with _built_whole(out, model=model) as build:
        try:
            folder, (train_set, cal) = _held_out(
                model,
                bbbc005,
                data,
                simulated=simulated,
                seed=seed,
                workers=workers,
                cache=cache,
                log=typer.echo,
                channel=channel,
                out=out,
                build=build,
            )
            if train_set is None:
                fail("the data gave no training images")
            files = train_ensemble(
                folder,
                train_set,
                cal,
                members=members,
                epochs=epochs,
                seed=seed,
                progress=progress,
                log=typer.echo,
            )
            _record_ensemble(folder, simulated=simulated, seed=seed)
        except _user_errors() as err:
            fail(err)
    typer.echo(f"{len(files)} ensemble member(s) -> {out or model}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
