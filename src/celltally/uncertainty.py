"""Calibrating a model folder, and its epistemic ensemble of counter heads.

A model folder stores, in ``config.json``'s ``calibration`` block, everything
fitted on its held-out calibration split (see :func:`calibrate_model`):
split-conformal scores (the default intervals), a temperature for sigma (the
compared alternative), out-of-distribution thresholds and, when several
calibration images come from one well, the correlation of their errors
(used for per-well totals, :mod:`celltally.wells`). With an ensemble
(:func:`train_ensemble`), the same again for the ensemble's total sigma under
``calibration.epistemic``.

The ensemble is cheap because only the counter stage is repeated: every
member reads the same segmenter's mask, so ``ensemble_<k>.safetensors`` holds
one counter's ``state_dict`` (k = 1 .. members - 1; member 0 is the counter in
``model.safetensors``). Deep ensembles were chosen over MC dropout by
measurement (``benchmarks/mc_dropout.py``, ``docs/uncertainty.md``): at
matched cost on real BBBC005 calibration sites, MC dropout's counter was less
accurate (MAE 0.72 against 0.65) and its conformal 95% intervals 11% wider.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltally import io, naming
from celltally.calibration import (
    LOW_CONTRAST,
    MIN_SIZE_SHIFT,
    calibrate,
    conformal_rank,
    feature_classes,
    feature_reference,
    fit_group_correlation,
    held_out_distances,
    held_out_size_ratios,
    object_size,
    ood_thresholds,
    size_reference,
)
from celltally.datasets import LabeledSet, source_file
from celltally.model_folder import ensemble_files, recorded_channel
from celltally.models.pipeline import (
    CounterHead,
    CountingPipeline,
    build_counter,
    first_line,
    read_model_config,
)
from celltally.train import save_readable, write_config
from celltally.wells import well_key

Log = Callable[[str], None]

#: The calibration blocks a count correction can be fitted for (``calibrate_model``).
COUNT_SCALE_BLOCKS = ("plain", "epistemic")


def load_members(folder: str | Path, config: dict[str, Any]) -> list[CounterHead]:
    """The extra counter heads of a model folder (eval mode, on the CPU).

    Each member has the model's counter architecture (``config['counter']``)
    unless its file's metadata holds its own counter block under ``"counter"``
    (JSON), as the ``nuclei`` model's members with wider U-Nets do.

    Raises
    ------
    celltally.io.InputError
        The folder has no ensemble, or a member does not fit the architecture.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    files = ensemble_files(folder)
    if not files:
        raise io.InputError(
            f"{folder}: model has no ensemble members (ensemble_<k>.safetensors); "
            "train them with `celltally ensemble`"
        )
    members = []
    for path in files:
        try:
            with safe_open(str(path), "pt") as handle:
                own = (handle.metadata() or {}).get("counter")
            # A member may describe its own counter (e.g. a wider U-Net part).
            block = config["counter"] if own is None else json.loads(own)
            counter = build_counter(
                block, len(config["counter_inputs"]), planes_at=block.get("planes_at", "mask")
            )
            counter.load_state_dict(load_file(str(path)))
        except (RuntimeError, OSError, ValueError, KeyError, SafetensorError) as err:
            problem = f"not a counter of this model ({first_line(err)})"
            raise io.InputError(f"{path}: {problem}") from None
        members.append(counter.eval())
    return members


