"""Fine-tuning on a user's folder: `celltally train --data FOLDER --from MODEL --out NEW`.

Folders are generated with the simulator (16-bit TIFFs + labels + counts.csv),
half the BBBC frame size, and the base model is a tiny density-head model
whose native frame is that size, so everything runs in seconds.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
from conftest import blob_image
from typer.testing import CliRunner

from celltally import io
from celltally.cli import app
from celltally.counter import CellCounter
from celltally.datasets import load_folder
from celltally.models.pipeline import CountingPipeline
from celltally.simulate import simulate_plate
from celltally.train import save_model_folder

runner = CliRunner()
SIZE = (260, 348)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_config(name: str) -> dict:
    from conftest import tiny_config

    config = tiny_config()
    config["counter"] = {
        "width": 0.125,
        "fc": [16, 16],
        "pool_size": [3, 4],
        "count_scale": 1.0,
        "head": "density",
    }
    config["scale"] = {"native_size": list(SIZE), "object_diameter_px": 16.0}
    config["train"]["segmenter"].update(epochs=6, batch_size=4, lr=3e-3)
    config["train"]["counter"].update(epochs=30, batch_size=4, lr=1e-2)
    config["name"] = name
    return config


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    torch.manual_seed(0)
    config = base_config("base")
    folder = tmp_path_factory.mktemp("base") / "base"
    save_model_folder(CountingPipeline(config), config, folder)
    return folder


def plate(root, images, seed):
    return simulate_plate(
        root,
        images=images,
        counts=(2, 40),
        blurs=(1,),
        stains=(1,),
        seed=seed,
        size=SIZE,
        bit_depth=16,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plates")
    return plate(root / "train", 28, seed=3), plate(root / "val", 10, seed=4)


def mae(model, folder) -> float:
    counter = CellCounter.from_pretrained(model, device="cpu")
    with (folder / "counts.csv").open() as handle:
        truth = {row["image"]: float(row["count"]) for row in csv.DictReader(handle)}
    errors = [
        abs(counter.count(folder / "images" / name).count - true) for name, true in truth.items()
    ]
    return float(np.mean(errors))


def test_finetuning_improves_its_validation_error(base_model, folders, tmp_path, monkeypatch):
    train, val = folders
    new = tmp_path / "mine"
    monkeypatch.chdir(base_model.parent)  # --from as typed: relative to here
    result = run("train", "--data", train, "--from", base_model.name, "--out", new, "--no-progress")
    assert result.exit_code == 0, result.output
    config = json.loads((new / "config.json").read_text())
    # recorded as typed, it was found again only from this folder (evaluate --held-out
    # then took the starting model's training images for held-out ones)
    assert config["training"]["from"] == str(base_model.resolve())
    monkeypatch.chdir(tmp_path)
    from celltally.uncertainty import _lineage

    assert len(_lineage(config)) == 2
    # `models` says what it was fine-tuned from and how it did against it (it did not)
    described = run("models", new)
    assert f"fine-tuned from: {base_model.resolve()}" in described.output
    compared = config["training"]["compared_with_start"]
    assert f"on its {compared['n']} calibration image(s) (held out of fine-tuning)" in (
        described.output
    )
    # --diameter's reference is now the user's objects, measured on the label images
    from celltally.datasets import labels_diameter

    measured = labels_diameter(train)
    assert 4.0 < measured < 40.0
    assert config["scale"]["object_diameter_px"] == round(measured, 2)
    assert config["scale"]["native_size"] == list(SIZE)
    # the log and the config compare it with the starting model on the held-out images
    compared = config["training"]["compared_with_start"]
    assert compared["n"] == config["calibration"]["n"]
    assert compared["mae_new"] < compared["mae_start"]
    assert "calibration image(s) (not trained on): MAE" in result.output
    assert "warning: the new model counts" not in result.output
    assert config["calibration"]["n"] > 0
    before, after = mae(base_model, val), mae(new, val)
    assert after < 0.5 * before, (before, after)
    counted = run(
        "count", val / "images", "--model", new, "--out", tmp_path / "r.csv", "--no-progress"
    )
    assert counted.exit_code == 0, counted.output
    # a copy of the training folder never calibrates on the images trained on (by name),
    # and one folder given twice counts once
    import shutil

    from celltally.uncertainty import held_out_sets

    recorded = config["training"]["split"][str(train)]["train_names"]
    assert len(recorded) == config["training"]["n_train"]
    # evaluate knows the training folder's images as ones the model was made with
    from celltally.uncertainty import seen_by_model

    keys = [p.name for p in sorted((train / "images").iterdir())]
    seen = seen_by_model(config, keys, folder=train)
    assert len(seen) == len(keys)
    assert list(seen.values()).count("training") == len(recorded)
    copy = shutil.copytree(train, tmp_path / "copy")
    said: list[str] = []
    _, cal = held_out_sets(
        config, folders=[copy, copy], unseen_folders_calibrate=True, log=said.append
    )
    assert not {m["name"] for m in cal.meta} & set(recorded)
    assert len(cal) == len(list((train / "images").iterdir())) - len(recorded)
    assert any("given more than once" in line for line in said)


def test_counts_come_from_label_masks_without_counts_csv(folders, tmp_path):
    train, _ = folders
    folder = tmp_path / "labels_only"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    truth = {}
    for i, image in enumerate(sorted((train / "images").iterdir())[:4]):
        labels = tifffile.imread(train / "labels" / (image.stem + ".tif"))
        shutil.copy(image, folder / "images" / f"well{i}.tif")
        tifffile.imwrite(folder / "labels" / f"well{i}.tif", labels)
        truth[f"well{i}.tif"] = len(np.unique(labels)) - 1
    # an empty frame's label image (all 0) counts 0
    shutil.copy(image, folder / "images" / "empty.tif")
    tifffile.imwrite(folder / "labels" / "empty.tif", np.zeros_like(labels))
    truth["empty.tif"] = 0
    data = load_folder(folder, size=(64, 96))
    assert {m["name"]: c for m, c in zip(data.meta, data.counts.tolist(), strict=True)} == truth
    assert bool(data.has_mask.all())
    binary = tmp_path / "binary_only"
    shutil.copytree(folder, binary)
    for path in (binary / "labels").iterdir():
        tifffile.imwrite(path, (tifffile.imread(path) > 0).astype(np.uint8) * 255)
    with pytest.raises(
        ValueError, match="neither _C<count>_ in the name nor a label image to count"
    ):
        load_folder(binary, size=(64, 96))
    # binary masks in masks/ beside the label images in labels/: the labels count
    both = tmp_path / "both"
    shutil.copytree(folder, both)
    shutil.copytree(binary / "labels", both / "masks")
    data = load_folder(both, size=(64, 96))
    assert {m["name"]: c for m, c in zip(data.meta, data.counts.tolist(), strict=True)} == truth
    # evaluate reads the same truths (it refused the folder train accepts)
    from celltally.evaluation import labelled_files

    for where in (folder, both):
        assert {p.name: c for p, c in labelled_files(where)} == truth
    # binary masks give no count (one value: one object or a foreground?); all-0 gives 0
    assert {p.name: c for p, c in labelled_files(binary)} == {"empty.tif": 0}
    (binary / "labels" / "empty.tif").unlink()
    with pytest.raises(ValueError, match="no label image .* gives a count"):
        labelled_files(binary)


def copy_plate(source, target):
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("mask_size", "mask is 100x80 but its image is 348x260"),
        ("missing_file", "lists 'nothere_C5.tif', which is not in"),
        ("negative", "is negative"),
        ("header_only", "counts.csv: lists no images"),
        ("two_masks", "are both masks of"),
        ("latin1", "is not UTF-8 text (save it as CSV UTF-8"),  # was a codec error
        ("csv_as_data", "a file; --data takes a folder of images"),  # was "unsupported type"
    ],
)
def test_bad_annotations_fail_before_training(base_model, folders, tmp_path, problem, message):
    folder = copy_plate(folders[1], tmp_path / "bad")
    counts = folder / "counts.csv"
    rows = list(csv.DictReader(counts.open()))
    if problem == "mask_size":
        victim = sorted((folder / "labels").iterdir())[1]
        tifffile.imwrite(victim, np.zeros((80, 100), dtype=np.uint16))
        for m in (folder / "masks").iterdir():
            m.unlink()
    elif problem == "missing_file":
        rows.append({**rows[0], "image": "nothere_C5.tif"})
    elif problem == "negative":
        rows[2]["count"] = "-3"
    elif problem == "two_masks":
        for sub in ("masks", "labels"):  # the same mask again, as X.PNG beside X.png
            victim = sorted((folder / sub).iterdir())[0]
            shutil.copy(victim, victim.with_suffix(victim.suffix.upper()))
    # beside every label image, a note that is not a mask (ignored, not an error)
    for label in list((folder / "labels").iterdir())[:1]:
        label.with_suffix(".txt").write_text("counted by hand")
    fields = list(rows[0])
    if problem == "header_only":
        rows = []
    with counts.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    if problem == "latin1":
        counts.write_bytes(counts.read_bytes() + "Zellzählung_é.tif,3\n".encode("latin-1"))
    out = tmp_path / "never"
    data = counts if problem == "csv_as_data" else folder
    result = run("train", "--data", data, "--from", base_model, "--out", out, "--no-progress")
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not out.exists()


@pytest.mark.parametrize("extra", [(), ("--seg-epochs", "0", "--channel", "0")])
def test_counts_only_folder_finetunes_only_the_counter(base_model, tmp_path, extra):
    """No masks, as docs/finetuning.md says: the segmenter is kept, the counter learns counts."""
    from safetensors.torch import load_file

    folder = plate(tmp_path / "counts_only", 8, seed=5)
    shutil.rmtree(folder / "masks", ignore_errors=True)
    shutil.rmtree(folder / "labels", ignore_errors=True)
    args = ("train", "--data", folder, "--no-progress", "--count-epochs", "2")
    # a new model cannot learn its segmenter without masks: a clear refusal
    refused = run(*args, "--out", tmp_path / "a")
    assert refused.exit_code == 2 and "needs masks" in refused.output
    assert "--from MODEL" in refused.output
    alone = run(*args, "--stage", "segmenter", "--out", tmp_path / "a2")
    assert alone.exit_code == 2 and "needs masks" in alone.output
    assert not (tmp_path / "a2").exists()  # was left, marked unfinished: count said --resume
    # nor a counter on a new (untrained) segmenter; and --from keeps its own architecture
    for more in (("--stage", "counter"), ("--seg-epochs", "0")):
        untrained = run(*args, *more, "--out", tmp_path / "c")
        assert untrained.exit_code == 2 and "add --from MODEL" in untrained.output
    preset = run(*args, "--from", base_model, "--preset", "paper", "--out", tmp_path / "d")
    assert preset.exit_code == 2 and "does not apply with --from" in preset.output
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    start = tmp_path / "start"  # a model whose own recipe used more than `fit` does
    shutil.copytree(base_model, start)
    config = json.loads((start / "config.json").read_text())
    config["train"]["counter"].update(ema=0.98, crop=[96, 256], loss="on mosaics")
    (start / "config.json").write_text(json.dumps(config))
    result = run(*args, "--from", start, "--out", tmp_path / "b", *extra)
    assert result.exit_code == 0, result.output
    if not extra:
        assert "the segmenter is kept, only the counter is trained" in result.output
    # the record says what this run did (it copied the start's recipe, segmenter epochs too)
    recipe = json.loads((tmp_path / "b" / "config.json").read_text())["train"]
    assert recipe["segmenter"]["epochs"] == 0 and recipe["counter"]["epochs"] == 2
    recorded = json.loads((tmp_path / "b" / "config.json").read_text()).get("channel")
    assert recorded == (0 if "--channel" in extra else None)  # counting reads it by default
    assert not {"ema", "crop", "loss"} & set(recipe["counter"])
    before = load_file(str(base_model / "model.safetensors"))
    after = load_file(str(tmp_path / "b" / "model.safetensors"))
    segmenter = [k for k in before if k.startswith("segmenter.")]
    counter = [k for k in before if k.startswith("counter.") and before[k].is_floating_point()]
    assert all(torch.equal(before[k], after[k]) for k in segmenter)
    assert any(not torch.equal(before[k], after[k]) for k in counter)


def test_finetuning_a_model_whose_counter_averages_a_unet(folders, tmp_path):
    # the shipped nuclei model's design (models.average): both counters learn the counts
    train, val = folders
    torch.manual_seed(0)
    config = base_config("averaged")
    unet = {"head": "unet", "width": 4, "levels": 2, "count_scale": 0.05, "tta": "none"}
    config["counter"]["average_with"] = [unet]
    base = tmp_path / "averaged"
    save_model_folder(CountingPipeline(config), config, base)
    new = tmp_path / "mine"
    result = run("train", "--data", train, "--from", base, "--out", new, "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((new / "config.json").read_text())["counter"]["average_with"] == [unet]
    before, after = mae(base, val), mae(new, val)
    assert after < 0.5 * before, (before, after)


def test_a_segmenter_trained_apart_is_still_fine_tuned_on_the_users_masks(folders, tmp_path):
    """A starting model that records 0 segmenter epochs (as the shipped nuclei model)."""
    torch.manual_seed(0)
    config = base_config("apart")
    config["train"]["segmenter"]["epochs"] = 0
    base = tmp_path / "apart"
    save_model_folder(CountingPipeline(config), config, base)
    train, _ = folders
    new = tmp_path / "mine"
    args = ["train", "--data", train, "--from", base, "--out", new, "--no-progress"]
    result = run(*args, "--count-epochs", "1")
    assert result.exit_code == 0, result.output
    assert "segmenter: 6 epochs at lr 0.0003" in result.output
    history = json.loads((new / "config.json").read_text())["history"]
    assert len(history["segmenter"]) == 6
    # a fine-tune of the fine-tune: a tenth of the first rate again, not a hundredth
    newer = run(
        "train", "--data", train, "--from", new, "--out", tmp_path / "newer", "--no-progress",
        "--count-epochs", "1", "--seg-epochs", "1",
    )  # fmt: skip
    assert newer.exit_code == 0 and "segmenter: 1 epochs at lr 0.0003" in newer.output
    kept = run(
        *args[:-3],
        "--out",
        tmp_path / "kept",
        "--no-progress",
        "--count-epochs",
        "1",
        "--seg-epochs",
        "0",
    )
    assert kept.exit_code == 0 and "segmenter:" not in kept.output
    again = run(*args[:-3], "--out", new, "--no-progress", "--count-epochs", "1")
    assert again.exit_code != 0 and "already holds a finished model" in again.output


def test_training_frames_and_the_models_frame_stay_the_same_size(base_model, folders, tmp_path):
    """Training resizes each image whole; counting does so only for frames of the model's size."""
    train, _ = folders  # SIZE frames (260 x 348)
    quick = ("--no-progress", "--seg-epochs", "1", "--count-epochs", "1")
    # a new model trained on the user's images alone takes their size as its frame
    result = run("train", "--data", train, "--out", tmp_path / "new", *quick)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["scale"]["native_size"] == list(SIZE)
    assert "the new model's frame is 348 x 260 px (width x height" in result.output
    # fine-tuning a model on images of another size warns, naming the sizes
    other = simulate_plate(
        tmp_path / "big",
        images=6,
        counts=(2, 40),
        blurs=(1,),
        stains=(1,),
        seed=9,
        size=(520, 696),
        bit_depth=16,
    )
    tuned = run("train", "--data", other, "--from", base_model, "--out", tmp_path / "t", *quick)
    assert tuned.exit_code == 0, tuned.output
    # fine-tuned on them alone: their size is its frame, so counting sees them as training did
    assert "the new model's frame is 696 x 520 px (width x height, your images' size)" in (
        tuned.output
    )
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["scale"]["native_size"] == [520, 696]
    # the log's comparison counts the held-out files as `count` does, with both models
    trained = set(config["training"]["split"][str(other)]["train_names"])
    with (other / "counts.csv").open() as handle:
        held = {r["image"]: float(r["count"]) for r in csv.DictReader(handle)}
    held = {k: v for k, v in held.items() if k not in trained}
    for key, model in (("mae_start", base_model), ("mae_new", tmp_path / "t")):
        counter = CellCounter.from_pretrained(model)
        errors = [abs(counter.count(other / "images" / k).count - v) for k, v in held.items()]
        expected = round(float(np.mean(errors)), 4)
        assert config["training"]["compared_with_start"][key] == pytest.approx(expected, abs=1e-3)
    # mixed with other data (simulated scenes), the starting frame stays, with a warning
    mixed = run(
        "train", "--data", other, "--simulated", "4", "--from", base_model,
        "--out", tmp_path / "m", *quick,
    )  # fmt: skip
    assert mixed.exit_code == 0, mixed.output
    assert "warning: 6 of 6 training images are not about the model's frame of 348 x 260" in (
        mixed.output
    )
    # of two sizes, the most common one is the frame, and the others are named
    two = tmp_path / "two"
    shutil.copytree(train, two)
    tifffile.imwrite(two / "images" / "big_C5.tif", blob_image(5, shape=(300, 400)))
    with (two / "counts.csv").open("a") as handle:
        handle.write("big_C5.tif,5,1,1\n")
    result = run("train", "--data", two, "--out", tmp_path / "two_m", *quick)
    assert result.exit_code == 0, result.output
    n = len(list((two / "images").iterdir()))
    assert f"frame is 348 x 260 px (width x height, {n - 1} of your {n} images' size)" in (
        result.output
    )
    assert f"warning: 1 of {n} training images are not about the model's frame of 348 x 260" in (
        result.output
    )
    # portrait images for a landscape input: no frame that would squash them, a warning
    tall = simulate_plate(
        tmp_path / "tall", images=6, counts=(2, 20), blurs=(1,), stains=(1,), seed=5,
        size=(348, 260),
    )  # fmt: skip
    portrait = run("train", "--data", tall, "--from", base_model, "--out", tmp_path / "p", *quick)
    assert portrait.exit_code == 0, portrait.output
    assert "are not shaped like the model's frame (348 x 260), which stays" in portrait.output
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["scale"]["native_size"] == list(SIZE)


