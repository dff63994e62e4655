"""Per-well totals (celltally.wells, `celltally wells`, `celltally count --wells`)."""

import csv
import json
import math

import numpy as np
import pytest
import tifffile
from conftest import blob_image
from PIL import Image
from typer.testing import CliRunner

from celltally.calibration import (
    coverage_tolerance,
    fit_group_correlation,
    gaussian_quantile,
    total_std,
)
from celltally.cli import app
from celltally.wells import (
    DEFAULT_CORRELATION,
    WELL_COLUMNS,
    aggregate_wells,
    model_correlation,
    well_key,
)

runner = CliRunner()


def row(file, count, std, multiplier=2.0, **extra):
    return {
        "file": file,
        "count": str(count),
        "std": str(std),
        "low": str(max(0.0, count - multiplier * std)),
        "high": str(count + multiplier * std),
        "level": "0.95",
        "model": "m",
        **extra,
    }


def test_total_std_by_hand():
    # var = 1 + 4 + 4 + 0.5 * ((1 + 2 + 2)^2 - 9) = 17
    assert total_std([1, 2, 2], 0.5) == pytest.approx(math.sqrt(17))
    assert total_std([1, 2, 2], 0.0) == pytest.approx(3.0)
    assert total_std([1, 2, 2], 1.0) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        total_std([1.0], 1.5)


def test_wells_sum_sites_per_stain_with_the_combined_interval():
    rows = [
        row("P1_B03_s1_w1.tif", 10.0, 1.0, true_count="11"),
        row("P1_B03_s2_w1.tif", 20.0, 2.0, true_count="19"),
        row("P1_B03_s3_w1.tif", 30.0, 2.0, true_count="33"),
        row("P1_B03_s1_w2.tif", 12.0, 1.0),  # other stain: a total of its own
        row("no_well_here.tif", 5.0, 1.0),
    ]
    original = [dict(r) for r in rows]
    wells, skipped = aggregate_wells(rows, correlation=0.5)
    assert rows == original  # inputs untouched
    assert skipped == 1
    assert [(w["plate"], w["well"], w["stain"], w["images"]) for w in wells] == [
        ("P1", "B03", "1", 3),
        ("P1", "B03", "2", 1),
    ]
    first = wells[0]
    assert set(first) == set(WELL_COLUMNS)
    assert first["count"] == 60.0 and first["sites"] == "1;2;3"
    assert first["std"] == pytest.approx(math.sqrt(17), abs=1e-3)
    assert first["high"] == pytest.approx(60 + 2 * math.sqrt(17), abs=0.01)
    assert first["low"] == pytest.approx(60 - 2 * math.sqrt(17), abs=0.01)
    assert first["true_count"] == 63.0 and first["error"] == -3.0
    assert first["mean_per_image"] == 20.0
    assert wells[1]["true_count"] == ""  # truth unknown for one of its images
    assert first["repeated_sites"] == ""
    # a row the web page could not count (no count, a 'problem') is a failed image
    web = [*rows[:3], {**row("P1_B03_s4_w1.tif", 0, 0), "count": "", "problem": "corrupt"}]
    (same, *_), _ = aggregate_wells(web, correlation=0.5)
    assert same["failed"] == 1 and same["count"] == first["count"]
    # the page's CSV may count one image with two models: a total each, both short of s4
    other = [{**r, "model": "n"} for r in rows[:3]]
    two = [w for w in aggregate_wells([*web, *other], correlation=0.5)[0] if w["stain"] == "1"]
    assert [(w["model"], w["failed"]) for w in two] == [("m", 1), ("n", 1)]
    # failed once, counted when dropped again: not failed
    again = [*web, row("P1_B03_s4_w1.tif", 4.0, 1.0)]
    assert aggregate_wells(again, correlation=0.5)[0][0]["failed"] == 0
    again = [*rows[:3], row("copy/P1_B03_s2_w1.tif", 20.0, 2.0)]
    twice = aggregate_wells(again, correlation=0.5)[0]
    assert twice[0]["repeated_sites"] == "2" and twice[0]["images"] == 4