def train_ensemble(
    model_folder: str | Path,
    train: LabeledSet,
    calibration: LabeledSet | None = None,
    *,
    members: int = 4,
    epochs: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    progress: bool = True,
    log: Log = print,
) -> list[Path]:
    """Train ``members - 1`` more counter heads on the folder's frozen segmenter.

    Parameters
    ----------
    model_folder : path
        A trained model folder; ``ensemble_<k>.safetensors`` are written into
        it (existing ones are replaced) and, with ``calibration``, its
        ``config.json`` is recalibrated by :func:`calibrate_model`.
    train, calibration : LabeledSet
        Prepared training images and the held-out calibration split (the same
        split the model was calibrated on: the members must not see it).
    members : int
        Ensemble size including the folder's own counter (>= 2).
    epochs : int, optional
        Counter epochs per member; default the config's ``train.counter.epochs``.
    seed : int
        Member ``k`` is initialised and shuffled with ``seed + k``.

    Returns
    -------
    list of Path
        The member files written.
    """

    from celltally.train import default_device

    if members < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {members}")
    folder = Path(model_folder)
    config = read_model_config(folder)
    hp = dict(config.get("train", {}).get("counter", {}))
    device = device or default_device()
    # New members are written beside the old ones and swapped in once all are trained:
    # a run that fails midway leaves the folder's ensemble as it was.
    written: list[Path] = []
    try:
        _train_members(
            folder,
            config,
            hp,
            train=train,
            calibration=calibration,
            members=members,
            epochs=epochs,
            seed=seed,
            device=device,
            progress=progress,
            log=log,
            written=written,
        )
    except BaseException:
        for path in written:  # members of an unfinished run: the folder keeps its own
            path.unlink(missing_ok=True)
        raise
    if earlier := ensemble_files(folder):
        log(
            f"replaced the model's {len(earlier)} earlier ensemble member(s) by "
            f"{members - 1} new one(s)"
        )
    for old in earlier:
        old.unlink()
    # The old members' intervals must never pass for the new ones' (not even after a kill
    # between the swap and the recalibration): dropped first, refitted after.
    config = read_model_config(folder)
    (config.get("calibration") or {}).pop("epistemic", None)
    training = config.setdefault("training", {})
    # what described the replaced members is kept apart, not left to describe these
    stale = {k: training.pop(k) for k in STALE_MEMBER_KEYS if k in training}
    if stale:
        training["replaced_members"] = stale
    training["ensemble"] = _ensemble_record(
        train,
        members=members,
        epochs=int(epochs if epochs is not None else hp.get("epochs", 30)),
        seed=seed,
    )
    write_config(folder, config)
    written = [path.replace(path.with_suffix("")) for path in written]
    if calibration is not None and len(calibration):
        calibrate_model(folder, calibration, device=device, log=log, only_epistemic=True)
    else:
        log(
            "no calibration images: --epistemic intervals use the model's own calibration "
            "until `celltally calibrate` refits them for the new members"
        )
    return written


#: Added to ``seed`` for the scenes ``held_out_sets(simulated=N)`` draws (ensemble
#: members): 2**33 is past every seed ``celltally train`` draws scenes with.
ENSEMBLE_SCENE_SEED = 2**33


def _ensemble_record(train: Any, *, members: int, epochs: int, seed: int) -> dict[str, Any]:
    """What ``config.json`` keeps of how ``train_ensemble`` made the members."""
    sources: dict[str, int] = {}
    for meta in train.meta:
        key = str(meta.get("source", "unknown"))
        sources[key] = sources.get(key, 0) + 1
    return {
        "members": [f"ensemble_{k}.safetensors" for k in range(1, members)],
        "seeds": [seed + k for k in range(1, members)],
        "counter_epochs": epochs,
        "training_images": sources,
        "how": "celltally ensemble: per member a fresh counter, initialised and shuffled "
        "with its seed, trained on the model's own segmenter (unchanged)",
    }


def _train_members(
    folder: Path,
    config: dict[str, Any],
    hp: dict[str, Any],
    *,
    train: Any,
    calibration: Any,
    members: int,
    epochs: int | None,
    seed: int,
    device: torch.device,
    progress: bool,
    log: Any,
    written: list[Path],
) -> None:
    """Train ensemble members 1 .. members - 1 into ``ensemble_<k>.safetensors.new``.

    Each file is appended to ``written`` before it is saved, so a failure
    leaves nothing the caller does not know about.
    """
    from safetensors.torch import load_file

    from celltally.train import seed_everything, train_counter

    for k in range(1, members):
        seed_everything(seed + k)
        model = CountingPipeline(config)  # fresh counter, initialised by seed + k
        fresh_counter = model.counter.state_dict()
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        model.counter.load_state_dict(fresh_counter)
        log(f"ensemble member {k} of {members - 1}")
        train_counter(
            model,
            train,
            val=calibration,
            epochs=int(epochs if epochs is not None else hp.get("epochs", 30)),
            batch_size=int(hp.get("batch_size", 16)),
            lr=float(hp.get("lr", 1e-3)),
            beta=float(hp.get("beta", 0.0)),
            schedule=str(hp.get("schedule", "one_cycle")),
            seed=seed + k,
            device=device,
            progress=progress,
            log=log,
        )
        state = {k2: v.detach().cpu().contiguous() for k2, v in model.counter.state_dict().items()}
        path = folder / f"ensemble_{k}.safetensors.new"
        written.append(path)
        save_readable(state, path)