def test_small_training_sets_get_smaller_batches():
    from celltally.training_data import _small_batches

    config = base_config("small_set")
    config["train"]["segmenter"]["batch_size"] = 8
    config["train"]["counter"]["batch_size"] = 16
    lines: list[str] = []
    # the segmenter learns from the images with a mask only
    _small_batches(config, n_images={"segmenter": 8, "counter": 18}, log=lines.append)
    assert config["train"]["segmenter"]["batch_size"] == 2
    assert config["train"]["counter"]["batch_size"] == 4
    assert "counter: batches of 4 instead of 16, so each epoch over 18" in lines[-1]
    _small_batches(config, n_images={"counter": 5}, stages="counter", log=lines.append)
    assert config["train"]["counter"]["batch_size"] == 2  # never below 2
    # a model fine-tuned from this one on many images gets the planned 16 back
    assert config["train"]["counter"]["batch_size_planned"] == 16
    _small_batches(config, n_images={"segmenter": 800, "counter": 1000}, log=lines.append)
    assert config["train"]["counter"]["batch_size"] == 16
    assert config["train"]["segmenter"]["batch_size"] == 8
    assert "batch_size_planned" not in config["train"]["counter"]
    # two processes each see half the images
    two = base_config("two")
    two["train"]["counter"]["batch_size"] = 16
    _small_batches(two, n_images={"segmenter": 0, "counter": 40}, world=2, log=lines.append)
    assert two["train"]["counter"]["batch_size"] == 5 and "per process" in lines[-1]
    # one masked image, two processes: each would take 0 steps, the segmenter untrained
    with pytest.raises(
        io.InputError, match=r"the segmenter has 1 training image\(s\) with a mask for 2"
    ):
        _small_batches(two, n_images={"segmenter": 1, "counter": 40}, world=2, log=lines.append)
    # a stage that does not run keeps its settings; a large set changes nothing
    kept = base_config("kept")
    kept["train"]["segmenter"]["epochs"] = 0
    _small_batches(kept, n_images={"segmenter": 4, "counter": 1000}, log=lines.append)
    before = base_config("kept")["train"]
    assert kept["train"]["counter"] == before["counter"]
    assert kept["train"]["segmenter"]["batch_size"] == before["segmenter"]["batch_size"]


