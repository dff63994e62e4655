import csv
import json
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import blob_image
from typer.testing import CliRunner

from celltally.cli import app
from celltally.counter import CellCounter

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_count_writes_rows_and_masks(tiny_model, image_folder, tmp_path):
    out = tmp_path / "res.csv"
    masks = tmp_path / "masks"
    result = run(
        "count",
        image_folder,
        "--out",
        out,
        "--model",
        tiny_model,
        "--save-masks",
        masks,
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "counted 2 of 2 images in " in result.output and " img/s -> " in result.output
    rows = read_rows(out)
    assert sorted(r["well"] for r in rows) == ["A01", "A02"]  # rows in processing order
    assert {"file", "count", "std", "low", "high", "blur", "stain", "site"} <= set(rows[0])
    for r in rows:
        assert float(r["low"]) <= float(r["count"]) <= float(r["high"])
        assert r["true_count"] in ("3", "8")
    assert len(list(masks.glob("*_mask.png"))) == 2
    assert len(list(masks.glob("*_mask_std.tif"))) == 2


def test_count_matches_python_api(tiny_model, image_folder, tmp_path):
    out = tmp_path / "res.csv"
    assert (
        run("count", image_folder, "-o", out, "--model", tiny_model, "--no-progress").exit_code == 0
    )
    counter = CellCounter.from_pretrained(tiny_model)
    first = sorted(image_folder.iterdir())[0]
    row = next(r for r in read_rows(out) if r["file"] == str(first))
    assert float(row["count"]) == pytest.approx(counter.count(first).count, abs=0.01)


def test_python_api_refuses_uncountable_arrays_and_takes_one_path(tiny_model, image_folder):
    from celltally import io

    counter = CellCounter.from_pretrained(tiny_model)
    for bad in (np.zeros((64, 64), np.complex64), np.full((64, 64), 1e39)):
        with pytest.raises(io.InputError):
            counter.count(bad)
    first = sorted(image_folder.iterdir())[0]
    (only,) = list(counter.count_paths(str(first)))  # one path, not its characters
    assert only[0] == first and not isinstance(only[1], Exception)


def test_bad_file_in_folder_is_reported_and_rest_counted(tiny_model, image_folder, tmp_path):
    (image_folder / "broken.tif").write_bytes(b"II*\x00garbage")
    out = tmp_path / "res.csv"
    result = run("count", image_folder, "-o", out, "--model", tiny_model, "--no-progress")
    assert result.exit_code == 1
    assert "broken.tif" in result.output
    assert len(read_rows(out)) == 2


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.tif", "no such file"),
        (lambda d: d, "contains no"),  # empty folder
        (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "unsupported"),
    ],
)
def test_bad_input_one_line_error(tiny_model, tmp_path, make, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    target = make(empty) if expected != "contains no" else empty
    result = run("count", target, "-o", tmp_path / "r.csv", "--model", tiny_model)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
    assert "Traceback" not in result.output


def test_corrupt_and_stack_files_fail_cleanly(tiny_model, tmp_path):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + bytes(50))
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 32, 32), np.uint8))
    for path in (corrupt, stack):
        result = run(
            "count", path, "-o", tmp_path / "r.csv", "--model", tiny_model, "--no-progress"
        )
        assert result.exit_code == 1
        assert path.name in result.output and "Traceback" not in result.output