def _off_frame_files(counter: Any, data: LabeledSet) -> dict[int, Path]:
    """The images (index: file) that ``celltally count`` counts in tiles at ``counter``'s scale.

    A folder's image whose size is not the model's frame: calibration reads it
    again from its file and prepares it as ``count`` does
    (``CellCounter.prepare_any``), one at a time; the rest are used as the set
    holds them, resized whole to the input, which is what ``count`` does with a
    frame-sized image. Before, every image was resized whole, and a model
    calibrated on half-size frames kept 4 of those 30 images inside their own
    95% intervals.
    """
    files = {}
    for i, meta in enumerate(data.meta):
        path = source_file(meta)
        if path is not None and counter.counts_in_tiles(meta["shape"]):
            files[i] = path
    return files


def _each_as_counted(counter: Any, data: LabeledSet, use: Any) -> list[Any]:
    """``use(batch)`` over the calibration images as ``count`` gives them to the network.

    ``use`` takes a list of model inputs (prepared arrays or ``ModelScaleImage``)
    and returns one item per input (a count, an embedding). Frame-sized images
    go in batches; each off-frame one (:func:`_off_frame_files`) alone, read
    from its file, so memory holds one such image at a time.
    """
    files = _off_frame_files(counter, data)
    out: list[Any] = [None] * len(data)
    framed = [i for i in range(len(data)) if i not in files]
    if framed:
        images = data.images[:, 0].numpy()
        for i, item in zip(framed, use([images[i] for i in framed]), strict=True):
            out[i] = item
    for i, path in files.items():
        meta = data.meta[i]
        raw = io.read_image(
            path, channel=meta.get("channel"), default_channel=meta.get("default_channel")
        )
        out[i] = use([counter.prepare_any(raw)])[0]
    return out


def _predict(
    counter: Any, data: LabeledSet, *, sizes: bool = True
) -> tuple[np.ndarray, np.ndarray, list[dict], list[tuple[float, float] | None]]:
    """Counts, stds, out-of-distribution features and (with ``sizes``) object sizes
    (:func:`object_size`; None each without)."""
    results = _each_as_counted(counter, data, counter.count_prepared)
    mean = np.array([r.count for r in results])
    std = np.array([r.std for r in results])
    features = [r.ood for r in results]
    measured = [
        # a frame that may hold no cells: its mask is noise (as CellCounter measures)
        object_size(r.mask) if sizes and r.ood.get("contrast", 1.0) >= LOW_CONTRAST else None
        for r in results
    ]
    return mean, std, features, measured


def _size_block(
    sizes: Sequence[tuple[float, float] | None],
    *,
    groups: Sequence[Any],
    classes: Sequence[str] | None,
    quantile: float,
) -> dict[str, Any]:
    """Object-size curves (``size``) and the factor beyond which a warning names the size.

    Fitted on the calibration images with enough foreground to measure
    (:func:`celltally.calibration.object_size`); ``size_shift`` is the
    ``quantile`` of their held-out ratios (either way, folds by ``groups``),
    at least ``MIN_SIZE_SHIFT``. The size raises no warning by itself; it
    names the likely cause of one (``ood_warning``). Empty with fewer than
    ``MIN_OOD_IMAGES`` such images. Classes as the deep-feature reference's,
    where each keeps ``MIN_OOD_IMAGES``; else one curve.
    """
    keep = [(i, s) for i, s in enumerate(sizes) if s is not None]
    if len(keep) < MIN_OOD_IMAGES:
        return {}
    fraction, width = [s[0] for _, s in keep], [s[1] for _, s in keep]
    kept = None
    if classes:
        kept = feature_classes([classes[i] for i, _ in keep], min_images=MIN_OOD_IMAGES)
    curves = size_reference(fraction, width, classes=kept)
    held = held_out_size_ratios(fraction, width, groups=[groups[i] for i, _ in keep], classes=kept)
    held = held[np.isfinite(held)]
    shifts = np.maximum(held, 1.0 / held)
    limit = max(MIN_SIZE_SHIFT, float(np.quantile(shifts, quantile)) if len(held) else 0.0)
    return {"size": curves, "size_shift": round(limit, 6)}


def _count_scale(y: np.ndarray, mean: np.ndarray) -> tuple[float, np.ndarray]:
    """The factor ``s = sum(y) / sum(mean)`` and, per image, the same factor without it.

    The intervals are fitted on counts corrected by the leave-one-out factors,
    so each image's score is out of sample, as split-conformal needs.
    """
    y, mean = np.asarray(y, float), np.asarray(mean, float)
    total = float(mean.sum())
    if len(y) < 2 or not np.isfinite(total) or np.any(mean.sum() - mean <= 0):
        raise ValueError("count_scale: needs 2 or more calibration images with counts above zero")
    if np.any(y.sum() - y <= 0):  # a factor of 0 would count every image as 0 +- 0
        raise ValueError(
            "count_scale: needs 2 or more calibration images whose true counts are above zero"
        )
    return round(float(y.sum()) / total, 5), (y.sum() - y) / (total - mean)