def test_a_mask_is_the_file_with_the_image_s_own_stem(tmp_path):
    from celltally.datasets import mask_for

    for name in ("A1.png", "A1.s2.png", "well[1].png", "A1.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert mask_for(tmp_path / "x" / "A1.tif", tmp_path) == tmp_path / "A1.png"
    assert mask_for(tmp_path / "x" / "A1.s2.tif", tmp_path) == tmp_path / "A1.s2.png"
    assert mask_for(tmp_path / "x" / "well[1].tif", tmp_path) == tmp_path / "well[1].png"
    assert mask_for(tmp_path / "x" / "B2.tif", tmp_path) is None


def test_a_small_folder_keeps_at_least_one_scene_for_calibration():
    from celltally.datasets import LabeledSet
    from celltally.training_data import split_by_scene_hash

    for n in range(2, 30):
        meta = [{"scene": f"plate_B{i:02d}_s1"} for i in range(n)]
        data = LabeledSet(torch.zeros(n, 1, 4, 4), torch.zeros(n, 1, 4, 4), torch.zeros(n), meta)
        parts = split_by_scene_hash(data)
        assert parts["calibration"].size >= 1 and parts["train"].size >= 1, n
        assert split_by_scene_hash(data)["calibration"].tolist() == parts["calibration"].tolist()
    # one scene (a time-lapse of one field) whose hash falls in the calibration share: all
    # of it trains (it left no training image, and train failed in torch.cat)
    meta = [{"scene": "field_A01_s10"}] * 8
    one = LabeledSet(torch.zeros(8, 1, 4, 4), torch.zeros(8, 1, 4, 4), torch.zeros(8), meta)
    assert split_by_scene_hash(one)["train"].tolist() == list(range(8))
    # two scenes, both in the calibration share: the lower one calibrates, the other trains
    meta = [{"scene": "field_A01_s10"}, {"scene": "field_A01_s22"}] * 2
    two = LabeledSet(torch.zeros(4, 1, 4, 4), torch.zeros(4, 1, 4, 4), torch.zeros(4), meta)
    assert split_by_scene_hash(two)["train"].tolist() == [0, 2]


def test_a_segmenter_only_model_says_its_counter_is_untrained(tmp_path):
    folder = plate(tmp_path / "small", 6, seed=8)
    common = ("--data", folder, "--no-progress", "--seg-epochs", "1", "--count-epochs", "1")
    refused = run("train", *common[:3], "--count-epochs", "0", "--out", tmp_path / "x")
    assert refused.exit_code == 2 and "--stage segmenter" in refused.output
    first = run("train", *common, "--stage", "segmenter", "--out", tmp_path / "s1")
    assert first.exit_code == 0, first.output
    assert "its counter is untrained" in first.output
    # a new model on label images alone records its objects' size, for --diameter
    from celltally.datasets import labels_diameter

    scale = json.loads((tmp_path / "s1" / "config.json").read_text())["scale"]
    assert scale["object_diameter_px"] == round(labels_diameter(folder), 2)
    assert "measured on your label images" in first.output
    image = sorted((folder / "images").iterdir())[0]
    counted = run("count", image, "-o", tmp_path / "r.csv", "--model", tmp_path / "s1")
    assert counted.exit_code == 2 and "its counter is untrained" in counted.output
    listed = run("models", tmp_path / "s1")
    assert "(untrained: a --stage segmenter model, it cannot count yet)" in listed.output
    # a segmenter trained on from it still has the untrained counter, and says so
    again = run(
        "train",
        *common,
        "--stage",
        "segmenter",
        "--from",
        tmp_path / "s1",
        "--out",
        tmp_path / "s1b",
    )
    assert again.exit_code == 0, again.output
    assert "its counter is untrained" in again.output
    counted = run("count", image, "-o", tmp_path / "r.csv", "--model", tmp_path / "s1b")
    assert counted.exit_code == 2 and "its counter is untrained" in counted.output
    second = run(
        "train",
        *common,
        "--stage",
        "counter",
        "--from",
        tmp_path / "s1",
        "--out",
        tmp_path / "s2",
        "--pixel-size",
        "0.65",
    )
    assert second.exit_code == 0, second.output
    assert "pixel size of the training images: 0.65 um" in second.output
    assert run("count", image, "-o", tmp_path / "r.csv", "--model", tmp_path / "s2").exit_code == 0
    # the recorded pixel size makes count --pixel-size work: pixels twice as large, factor 2
    model = tmp_path / "s2"
    assert CellCounter.from_pretrained(model, pixel_size=1.3).factor == pytest.approx(2.0)
    listed = run("models", model)
    assert "pixels of 0.65 um (--pixel-size)" in listed.output
    # a model fine-tuned from it keeps it, and says so; --pixel-size needs --data
    again = run("train", *common, "--from", model, "--out", tmp_path / "s3")
    assert again.exit_code == 0, again.output
    assert "the new model's pixel size (--pixel-size) is 0.65 um;" in again.output
    assert (
        json.loads((tmp_path / "s3" / "config.json").read_text())["scale"]["pixel_size_um"] == 0.65
    )
    for bad, said in (
        (("--simulated", "4"), "give --data FOLDER"),
        (("--data", folder, "--pixel-size", "-1"), "positive number of micrometres"),
    ):
        args = ("--pixel-size", "0.5", *bad) if "--pixel-size" not in bad else bad
        refused = run("train", *args, "--out", tmp_path / "bad")
        assert refused.exit_code == 2 and said in refused.output, refused.output
    # 6 scenes leave a calibration image or two: the log says what they cannot promise
    assert "calibration image(s): they guarantee intervals up to" in second.output


def test_an_interrupted_run_is_not_silently_restarted(tmp_path):
    out = tmp_path / "m"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "counter.pt").write_bytes(b"from an interrupted run")
    result = run("train", "--simulated", "10", "--out", out, "--no-progress")
    assert result.exit_code == 2 and "add --resume to continue it" in result.output
    assert (out / "checkpoints" / "counter.pt").read_bytes() == b"from an interrupted run"