def test_unknown_model_and_level(image_folder, tmp_path):
    result = run("count", image_folder, "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "no such model" in result.output
    result = run("count", image_folder, "--level", "1.5")
    assert result.exit_code == 2 and "--level" in result.output


def test_a_level_above_what_the_calibration_supports_is_noted(tiny_model, image_folder, tmp_path):
    import shutil

    model = tmp_path / "five_scores"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["calibration"] = {"default": "conformal", "scores": [0.2, 0.5, 0.9, 1.3, 2.0]}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "res.csv"
    common = ("--model", model, "--no-progress")
    supported = run("count", image_folder, "-o", out, "--level", "0.8", *common)
    assert supported.exit_code == 0 and "note: level" not in supported.output
    above = run("count", image_folder, "-o", tmp_path / "b.csv", "--level", "0.9", *common)
    assert above.exit_code == 0, above.output
    assert "note: level 0.9 is above the 0.833 that the model's 5 calibration images" in (
        above.output
    )
    evaluated = run(
        "evaluate", image_folder, "--level", "0.9", "--out", tmp_path / "e.json", *common
    )
    assert "note: level 0.9 is above" in evaluated.output


def test_evaluate_writes_json(tiny_model, image_folder, tmp_path):
    from conftest import blob_image

    # a blur level with one image: its group's R² is undefined
    tifffile.imwrite(image_folder / "SIMCEPImages_A03_C5_F23_s01_w1.TIF", blob_image(5, seed=7))
    tifffile.imwrite(image_folder / "no_count_here.tif", blob_image(3, seed=8))  # not scored
    out = tmp_path / "eval.json"
    result = run("evaluate", image_folder, "--model", tiny_model, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "mae" in result.output and out.exists()
    assert "1 image(s) of the folder left out: no true count" in result.output
    assert [p.endswith("no_count_here.tif") for p in json.loads(out.read_text())["unlabelled"]] == [
        True
    ]
    # strict JSON: the one-image groups' R² is NaN, written as null (JSON.parse refuses NaN)
    text = out.read_text()
    assert "NaN" not in text
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    groups = [m for m in report["metrics"].values() if m["n"] == 1]
    assert groups and all(m["r2"] is None for m in groups)
    assert all(isinstance(m["n"], int) for m in report["metrics"].values())
    assert report["normalization"]["method"] == "percentile"  # what it was counted with
    flat = run(
        "evaluate", image_folder, "--model", tiny_model, "--out", out, "--background", "quadratic"
    )
    assert flat.exit_code == 0, flat.output
    assert json.loads(out.read_text())["normalization"]["background"] == "quadratic"
    # --sites takes ranges; a bad value is a one-line error naming the option
    sites = run("evaluate", image_folder, "--model", tiny_model, "--out", out, "--sites", "1-3")
    assert sites.exit_code == 0, sites.output
    bad = run("evaluate", image_folder, "--model", tiny_model, "--out", out, "--sites", "9-x")
    assert bad.exit_code != 0 and "--sites: expected numbers" in bad.output
    assert "Traceback" not in bad.output


def test_evaluate_names_the_images_a_model_was_made_with(tiny_model, tmp_path):
    import shutil

    from conftest import blob_image

    from celltally.uncertainty import seen_by_model

    # real BBBC005 names (each column's count as in BBBC005's design): site 1 trained on,
    # site 2 calibrated on (as the shipped model's split records its sites); a file name
    # recorded as a calibration image (as nuclei's split); site 9 held out
    folder = tmp_path / "plate"
    folder.mkdir()
    names = {
        "SIMCEPImages_A01_C1_F1_s01_w1.TIF": "training",
        "SIMCEPImages_A02_C5_F1_s01_w1.TIF": "training",
        "SIMCEPImages_A03_C10_F1_s02_w1.TIF": "calibration",
        "SIMCEPImages_A04_C14_F1_s03_w1.TIF": "calibration",
        "SIMCEPImages_A05_C18_F1_s09_w1.TIF": None,
    }
    for i, name in enumerate(names):
        tifffile.imwrite(folder / name, blob_image(3 + i, seed=i))
    model = tmp_path / "made"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["training"] = {
        "split": {
            "train_sites": [1],
            "calibration_sites": [2],
            "calibration": ["SIMCEPImages_A04_C14_F1_s03_w1.TIF"],
        }
    }
    (model / "config.json").write_text(json.dumps(config))
    seen = {k: v for k, v in names.items() if v}
    assert seen_by_model(config, list(names), folder=folder) == seen
    # a simulated plate's names (any count) and other namings at those sites are new images
    simulated = ["SIMCEPImages_A01_C37_F1_s01_w1.TIF", "SIMCEPImages_B02_C12_F1_s02_w2.TIF"]
    assert seen_by_model(config, [*simulated, "plate_B02_s2.tif"], folder=folder) == {}
    out = tmp_path / "e.json"
    said = run("evaluate", folder, "--model", model, "--out", out, "--no-progress")
    assert said.exit_code == 0, said.output
    assert (
        "warning: 4 image(s) the model was made with (2 trained on, 2 calibrated on, as its "
        "config.json records): their errors and coverage are not held-out figures"
    ) in said.output
    report = json.loads(out.read_text())
    assert report["seen"] == {"training": 2, "calibration": 2, "left_out": False}
    assert report["metrics"]["all"]["n"] == 5
    assert {r["file"]: r["seen"] for r in report["rows"]} == names
    # --held-out scores only the others; none left is a one-line error
    held = run("evaluate", folder, "--model", model, "--out", out, "--held-out")
    assert held.exit_code == 0, held.output
    assert "left out 4 image(s) the model was made with" in held.output
    report = json.loads(out.read_text())
    assert [r["file"] for r in report["rows"]] == ["SIMCEPImages_A05_C18_F1_s09_w1.TIF"]
    assert report["rows"][0]["seen"] is None and report["seen"]["left_out"] is True
    none = run("evaluate", folder, "--model", model, "--out", out, "--sites", "1,2", "--held-out")
    assert none.exit_code == 2 and "none is held out" in none.output, none.output


def test_what_a_model_was_made_with_is_its_own_record(tiny_model, tmp_path):
    import shutil

    from celltally.uncertainty import seen_by_model

    parent = tmp_path / "parent"
    shutil.copytree(tiny_model, parent)
    config = json.loads((parent / "config.json").read_text())
    config["training"] = {"split": {"train_sites": [1], "calibration_sites": [2]}}
    (parent / "config.json").write_text(json.dumps(config))
    trained = tmp_path / "mine"
    (trained / "images").mkdir(parents=True)
    child = {
        "training": {
            "from": str(parent),
            "split": {
                str(trained): {"path": str(trained), "train_names": ["a.tif", "b.tif"]},
            },
        }
    }
    real = ["SIMCEPImages_A01_C1_F1_s01_w1.TIF", "SIMCEPImages_A02_C5_F1_s02_w1.TIF"]
    # the parent's training sites are the child's training too; its calibration sites not
    assert seen_by_model(child, real, folder=tmp_path) == {real[0]: "training"}
    assert seen_by_model(config, real, folder=tmp_path) == {
        real[0]: "training",
        real[1]: "calibration",
    }
    # the trained folder, given as itself or as its images/ folder: the rest calibrated
    mine = ["a.tif", "b.tif", "c.tif"]
    expected = {"a.tif": "training", "b.tif": "training", "c.tif": "calibration"}
    assert seen_by_model(child, mine, folder=trained) == expected
    assert seen_by_model(child, mine, folder=trained / "images") == expected
    # elsewhere (a copy, or a larger folder holding the images) the training names are
    # still training images, and the others are not taken for calibration images
    other = ["a.tif", "b.tif", *(f"new{i}.tif" for i in range(6))]
    assert seen_by_model(child, other, folder=tmp_path / "other") == {
        "a.tif": "training",
        "b.tif": "training",
    }


def test_evaluate_reports_unreadable_images_and_exits_1(tiny_model, image_folder, tmp_path):
    (image_folder / "SIMCEPImages_A03_C5_F1_s01_w1.TIF").write_bytes(b"not a tiff")
    out = tmp_path / "eval.json"
    result = run("evaluate", image_folder, "--model", tiny_model, "--out", out, "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "SIMCEPImages_A03_C5_F1_s01_w1.TIF" in result.output
    assert "1 of 3 images could not be counted" in result.output
    report = json.loads(out.read_text())  # the metrics of the other two are still written
    assert report["metrics"]["all"]["n"] == 2 and len(report["errors"]) == 1


def test_evaluate_takes_the_scale_and_normalization_options(tiny_model, image_folder, tmp_path):
    out = tmp_path / "eval.json"
    args = ("evaluate", image_folder, "--model", tiny_model, "--out", out, "--no-progress")
    assert run(*args, "--norm-high", "99.0").exit_code == 0
    assert run(*args, "--threads", "1").exit_code == 0
    assert run(*args, "--threads", "0").exit_code == 2
    # the tiny model records no object scale: --diameter is refused in one line
    result = run(*args, "--diameter", "20")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "--rescale 2 for 2 x 2-binned images" in result.output  # what it can do instead
    result = run(*args, "--rescale", "1.5")  # the tiny model's head counts one fixed frame
    assert result.exit_code == 2 and "'fc' head, which cannot rescale" in result.output
    result = run(*args, "--rescale", "2", "--diameter", "20")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "error: --diameter and --rescale: give only one of" in result.output


def test_rescale_brings_binned_images_back_to_the_shipped_model_scale(tmp_path):
    from skimage.transform import rescale

    from celltally.simulate import simulate_plate

    plate = simulate_plate(tmp_path / "p", images=1, counts=[60], blurs=(1,), stains=(2,))
    (full,) = sorted((plate / "images").iterdir())
    binned = tmp_path / "binned" / full.name  # 2 x 2 binning: cells half as wide
    binned.parent.mkdir()
    image = tifffile.imread(full).astype(np.float32)
    small = rescale(image, 0.5, anti_aliasing=True, preserve_range=True)
    tifffile.imwrite(binned, np.round(small).astype(np.uint8))
    counts = {}
    for name, extra in (("plain", ()), ("rescaled", ("--rescale", "2"))):
        out = tmp_path / f"{name}.csv"
        result = run("count", binned, "-o", out, "--threads", "1", "--no-progress", *extra)
        assert result.exit_code == 0, result.output
        (row,) = list(csv.DictReader(out.open()))
        counts[name] = float(row["count"])
    assert abs(counts["rescaled"] - 60) < 5, counts
    assert abs(counts["plain"] - 60) > 10, counts  # cells half as wide as it saw


def test_count_says_how_many_images_look_unlike_the_calibration_data(tmp_path):
    from celltally.simulate import simulate_plate

    # BBBC005-like cell bodies are far from the nuclei model's calibration images
    plate = simulate_plate(tmp_path / "p", images=1, counts=[60], blurs=(48,), stains=(2,))
    out = tmp_path / "res.csv"
    args = ("-o", out, "--model", "nuclei", "--threads", "1", "--no-progress")
    result = run("count", plate / "images", *args)
    assert result.exit_code == 0, result.output
    assert f"1 of 1 images in {out} flagged as unlike the model's calibration" in result.output


def test_count_suggests_a_factor_for_images_at_another_magnification(tmp_path):
    from skimage.transform import rescale

    from celltally.calibration import suggested_rescale
    from celltally.simulate import simulate_scene

    folder = tmp_path / "zoomed"
    folder.mkdir()
    for seed in (1, 2):  # cell bodies at twice BBBC005's magnification, named as BBBC005's
        image = simulate_scene(60, stain=2, seed=seed).image.astype(np.float32)
        large = np.clip(np.round(rescale(image, 2.0, preserve_range=True)), 0, 255)
        tifffile.imwrite(folder / f"SIMCEPImages_A0{seed}_C60_F1_s1_w2.TIF", large.astype(np.uint8))
    out = tmp_path / "res.csv"
    result = run("count", folder, "-o", out, "--threads", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert all(abs(float(r["count"]) - 60) > 30 for r in rows), rows  # badly miscounted
    factors = [suggested_rescale(r["warning"]) for r in rows]
    assert all(0.4 < f < 0.65 for f in factors), rows  # the truth: 0.5
    said = re.search(
        r"2 of them have objects wider or narrower than the calibration images' \(their "
        r"warnings say how much\): if they were taken at another magnification, count them "
        r"again with --rescale (\S+) \(the median of their factors; or --diameter\)",
        " ".join(result.output.split()),
    )
    assert said and float(said[1]) == pytest.approx(statistics.median(factors), abs=0.006)
    fixed = tmp_path / "fixed.csv"
    again = run("count", folder, "-o", fixed, "--rescale", "0.5", "--threads", "1", "--no-progress")
    assert again.exit_code == 0 and "another magnification" not in again.output
    assert all(abs(float(r["count"]) - 60) < 6 for r in csv.DictReader(fixed.open()))


def test_version_and_a_bad_stage(tmp_path):
    from celltally import __version__

    version = run("--version")
    assert version.exit_code == 0 and version.output.strip() == f"celltally {__version__}"
    # a bad --stage is refused before any data is loaded or simulated
    bad = run("train", "--out", tmp_path / "m", "--simulated", "100000", "--stage", "Counter")
    assert bad.exit_code == 2 and "--stage must be both, segmenter or counter" in bad.output


def test_console_entry_point_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "celltally.cli", "count", str(tmp_path / "none.tif")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "none.tif" in proc.stderr


def test_demo_counts_a_simulated_plate_with_the_shipped_model(tmp_path):
    """The README's first command: simulate, count with the shipped model, compare, write CSV."""
    result = run("demo", "--out", tmp_path / "demo", "--images", 3, "--seed", 11)
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "demo" / "results.csv")
    assert len(rows) == 3 * 6  # 3 scenes x (F1, F23, F48) x (w1, w2)
    errors = [abs(float(r["count"]) - float(r["true_count"])) for r in rows]
    # the shipped model, not an untrained one: a few cells at most on its own kind of image
    assert sum(errors) / len(errors) < 4.0 and max(errors) < 12.0
    assert all(float(r["low"]) <= float(r["count"]) <= float(r["high"]) for r in rows)
    assert "mean |error|" in result.output and "results.csv" in result.output
    # count's own columns: the other commands take the demo's CSV as a results CSV
    wells = run("wells", tmp_path / "demo" / "results.csv", "--out", tmp_path / "w.csv")
    assert wells.exit_code == 0, wells.output
    assert len(read_rows(tmp_path / "w.csv")) == 3 * 6  # one site per well and stain
    # run again into the same folder with another plate: that plate alone
    again = run("demo", "--out", tmp_path / "demo", "--images", 1, "--seed", 12)
    assert again.exit_code == 0, again.output
    assert len(read_rows(tmp_path / "demo" / "results.csv")) == 6
    assert len(list((tmp_path / "demo" / "plate" / "images").iterdir())) == 6


def _silent(_: str) -> None:
    return None


def test_channel_option_across_commands(tiny_model, image_folder, tmp_path):
    """Two-channel TIFFs: refused without --channel, read the same as 2-D files with it."""
    from celltally.datasets import load_folder

    two = tmp_path / "two"
    two.mkdir()
    for path in sorted(image_folder.glob("*.TIF")):  # counts from the BBBC names
        image = tifffile.imread(path)
        planes = np.stack([np.zeros_like(image), image])
        tifffile.imwrite(two / path.name, planes, photometric="minisblack")
    first = sorted(two.glob("*.TIF"))[0]

    refused = run("explain", first, "--model", tiny_model, "--out", tmp_path / "x.png")
    assert refused.exit_code != 0 and "--channel 0-1" in refused.output
    shown = run(
        "explain", first, "--model", tiny_model, "--out", tmp_path / "x.png", "--channel", "1"
    )
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "x.png").stat().st_size > 0

    flat = tmp_path / "flat.json"
    picked = tmp_path / "picked.json"
    args = ("--model", tiny_model, "--no-progress")
    assert run("evaluate", image_folder, *args, "--out", flat).exit_code == 0
    result = run("evaluate", two, *args, "--out", picked, "--channel", "1")
    assert result.exit_code == 0, result.output

    rows = {r["file"]: r["count"] for r in json.loads(picked.read_text())["rows"]}
    expected = {r["file"]: r["count"] for r in json.loads(flat.read_text())["rows"]}
    assert rows == pytest.approx(expected)

    # training data: the same plane as the 2-D files, and a clear error without one
    ref = load_folder(image_folder, size=(64, 96))
    got = load_folder(two, size=(64, 96), channel=1)
    assert np.allclose(got.images.numpy(), ref.images.numpy())
    with pytest.raises(Exception, match="--channel 0-1"):
        load_folder(two, size=(64, 96))

    # a model trained on channel 1 (train --channel records it) reads it by default from
    # multi-channel files, and single-channel files as they are (it refused the first)
    import shutil

    trained = tmp_path / "trained_on_1"
    shutil.copytree(tiny_model, trained)
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "channel": 1}))
    again = tmp_path / "again.json"
    result = run("evaluate", two, "--model", trained, "--no-progress", "--out", again)
    assert result.exit_code == 0, result.output
    rows = {r["file"]: r["count"] for r in json.loads(again.read_text())["rows"]}
    assert rows == pytest.approx(expected)
    assert run("evaluate", image_folder, "--model", trained, "--out", again).exit_code == 0
    assert "reads channel 1 of multi-channel files" in run("models", trained).output
    from celltally.uncertainty import held_out_sets  # calibrate's and ensemble's reader

    _, calibration = held_out_sets({**config, "channel": 1}, folders=[two], log=_silent)
    assert calibration is not None and len(calibration)  # was "choose ... --channel 0-1"