def _calibrated_block(
    y: np.ndarray, mean: np.ndarray, std: np.ndarray, *, scaled: bool
) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`celltally.calibration.calibrate`'s block, with a fitted ``count_scale`` if ``scaled``.

    Also returns the per-image factors the intervals were fitted with (the
    leave-one-out ones, or ones).
    """
    scale, loo = _count_scale(y, mean) if scaled else (1.0, np.ones(len(y)))
    block = calibrate(y, mean * loo, std * loo)
    if scaled:
        block["count_scale"] = scale
    return block, loo


def _with_distances(features: list[dict], distances: np.ndarray | None) -> list[dict]:
    """``features`` with their ``feature_distance`` replaced by ``distances`` (if given)."""
    if distances is None:
        return features
    return [{**f, "feature_distance": float(d)} for f, d in zip(features, distances, strict=True)]


#: Training-record keys of a shipped model that describe its own ensemble members.
STALE_MEMBER_KEYS = (
    "ensemble",
    "ensemble_note",
    "ensemble_members",
    "unet_members",
    "unet_members_stored_as",
    "unet_members_tta",
)


def _add_well_correlation(
    block: dict[str, Any], calibration: LabeledSet, y: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> None:
    """The within-well error correlation (for per-well totals, celltally.wells), where the
    calibration images' names give wells: one well per folder (two plates' A01 in two
    ``--data`` folders are two wells, as ``celltally wells`` keeps them)."""
    wells = [
        (m.get("source") or "", key)
        if m.get("name") and (key := well_key(m["name"])) is not None
        else None
        for m in calibration.meta
    ]
    if len(wells) == len(y) and (fitted := fit_group_correlation(y, mean, std, wells)):
        block["well_correlation"] = fitted


def _epistemic_block(
    folder: Path,
    calibration: LabeledSet,
    y: np.ndarray,
    *,
    count_scale: Sequence[str],
    device: torch.device | str | None,
) -> tuple[dict[str, Any], list[dict]]:
    """The ensemble's ``calibration.epistemic`` block (without ``ood``) and its features."""
    from celltally.counter import CellCounter

    ens = CellCounter.from_folder(folder, device=device, epistemic=True)
    ens.count_scale = 1.0
    e_mean, e_std, e_features, _ = _predict(ens, calibration, sizes=False)  # the plain's
    block, e_loo = _calibrated_block(y, e_mean, e_std, scaled="epistemic" in count_scale)
    _add_well_correlation(block, calibration, y, e_mean * e_loo, e_std * e_loo)
    block["members"] = 1 + len(ens.members)
    return block, e_features


def _calibrate_epistemic(
    folder: Path,
    config: dict[str, Any],
    calibration: LabeledSet,
    y: np.ndarray,
    *,
    count_scale: Sequence[str],
    device: torch.device | str | None,
    log: Log,
) -> dict[str, Any]:
    """:func:`calibrate_model` for new ensemble members: ``calibration.epistemic`` only."""
    block = dict(config["calibration"])
    epistemic, _ = _epistemic_block(folder, calibration, y, count_scale=count_scale, device=device)
    epistemic["ood"] = dict(block.get("ood") or {})  # the segmenter's features: the same
    block["epistemic"] = epistemic
    config["calibration"] = block
    write_config(folder, config)
    log(
        f"calibrated the ensemble of {_shown(folder)} on {len(y)} images: temperature "
        f"{epistemic['temperature']:.3f} (the plain intervals and checks kept as they were)"
    )
    _note_few_images(len(y), _shown(folder), log, what="--epistemic intervals")
    return block


def _note_few_images(n: int, shown: Path, log: Log, *, what: str = "intervals") -> None:
    """Say so when ``n`` calibration images cannot guarantee 95% (it needs 19)."""
    if conformal_rank(n, 0.95) > n:
        log(
            f"only {n} calibration image(s): they guarantee {what} up to "
            f"{n / (n + 1):.3f}, not 95% (that needs 19); wider levels extrapolate, "
            "never narrower than the model's own sigma. For guaranteed 95% intervals: "
            f"celltally calibrate --model {shown} --data FOLDER_OF_HELD_OUT_IMAGES"
        )