def test_a_second_train_into_a_folder_being_written_is_refused(tmp_path):
    """Two runs into one new --out would overwrite each other's checkpoints and model."""
    from celltally.training_data import _train_lock

    out = tmp_path / "m"
    with _train_lock(out, resume=False):  # as a first run does while it trains
        second = run("train", "--simulated", "4", "--out", out, "--no-progress")
        assert second.exit_code == 2, second.output
        assert "another celltally train is writing this folder" in second.output
        assert not (out / "checkpoints").exists()
    args = ("--simulated", "4", "--seg-epochs", "1", "--count-epochs", "1", "--no-progress")
    after = run("train", *args, "--out", out)  # once the first has let go
    assert after.exit_code == 0, after.output
    assert (out / "config.json").exists()


def test_a_finished_model_is_never_trained_over_and_a_stop_in_calibration_resumes(
    tmp_path, monkeypatch
):
    import shutil

    from celltally import uncertainty
    from celltally.counter import CellCounter

    args = ("--simulated", "4", "--seg-epochs", "1", "--count-epochs", "1", "--no-progress")
    out = tmp_path / "m"
    real = uncertainty.calibrate_model

    def stopped(*a, **k):  # Ctrl-C while the finished weights are being calibrated
        raise KeyboardInterrupt

    monkeypatch.setattr(uncertainty, "calibrate_model", stopped)
    interrupted = run("train", *args, "--out", out)
    assert interrupted.exit_code == 130 and "with --resume to go on" in interrupted.output
    monkeypatch.setattr(uncertainty, "calibrate_model", real)
    assert (out / "config.json").exists()  # it looks finished, but is not
    with pytest.raises(io.InputError, match="stopped before it finished"):
        CellCounter.from_pretrained(out)
    early = tmp_path / "early"  # stopped before it wrote any model file
    early.mkdir()
    (early / ".unfinished").touch()
    with pytest.raises(io.InputError, match="has not finished; run the same"):
        CellCounter.from_pretrained(early)
    plain = run("train", *args, "--out", out)
    assert plain.exit_code == 2 and "add --resume" in plain.output
    resumed = run("train", *args, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    counter = CellCounter.from_pretrained(out)
    assert counter.calibration.get("temperature")  # calibrated this time
    weights = (out / "model.safetensors").read_bytes()
    # finished: refused with or without --resume, checkpoints or not
    shutil.rmtree(out / "checkpoints")
    for extra in ((), ("--resume",)):
        again = run("train", *args, "--out", out, *extra)
        assert again.exit_code == 2 and "already holds a finished model" in again.output
    assert (out / "model.safetensors").read_bytes() == weights


def test_a_shipped_models_name_means_the_shipped_model(tmp_path, monkeypatch):
    import shutil

    from celltally.counter import resolve_model
    from celltally.model_folder import WEIGHTS_DIR

    monkeypatch.chdir(tmp_path)
    refused = run("train", "--simulated", "4", "--out", "bbbc005", "--no-progress")
    assert refused.exit_code == 2 and "the name of a shipped model" in refused.output
    assert not (tmp_path / "bbbc005").exists()
    shutil.copytree(WEIGHTS_DIR / "nuclei", tmp_path / "bbbc005")  # a folder here, that name
    assert resolve_model("bbbc005") == WEIGHTS_DIR / "bbbc005"
    assert resolve_model("./bbbc005").resolve() == (tmp_path / "bbbc005").resolve()
    copy = run("calibrate", "--model", "bbbc005", "--data", tmp_path, "--out", "nuclei")
    assert copy.exit_code == 2 and "the name of a shipped model" in copy.output
    inside = run("train", "--simulated", "4", "--out", tmp_path / "mm" / "nuclei", "--no-progress")
    assert inside.exit_code == 2 and "named like the shipped model 'nuclei'" in inside.output


def test_a_counter_with_one_training_image_is_refused_before_training(tmp_path):
    data = tmp_path / "two"
    (data / "masks").mkdir(parents=True)
    for i, n in enumerate((4, 9)):
        image = blob_image(n, shape=SIZE, seed=i)
        tifffile.imwrite(data / f"img{i}_C{n}_s{i + 1}.tif", image)
        tifffile.imwrite(data / "masks" / f"img{i}_C{n}_s{i + 1}.tif", (image > 60).astype("uint8"))
    out = tmp_path / "p"
    result = run("train", "--data", data, "--preset", "paper", "--out", out, "--no-progress")
    assert result.exit_code == 2 and "it needs 2 or more" in result.output, result.output
    assert not (out / "checkpoints").exists()


def test_one_scene_says_its_intervals_come_from_simulated_scenes(base_model, tmp_path):
    data = tmp_path / "timelapse"
    data.mkdir()
    rows = ["image,count"]
    for t in range(1, 5):  # one field over time: one scene, none left to hold out
        tifffile.imwrite(data / f"exp_A01_s1_t{t:02d}.tif", blob_image(6 + t, shape=SIZE, seed=t))
        rows.append(f"exp_A01_s1_t{t:02d}.tif,{6 + t}")
    (data / "counts.csv").write_text("\n".join(rows) + "\n")
    quick = ("--no-progress", "--seg-epochs", "0", "--count-epochs", "1", "--from", base_model)
    result = run("train", "--data", data, "--out", tmp_path / "m", *quick)
    assert result.exit_code == 0, result.output
    assert "warning: your images are too few scenes to hold some out" in result.output
    assert f"celltally calibrate --model {tmp_path / 'm'} --data FOLDER" in result.output


def test_images_off_the_models_frame_calibrate_as_count_counts_them(base_model, tmp_path):
    other = simulate_plate(
        tmp_path / "big", images=6, counts=(2, 40), blurs=(1,), stains=(1,), seed=2,
        size=(130, 174),
    )  # fmt: skip
    out = tmp_path / "c"
    result = run("calibrate", "--model", base_model, "--data", other, "--out", out)
    assert result.exit_code == 0, result.output
    assert "not about the model's frame" not in result.output  # counted in tiles, as count does
    counter = CellCounter.from_pretrained(out)
    n = len(json.loads((out / "config.json").read_text())["calibration"]["scores"])
    assert n == 6
    truth = io.read_counts_csv(other / "counts.csv")
    # at n / (n + 1) the conformal multiplier is the largest score: each of the images it
    # was fitted on lies inside its own interval, if calibrate counted them as count does
    for name, true in truth.items():
        result = counter.count(other / "images" / name, level=n / (n + 1))
        assert result.low - 1e-3 <= true <= result.high + 1e-3, (name, true, result)


def test_a_folder_given_twice_is_used_once_and_a_bad_seed_is_refused(tmp_path):
    folder = plate(tmp_path / "small", 6, seed=8)
    common = ("--no-progress", "--seg-epochs", "0", "--count-epochs", "1", "--from", "bbbc005")
    once = run("train", "--data", folder, *common, "--out", tmp_path / "a")
    assert once.exit_code == 0, once.output
    twice = run("train", "--data", folder, "--data", f"{folder}/", *common, "--out", tmp_path / "b")
    assert twice.exit_code == 0, twice.output
    assert "--data: 1 folder(s) given twice are used once" in twice.output
    sizes = [line for line in once.output.splitlines() if line.startswith("train ")]
    assert sizes and sizes[0] in twice.output  # the same split, not each image twice
    for seed in ("-1", str(2**32)):
        bad = run("train", "--data", folder, *common, "--seed", seed, "--out", tmp_path / "c")
        assert bad.exit_code == 2 and "--seed" in bad.output
        assert not (tmp_path / "c").exists()


def test_a_pixel_size_is_recorded_for_the_models_frame():
    from celltally.training_data import _check_frame_size, _record_pixel_size

    said: list[str] = []
    big = [{"shape": [1040, 1392]}] * 3
    # images twice the frame's size, resized whole into it: frame pixels twice as large
    config = {"input_size": [192, 256], "scale": {"native_size": [520, 696]}}
    _record_pixel_size(config, 0.65, None, said.append, big)
    assert config["scale"]["pixel_size_um"] == pytest.approx(1.3)
    assert "to which your 1392 x 1040 images are resized" in said[-1]
    # a frame adopted from the user's images: an inherited pixel size follows the frame
    config = {
        "input_size": [192, 256],
        "scale": {"native_size": [520, 696], "pixel_size_um": 0.65, "object_diameter_px": 10},
    }
    _check_frame_size(config, big, adopt=True, log=said.append)
    assert config["scale"]["native_size"] == [1040, 1392]
    assert config["scale"]["pixel_size_um"] == pytest.approx(0.325)
    assert config["scale"]["object_diameter_px"] == pytest.approx(20)
    # the notes give the starting model's own values and the assumption (they read as if
    # the starting model had 0.325 um and 20 px)
    _record_pixel_size(config, None, "start", said.append)
    assert "is 0.325 um (start's 0.65 um over your frame over its frame, 2)" in said[-1]
    from celltally.training_data import _rescale_reference

    _rescale_reference(config, [], "start", said.append)
    assert "diameter (--diameter) is 20 px: start's 10 px times your frame" in said[-1]
    assert "if they are crops at its magnification" in said[-1]


def test_files_a_training_folder_leaves_out_are_named(folders, tmp_path):
    from celltally.datasets import unused_files

    train, _ = folders
    folder = tmp_path / "mine"
    shutil.copytree(train, folder)
    assert unused_files(folder) == []
    images = sorted((folder / "images").iterdir())
    first = images[0]
    shutil.copy(folder / "labels" / f"{first.stem}.tif", folder / "labels" / "A01_mask.tif")
    (folder / "images" / "p1").mkdir()
    shutil.copy(first, folder / "images" / "p1" / "extra.tif")
    notes = unused_files(folder)  # each was left out without a word
    assert len(notes) == 2
    assert "1 image(s) not used, not in counts.csv (e.g. p1/extra.tif)" in notes[0]
    assert "labels: 1 file(s) are no image's mask (e.g. A01_mask.tif)" in notes[1]
    (folder / "counts.csv").unlink()  # then only the top-level images count
    assert "in sub-folders, which only counts.csv can name" in unused_files(folder)[0]
    # the mask of an image left out is that image's, not "no image's mask"
    (folder / "labels" / "A01_mask.tif").unlink()
    (folder / "labels" / "p1").mkdir()
    shutil.copy(folder / "labels" / f"{first.stem}.tif", folder / "labels" / "p1" / "extra.tif")
    assert len(unused_files(folder)) == 1


def test_counts_csv_inside_the_images_folder_is_taken(folders, tmp_path):
    from celltally.evaluation import labelled_files

    folder = copy_plate(folders[1], tmp_path / "mine")
    rows = list(csv.DictReader((folder / "counts.csv").open()))
    with (folder / "counts.csv").open("w", newline="") as handle:  # unlike the names' _C<n>_
        handle.write("image,count\n" + "".join(f"{r['image']},{r['count']}.5\n" for r in rows))
    truth = {p.name: c for p, c in labelled_files(folder)}
    assert all(c % 1 == 0.5 for c in truth.values())
    shutil.move(folder / "counts.csv", folder / "images" / "counts.csv")  # was "no counts.csv"
    assert {p.name: c for p, c in labelled_files(folder)} == truth
    data = load_folder(folder, size=(64, 96))
    assert {m["name"]: c for m, c in zip(data.meta, data.counts.tolist(), strict=True)} == truth


def test_too_few_images_fail_before_calibration_scenes_are_simulated(base_model, tmp_path):
    folder = plate(tmp_path / "one", 1, seed=8)
    out = tmp_path / "never"
    result = run("train", "--data", folder, "--from", base_model, "--out", out, "--no-progress")
    assert result.exit_code == 2 and "the counter would train on 1 image" in result.output
    assert "simulating" not in result.output  # 60 calibration scenes were simulated first
    assert not out.exists()


def test_a_run_killed_comparing_with_its_start_resumes_to_the_comparison(
    base_model, folders, tmp_path, monkeypatch
):
    from celltally import training_data

    train, _ = folders
    new = tmp_path / "mine"
    real = training_data.compare_with_start

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_data, "compare_with_start", killed)
    args = ("train", "--data", train, "--from", base_model, "--out", new, "--no-progress")
    args += ("--seg-epochs", "1", "--count-epochs", "2")
    assert run(*args).exit_code == 130
    monkeypatch.setattr(training_data, "compare_with_start", real)
    again = run(*args, "--resume")  # was "already holds a finished model": comparison lost
    assert again.exit_code == 0, again.output
    assert "compared_with_start" in json.loads((new / "config.json").read_text())["training"]