def test_too_small_image_is_named_and_the_rest_counted(tiny_model, image_folder, tmp_path):
    tifffile.imwrite(image_folder / "speck.tif", np.full((1, 5), 9, np.uint8))
    out = tmp_path / "res.csv"
    result = run("count", image_folder, "-o", out, "--model", tiny_model, "--no-progress")
    assert result.exit_code == 1
    assert "speck.tif: image of 5x1 px is too small to count" in result.output
    assert len(read_rows(out)) == 2
    counter = CellCounter.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match=r"speck\.tif: image of 5x1 px is too small"):
        counter.count(image_folder / "speck.tif")
    with pytest.raises(ValueError, match="at least 8 px"):
        counter.count(np.zeros((7, 100), np.float32))
    explained = run(
        "explain", image_folder / "speck.tif", "--model", tiny_model, "-o", tmp_path / "e.png"
    )
    assert explained.exit_code == 2
    assert "speck.tif: image of 5x1 px" in explained.output
    assert not (tmp_path / "e.png").exists()


def test_models_lists_shipped_models_with_their_figures():
    result = run("models")
    assert result.exit_code == 0, result.output
    assert "bbbc005 (default): for BBBC005-like images" in result.output
    assert "\nnuclei: for fluorescent nuclei" in result.output  # what each is for
    # the figures printed are the ones recorded in the model folders
    bbbc005 = CellCounter.from_pretrained("bbbc005", device="cpu").config["metrics"]["test"]["all"]
    assert f"held-out test ({int(bbbc005['n'])} images): MAE {bbbc005['mae']:.2f}" in result.output
    assert "trained on:\n    - " in result.output  # one line per training source, not a list repr
    assert "['" not in result.output
    wells = CellCounter.from_pretrained("bbbc005", device="cpu").calibration["well_correlation"]
    assert f"within-well error correlation {wells['value']:.3f}" in result.output
    # a model that measured its ensemble says so, under its own entry
    nuclei = CellCounter.from_pretrained("nuclei", device="cpu").config["metrics"]
    ensemble = nuclei["epistemic"]["test"]["all"]
    assert f"with --epistemic: MAE {ensemble['mae']:.2f}" in result.output.split("\nnuclei: ")[1]
    # and a count correction, where its calibration fitted one
    scale = CellCounter.from_pretrained("nuclei", epistemic=True, device="cpu").count_scale
    line = f"counts with --epistemic multiplied by {scale:.4f}"
    assert (line in result.output) == (scale != 1.0)