def _shown(folder: Path) -> Path:
    """The folder a user will find: a copy built in ``.NAME.partial`` becomes ``NAME``,
    and a folder rewritten in place (built in its own ``.partial``) the folder."""
    name = folder.name
    if name == ".partial":
        return folder.parent
    if name.startswith(".") and name.endswith(".partial"):
        return folder.with_name(name[1 : -len(".partial")])
    return folder


#: Fewest calibration images on which out-of-distribution thresholds are fitted.
MIN_OOD_IMAGES = 20


def _class_sizes(by: str, classes: Sequence[str]) -> dict[str, Any]:
    """What the feature reference's classes were (recorded beside the thresholds)."""
    return {"by": by, "images": {c: classes.count(c) for c in sorted(set(classes))}}


def calibrate_model(
    model_folder: str | Path,
    calibration: LabeledSet,
    *,
    quantile: float = 0.99,
    count_scale: Sequence[str] = (),
    device: torch.device | str | None = None,
    log: Log = print,
    only_epistemic: bool = False,
) -> dict[str, Any]:
    """Fit the interval calibrations and OOD thresholds of a model folder; rewrite its config.

    Runs the model on the held-out ``calibration`` split (prepared images with
    true counts), stores :func:`celltally.calibration.calibrate`'s block plus
    ``ood`` thresholds (the ``quantile`` of each out-of-distribution feature)
    in ``config.json``'s ``calibration``, and, when the folder has an ensemble,
    the same for the ensemble's total sigma in ``calibration.epistemic``. The
    mean and shrunk precision of the images' deep features (the reference of
    the feature-distance check; one per stain where the names give 2 or more
    stains of ``MIN_OOD_IMAGES`` images each) go to ``ood.safetensors``; that check's
    threshold is the ``quantile`` of the images' distances measured out of
    sample (:func:`celltally.calibration.held_out_distances`, folds by scene).
    The weights are not touched.

    ``only_epistemic`` (what ``celltally ensemble`` uses for new members) refits
    ``calibration.epistemic`` alone and keeps the rest, the feature reference
    included, as it was (the out-of-distribution features are the segmenter's,
    so the ensemble shares the plain block's thresholds); a model never
    calibrated before gets the whole block.

    ``count_scale`` names the blocks ('plain', 'epistemic') whose counts get a
    multiplicative correction ``s = sum(y) / sum(mu)`` fitted on the same
    split (stored as the block's ``count_scale``; :class:`celltally.counter.CellCounter`
    multiplies counts and stds by it). The block's intervals are fitted on
    counts corrected by leave-one-out factors (each image's without itself),
    so their scores stay out of sample. For a model that systematically under-
    or over-counts unseen images; check the gain out of sample first.

    Returns
    -------
    dict
        The new ``calibration`` block.
    """
    from celltally.counter import CellCounter

    folder = Path(model_folder)
    if len(calibration) == 0:
        raise ValueError("the calibration split is empty")
    y = calibration.counts.numpy().astype(float)

    from celltally.counter import OOD_REFERENCE_FILE

    unknown = set(count_scale) - set(COUNT_SCALE_BLOCKS)
    if unknown:
        raise ValueError(f"count_scale: unknown block(s) {sorted(unknown)}; 'plain' or 'epistemic'")
    if "epistemic" in count_scale and not ensemble_files(folder):
        raise ValueError(
            "count_scale 'epistemic': the model has no ensemble members to correct "
            "(celltally ensemble adds them)"
        )
    shown = _shown(folder)
    config = read_model_config(folder)
    old = config.get("calibration") or {}
    if only_epistemic and old.get("scores"):
        return _calibrate_epistemic(
            folder, config, calibration, y, count_scale=count_scale, device=device, log=log
        )
    for name, earlier in (("plain", old), ("epistemic", old.get("epistemic") or {})):
        if "count_scale" in earlier and name not in count_scale:
            log(
                f"dropped the {name} counts' earlier correction (x{earlier['count_scale']}); "
                f"refit it with count_scale {name!r} (--count-scale {name})"
            )
    fit_ood = len(y) >= MIN_OOD_IMAGES
    held_out: np.ndarray | None = None
    classes: list[str] | None = None
    scenes = [m.get("scene") or i for i, m in enumerate(calibration.meta)]
    if fit_ood:
        counter = CellCounter.from_folder(folder, device=device)  # also mid-train
        embeddings = np.stack(_each_as_counted(counter, calibration, counter.embed))
        # one Gaussian per stain where the names give stains (BBBC005's w1 nuclei and w2
        # cell bodies): a w2 frame shrunk 0.7x sits between the two and was flagged 15%
        # of the time against one Gaussian, 58% against one per stain (sites 1-8;
        # benchmarks/ood_classes.py)
        classes = feature_classes(
            [m.get("stain") for m in calibration.meta], min_images=MIN_OOD_IMAGES
        )
        reference = feature_reference(embeddings, classes=classes)
        # its threshold from distances measured out of sample, by scene where known
        held_out = held_out_distances(embeddings, groups=scenes, classes=classes)
        tensors = {k: torch.from_numpy(v.astype(np.float32)) for k, v in reference.items()}
        save_readable(tensors, folder / OOD_REFERENCE_FILE)
    else:  # a 99th percentile of a handful of images would flag most new ones
        (folder / OOD_REFERENCE_FILE).unlink(missing_ok=True)
        log(
            f"only {len(y)} calibration image(s): out-of-distribution warnings use loose "
            "defaults that flag only images far from anything the model saw (thresholds "
            f"are fitted on {MIN_OOD_IMAGES} or more: `celltally calibrate --data FOLDER` "
            "with more images not trained on)"
        )
    counter = CellCounter.from_folder(folder, device=device)  # with the reference, if any
    counter.count_scale = 1.0  # raw counts: an earlier correction must not shape this fit
    mean, std, features, sizes = _predict(counter, calibration)
    # object sizes (a frame at another magnification), to name that cause in a warning:
    # the mask is the segmenter's, so the plain and ensemble blocks share them
    size_block = (
        _size_block(sizes, groups=scenes, classes=classes, quantile=quantile) if fit_ood else {}
    )

    def ood_block(scores: list[dict[str, float]]) -> dict[str, Any]:
        """The thresholds of ``scores`` (with the held-out distances), the classes, the sizes."""
        if not fit_ood:
            return {}
        out = ood_thresholds(_with_distances(scores, held_out), quantile=quantile)
        if classes:
            out["feature_classes"] = _class_sizes("stain", classes)
        return {**out, **size_block}

    block, loo = _calibrated_block(y, mean, std, scaled="plain" in count_scale)
    block["ood"] = ood_block(features)
    _add_well_correlation(block, calibration, y, mean * loo, std * loo)
    if ensemble_files(folder):
        epistemic, e_features = _epistemic_block(
            folder, calibration, y, count_scale=count_scale, device=device
        )
        epistemic["ood"] = ood_block(e_features)
        block["epistemic"] = epistemic
    config["calibration"] = block
    write_config(folder, config)
    _note_few_images(len(y), shown, log)
    log(
        f"calibrated {shown} on {len(y)} images: temperature {block['temperature']:.3f}"
        + (
            f", ensemble temperature {block['epistemic']['temperature']:.3f}"
            if "epistemic" in block
            else ""
        )
    )
    return block