def test_bbbc005_folder_without_its_test_sites_trains_without_test_images(tmp_path, tiny_model):
    folder = plate(tmp_path / "sim", 4, seed=3)  # BBBC005 names, every scene at site s01
    out = tmp_path / "m"
    common = ("--no-progress", "--seg-epochs", "0", "--count-epochs", "1", "--from", tiny_model)
    result = run("train", "--bbbc005", folder, *common, "--out", out)
    assert result.exit_code == 0, result.output  # it failed inside torch.cat, in one line
    assert "has no images of site(s) 9-10, BBBC005's test sites" in result.output
    assert "has no images of site(s) 8, BBBC005's calibration sites" in result.output
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["n_test"] == 0
    # what a rerun needs besides data and settings (weights depend on the thread count)
    env = training["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["resumed"] is False and env["device"] == "cpu" and env["processes"] == 1
    assert env["command"] and env["celltally"] and env["started"].endswith("+00:00")
    # a copy of the test sites alone: nothing to train on, said before anything is made
    for image in (folder / "images").iterdir():
        image.rename(image.with_name(image.name.replace("_s01_", "_s09_")))
    (folder / "counts.csv").unlink()
    refused = run("train", "--bbbc005", folder, *common, "--out", tmp_path / "none")
    assert refused.exit_code != 0 and "no training images" in refused.output
    assert "has no images of site(s) 1-7, BBBC005's training sites" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "none").exists()