def test_models_describes_a_model_folder_given(tiny_model, tmp_path):
    result = run("models", tiny_model)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{tiny_model}\n") and "bbbc005" not in result.output
    assert "held-out test" in result.output
    missing = run("models", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "no such model" in missing.output
    weights = run("models", f"{tiny_model}/config.json")  # a file: was "no such model"
    assert weights.exit_code == 2 and "a file, not a model; give the model's folder" in (
        weights.output
    )
    assert run("models", "nuclei").output.startswith("nuclei: for ")  # a shipped model's name


def test_models_shows_a_recalibrated_copys_original_figures(tmp_path):
    import json
    import shutil

    from celltally.counter import WEIGHTS_DIR

    copy = tmp_path / "copy"  # what `calibrate --model bbbc005 --out copy` leaves
    shutil.copytree(WEIGHTS_DIR / "bbbc005", copy)
    config = json.loads((copy / "config.json").read_text())
    config["metrics_of_original"] = config.pop("metrics")
    (copy / "config.json").write_text(json.dumps(config))
    result = run("models", copy)
    assert result.exit_code == 0, result.output
    test = config["metrics_of_original"]["test"]["all"]
    assert (
        "held-out test: not measured for this folder; the model it was copied from, before "
        f"this calibration: ({test['n']} images): MAE {test['mae']:.2f}"
    ) in result.output


def test_listing_models_and_summing_wells_do_not_import_torch():
    """``models`` and ``wells`` read JSON and CSV only: they start in well under a second."""
    code = (
        "import sys; from typer.testing import CliRunner; from celltally.cli import app; "
        "r = CliRunner().invoke(app, ['models']); assert r.exit_code == 0, r.output; "
        "import celltally.wells, celltally.batch; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_progress_bar_only_on_a_terminal(tiny_model, image_folder, tmp_path):
    """A log file or pipe gets no progress-bar redraws; a terminal gets the bar."""
    import os
    import pty
    import termios

    def stderr_of(out, *, terminal: bool) -> str:
        cmd = [sys.executable, "-m", "celltally.cli", "count", str(image_folder)]
        cmd += ["--out", str(out), "--model", str(tiny_model)]
        if not terminal:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stderr
        leader, follower = pty.openpty()
        termios.tcsetwinsize(follower, (24, 80))  # a new pty is 0 columns wide: no bar fits
        proc = subprocess.run(cmd, stderr=follower, stdout=subprocess.DEVNULL, timeout=120)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO once the terminal is drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert proc.returncode == 0
        return b"".join(chunks).decode(errors="replace")

    assert "img/s" in stderr_of(tmp_path / "a.csv", terminal=True)
    piped = stderr_of(tmp_path / "b.csv", terminal=False)
    assert "img/s" not in piped and "\r" not in piped


def test_explain_takes_the_truth_from_a_bbbc_name(tiny_model, image_folder, tmp_path):
    named = next(p for p in sorted(image_folder.iterdir()) if "_C3_" in p.name)
    result = run("explain", named, "--model", tiny_model, "--out", tmp_path / "n.png")
    assert result.exit_code == 0, result.output
    assert "(truth 3, from the file name)" in result.output
    given = run("explain", named, "--model", tiny_model, "--out", tmp_path / "g.png", "--true", 5)
    assert "(truth 5)" in given.output  # --true wins over the name


@pytest.mark.parametrize(
    "args",
    [
        ["count", "{images}", "-o", "{file}/r.csv"],
        ["count", "{images}", "-o", "{tmp}/r.csv", "--save-masks", "{file}"],
        ["count", "{images}", "-o", "{tmp}/r.csv", "--save-labels", "{file}/labels"],
        ["count", "{images}", "-o", "{tmp}/r.csv", "--wells", "{tmp}"],
        ["count", "{images}", "-o", "{tmp}/r.csv", "--wells", "{tmp}/r.csv"],
        ["count", "{images}", "-o", "{tmp}/r.csv", "--wells", "{images}/x.TIF"],
        ["count", "{images}", "-o", "{tmp}/r.csv", "--save-masks", "{tmp}/r.csv"],
        ["count", "{images}", "-o", "{tmp}/r.csv", "--save-masks", "{tmp}/m", "--level", "2"],
        ["evaluate", "{images}", "--out", "{tmp}"],
        ["evaluate", "{images}", "--out", "{file}/e.json"],
        ["evaluate", "{images}", "--out", "{tmp}/e.json", "--report", "{file}"],
        ["explain", "{image}", "-o", "{file}/x.png"],
        ["explain", "{image}", "-o", "{tmp}"],
        ["explain", "{image}", "-o", "{image}"],
        ["explain", "{image}", "-o", "{tmp}/x.csv"],
        ["count", "{images}", "-o", "{tmp}/brandnew"],
        ["demo", "-o", "{file}"],
        ["train", "-o", "{file}", "--data", "{images}"],
        ["train", "-o", "{tmp}/m", "--data", "{images}", "--seg-epochs", "-1"],
        ["explain", "{image}", "--true", "nan"],
    ],
)
def test_bad_outputs_and_options_fail_in_one_line_before_any_work(
    tiny_model, image_folder, tmp_path, args
):
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    image = sorted(image_folder.iterdir())[0]
    values = {"images": image_folder, "image": image, "file": afile, "tmp": tmp_path}
    argv = [a.format(**values) for a in args]
    if argv[0] in ("count", "evaluate", "explain"):
        argv += ["--model", str(tiny_model)]
    result = run(*argv)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "counted" not in result.output
    assert afile.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "plate"]  # nothing made
    assert len(list(image_folder.iterdir())) == 2


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-o", "{file}/r.csv"], "error: --out {file}/r.csv: {file} is a file, not a folder"),
        (["-o", "{tmp}/r.csv", "--save-labels", "{file}"], "error: --save-labels {file}: is a"),
    ],
)
def test_a_bad_output_is_named_by_its_own_option(tiny_model, image_folder, tmp_path, args, said):
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    values = {"file": afile, "tmp": tmp_path}
    argv = ["count", image_folder, *(a.format(**values) for a in args), "--model", tiny_model]
    result = run(*argv)
    assert result.exit_code == 2 and result.output.startswith(said.format(**values)), result.output


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate_weights", "model.safetensors: corrupt weights file"),
        ("drop_weights", "model.safetensors: missing"),
        ("garbage_ood", "ood.safetensors: corrupt file"),
        ("empty_config", "config.json: not a celltally model config (no 'input_size')"),
        ("list_config", "config.json: not a celltally model config (not a JSON object)"),
        ("broken_json", "config.json: not a readable model config"),
        ("no_config", "a folder but not a model (no config.json"),
    ],
)
def test_a_damaged_model_folder_is_one_line_naming_the_file(
    tiny_model, image_folder, tmp_path, damage, expected
):
    import shutil

    model = tmp_path / "damaged"
    shutil.copytree(tiny_model, model)
    weights, config = model / "model.safetensors", model / "config.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "drop_weights":
        weights.unlink()
    elif damage == "garbage_ood":
        (model / "ood.safetensors").write_bytes(b"garbage")
    elif damage == "empty_config":
        config.write_text("{}")
    elif damage == "list_config":
        config.write_text("[1, 2]")
    elif damage == "broken_json":
        config.write_text('{"input_size": ')
    elif damage == "no_config":
        config.unlink()
    for argv in (
        ["count", image_folder, "-o", tmp_path / "r.csv"],
        ["evaluate", image_folder, "--out", tmp_path / "e.json"],
        ["explain", sorted(image_folder.iterdir())[0], "-o", tmp_path / "x.png"],
    ):
        result = run(*argv, "--model", model)
        assert result.exit_code == 2, (argv[0], result.output)
        assert expected in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_a_tiny_diameter_is_refused_before_it_asks_for_terabytes(image_folder, tmp_path):
    out = tmp_path / "r.csv"
    result = run("count", image_folder, "-o", out, "--model", "nuclei", "--diameter", "0.1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "million pixels); check --rescale / --diameter" in result.output
    # beyond 1000x either way: refused as an option, before any file is read
    result = run(
        "count", image_folder, "-o", tmp_path / "x.csv", "--model", "nuclei", "--diameter", "0.001"
    )
    assert result.exit_code == 2 and "--diameter 0.001 would rescale the images by 2.83e+04" in (
        result.output
    )
    assert not (tmp_path / "x.csv").exists()
    # the other way (2830 for 28.3): a frame shrunk to a few pixels is no empty well
    result = run("count", image_folder, "-o", out, "--model", "nuclei", "--diameter", "2830")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "too small to count (each side needs at least 8 px); check --rescale" in (result.output)