def _split_entries(config: Mapping[str, Any]) -> Iterator[tuple[set[Path], Mapping[str, Any]]]:
    """Each user folder of the config's ``training.split`` (not BBBC005's): where it is
    (its key resolved from here, and its recorded ``path``: older models record only
    the name as given) and what the split recorded of it.
    """
    for key, info in ((config.get("training") or {}).get("split") or {}).items():
        if key == "bbbc005" or not isinstance(info, Mapping):
            continue
        yield {Path(key).resolve(), *([Path(info["path"])] if info.get("path") else [])}, info


def _lineage(config: Mapping[str, Any], *, depth: int = 8) -> list[Mapping[str, Any]]:
    """``config``, then the configs of the models it was fine-tuned from (``training.from``),
    as far as they can still be found (at most ``depth`` back)."""
    from celltally.model_folder import resolve_model

    chain = [config]
    while len(chain) <= depth and (start := (chain[-1].get("training") or {}).get("from")):
        try:
            chain.append(read_model_config(resolve_model(start)))
        except (io.InputError, OSError, ValueError):
            break  # moved or deleted since: only the record up to here is known
    return chain


def _seen_in_training(config: Mapping[str, Any]) -> tuple[set[Path], set[str]]:
    """What a model, or one it was fine-tuned from (its :func:`_lineage`), trained on:
    the user folders of :func:`_split_entries`, and the file names recorded in
    ``training.split.train`` (models trained apart, like the shipped nuclei)."""
    folders: set[Path] = set()
    names: set[str] = set()
    for c in _lineage(config):
        for places, info in _split_entries(c):
            folders |= places
            names |= set(info.get("train_names") or ())  # recorded by `train` since 2026-11-27
        names |= set(((c.get("training") or {}).get("split") or {}).get("train") or ())
    return folders, names


