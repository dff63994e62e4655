"""Assemble training, calibration and test sets from the sources a user names, then fit."""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from celltally import io
from celltally.datasets import (
    LabeledSet,
    labels_diameter,
    load_bbbc005,
    load_folder,
    simulate_set,
    source_file,
    split_bbbc005,
    unused_files,
)
from celltally.distributed import is_main, launched, world_size
from celltally.model_folder import UNFINISHED, check_new_model_folder
from celltally.models.presets import get_preset
from celltally.scale import model_scale, off_frame, off_frame_note
from celltally.train import Log, fit, write_config
from celltally.transforms import DEFAULT_NORMALIZATION

#: Factor on a starting model's segmenter learning rate when fine-tuning (``--from``).
FINE_TUNE_SEGMENTER_LR = 0.1


def _hash_fraction(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_by_scene_hash(
    data: LabeledSet, *, calibration_fraction: float = 0.15
) -> dict[str, np.ndarray]:
    """Stable scene-level split for a user folder (same scene, same side, every run).

    A scene goes to calibration when its name's hash falls in the lowest
    ``calibration_fraction``. When none does (a small folder: 14% of 12-scene
    folders), or all do, the scene with the lowest hash does, if there are two
    or more: the intervals of a fine-tuned model are then calibrated on the
    user's own images rather than on simulated ones. A folder of one scene
    (one field of a time-lapse, a single image) is all training images.
    """
    fraction = {str(m["scene"]): _hash_fraction(str(m["scene"])) for m in data.meta}
    threshold = calibration_fraction
    below = sum(f < calibration_fraction for f in fraction.values())
    if len(fraction) < 2:
        threshold = 0.0  # nothing would be left to train on
    elif below == 0 or below == len(fraction):
        threshold = min(fraction.values()) + 1e-12  # the lowest scene only
    cal = [i for i, m in enumerate(data.meta) if fraction[str(m["scene"])] < threshold]
    cal_set = set(cal)
    train = [i for i in range(len(data)) if i not in cal_set]
    return {
        "train": np.asarray(train, dtype=np.int64),
        "calibration": np.asarray(cal, dtype=np.int64),
    }


#: Fewest optimizer steps per epoch on a small training set (batches are made smaller).
MIN_STEPS_PER_EPOCH = 4


def _small_batches(
    config: dict[str, Any],
    *,
    n_images: Mapping[str, int],
    stages: str = "both",
    world: int = 1,
    log: Log = print,
) -> None:
    """Smaller batches for a small training set, so each epoch takes a few steps.

    ``n_images`` holds each stage's training images (the segmenter's: those
    with a mask). A stage that runs gets batches of at most
    ``n // (world * MIN_STEPS_PER_EPOCH)`` images (and at least 2; ``world``
    processes each see ``n / world``): with 18 images and the usual 16 a
    counter epoch was one step (the last, partial batch is dropped), and 10
    epochs 10 updates. The size it replaces is kept (``batch_size_planned``), so a
    model fine-tuned from this one on more images gets the full size back.
    """
    for stage in ("segmenter", "counter"):
        hp = config["train"][stage]
        if stages not in ("both", stage) or hp.get("epochs", 0) <= 0:
            continue
        if "batch_size_planned" in hp:  # shrunk for the starting model's few images
            hp["batch_size"] = hp.pop("batch_size_planned")
        total = int(n_images.get(stage, 0))
        n = total // max(1, world)
        if total == 0:  # nothing to train this stage on (e.g. no masks: the segmenter is kept)
            continue
        if n == 0:  # fewer than the processes: each would take 0 steps, the stage untrained
            what = " with a mask" if stage == "segmenter" else ""
            raise io.InputError(
                f"the {stage} has {total} training image(s){what} for {world} processes "
                "(each process needs one or more): add images, or train with fewer processes"
            )
        if stage == "counter" and n < 2:  # one image a batch: BatchNorm cannot train on it
            raise io.InputError(
                f"the counter would train on {n} image{' per process' if world > 1 else ''}; "
                "it needs 2 or more (add images, or train only the segmenter: --stage segmenter)"
            )
        batch = max(2, min(int(hp["batch_size"]), n // MIN_STEPS_PER_EPOCH))
        if batch < hp["batch_size"]:
            log(
                f"{stage}: batches of {batch} instead of {hp['batch_size']}, so each epoch "
                f"over {n} training images{' per process' if world > 1 else ''} takes "
                f"{max(1, n // batch)} steps"
            )
            hp["batch_size_planned"] = hp["batch_size"]
            hp["batch_size"] = batch


def _frame_shapes(meta: Sequence[Mapping[str, Any]]) -> collections.Counter:
    """How many training images have each raw (height, width)."""
    return collections.Counter(tuple(m["shape"]) for m in meta if m.get("shape"))


def _size_ratio(shape: Sequence[int], native: Sequence[int]) -> float:
    """How many times the model's frame ``native`` an image of ``shape`` is, per side
    (the mean of the two sides' ratios)."""
    return (shape[0] / native[0] + shape[1] / native[1]) / 2


def _check_frame_size(
    config: dict[str, Any], meta: Sequence[dict[str, Any]], *, adopt: bool, log: Log
) -> None:
    """Keep the training frames and the model's frame (``scale.native_size``) the same size.

    Each training image is resized whole to the model input, while counting
    resizes only images of the model's frame size that way (others are counted
    in tiles at the model's pixel scale). A model trained on the user's images
    alone (``adopt``; new or ``--from``) takes their most common size as its
    frame, so counting those images sees them as training did (a fine-tuned
    model kept its starting frame, and counted the user's off-frame images in
    tiles at a scale it was not trained at: errors of 7-19 cells where its
    calibration said 0.02). Its reference object diameter, if it has one, is
    rescaled with the frame. Images more than 10% off the frame get a warning.
    """
    native = tuple(model_scale(config).native_size)
    shapes = _frame_shapes(meta)
    if adopt and shapes:
        common, n = shapes.most_common(1)[0]
        # only a frame shaped like the model's (height / width): resized whole into the
        # input, a portrait frame for a landscape model is squashed (0.55 x 0.98), its
        # cells shaped unlike any the model learned
        same_shape = abs((common[0] / common[1]) / (native[0] / native[1]) - 1) <= 0.1
        if common != native and same_shape:
            scale = dict(config.get("scale") or {})
            scale["native_size"] = list(common)
            ratio = _size_ratio(common, native)
            # taken as the same field of view in more (or fewer) pixels: the same objects
            # are wider (narrower) in pixels; the notes below say so (crops would not be)
            if scale.get("object_diameter_px"):
                scale["object_diameter_px"] = round(scale["object_diameter_px"] * ratio, 2)
            if scale.get("pixel_size_um"):
                scale["pixel_size_um"] = round(scale["pixel_size_um"] / ratio, 6)
            scale["frame_ratio"] = round(ratio, 4)  # the new frame over the starting one
            config["scale"] = scale
            whose = "your images'" if n == len(meta) else f"{n} of your {len(meta)} images'"
            log(
                f"the new model's frame is {common[1]} x {common[0]} px (width x height, "
                f"{whose} size); images of another size will be counted in tiles at its "
                "pixel scale"
            )
            native = common
        elif common != native:
            log(
                f"warning: your images ({common[1]} x {common[0]} px, width x height) are not "
                f"shaped like the model's frame ({native[1]} x {native[0]}), which stays"
            )
    if off := off_frame(meta, native):
        log(
            f"warning: {off_frame_note(off, len(meta), native, kind='training')}. Each is "
            "resized whole to the model input, so its cells look larger or smaller than when "
            "such an image is counted (in tiles at the model's scale): crop them into pieces "
            f"of about {native[1]} x {native[0]} px"
        )


def _rescale_reference(
    config: dict[str, Any], folders: Sequence[Path], from_model: str | None, log: Log
) -> None:
    """Make a fine-tuned (or new) model's reference object diameter (``--diameter``) the user's.

    The new model learns the user's images at their own scale, so the starting
    model's ``scale.object_diameter_px`` no longer applies: it is measured from
    the folders' label images where there are some, else kept with a note. A
    new model (``from_model`` None) trained on the folders alone gets one only
    from label images.
    """
    measured = [d for d in (labels_diameter(f) for f in folders) if d is not None]
    scale = dict(config.get("scale") or {})
    if measured:
        scale["object_diameter_px"] = round(float(np.median(measured)), 2)
        scale["note"] = "median equivalent diameter of the training label images' objects, raw px"
        config["scale"] = scale
        log(
            f"reference object diameter (--diameter): {scale['object_diameter_px']} px, "
            "measured on your label images"
        )
    elif "object_diameter_px" in scale and from_model is not None:
        value = f"{scale['object_diameter_px']:g} px"
        if ratio := scale.get("frame_ratio"):
            value = (
                f"{value}: {from_model}'s {scale['object_diameter_px'] / ratio:.4g} px times "
                f"your frame over its frame ({ratio:g}), as if your images showed its field "
                "in other pixels; if they are crops at its magnification, train with label "
                "images"
            )
        log(
            "no label images to measure your objects: the new model's reference object "
            f"diameter (--diameter) is {value}"
        )


def _record_pixel_size(
    config: dict[str, Any],
    pixel_size: float | None,
    from_model: str | None,
    log: Log,
    meta: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Record the user's pixel size (``train --pixel-size``, um) as ``scale.pixel_size_um``.

    ``count --pixel-size`` then rescales other images to it. It is recorded
    for the model's frame (``scale.native_size``): training resizes each image
    whole into the model input, so images of another size (their most common
    one, from ``meta``) give frame pixels of ``pixel_size`` times their size
    over the frame's. Without one, a model fine-tuned from another keeps the
    starting model's (rescaled with an adopted frame), with a note.
    """
    scale = dict(config.get("scale") or {})
    if pixel_size is not None:
        native = model_scale(config).native_size
        shapes = _frame_shapes(meta)
        common = shapes.most_common(1)[0][0] if shapes else native
        ratio = _size_ratio(common, native)
        scale["pixel_size_um"] = round(float(pixel_size) * ratio, 6)
        config["scale"] = scale
        frame = (
            ""
            if abs(ratio - 1) < 1e-6
            else f" ({scale['pixel_size_um']:g} um per pixel of the model's {native[1]} x "
            f"{native[0]} frame, to which your {common[1]} x {common[0]} images are resized)"
        )
        log(
            f"pixel size of the training images: {pixel_size:g} um{frame}, recorded for "
            "count --pixel-size"
        )
    elif "pixel_size_um" in scale and from_model is not None:
        value = f"{scale['pixel_size_um']:g} um"
        if frame_ratio := scale.get("frame_ratio"):
            value = (
                f"{value} ({from_model}'s {scale['pixel_size_um'] * frame_ratio:.4g} um over "
                f"your frame over its frame, {frame_ratio:g})"
            )
        log(
            f"the new model's pixel size (--pixel-size) is {value}; if your images' pixels "
            "differ, train again with --pixel-size UM"
        )


def _check_out(out: Path, *, resume: bool, locked: bool = False) -> None:
    """Refuse an ``--out`` that holds a finished model, or an interrupted run without resume.

    A run marks its folder unfinished (:data:`UNFINISHED`) until its model is
    complete and calibrated: only such a folder, or one with checkpoints and no
    model yet, can be resumed. A finished model is never trained over.
    ``locked``: this process holds the folder's lock (:func:`_train_lock`).
    """
    folder = Path(out)
    check_new_model_folder(out)
    unfinished = (folder / UNFINISHED).exists()
    if unfinished and not locked and _being_written(folder):
        raise _being_written_error(out)
    if (folder / "config.json").exists() and not unfinished:
        raise io.InputError(
            f"{out}: already holds a finished model; give a new --out (to train it further: "
            f"--from {out})",
            out,
        )
    saved = folder / "checkpoints"
    if not resume and saved.is_dir() and any(saved.glob("*.pt")):
        raise io.InputError(
            f"{out}: holds an interrupted training run; add --resume to continue it, or give "
            "a new --out",
            out,
        )


#: Hidden file in a model folder that a ``train`` run holds locked while it writes there.
TRAIN_LOCK = ".train.lock"


def _being_written_error(out: Path) -> io.InputError:
    """The one-line refusal of an ``--out`` another ``train`` run holds."""
    return io.InputError(
        f"{out}: another celltally train is writing this folder; wait for it to finish or "
        "give a new --out",
        out,
    )


def _being_written(folder: Path) -> bool:
    """Whether a ``train`` run holds ``folder``'s lock now (the lock is not kept).

    Asked by the main process only, with a shared lock: probes never see each
    other as writers (torchrun's ranks all check the folder at once).
    """
    if not is_main():
        return False
    try:
        import fcntl

        fd = os.open(folder / TRAIN_LOCK, os.O_RDONLY)
    except (ImportError, OSError):  # no lock file: nobody holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def _train_lock(out: Path, *, resume: bool) -> Iterator[None]:
    """Hold ``out`` for this run: a second ``train`` into it fails at once with one line.

    Taken only by the process that writes (rank 0 under torchrun), after the data
    are loaded, so the folder checks are repeated under the lock: a run that
    finished meanwhile has left a model there. The lock file stays (removing
    it would let a third run lock a fresh file while a second waits on the old).
    """
    if not is_main():
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock
        yield
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(out) / TRAIN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _being_written_error(out) from None
        _check_out(out, resume=resume, locked=True)
        (Path(out) / UNFINISHED).touch()  # until the model is complete (build_and_fit)
        yield
    finally:
        os.close(fd)  # also releases the lock


def build_and_fit(
    *,
    out: Path,
    bbbc005: Path | None = None,
    folders: Sequence[Path] = (),
    simulated: int = 0,
    preset: str | None = None,
    stages: str = "both",
    from_model: str | None = None,
    seg_epochs: int | None = None,
    count_epochs: int | None = None,
    seed: int = 0,
    resume: bool = False,
    workers: int = 2,
    cache: Path | None = None,
    progress: bool = True,
    log: Log = print,
    channel: int | None = None,
    pixel_size: float | None = None,
) -> dict[str, Any]:
    """Load every named source, split by scene, train, calibrate and write the model folder.

    ``preset`` ('small' when None) shapes a new model; with ``from_model`` the
    starting model's architecture is kept and ``preset`` must be None.
    ``channel`` picks the plane of multi-channel images in ``folders``;
    ``pixel_size`` (um) is theirs, recorded for ``count --pixel-size``.
    """
    _check_out(out, resume=resume)
    if pixel_size is not None:
        if not (math.isfinite(pixel_size) and pixel_size > 0):
            raise io.InputError(
                f"--pixel-size must be a positive number of micrometres, got {pixel_size}"
            )
        if not folders:
            raise io.InputError(
                "--pixel-size is the pixel size of your --data images: give --data FOLDER"
            )
    for name, value in (("seg_epochs", seg_epochs), ("count_epochs", count_epochs)):
        if value is not None and value < 0:
            raise io.InputError(f"{name} must be 0 or more, got {value}")
    if simulated < 0:
        raise io.InputError(f"simulated must be 0 or more, got {simulated}")
    if stages not in ("both", "segmenter", "counter"):
        raise io.InputError(f"--stage must be both, segmenter or counter, not {stages!r}")
    if from_model is None and (stages == "counter" or (stages == "both" and seg_epochs == 0)):
        what = "--stage counter" if stages == "counter" else "--seg-epochs 0"
        raise io.InputError(
            f"{what} keeps the segmenter as it is, and a new model's segmenter is "
            "untrained: add --from MODEL (e.g. a model trained with --stage segmenter) to "
            "train a counter on its masks"
        )
    if from_model is None and stages == "both" and count_epochs == 0:
        raise io.InputError(
            "--count-epochs 0 would leave a new model's counter untrained: to train only "
            "the segmenter, say so with --stage segmenter"
        )
    if from_model is not None and preset is not None:
        raise io.InputError(
            f"--preset {preset} does not apply with --from {from_model}: fine-tuning keeps "
            "the starting model's architecture"
        )
    init = None
    start_untrained = False  # the starting model is a --stage segmenter one
    if from_model is not None:
        from safetensors.torch import load_file

        from celltally.model_folder import read_model_config, resolve_model

        folder = resolve_model(from_model)
        base = read_model_config(folder)
        start_untrained = bool(base.get("untrained_counter"))
        config = {k: base[k] for k in ("input_size", "segmenter", "counter", "counter_inputs")}
        recipe = (
            base["train"] if "train" in base else get_preset(base.get("preset", "small"))["train"]
        )
        # only what `fit` reads: a shipped model's record of its own recipe (crops of
        # frame mosaics, EMA, steps per epoch) would describe a run this is not
        config["train"] = {
            stage: {k: copy.deepcopy(v) for k, v in recipe[stage].items() if k in FIT_KEYS[stage]}
            for stage in ("segmenter", "counter")
        }
        segmenter = config["train"]["segmenter"]
        if seg_epochs is None and segmenter.get("epochs", 0) <= 0:
            # A shipped model whose segmenter was trained apart (nuclei) records 0 epochs:
            # fine-tuning on the user's masks must still train it (the small preset's epochs).
            segmenter["epochs"] = get_preset("small")["train"]["segmenter"]["epochs"]
        # A trained segmenter is fine-tuned at a tenth of its learning rate: at the full
        # rate 34 simulated nuclei frames made the shipped one worse (docs/finetuning.md).
        # A tenth of the rate it was first trained at (lr_base), not of a fine-tune's,
        # and only where this run trains the segmenter.
        base_lr = segmenter.pop("lr_base", segmenter["lr"])
        segmenter["lr"] = base_lr
        if stages in ("both", "segmenter") and seg_epochs != 0:
            segmenter["lr_base"] = base_lr
            segmenter["lr"] = base_lr * FINE_TUNE_SEGMENTER_LR
        config["preset"] = base.get("preset")
        config["normalization"] = base.get("normalization", {})
        if "scale" in base:
            config["scale"] = base["scale"]
        init = load_file(str(folder / "model.safetensors"))
    else:
        preset = preset or "small"
        config = get_preset(preset)
        config["preset"] = preset
        config["normalization"] = dict(config.get("normalization", DEFAULT_NORMALIZATION))
    if seg_epochs is not None:
        config["train"]["segmenter"]["epochs"] = seg_epochs
    if count_epochs is not None:
        config["train"]["counter"]["epochs"] = count_epochs
    if bbbc005 is None and not folders and simulated <= 0:
        raise io.InputError("no training data: give --bbbc005, --data or --simulated N")
    size = config["input_size"]
    norm = config["normalization"]
    trains, cals, tests, sources = [], [], [], []
    split_info: dict[str, Any] = {}
    if bbbc005 is not None:
        log(f"loading BBBC005 from {bbbc005}")
        real = load_bbbc005(bbbc005, size=size, norm=norm, cache_dir=cache)
        parts = split_bbbc005(real.meta)
        trains.append(real.subset(parts["train"]))
        cals.append(real.subset(parts["calibration"]))
        tests.append(real.subset(parts["test"]))
        for part, sites in (("train", "1-7"), ("calibration", "8"), ("test", "9-10")):
            if not parts[part].size:  # e.g. a copy of part of it, or a simulated plate (s01)
                what = "training" if part == "train" else part
                log(
                    f"note: --bbbc005 {bbbc005} has no images of site(s) {sites}, BBBC005's "
                    f"{what} sites, so this model has no {what} images from it"
                )
        sources.append(f"BBBC005 ({len(real)} real images)")
        split_info["bbbc005"] = {
            "by": "scene (site)",
            "train_sites": "1-7",
            "calibration_sites": [8],
            "test_sites": [9, 10],
            **{k: int(v.size) for k, v in parts.items()},
        }
    only_user = bbbc005 is None and simulated <= 0  # the user's folders are all it learns
    user_meta: list[dict[str, Any]] = []
    unique: dict[str, Path] = {}
    for folder in folders:
        if Path(folder).is_file():  # e.g. --data my_training/counts.csv (load_folder says
            # it too, for calibrate and ensemble; here before anything else is done)
            raise io.InputError(
                f"--data {folder}: a file; --data takes a folder of images (with counts.csv, "
                "masks/ or labels/ beside them)"
            )
        unique.setdefault(os.path.realpath(folder), Path(folder))
    if len(unique) < len(folders):  # its images would train twice, or calibrate twice
        log(f"--data: {len(folders) - len(unique)} folder(s) given twice are used once")
    folders = list(unique.values())
    for folder in folders:
        log(f"loading {folder}")
        user = load_folder(folder, size=size, norm=norm, channel=channel)
        for note in unused_files(folder):
            log(f"note: {note}")
        user_meta += user.meta
        parts = split_by_scene_hash(user)
        trains.append(user.subset(parts["train"]))
        cals.append(user.subset(parts["calibration"]))
        plane = "" if channel is None else f", channel {channel}"
        sources.append(f"{folder} ({len(user)} images{plane})")
        split_info[str(folder)] = {
            "by": "scene hash",
            "path": str(Path(folder).resolve()),
            **{k: int(v.size) for k, v in parts.items()},
            # by name, so a copy of the folder never calibrates on them (calibrate --data)
            "train_names": [user.meta[int(i)]["name"] for i in parts["train"]],
        }
    if user_meta:
        _check_frame_size(config, user_meta, adopt=only_user, log=log)
    if folders and (from_model is not None or only_user):
        # a model trained on the user's images alone learns their objects' size too
        # (after the frame: a diameter measured on their labels is already in their pixels)
        _rescale_reference(config, folders, from_model, log)
    if folders:
        _record_pixel_size(config, pixel_size, from_model, log, user_meta)
    if "frame_ratio" in (config.get("scale") or {}):  # this run's, for the notes above only
        config["scale"] = {k: v for k, v in config["scale"].items() if k != "frame_ratio"}
    if simulated > 0:
        log(f"simulating {simulated} training scenes")
        trains.append(
            simulate_set(simulated, size=size, seed=seed + 1000, workers=workers, norm=norm)
        )
        sources.append(f"simulated ({simulated} scenes, counts 1-100, blur F1/F23/F48, w1/w2)")
    if not any(len(t) for t in trains):  # e.g. --bbbc005 on a copy of its sites 8-10 alone
        raise io.InputError(
            "no training images: the data hold none to train on (BBBC005's training sites "
            "are 1-7); add --data FOLDER or --simulated N"
        )
    train = LabeledSet.concat(trains)
    # checked before any calibration scene is simulated (one image simulated 60 first)
    _small_batches(
        config,
        n_images={"segmenter": int(train.has_mask.sum()), "counter": len(train)},
        stages=stages,
        world=world_size(),
        log=log,
    )
    segmenter_runs = stages in ("both", "segmenter") and config["train"]["segmenter"]["epochs"] > 0
    if segmenter_runs and (init is None or stages == "segmenter") and not train.has_mask.any():
        # as train_segmenter says it, but before the folder is made (it was left behind,
        # marked unfinished, and `count` then asked for a --resume)
        raise io.InputError(
            "no training image has a foreground mask, and the segmenter needs masks (to "
            "train only the counter on counts: --from MODEL --stage counter)"
        )
    calibration = LabeledSet.concat(cals) if any(len(c) for c in cals) else None
    if calibration is None:
        n_cal = max(60, simulated // 10)
        log(f"simulating {n_cal} calibration scenes")
        if folders:
            log(
                "warning: your images are too few scenes to hold some out, so the intervals "
                f"and out-of-distribution checks are fitted on {n_cal} simulated scenes and "
                "may not describe your images; calibrate them on images not trained on: "
                f"celltally calibrate --model {out} --data FOLDER"
            )
        calibration = simulate_set(n_cal, size=size, seed=seed + 2000, workers=workers, norm=norm)
        split_info["calibration"] = f"{n_cal} fresh simulated scenes"
    test = LabeledSet.concat(tests) if any(len(t) for t in tests) else None
    config["name"] = Path(out).name
    if channel is not None:  # counting then reads multi-channel files' same plane by default
        config["channel"] = int(channel)
    config["training"] = {
        "data": sources,
        "split": split_info,
        "n_train": len(train),
        "n_calibration": len(calibration),
        "n_test": 0 if test is None else len(test),
        "seed": seed,
        # a shipped model by name, a user's folder by its full path: read from any
        # working folder (evaluate --held-out follows it back to what that model saw)
        "from": None if from_model is None else _start_record(from_model),
        "environment": _environment(resume=resume),
    }
    log(
        f"train {len(train)} / calibration {len(calibration)} / test {config['training']['n_test']}"
    )
    with _train_lock(out, resume=resume):
        result = fit(
            train=train,
            calibration=calibration,
            test=test,
            config=config,
            out=out,
            stages=stages,
            init=init,
            init_untrained_counter=start_untrained,
            seed=seed,
            resume=resume,
            progress=progress,
            log=log,
        )
        if (
            from_model is not None
            and not start_untrained
            and not result.get("untrained_counter")
            and split_info.get("calibration") is None
            and is_main()
        ):  # before the folder is marked finished: a run killed here is resumed, not lost
            try:
                result["training"]["compared_with_start"] = compare_with_start(
                    Path(out), from_model, calibration, channel=channel, log=log
                )
            except io.InputError as err:  # the model is complete all the same
                log(f"warning: the new model could not be compared with {from_model}: {err}")
        if is_main():  # complete and calibrated: usable, and never trained over
            (Path(out) / UNFINISHED).unlink(missing_ok=True)
    return result


#: The keys of a config's ``train`` block that :func:`celltally.train.fit` reads, per stage.
FIT_KEYS = {
    "segmenter": (
        "lr",
        "lr_base",
        "batch_size",
        "batch_size_planned",
        "epochs",
        "tv_weight",
        "schedule",
    ),
    "counter": ("lr", "batch_size", "batch_size_planned", "epochs", "beta", "schedule"),
}


def _environment(*, resume: bool) -> dict[str, Any]:
    """What a rerun needs besides the data and settings: the command, versions, threads.

    CPU weights are bit-identical for the same seed only at the same torch thread
    count (it sets the order of the convolutions' sums); on GPU, bfloat16 autocast
    (``CELLTALLY_AMP``) and the GPU's own kernels change them too.
    """
    import datetime
    import platform
    import shlex
    import sys

    import torch

    from celltally import __version__
    from celltally.distributed import bfloat16_on, device

    on = device()
    program = Path(sys.argv[0]).name if sys.argv else ""
    # the command line as run (the Python API: the script that called it)
    words = ["celltally" if program == "celltally" else program]
    if program == "cli.py" and "celltally" in sys.argv[0]:  # python -m celltally.cli
        words = ["-m", "celltally.cli"] if launched() else ["python", "-m", "celltally.cli"]
    if launched():  # torchrun: how many processes, on how many machines
        per_node = os.environ.get("LOCAL_WORLD_SIZE") or str(world_size())
        nodes = max(1, world_size() // max(1, int(per_node)))
        words = ["torchrun", "--nnodes", str(nodes), "--nproc_per_node", per_node, *words]
    return {
        "command": shlex.join([*words, *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed": bool(resume),
        "celltally": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(on),
        "torch_threads": torch.get_num_threads(),
        "processes": world_size(),
        "bfloat16_autocast": bfloat16_on(on),
    }


def _start_record(from_model: str) -> str:
    """How ``training.from`` names the starting model: its name if shipped, else its folder."""
    from celltally.model_folder import is_shipped, resolve_model

    folder = resolve_model(from_model)
    return folder.name if is_shipped(folder) else str(folder.resolve())


def compare_with_start(
    out: Path,
    from_model: str,
    calibration: LabeledSet,
    *,
    channel: int | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Count the calibration images with the fine-tuned and the starting model; record both.

    Fine-tuning can make a model worse (too few images, too few epochs): the
    user is told, and ``config.json`` (``training.compared_with_start``) keeps
    both figures. Each model counts the image files as ``celltally count``
    does (an image off a model's frame in tiles at its pixel scale), not the
    images resized whole for training: the starting model's figure was 20.8
    where ``count`` gave 3.5.
    """
    from celltally.counter import CellCounter, resolve_model

    # the user's folders' images by file (load_folder records their source and shape);
    # any other (BBBC005's, already at a model frame) as prepared
    on_file = [i for i, m in enumerate(calibration.meta) if source_file(m) is not None]
    files = [cast("Path", source_file(calibration.meta[i])) for i in on_file]  # not None
    truth = calibration.counts.numpy().astype(float)
    mae = {}
    for key, folder in (("new", out), ("start", resolve_model(from_model))):
        # from_folder: the new model's folder is still marked unfinished
        counter = CellCounter.from_folder(folder, channel=channel)
        counts = np.zeros(len(truth))
        rest = sorted(set(range(len(truth))) - set(on_file))
        prepared = [calibration.images[i, 0].numpy() for i in rest]
        for i, done in zip(rest, counter.count_prepared(prepared), strict=True):
            counts[i] = done.count
        for i, (_, outcome) in zip(on_file, counter.count_paths(files), strict=True):
            if isinstance(outcome, Exception):
                raise outcome
            counts[i] = outcome.count
        mae[key] = round(float(np.mean(np.abs(counts - truth))), 4)
    record = {"n": len(truth), "mae_new": mae["new"], "mae_start": mae["start"]}
    log(
        f"your {len(truth)} calibration image(s) (not trained on): MAE {mae['new']:.2f} with "
        f"the new model, {mae['start']:.2f} with {from_model}"
    )
    if mae["new"] > mae["start"]:
        log(
            f"warning: the new model counts your calibration images worse than {from_model}; "
            f"keep using {from_model}, or fine-tune with more images or epochs (--count-epochs)"
        )
    config = json.loads((out / "config.json").read_text())
    config.setdefault("training", {})["compared_with_start"] = record
    write_config(out, config)
    return record