def test_the_multiplier_survives_the_csv_rounding_of_a_near_empty_site():
    q = 2.0392  # the model's multiplier; the CSV keeps count/high to 0.01, std to 0.001
    sites = [(0.084, 0.0124), (40.31, 1.874), (55.6, 2.41), (61.2, 2.77)]
    rows = [
        {
            "file": f"P1_B03_s{i}_w1.tif",
            "count": f"{c:.2f}",
            "std": f"{s:.3f}",
            "low": f"{max(0.0, c - q * s):.2f}",
            "high": f"{c + q * s:.2f}",
            "level": "0.95",
            "model": "m",
        }
        for i, (c, s) in enumerate(sites, start=1)
    ]
    (well,), _ = aggregate_wells(rows, correlation=0.3)
    assert (well["high"] - well["count"]) / well["std"] == pytest.approx(q, rel=2e-3)


def test_well_key_from_names():
    assert well_key("SIMCEPImages_A05_C18_F1_s03_w2.TIF") == ("", "A05", "2")
    assert well_key("Plate7_C11_s2_w1.tif") == ("Plate7", "C11", "1")
    assert well_key("image_001.png") is None


@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_fitted_correlation_and_well_coverage_on_a_known_noise_model(rho):
    """Errors with a known within-well correlation: the estimate recovers it, and
    intervals built from it reach their nominal coverage (4 binomial sds)."""
    rng = np.random.default_rng(7)
    wells, sites = 1500, 4
    sigma = rng.uniform(0.5, 3.0, (wells, sites))
    shared = rng.normal(size=(wells, 1))
    own = rng.normal(size=(wells, sites))
    z = math.sqrt(rho) * shared + math.sqrt(1 - rho) * own
    mu = rng.uniform(10, 100, (wells, sites))
    y = mu + sigma * z
    groups = [w for w in range(wells) for _ in range(sites)]
    fitted = fit_group_correlation(y.ravel(), mu.ravel(), sigma.ravel(), groups)
    pairs = wells * sites * (sites - 1) / 2
    assert fitted["groups"] == wells and fitted["pairs"] == pairs
    assert abs(fitted["value"] - rho) < 4 * math.sqrt((1 + rho**2) / pairs) + 0.02
    level = 0.9
    half = gaussian_quantile(level) * np.array([total_std(s, fitted["value"]) for s in sigma])
    inside = np.abs(y.sum(1) - mu.sum(1)) <= half
    assert abs(inside.mean() - level) < coverage_tolerance(level, wells)
    if rho > 0:  # taking the errors as independent under-covers
        naive = gaussian_quantile(level) * np.sqrt((sigma**2).sum(1))
        assert (np.abs(y.sum(1) - mu.sum(1)) <= naive).mean() < level - 0.05


def test_fit_without_groups_gives_none():
    assert fit_group_correlation([1, 2], [1, 2], [1, 1], ["a", "b"]) is None
    assert fit_group_correlation([1, 2], [1, 2], [1, 1], [None, None]) is None


def test_model_correlation_measured_or_assumed():
    value, note = model_correlation("bbbc005")
    assert 0 < value < 1 and "measured" in note
    assert model_correlation("nuclei") == (
        DEFAULT_CORRELATION,
        "assumed (nuclei has no measured value)",
    )
    assert model_correlation("no-such-model")[0] == DEFAULT_CORRELATION


@pytest.fixture
def well_plate(tmp_path):
    folder = tmp_path / "screen"
    folder.mkdir()
    for well, n in (("B02", 4), ("B03", 9)):
        for site in (1, 2):
            tifffile.imwrite(folder / f"Plate1_{well}_s{site}_w1.tif", blob_image(n, seed=site + n))
    return folder