def _bbbc005_sites(config: Mapping[str, Any]) -> dict[str, set[int]]:
    """The BBBC005 sites a model trained and calibrated on, as its config records them:
    the shipped model's ``training.split`` (``train_sites``, ``calibration_sites``), or
    ``train --bbbc005``'s ``training.split.bbbc005`` (sites 1-7 and 8). {} for none."""
    split = (config.get("training") or {}).get("split") or {}
    if isinstance(split.get("bbbc005"), Mapping):  # celltally train --bbbc005
        return {"training": set(range(1, 8)), "calibration": {8}}
    if "calibration_sites" in split:
        return {
            "training": {int(v) for v in split.get("train_sites") or ()},
            "calibration": {int(v) for v in split["calibration_sites"]},
        }
    return {}


def _real_bbbc005(names: Sequence[str]) -> bool:
    """Whether ``names`` are real BBBC005 images: BBBC005 names, nine in ten or more of
    them with their column's count (:data:`~celltally.naming.BBBC005_COLUMN_COUNTS`).
    A simulated plate's names have the same form with any count (one in 100 or so fits)."""
    parsed = [naming.parse_name(n) for n in names if naming.BBBC005_PATTERN.match(n)]
    fits = [
        p.column is not None
        and 1 <= p.column <= len(naming.BBBC005_COLUMN_COUNTS)
        and p.count == naming.BBBC005_COLUMN_COUNTS[p.column - 1]
        for p in parsed
    ]
    return bool(fits) and sum(fits) >= 0.9 * len(fits)


def seen_by_model(
    config: Mapping[str, Any], keys: Sequence[str], *, folder: str | Path
) -> dict[str, str]:
    """The images of ``folder`` (named by ``keys``, paths under it) the model was made with.

    Returns {key: "training" or "calibration"}. Training: the file names its
    config, or that of a model it was fine-tuned from, records as training
    images (``training.split``: the shipped ``nuclei``'s list, ``train``'s
    ``train_names``), matched by name wherever they are (as ``calibrate``
    matches them: a copy of a training image must not pass for a held-out
    one; a namesake is left out too), and real BBBC005 images
    (:func:`_real_bbbc005`; not a simulated plate's) from the sites they trained
    on. Calibration, this model's own only (it recalibrated after any it was
    fine-tuned from): the names its split records as calibration images, real
    BBBC005 images from its calibration sites, and the other images of a
    folder its ``train`` split (``folder``, or its parent when it is an
    ``images`` folder; images added since are taken for them too).
    Calibration by ``celltally calibrate`` on a user's folder is found by the
    names it records (since 2026-11-27; earlier recalibrations are not).
    """
    here = Path(folder).resolve()
    where = {here, here.parent} if here.name == "images" else {here}
    chain = _lineage(config)
    own = chain[0]
    trained: set[str] = set()
    trained_sites: set[int] = set()
    for c in chain:
        trained |= set(((c.get("training") or {}).get("split") or {}).get("train") or ())
        trained |= {n for _, info in _split_entries(c) for n in info.get("train_names") or ()}
        trained_sites |= _bbbc005_sites(c).get("training", set())
    calibrated = set(((own.get("training") or {}).get("split") or {}).get("calibration") or ())
    # and the user's images a `celltally calibrate` recalibrated it on (recorded since 2026-11-27)
    calibrated |= set(((own.get("training") or {}).get("calibrated") or {}).get("names") or ())
    calibrated_sites = _bbbc005_sites(own).get("calibration", set())
    split_here = any(where & places for places, _ in _split_entries(own))
    real_bbbc005 = _real_bbbc005([Path(k).name for k in keys])
    seen: dict[str, str] = {}
    for key in keys:
        name = Path(key).name  # a key may be a path under the folder, or a full one
        site = naming.parse_name(name).site if real_bbbc005 else None
        if key in trained or name in trained or site in trained_sites:
            seen[key] = "training"
        elif key in calibrated or name in calibrated or site in calibrated_sites or split_here:
            seen[key] = "calibration"
    return seen


def _training_folders(config: Mapping[str, Any]) -> set[Path]:
    """The user folders a model's config says it, or a model it was fine-tuned from, saw."""
    return _seen_in_training(config)[0]