def test_evaluate_says_what_is_wrong_with_its_data_argument(tiny_model, image_folder, tmp_path):
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "counts.csv").write_text("image,count\n")
    image = sorted(image_folder.iterdir())[0]
    for data, expected in ((listed, "counts.csv: lists no images"), (image, "a file; evaluate")):
        result = run("evaluate", data, "--model", tiny_model, "--out", tmp_path / "e.json")
        assert result.exit_code == 2 and expected in result.output, result.output


@pytest.mark.skipif(sys.platform != "linux", reason="an address-space limit (RLIMIT_AS)")
def test_an_image_without_memory_to_count_it_is_one_error_and_the_run_goes_on(
    image_folder, tmp_path
):
    """A real out-of-memory: the process may use 1.6 GB, the image needs more (the
    shipped model counts it in tiles; 3 GB were enough)."""
    import resource
    import shutil

    from conftest import write_zero_tiff

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    write_zero_tiff(folder / "a_huge.tif", 16000)  # 256 million pixels, a 250 KB file
    out = tmp_path / "r.csv"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1_600_000_000, 1_600_000_000))

    args = ["count", folder, "-o", out, "--model", "bbbc005", "--no-progress"]
    args += ["--read-threads", "0", "--threads", "1", "--batch-size", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "celltally.cli", *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    said = done.stdout + done.stderr
    assert "a_huge.tif: ran out of memory counting it" in said and "Traceback" not in said
    names = [row["file"] for row in read_rows(out)]
    assert len(names) == len(list(image_folder.iterdir())) and "a_huge" not in " ".join(names)
    errors = (tmp_path / "r.errors.csv").read_text()
    assert "a_huge.tif" in errors


@pytest.mark.skipif(sys.platform != "linux", reason="a file-size limit (RLIMIT_FSIZE)")
def test_a_failed_write_names_the_file(tiny_model, tmp_path):
    """Disk full or file too large: the error says which output, and the rows kept are whole."""
    import resource

    from conftest import blob_image

    folder = tmp_path / "plate"
    folder.mkdir()
    for i in range(16):
        tifffile.imwrite(
            folder / f"SIMCEPImages_A{i + 1:02d}_C5_F1_s01_w1.TIF", blob_image(5, seed=i)
        )
    whole = tmp_path / "whole.csv"
    args = [folder, "--model", tiny_model, "--no-progress", "--batch-size", "1"]
    assert run("count", *args, "-o", whole).exit_code == 0
    room = whole.with_suffix(".manifest.json").stat().st_size + 200  # the manifest fits
    assert whole.stat().st_size > room + 400  # the rows do not

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    out = tmp_path / "r.csv"
    done = subprocess.run(
        [sys.executable, "-m", "celltally.cli", "count", *map(str, args), "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert done.returncode != 0
    assert f"error: {out}: file too large" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    kept = read_rows(out)
    assert 0 < len(kept) < 16 and all(row["count"] for row in kept)


def test_a_negative_channel_is_refused_before_any_file_is_read(tiny_model, image_folder, tmp_path):
    out = tmp_path / "res.csv"
    args = ("-o", out, "--model", tiny_model, "--no-progress")
    result = run("count", image_folder, *args, "--channel", "-1")
    assert result.exit_code == 2, result.output
    assert "channel must be 0 or more (0-based; --channel), got -1" in result.output
    assert not out.exists()  # refused as a bad option, not as N unreadable files


def test_evaluate_never_writes_its_json_over_a_table(tiny_model, image_folder, tmp_path):
    counts = image_folder / "counts.csv"
    counts.write_text("image,count\n" + "".join(f"{p.name},1\n" for p in image_folder.glob("*")))
    before = counts.read_text()
    result = run("evaluate", image_folder, "--model", tiny_model, "--out", counts)
    assert result.exit_code == 2
    assert "give a .json name" in result.output
    assert counts.read_text() == before


def test_explain_writes_over_its_own_figure_but_never_over_an_image(
    tiny_model, image_folder, tmp_path
):
    first, second = sorted(image_folder.glob("*.TIF"))
    kept = second.read_bytes()
    result = run("explain", first, "--model", tiny_model, "--out", second)
    assert result.exit_code == 2
    assert f"--out {second}: exists and is not a figure celltally wrote" in result.output
    assert second.read_bytes() == kept
    import matplotlib.pyplot as plt

    plt.imsave(tmp_path / "mine.png", tifffile.imread(second))  # a user's image, by matplotlib
    kept = (tmp_path / "mine.png").read_bytes()
    result = run("explain", first, "--model", tiny_model, "--out", tmp_path / "mine.png")
    assert result.exit_code == 2 and "exists and is not a figure" in result.output
    assert (tmp_path / "mine.png").read_bytes() == kept
    for name in ("fig.tif", "fig.png", "fig.jpg"):  # a rerun replaces its own figure
        for _ in range(2):
            again = run("explain", first, "--model", tiny_model, "--out", tmp_path / name)
            assert again.exit_code == 0, again.output
    huge = run(
        "explain", first, "--model", tiny_model, "--out", tmp_path / "t.png", "--true", "1e39"
    )
    assert huge.exit_code == 2 and "--true must be a count from 0 to" in huge.output


def test_files_of_formats_celltally_does_not_read_are_named_not_silently_left_out(
    tiny_model, image_folder, tmp_path
):
    (image_folder / "well_A01.czi").write_bytes(b"ZISRAWFILE")  # a vendor's format
    (image_folder / "well_A02.nd2").write_bytes(b"\x00")
    (image_folder / "acquisition.xml").write_text("<metadata/>")  # not an image: no word
    out = tmp_path / "r.csv"
    result = run("count", image_folder, "--out", out, "--model", tiny_model, "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(read_rows(out)) == 2
    assert "note: 2 file(s) in formats celltally does not read were left out" in result.output
    assert "(1 .czi, 1 .nd2)" in result.output and ".xml" not in result.output


def _deny_listing(monkeypatch, folder):
    """Make ``folder`` unlistable: chmod where that binds; as root (chmod does not bind
    root) os.scandir is made to raise for that folder, as it does for any other user."""
    import os as _os

    folder.chmod(0)
    if _os.geteuid() == 0:
        real = _os.scandir

        def scandir(path="."):
            if _os.path.realpath(path) == _os.path.realpath(folder):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr("celltally.io.os.scandir", scandir)


def test_a_sub_folder_that_cannot_be_listed_is_named_and_the_rest_counted(
    tiny_model, image_folder, tmp_path, monkeypatch
):
    locked = image_folder / "locked"
    locked.mkdir()
    tifffile.imwrite(locked / "hidden_A03.tif", blob_image(4, seed=9))
    (image_folder / "z_more").mkdir()
    tifffile.imwrite(image_folder / "z_more" / "A04.tif", blob_image(5, seed=8))
    _deny_listing(monkeypatch, locked)
    out = tmp_path / "r.csv"
    try:
        result = run("count", image_folder, "--recursive", "--out", out, "--model", tiny_model)
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert len(read_rows(out)) == 3  # the other images were counted
    assert f"error: cannot list {locked}: " in result.output
    assert "Traceback" not in result.output
    # a folder whose only sub-folder cannot be listed says why it has no images
    lonely = tmp_path / "lonely"
    (lonely / "locked").mkdir(parents=True)
    _deny_listing(monkeypatch, lonely / "locked")
    try:
        result = run("count", lonely, "--recursive", "--out", tmp_path / "l.csv")
    finally:
        (lonely / "locked").chmod(0o755)
    assert result.exit_code == 2 and f"cannot list {lonely / 'locked'}" in result.output


def test_sub_folders_with_images_are_named_when_not_searched(tiny_model, image_folder, tmp_path):
    (image_folder / "A05").mkdir()
    tifffile.imwrite(image_folder / "A05" / "site1.tif", blob_image(4, seed=3))
    (image_folder / "notes").mkdir()  # no images: no word
    (image_folder / "notes" / "readme.txt").write_text("x")
    (image_folder / "up").symlink_to("..")  # a link back: its images are counted already
    (image_folder / "masks_prev").mkdir()  # an earlier run's masks are not images to count
    tifffile.imwrite(image_folder / "masks_prev" / "A01_mask.png", np.zeros((8, 8), np.uint8))
    (image_folder / "mixed").mkdir()  # but a user's image beside them is
    for name in ("A00_mask.png", "A02_mask.png", "A03_labels.tif"):
        tifffile.imwrite(image_folder / "mixed" / name, np.zeros((8, 8), np.uint8))
    tifffile.imwrite(image_folder / "mixed" / "site.tif", blob_image(2, seed=5))
    out = tmp_path / "r.csv"
    result = run("count", image_folder, "--out", out, "--model", tiny_model, "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(read_rows(out)) == 2
    assert "holds images that were not searched; --recursive counts them too" in result.output
    assert "(and 1 more)" in result.output  # A05 and mixed, in directory order
    assert "notes" not in result.output and "up" not in result.output
    assert "masks_prev" not in result.output
    import shutil

    for name in ("masks_prev", "mixed"):  # --recursive would count the masks as images
        shutil.rmtree(image_folder / name)
    again = run(
        "count", image_folder, "--recursive", "--out", tmp_path / "all.csv", "--model", tiny_model
    )
    assert again.exit_code == 0 and "not searched" not in again.output
    assert len(read_rows(tmp_path / "all.csv")) == 3


def test_evaluate_without_recursive_names_its_sub_folders_for_evaluate(tiny_model, tmp_path):
    import json

    top = tmp_path / "top"
    (top / "p1").mkdir(parents=True)
    tifffile.imwrite(top / "p1" / "SIMCEPImages_A01_C3_F1_s01_w1.TIF", blob_image(3))
    out = tmp_path / "e.json"
    result = run("evaluate", top, "--model", tiny_model, "--out", out, "--no-progress")
    assert result.exit_code == 2 and "--recursive" not in result.output, result.output
    assert f"its sub-folder 'p1' has: evaluate {top / 'p1'}, or name the images" in (result.output)
    # images of its own and a sub-folder with more: the sub-folder is named, not passed over
    tifffile.imwrite(top / "SIMCEPImages_A02_C5_F1_s01_w1.TIF", blob_image(5, seed=1))
    result = run("evaluate", top, "--model", tiny_model, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"note: sub-folder {top / 'p1'} holds images that were not searched" in result.output
    assert "--recursive" not in result.output
    assert json.loads(out.read_text())["unsearched"] == [str(top / "p1")]


def test_evaluate_says_counts_csv_gives_every_true_count(tiny_model, image_folder, tmp_path):
    first, second = sorted(p.name for p in image_folder.iterdir())  # both named _C<n>_
    (image_folder / "counts.csv").write_text(f"image,count\n{first},3\n")
    out = tmp_path / "e.json"
    result = run("evaluate", image_folder, "--model", tiny_model, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (
        "1 image(s) of the folder left out: no true count (not in counts.csv, which gives "
        "every true count when present: _C<n>_ in names and label images are not read; "
        f"e.g. {second})"
    ) in result.output
    assert "no _C<n>_ in the name" not in result.output


def test_evaluate_takes_absolute_paths_that_share_a_base_name(tiny_model, tmp_path):
    import json

    for k, sub in enumerate(("sub", "sub2")):  # /x/sub/a.tif and /x/sub2/a.tif
        (tmp_path / "x" / sub).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "x" / sub / "a.tif", blob_image(3 + 4 * k, seed=k))
    data = tmp_path / "data"
    data.mkdir()
    listed = [tmp_path / "x" / "sub" / "a.tif", tmp_path / "x" / "sub2" / "a.tif"]
    (data / "counts.csv").write_text(f"image,count\n{listed[0]},3\n{listed[1]},7\n")
    out, report = tmp_path / "e.json", tmp_path / "rep"
    args = ("--model", tiny_model, "--out", out, "--no-progress", "--report", report)
    result = run("evaluate", data, *args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["file"], r["true"]) for r in rows] == [(str(listed[0]), 3.0), (str(listed[1]), 7.0)]
    # one image named twice (by its name and its absolute path) is one line, not two rows
    tifffile.imwrite(data / "b.tif", blob_image(2))
    (data / "counts.csv").write_text(f"image,count\nb.tif,2\n{data / 'b.tif'},2\n")
    result = run("evaluate", data, *args)
    assert result.exit_code == 2 and "lists b.tif twice" in result.output, result.output