def test_count_with_wells_then_wells_command(tiny_model, well_plate, tmp_path):
    out, totals = tmp_path / "res.csv", tmp_path / "wells.csv"
    result = runner.invoke(
        app,
        [
            "count",
            str(well_plate),
            "-o",
            str(out),
            "--model",
            str(tiny_model),
            "--wells",
            str(totals),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 well total(s)" in result.output and "assumed" in result.output
    with open(out, newline="") as handle:
        images = list(csv.DictReader(handle))
    with open(totals, newline="") as handle:
        wells = list(csv.DictReader(handle))
    assert [(w["plate"], w["well"], w["images"], w["sites"]) for w in wells] == [
        ("Plate1", "B02", "2", "1;2"),
        ("Plate1", "B03", "2", "1;2"),
    ]
    for w in wells:
        mine = [r for r in images if r["well"] == w["well"]]
        assert float(w["count"]) == pytest.approx(sum(float(r["count"]) for r in mine), abs=0.02)
        assert float(w["low"]) <= float(w["count"]) <= float(w["high"])
        assert float(w["correlation"]) == DEFAULT_CORRELATION
    # the command on its own, with a given correlation: stds simply add up at 1
    again = tmp_path / "w1.csv"
    result = runner.invoke(app, ["wells", str(out), "-o", str(again), "--correlation", "1"])
    assert result.exit_code == 0, result.output
    with open(again, newline="") as handle:
        first = next(csv.DictReader(handle))
    mine = [r for r in images if r["well"] == first["well"]]
    assert float(first["std"]) == pytest.approx(sum(float(r["std"]) for r in mine), abs=2e-3)
    # the same totals drawn on the plate's grid
    png = tmp_path / "plate.png"
    result = runner.invoke(app, ["wells", str(out), "-o", str(again), "--plate-map", str(png)])
    assert result.exit_code == 0 and f"plate map -> {png}" in result.output and png.stat().st_size
    bad = runner.invoke(app, ["wells", str(out), "--plate-map", str(png), "--map-value", "x"])
    assert bad.exit_code == 2 and "--map-value" in bad.output
    # a name without a suffix is written as NAME.png: a user's image there is kept
    users = tmp_path / "mine.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(users)
    kept = users.read_bytes()
    mine = runner.invoke(
        app, ["wells", str(out), "-o", str(again), "--plate-map", str(users.with_suffix(""))]
    )
    assert mine.exit_code == 2 and f"{users} exists and is not a figure" in mine.output
    assert users.read_bytes() == kept
    assert ", measured" not in result.output and f"{DEFAULT_CORRELATION:.3f}, assumed" in (
        result.output
    )
    assert "more than once" not in result.output
    # a site counted again under another name: summed twice, and said so
    copy = tmp_path / "copy"
    copy.mkdir()
    first_image = sorted(well_plate.iterdir())[0]
    (copy / first_image.name).write_bytes(first_image.read_bytes())
    args = ["count", str(copy), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["wells", str(out), "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert "warning: 1 well(s) hold a site more than once" in result.output


def test_wells_of_a_run_whose_every_image_failed(tiny_model, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "Plate1_B03_s1_w1.tif").write_bytes(b"not a tiff")
    out = tmp_path / "res.csv"
    args = ["count", str(folder), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    assert runner.invoke(app, args).exit_code == 1
    totals = tmp_path / "w.csv"
    result = runner.invoke(app, ["wells", str(out), "-o", str(totals)])
    assert result.exit_code == 0, result.output
    with open(totals, newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["well"], row["images"], row["failed"]) == ("B03", "0", "1")
    # a bad plate format is refused before anything is written
    bad = runner.invoke(
        app, ["wells", str(out), "-o", str(tmp_path / "x.csv"), "--plate-format", "100"]
    )
    assert bad.exit_code == 2 and "--plate-format" in bad.output
    assert not (tmp_path / "x.csv").exists()


def test_wells_refuses_results_without_wells_and_non_csv_files(tiny_model, tmp_path):
    folder = tmp_path / "nowells"
    folder.mkdir()
    tifffile.imwrite(folder / "nuclei_1.tif", blob_image(3))
    out = tmp_path / "res.csv"
    args = ["count", str(folder), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["wells", str(out), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 2 and "no file name carries a well" in result.output
    assert not (tmp_path / "w.csv").exists()
    binary = runner.invoke(app, ["wells", str(folder / "nuclei_1.tif")])
    assert binary.exit_code == 2 and "not a celltally results CSV" in binary.output


def test_wells_find_a_model_folder_through_the_manifest(
    tiny_model, well_plate, tmp_path, monkeypatch
):
    import shutil

    model = tmp_path / "models" / "mine"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["name"] = "mine"
    block = config.setdefault("calibration", {})
    block["well_correlation"] = {"value": 0.42, "groups": 7}
    block["epistemic"] = {"well_correlation": {"value": 0.3, "groups": 7}}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "res.csv"
    args = ["count", str(well_plate), "-o", str(out), "--model", str(model), "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the CSV names the model 'mine', not its folder
    result = runner.invoke(app, ["wells", str(out), "-o", "w.csv"])
    assert result.exit_code == 0, result.output
    assert "measured by mine on 7 calibration wells" in result.output
    with open("w.csv", newline="") as handle:
        assert {float(w["correlation"]) for w in csv.DictReader(handle)} == {0.42}
    # the ensemble's own value where it has one, else the model's
    assert model_correlation(model, epistemic=True)[0] == 0.3
    del config["calibration"]["epistemic"]
    (model / "config.json").write_text(json.dumps(config))
    assert model_correlation(model, epistemic=True)[0] == 0.42


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such results file"),
        ("image,count\na.tif,3\n", "not a celltally results CSV (missing column(s) file, std"),
    ],
)
def test_wells_bad_input_one_line_error(tmp_path, content, expected):
    path = tmp_path / "results.csv"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 2
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


HEADER = "file,count,std,low,high,level,model,well\n"
GOOD = "a_B02_s1.tif,3,1,1,5,0.95,m,B02\n"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (GOOD + GOOD, "a_B02_s1.tif has more than one row"),
        (GOOD + "a_B02_s2.tif,3,1\n", "data row 2 (a_B02_s2.tif) has fewer fields"),
        ("a_B02_s1.tif,-5,1,0,-3,0.95,m,B02\n", "count -5 of a_B02_s1.tif is below 0"),
        ("a_B02_s1.tif,3,-1,1,5,0.95,m,B02\n", "std -1 of a_B02_s1.tif is below 0"),
        ("a_B02_s1.tif,3,1,1,2,0.95,m,B02\n", "high 2 of a_B02_s1.tif is below 3"),
        ("a_B02_s1.tif,3,1,1,5,high,m,B02\n", "level 'high' of a_B02_s1.tif is not a number"),
        ("a_B02_s1.tif,3,1,1,5,1,m,B02\n", "level '1' of a_B02_s1.tif is not a number"),
        (GOOD + "a_B02_s2.tif,1e308,1,1,1e308,0.95,m,B02\n" * 2, "more than one row"),
        (
            GOOD.replace("3,1,1,5", "1e308,1,1,1e308")
            + "a_B02_s2.tif,1e308,1,1,1e308,0.95,m,B02\n",
            "the counts of well B02 add up to inf",
        ),
    ],
)
def test_wells_refuse_rows_no_count_run_writes(tmp_path, rows, expected):
    path = tmp_path / "results.csv"
    path.write_text(HEADER + rows)
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "w.csv").exists()


def test_wells_never_overwrite_the_results_they_read(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(HEADER + GOOD)
    for out in (path, tmp_path / "results.manifest.json", tmp_path):
        result = runner.invoke(app, ["wells", str(path), "-o", str(out)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert path.read_text() == HEADER + GOOD


def test_wells_refuses_a_bad_number_and_a_bad_correlation(tmp_path):
    path = tmp_path / "results.csv"
    fields = ["file", "count", "std", "low", "high", "level", "model", "well"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        values = ["a_B02_s1.tif", "nan", "1", "0", "2", "0.95", "m", "B02"]
        writer.writerow(dict(zip(fields, values, strict=True)))
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 2 and "count of a_B02_s1.tif is nan" in result.output
    result = runner.invoke(app, ["wells", str(path), "--correlation", "2"])
    assert result.exit_code == 2 and "between 0 and 1" in result.output


def test_python_api_totals_match_the_cli(tiny_model, well_plate, tmp_path):
    """The README's Python route (result_row + aggregate_wells) gives the CLI's totals."""
    from celltally.batch import result_row
    from celltally.counter import CellCounter

    counter = CellCounter.from_pretrained(tiny_model)
    rows = [
        result_row(path, r, model_name=str(tiny_model))
        for path, r in counter.count_paths(sorted(well_plate.glob("*.tif")))
        if not isinstance(r, Exception)
    ]
    wells, skipped = aggregate_wells(rows, correlation=model_correlation(tiny_model)[0])
    out, totals = tmp_path / "res.csv", tmp_path / "wells.csv"
    args = ["count", str(well_plate), "-o", str(out), "--model", str(tiny_model)]
    result = runner.invoke(app, [*args, "--wells", str(totals), "--no-progress"])
    assert result.exit_code == 0, result.output
    with open(totals, newline="") as handle:
        cli = list(csv.DictReader(handle))
    assert skipped == 0 and len(wells) == len(cli) == 2
    for mine, theirs in zip(wells, cli, strict=True):
        assert mine["well"] == theirs["well"]
        assert mine["count"] == pytest.approx(float(theirs["count"]), abs=0.02)
        assert mine["high"] == pytest.approx(float(theirs["high"]), abs=0.05)


def test_wells_say_which_images_failed(tiny_model, tmp_path):
    """A well with an unreadable image says so; a well with none counted still has a row."""
    folder = tmp_path / "plate"
    folder.mkdir()
    tifffile.imwrite(folder / "P_B02_s1_w1.tif", blob_image(4, seed=1))
    (folder / "P_B02_s2_w1.tif").write_bytes(b"II*\x00not a tiff")
    (folder / "P_C05_s1_w1.tif").write_bytes(b"II*\x00not a tiff")
    out, totals = tmp_path / "res.csv", tmp_path / "wells.csv"
    args = ["count", str(folder), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    result = runner.invoke(app, [*args, "--wells", str(totals)])
    assert result.exit_code == 1  # unreadable files: counted what it could
    assert "2 well(s) include images that could not be counted" in result.output
    with open(totals, newline="") as handle:
        wells = {w["well"]: w for w in csv.DictReader(handle)}
    assert (wells["B02"]["images"], wells["B02"]["failed"]) == ("1", "1")
    assert float(wells["B02"]["count"]) >= 0
    assert (wells["C05"]["images"], wells["C05"]["failed"], wells["C05"]["count"]) == ("0", "1", "")
    # once the file is fixed and the run resumed, the well is whole again
    tifffile.imwrite(folder / "P_B02_s2_w1.tif", blob_image(6, seed=2))
    runner.invoke(app, [*args, "--wells", str(totals)])
    with open(totals, newline="") as handle:
        wells = {w["well"]: w for w in csv.DictReader(handle)}
    assert (wells["B02"]["images"], wells["B02"]["failed"]) == ("2", "0")


def test_evaluate_reports_per_well_totals(tiny_model, tmp_path):
    folder = tmp_path / "labelled"
    folder.mkdir()
    for column, n in ((1, 3), (2, 8)):
        for site in (1, 2, 3):
            name = f"SIMCEPImages_A{column:02d}_C{n}_F1_s{site:02d}_w1.TIF"
            tifffile.imwrite(folder / name, blob_image(n, seed=10 * n + site))
    from celltally.evaluation import evaluate_folder

    result = evaluate_folder(folder, model=tiny_model)
    wells = result["wells"]
    assert wells["n_wells"] == 2 and wells["images_per_well"] == 3
    assert wells["correlation_source"] == "assumed" and wells["correlation"] == DEFAULT_CORRELATION
    by_well: dict[str, list] = {}
    for r in result["rows"]:
        by_well.setdefault(r["file"].split("_")[1], []).append(r)
    expected = np.mean(
        [abs(sum(r["count"] for r in rs) - sum(r["true"] for r in rs)) for rs in by_well.values()]
    )
    assert wells["mae"] == pytest.approx(expected, abs=0.02)
    assert 0.0 <= wells["coverage"] <= 1.0
    out = runner.invoke(
        app,
        [
            "evaluate",
            str(folder),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "e.json"),
            "--no-progress",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "per-well totals (2 wells of 3.0 images, assumed within-well correlation" in out.output
    single = tmp_path / "single"
    single.mkdir()
    tifffile.imwrite(single / "SIMCEPImages_A01_C3_F1_s01_w1.TIF", blob_image(3))
    assert evaluate_folder(single, model=tiny_model)["wells"] is None


def test_wells_read_a_results_csv_with_a_file_name_that_is_not_utf8(
    tiny_model, well_plate, tmp_path
):
    folder = tmp_path / "in"
    folder.mkdir()
    images = sorted(well_plate.iterdir())
    (folder / "Plate\udce9_B03_s1_w1.tif").write_bytes(images[0].read_bytes())  # byte 0xE9
    (folder / "Plate1_B03_s2_w1.tif").write_bytes(images[1].read_bytes())
    out, totals = tmp_path / "res.csv", tmp_path / "wells.csv"
    args = ["count", str(folder), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    result = runner.invoke(app, [*args, "--wells", str(totals)])
    assert result.exit_code == 0, result.output
    assert "2 well total(s)" in result.output
    assert b"Plate\xe9" in totals.read_bytes()  # the plate's name kept byte for byte
    (folder / "Plate\udce9_B04_s1_w1.tif").write_bytes(b"not a tiff")  # in errors.csv too
    result = runner.invoke(app, [*args, "--wells", str(totals)])
    assert result.exit_code == 1 and "well(s) include images that could not be counted" in (
        result.output
    )


def test_evaluate_per_well_rows_say_how_many_images_failed(tiny_model, tmp_path):
    from celltally.evaluation import evaluate_folder

    folder = tmp_path / "labelled"
    folder.mkdir()
    for column, n in ((1, 3), (2, 8)):
        for site in (1, 2):
            name = f"SIMCEPImages_A{column:02d}_C{n}_F1_s{site:02d}_w1.TIF"
            tifffile.imwrite(folder / name, blob_image(n, seed=10 * n + site))
    (folder / "SIMCEPImages_A01_C3_F1_s03_w1.TIF").write_bytes(b"II*\x00 truncated")
    result = evaluate_folder(folder, model=tiny_model)
    assert len(result["errors"]) == 1
    rows = [(w["well"], w["images"], w["failed"]) for w in result["wells"]["rows"]]
    assert rows == [("A01", 2, 1), ("A02", 2, 0)]


def test_plates_told_apart_only_by_their_folders_are_not_merged():
    rows = [
        row("screen/PlateA/P1_B02_s1_w1.tif", 10.0, 1.0),
        row("screen/PlateA/P1_B02_s2_w1.tif", 12.0, 1.0),
        row("screen/PlateB/P1_B02_s1_w1.tif", 20.0, 2.0),  # the same names, other images
        row("screen/PlateB/P1_B02_s2_w1.tif", 22.0, 2.0),
    ]
    wells, _ = aggregate_wells(rows, correlation=0.5, failed=["screen/PlateB/P1_B03_s1_w1.tif"])
    got = [(w["plate"], w["well"], w["images"], w["failed"], w.get("count")) for w in wells]
    assert got == [
        ("PlateA/P1", "B02", 2, 0, 22.0),
        ("PlateB/P1", "B02", 2, 0, 42.0),
        ("PlateB/P1", "B03", 0, 1, None),
    ]
    assert all(not w.get("repeated_sites") for w in wells)
    # one image counted twice under two folders' names (a copy) is a repeated site instead
    copy = [*rows[:2], row("copy/P1_B02_s1_w1.tif", 10.0, 1.0)]
    (well,), _ = aggregate_wells(copy, correlation=0.5)
    assert (well["plate"], well["images"], well["repeated_sites"]) == ("P1", 3, "1")


def test_wells_know_each_image_by_where_it_is(tmp_path, monkeypatch):
    # the same names on two plates, each counted from inside its folder into one CSV (the
    # shipped model: the untrained one counts every image alike, and alike is one image)
    for plate, n in (("PlateA", 2), ("PlateB", 30)):  # unlike counts: not one image twice
        (tmp_path / plate).mkdir()
        tifffile.imwrite(tmp_path / plate / "exp1_B02_s1_w1.tif", blob_image(n, seed=n))
    out = tmp_path / "res.csv"
    for plate in ("PlateA", "PlateB"):
        monkeypatch.chdir(tmp_path / plate)
        args = ["count", ".", "-o", str(out), "--model", "bbbc005", "--no-progress"]
        assert runner.invoke(app, args).exit_code == 0
    # a site added to PlateA, counted through its absolute path
    tifffile.imwrite(tmp_path / "PlateA" / "exp1_B02_s2_w1.tif", blob_image(5, seed=3))
    monkeypatch.chdir(tmp_path)
    args = ["count", str(tmp_path / "PlateA"), "-o", str(out), "--model", "bbbc005"]
    assert runner.invoke(app, [*args, "--no-progress"]).exit_code == 0
    result = runner.invoke(app, ["wells", str(out), "-o", "w.csv"])
    assert result.exit_code == 0, result.output  # was: 'has more than one row'
    with open("w.csv", newline="") as handle:
        got = {(w["plate"], w["sites"]) for w in csv.DictReader(handle)}
    assert got == {("PlateA/exp1", "1;2"), ("PlateB/exp1", "1")}


def test_wells_read_a_spreadsheet_saved_csv_and_say_when_a_last_row_is_left_out(tmp_path):
    path = tmp_path / "results.csv"
    rows = [
        f"{name},10,1,8,12,0.95,m,B02,{site}\n"
        for site, name in ((1, "p_B02_s1.tif"), (2, "p_B02_s2.tif"))
    ]
    path.write_bytes(
        b"\xef\xbb\xbf"
        + ("file,count,std,low,high,level,model,well,site\n" + "".join(rows)).encode()
    )  # UTF-8 with a BOM
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 0, result.output  # was: missing column(s) file
    with open(tmp_path / "w.csv", newline="") as handle:
        assert [w["images"] for w in csv.DictReader(handle)] == ["2"]
    assert "no line end" not in result.output
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # as an editor may save it
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 0, result.output
    assert "the last line of" in result.output and "has no line end: left out" in result.output


def test_wells_read_plate_well_and_channel_from_the_name_whatever_the_columns(tmp_path):
    # an older celltally wrote plate '' for Screen_P1 (it took the text before the first
    # '_'); a resumed run writes 'Screen_P1': one well, not two. A name without a well
    # keeps the well its row was given by hand.
    path = tmp_path / "results.csv"
    path.write_text(
        "file,count,std,low,high,level,model,plate,well,site,stain\n"
        "Screen_P1_B03_s1_w1.tif,10,1,8,12,0.95,m,,B03,1,1\n"
        "Screen_P1_B03_s2_w1.tif,12,1,10,14,0.95,m,Screen_P1,B03,2,1\n"
        "img7.tif,5,1,3,7,0.95,m,,C04,1,\n"
    )
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "w.csv", newline="") as handle:
        got = {(w["plate"], w["well"], w["sites"]) for w in csv.DictReader(handle)}
    assert got == {("Screen_P1", "B03", "1;2"), ("", "C04", "1")}


def test_wells_warn_when_names_begin_with_two_well_like_names(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(
        "file,count,std,low,high,level,model,well\n"
        "P01_A01_w1.tif,10,1,8,12,0.95,m,P01\n"
        "P01_B05_w1.tif,12,1,10,14,0.95,m,P01\n"
        "PL01_B05_w1.tif,12,1,10,14,0.95,m,B05\n"  # row PL is on no plate: B05 is the well
    )
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 0, result.output
    assert "2 file name(s) begin with two well-like names (e.g. P01_A01_w1.tif)" in result.output
    path.write_text(
        "file,count,std,low,high,level,model,well\nPlate01_A01_w1.tif,10,1,8,12,0.95,m,A01\n"
    )
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert "well-like names" not in result.output


def test_a_time_lapse_is_totalled_per_time_point(tmp_path):
    path = tmp_path / "results.csv"
    rows = "".join(
        f"Plate1_B03_s{s}_t0{t}_w1.tif,{n},1,{n - 2},{n + 2},0.95,m,B03\n"
        for t in (1, 2)
        for s in (1, 2)
        for n in (10 * t + s,)
    )
    path.write_text("file,count,std,low,high,level,model,well\n" + rows)
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 0, result.output
    assert "more than once" not in result.output and "repeated" not in result.output
    with open(tmp_path / "w.csv", newline="") as handle:
        got = {
            (w["plate"], w["sites"], w["repeated_sites"], w["count"])
            for w in csv.DictReader(handle)
        }
    # each time point's sites summed (11 + 12, 21 + 22), not the frames over time as repeats
    assert got == {("Plate1 t01", "1;2", "", "23.0"), ("Plate1 t02", "1;2", "", "43.0")}


def test_results_csvs_joined_end_to_end_are_refused_naming_the_line(tmp_path):
    path = tmp_path / "joined.csv"
    header = "file,count,std,low,high,level,model,well\n"
    path.write_text(  # the second file's header keeps its byte-order mark
        header + "a_B03.tif,3,1,1,5,0.95,m,B03\n\ufeff" + header + "b_B04.tif,4,1,2,6,0.95,m,B04\n"
    )
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {path}: line 3 repeats the header"), result.output
    assert not (tmp_path / "w.csv").exists()


def test_names_with_unpadded_wells_are_named_when_left_out(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(
        "file,count,std,low,high,level,model,well\n"
        "Plate1_B3_s1_w1.tif,10,1,8,12,0.95,m,\n"
        "Plate1_B03_s2_w1.tif,12,1,10,14,0.95,m,B03\n"
    )
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 0, result.output
    assert (
        "warning: 1 file name(s) hold a well without its leading zero (e.g. "
        "Plate1_B3_s1_w1.tif): wells are read with two digits (B03, not B3)"
    ) in result.output
    assert "1 image(s) without a well in the name left out" in result.output


def test_wells_missing_a_site_are_named(tmp_path):
    path = tmp_path / "results.csv"
    lines = ["file,count,std,low,high,level,model,well"]
    for well, sites in (("B03", (1, 2, 3, 4)), ("B04", (1, 2, 4)), ("B05", (1, 2, 3, 4))):
        lines += [f"P1_{well}_s{s}_w1.tif,10,1,8,12,0.95,m,{well}" for s in sites]
    path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["wells", str(path), "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 0, result.output
    # B04's total covered 3 sites where the others covered 4, without a word
    assert "1 well(s) have fewer images than most wells of their plate (e.g. B04: 3 of 4" in (
        result.output
    )


def test_evaluate_names_a_site_summed_twice_as_count_does(tiny_model, tmp_path):
    data = tmp_path / "nested"
    repeated = "SIMCEPImages_A05_C4_F1_s09_w1.TIF"
    for sub in ("p1", "p2"):  # the same image under one name in two sub-folders
        (data / sub).mkdir(parents=True)
        tifffile.imwrite(data / sub / repeated, blob_image(4, seed=1))
    tifffile.imwrite(data / "p1" / "SIMCEPImages_A05_C4_F1_s10_w1.TIF", blob_image(4, seed=2))
    (data / "counts.csv").write_text(
        f"image,count\np1/{repeated},4\np2/{repeated},4\np1/SIMCEPImages_A05_C4_F1_s10_w1.TIF,4\n"
    )
    out, report = tmp_path / "e.json", tmp_path / "rep"
    args = ["evaluate", str(data), "--model", str(tiny_model), "--out", str(out)]
    result = runner.invoke(app, [*args, "--report", str(report), "--no-progress"])
    assert result.exit_code == 0, result.output
    (well,) = json.loads(out.read_text())["wells"]["rows"]
    assert (well["images"], well["sites"], well["repeated_sites"]) == (3, "9;10", "9")
    assert (
        "warning: 1 well(s) hold a site more than once ('repeated_sites' in their well rows "
        f"in {out}; the same image counted under two names, or two stains whose names carry "
        "no _w1/_w2?): their totals count it twice"
    ) in result.output
    text = (report / "index.html").read_text()
    assert "1 well(s) hold a site more than once</strong>" in text and "A05 (site 9)" in text


def test_a_site_that_may_hold_no_cells_may_add_nothing_to_its_wells_total():
    from celltally.calibration import EMPTY_HINT

    sites = [row(f"P1_B03_s{s}_w1.tif", 40.0, 1.0) for s in (1, 2, 3)]
    empty = row("P1_B03_s4_w1.tif", 30.0, 0.5, warning=f"low contrast (range 0.10): {EMPTY_HINT}")
    (plain,), _ = aggregate_wells(sites + [row("P1_B03_s4_w1.tif", 30.0, 0.5)], correlation=0.0)
    (flagged,), _ = aggregate_wells(sites + [empty], correlation=0.0)
    assert flagged["count"] == plain["count"] == 150.0 and flagged["high"] == plain["high"]
    # the flagged site's own interval reaches 0, and so does its share of the total's
    assert flagged["low"] == pytest.approx(plain["low"] - 30.0, abs=0.01)


def test_totals_and_cellprofiler_tables_never_replace_a_users_csv(tiny_model, well_plate, tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("sample,notes\nB02,treated\n")
    out = tmp_path / "res.csv"
    count = ["count", str(well_plate), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    for args, name in (
        (["--wells", str(mine)], "--wells"),  # was written over without a word
        (["-o", str(tmp_path / "mine"), "--format", "cellprofiler"], "--format cellprofiler"),
    ):
        if name == "--format cellprofiler":
            (tmp_path / "mine_Image.csv").write_text("sample,notes\n")
        result = runner.invoke(app, [*count, *args])
        assert result.exit_code == 2, result.output
        assert f"{name} " in result.output and "is not a table celltally wrote" in result.output
    assert mine.read_text() == "sample,notes\nB02,treated\n" and not out.exists()
    assert (tmp_path / "mine_Image.csv").read_text() == "sample,notes\n"
    totals = tmp_path / "wells.csv"
    for _ in range(2):  # its own tables are written again on a rerun
        result = runner.invoke(app, [*count, "--wells", str(totals), "--format", "cellprofiler"])
        assert result.exit_code == 0, result.output
    refused = runner.invoke(app, ["wells", str(out), "--out", str(mine)])
    assert refused.exit_code == 2 and "is not a table celltally wrote" in refused.output
    assert runner.invoke(app, ["wells", str(out), "--out", str(totals)]).exit_code == 0