def _recorded_split(config: Mapping[str, Any], folder: str | Path) -> Mapping[str, Any]:
    """What the model's config records of how ``folder`` was split in training ({} if none)."""
    where = Path(folder).resolve()
    return next((info for places, info in _split_entries(config) if where in places), {})


def held_out_sets(
    config: dict[str, Any],
    *,
    bbbc005: str | Path | None = None,
    folders: Sequence[str | Path] = (),
    simulated: int = 0,
    seed: int = 0,
    workers: int = 2,
    cache: str | Path | None = None,
    log: Log = print,
    channel: int | None = None,
    unseen_folders_calibrate: bool = False,
) -> tuple[LabeledSet | None, LabeledSet | None]:
    """Training and calibration sets split as ``celltally train`` splits them.

    BBBC005: the calibration sites recorded in the model's config (default 8;
    the shipped model: 1-8), the other sites up to 8 train (9-10, the test
    sites, are never loaded into either). A user folder: its stable scene-hash split.
    With ``unseen_folders_calibrate``, a folder the model was not trained on
    (not among the folders its config's ``training.split`` records) goes to
    calibration whole, but for images named in ``training.split.train`` (a
    model trained apart, by file name).
    ``simulated`` scenes join the training set only; they are drawn with
    ``seed + ENSEMBLE_SCENE_SEED``, beyond every seed ``celltally train`` draws
    its scenes with (``seed + 1000`` for training, ``+ 2000`` for calibration,
    ``seed`` < 2**32), so they are never a model's own training scenes. Returns ``(train,
    calibration)``, either None when no source gave images to it.
    """
    from celltally.datasets import (
        calibration_sites,
        load_bbbc005,
        load_folder,
        simulate_set,
        split_bbbc005,
    )
    from celltally.training_data import split_by_scene_hash

    size, norm = config["input_size"], config.get("normalization")
    trains: list[LabeledSet] = []
    cals: list[LabeledSet] = []
    if bbbc005 is not None:
        log(f"loading BBBC005 from {bbbc005}")
        real = load_bbbc005(bbbc005, size=size, norm=norm, cache_dir=cache)
        parts = split_bbbc005(real.meta, calibration_sites=calibration_sites(config))
        trains.append(real.subset(parts["train"]))
        cals.append(real.subset(parts["calibration"]))
    trained_on, seen_names = _seen_in_training(config)

    def unseen(user: LabeledSet, index: np.ndarray, folder: str | Path) -> np.ndarray:
        """``index`` without the images named as the model's training images."""
        keep = np.asarray([i for i in index if user.meta[i].get("name") not in seen_names], int)
        if len(keep) < len(index):
            log(
                f"{folder}: {len(index) - len(keep)} image(s) have the names of this "
                "model's training images (training.split): left out of calibration"
            )
        return keep

    given: set[Path] = set()
    for folder in folders:
        if Path(folder).resolve() in given:  # the same images twice would count twice
            log(f"{folder}: given more than once (or a link to a folder given): used once")
            continue
        given.add(Path(folder).resolve())
        log(f"loading {folder}")
        user = load_folder(  # the plane it reads by default: the one it was trained on
            folder, size=size, norm=norm, channel=channel, default_channel=recorded_channel(config)
        )
        if unseen_folders_calibrate and Path(folder).resolve() not in trained_on:
            # a model trained apart (the shipped nuclei) records its training images by name
            fresh = unseen(user, np.arange(len(user)), folder)
            what = f"all {len(fresh)}" if len(fresh) == len(user) else f"the other {len(fresh)}"
            log(f"{folder} is not one of this model's training folders: {what} images calibrate")
            cals.append(user.subset(fresh))
            continue
        parts = split_by_scene_hash(user)
        if _recorded_split(config, folder).get("calibration") == 0:
            # trained before a folder always kept a scene back: it saw all of them
            log(f"{folder}: this model trained on all of its images; none can calibrate")
            parts = {"train": np.arange(len(user)), "calibration": np.arange(0)}
        trains.append(user.subset(parts["train"]))
        cals.append(user.subset(unseen(user, parts["calibration"], folder)))
    if simulated > 0:
        log(f"simulating {simulated} training scenes")
        trains.append(
            simulate_set(
                simulated, size=size, seed=seed + ENSEMBLE_SCENE_SEED, workers=workers, norm=norm
            )
        )
    train = LabeledSet.concat(trains) if any(len(t) for t in trains) else None
    calibration = LabeledSet.concat(cals) if any(len(c) for c in cals) else None
    return train, calibration
