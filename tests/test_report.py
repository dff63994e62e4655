"""The evaluation report (celltally.report) and `celltally evaluate --report`."""

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import tifffile
import torch
from conftest import blob_image
from scipy import ndimage
from typer.testing import CliRunner

from celltally.cli import app
from celltally.counter import CellCounter
from celltally.evaluation import evaluate_folder
from celltally.report import CAUSE_RANK, NO_CAUSE, assign_causes, image_measures, write_report


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine: 2 threads spin on each other (~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def discs(centres, shape=(80, 80), radius=8):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape)
    for cy, cx in centres:
        image += 200 * ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2)
    return np.clip(image + 5, 0, 255).astype(np.uint8)


def test_image_measures_see_focus_overlap_and_shape():
    sharp = blob_image(15, seed=4)
    focus = [
        image_measures(ndimage.gaussian_filter(sharp.astype(float), s), 15)["sharpness"]
        for s in (0, 2, 4)
    ]
    assert focus[0] > 1.5 * focus[1] > 1.5 * focus[2] > 0  # blurrier, less sharp

    apart = image_measures(discs([(20, 20), (60, 60)]), 2)
    touching = image_measures(discs([(40, 34), (40, 46)]), 2)
    assert apart["objects"] == 2 and apart["cells_per_object"] == 1.0
    assert touching["objects"] == 1 and touching["cells_per_object"] == 2.0
    assert touching["solidity"] < apart["solidity"]

    star = np.zeros((80, 80), dtype=np.uint8) + 5
    star[38:42, 10:70] = 200
    star[10:70, 38:42] = 200  # a plus sign: its convex hull is mostly empty
    assert image_measures(star, 1)["solidity"] < 0.5 < apart["solidity"]
    flat = image_measures(np.full((20, 20), 7, dtype=np.uint8), 0)
    assert math.isnan(flat.pop("sharpness"))  # no contrast: no focus to measure
    assert flat == {"objects": 0, "cells_per_object": 0.0, "solidity": 1.0}


def test_assign_causes_ranks_against_all_images():
    rng = np.random.default_rng(0)
    rows = [
        {
            "file": f"{i}",
            "cells_per_object": float(rng.uniform(1, 2)),
            "sharpness": float(rng.uniform(1, 2)),
            "solidity": float(rng.uniform(0.8, 0.9)),
        }
        for i in range(100)
    ]
    blurry = {**rows[0], "sharpness": 0.1}  # sharper images: all others
    clumped = {**rows[1], "cells_per_object": 9.0}
    typical = {"file": "t", "cells_per_object": 1.5, "sharpness": 1.5, "solidity": 0.85}
    groups = assign_causes([*rows, blurry, clumped], [blurry, clumped, typical])
    assert [r["file"] for r, _ in groups["focus"]] == ["0"]
    assert [r["file"] for r, _ in groups["overlap"]] == ["1"]
    assert [r["file"] for r, _ in groups[NO_CAUSE]] == ["t"]
    ranks = groups[NO_CAUSE][0][1]
    assert max(ranks.values()) < CAUSE_RANK and set(ranks) == {"overlap", "focus", "shape"}


@pytest.fixture
def labelled_folder(tmp_path):
    folder = tmp_path / "plate"
    folder.mkdir()
    for i, n in enumerate((2, 6, 11, 17, 25)):
        image = blob_image(n, seed=10 + i)
        if i == 3:
            image = ndimage.gaussian_filter(image, 3)
        tifffile.imwrite(
            folder / f"SIMCEPImages_A{i + 1:02d}_C{n}_F{1 + 22 * (i == 3)}_s01_w1.TIF", image
        )
    return folder


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_report_renders_and_its_images_exist(tiny_model, labelled_folder, tmp_path):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(labelled_folder, model=counter)
    before = [dict(r) for r in evaluation["rows"]]
    index = write_report(evaluation, tmp_path / "report", counter=counter, data=labelled_folder)
    assert evaluation["rows"] == before  # the evaluation is not modified
    text = index.read_text()
    parser = _Sources()
    parser.feed(text)
    assert {"pred_vs_true.png", "error_by_group.png", "reliability.png"} <= set(parser.sources)
    for src in parser.sources:
        assert (index.parent / src).is_file() and (index.parent / src).stat().st_size > 1000
    # An untrained model misses most truths: every miss has an explanation panel.
    misses = [r for r in evaluation["rows"] if not r["low"] <= r["true"] <= r["high"]]
    panels = [s for s in parser.sources if s.startswith("failures/")]
    assert misses and len(panels) == len(misses)
    assert f"({len(misses)} of 5)" in text
    for row in misses:
        assert row["file"] in text
    assert re.search(r"<td>0\.95</td>", text)  # the reliability table lists nominal 0.95
    assert "Per-well totals" not in text  # one image per well: no totals to show


def _two_wells(tmp_path):
    """A folder of two wells (4 and 9 cells) of two sites each, BBBC005-named."""
    folder = tmp_path / "wells"
    folder.mkdir()
    for site in (1, 2):
        for column, n in ((1, 4), (2, 9)):
            name = f"SIMCEPImages_A{column:02d}_C{n}_F1_s{site:02d}_w1.TIF"
            tifffile.imwrite(folder / name, blob_image(n, seed=site * 10 + n))
    return folder


def test_report_shows_per_well_totals(tiny_model, tmp_path):
    folder = _two_wells(tmp_path)
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(folder, model=counter)
    text = write_report(evaluation, tmp_path / "r", counter=counter, data=folder).read_text()
    wells = evaluation["wells"]
    assert "<h2>Per-well totals</h2>" in text and "2 wells of 2.0 images" in text
    assert f"<td>{wells['mae']:.2f}</td>" in text and f"<td>{wells['coverage']:.1%}</td>" in text
    # the wells' errors on the plate's grid (A01 and A02)
    assert [(w["well"], w["images"]) for w in wells["rows"]] == [("A01", 2), ("A02", 2)]
    assert "<img src='plate_error.png'" in text and (tmp_path / "r" / "plate_error.png").is_file()
    assert "Images not counted" not in text


def test_report_lists_the_images_it_could_not_count(tiny_model, labelled_folder, tmp_path):
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(labelled_folder, folder)
    broken = folder / "Plate1_G05_C40_s1_w1.tif"  # no blur in the name
    broken.write_bytes(b"II*\x00 truncated")
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(folder, model=counter)
    assert len(evaluation["errors"]) == 1
    text = write_report(evaluation, tmp_path / "r", counter=counter, data=folder).read_text()
    assert "<h2>Images not counted (1)</h2>" in text and "Plate1_G05_C40_s1_w1.tif" in text
    assert "blur None" not in text and "blur=None" not in text


def test_report_caps_the_gallery(tiny_model, labelled_folder, tmp_path, monkeypatch):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(labelled_folder, model=counter)
    index = write_report(
        evaluation, tmp_path / "r", counter=counter, data=labelled_folder, max_failures=1
    )
    assert len(list((index.parent / "failures").glob("*.png"))) == 1
    assert "more are listed in the table below" in index.read_text()
    # again into the same folder with no panel drawable: the earlier panel goes (it stayed,
    # unreferenced), and the page is still written, saying why (one too large lost it all)
    from celltally import explain

    monkeypatch.setattr(explain, "EXPLAIN_MAX_PIXELS", 100)
    again = write_report(
        evaluation, tmp_path / "r", counter=counter, data=labelled_folder, max_failures=1
    )
    assert list((again.parent / "failures").glob("*.png")) == []
    assert "No panel: " in again.read_text() and "too large to explain" in again.read_text()


def test_a_frame_without_contrast_is_not_put_under_bad_focus():
    from celltally.report import assign_causes, image_measures

    empty = {"file": "empty.tif", **image_measures(np.zeros((60, 80)), 0.0)}
    rows = [{"file": f"{i}.tif", "sharpness": 0.1 * (i + 1), "cells_per_object": 1.0,
             "solidity": 0.9} for i in range(9)] + [empty]  # fmt: skip
    groups = assign_causes(rows, [empty])
    assert "focus" not in groups  # sharpness 0 ranked as the worst focus of all


def test_cli_evaluate_report(tiny_model, labelled_folder, tmp_path):
    out = tmp_path / "rep"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(labelled_folder),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "ev.json"),
            "--report",
            str(out),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file() and (out / "reliability.png").is_file()
    assert "report ->" in result.output


def test_evaluation_and_report_name_the_interval_method_used(tiny_model, labelled_folder, tmp_path):
    from typer.testing import CliRunner

    from celltally.cli import app

    def named(counter):
        evaluation = evaluate_folder(labelled_folder, model=counter)
        index = write_report(evaluation, tmp_path / "r", counter=counter, data=labelled_folder)
        return evaluation["calibration"], evaluation["epistemic"], index.read_text()

    plain = CellCounter.from_pretrained(tiny_model, device="cpu")
    method, epistemic, text = named(plain)
    assert (method, epistemic) == ("none", False) and "(calibration used: none)" in text
    model = tmp_path / "calibrated"
    args = ["calibrate", "--model", str(tiny_model), "--data", str(labelled_folder)]
    assert CliRunner().invoke(app, [*args, "--out", str(model)]).exit_code == 0
    for asked, used in ((None, "conformal"), ("temperature", "temperature")):
        counter = CellCounter.from_pretrained(model, device="cpu", calibration=asked)
        method, _, text = named(counter)
        assert method == used and f"(calibration used: {used})" in text


def test_a_counts_csv_name_that_is_not_there_is_named_with_the_path_tried(tmp_path):
    from celltally import io
    from celltally.evaluation import labelled_files

    data = tmp_path / "sub"
    (data / "images").mkdir(parents=True)
    tifffile.imwrite(data / "images" / "a.tif", blob_image(3))
    (data / "counts.csv").write_text("image,count\nimages/a.tif,3\n")
    with pytest.raises(io.InputError) as err:
        labelled_files(data)
    message = str(err.value)
    assert "lists images/a.tif, but" in message and str(data / "images" / "images") in message


def test_the_overflow_table_prints_a_miss_as_a_miss(tiny_model, labelled_folder, tmp_path):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(labelled_folder, model=counter)
    row = evaluation["rows"][0]
    row.update({"true": 7.0, "count": 7.06, "low": 7.04, "high": 7.1})  # just missed
    text = write_report(
        evaluation, tmp_path / "r", counter=counter, data=labelled_folder, max_failures=0
    ).read_text()
    assert "<td>7</td><td>7.06</td><td>7.04</td><td>7.10</td>" in text  # not 7.1 / 7.0 / 7.1


def test_evaluate_and_report_take_counts_csv_names_in_sub_folders(tiny_model, tmp_path):
    data = tmp_path / "data"
    lines = ["image,count"]
    for k, sub in enumerate(("p1", "p2")):  # the same file name in two sub-folders
        (data / sub).mkdir(parents=True)
        tifffile.imwrite(data / sub / "img.tif", blob_image(3 + 4 * k, seed=k))
        lines.append(f"{sub}/img.tif,{3 + 4 * k}")
    (data / "counts.csv").write_text("\n".join(lines) + "\n")
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(data, model=counter)
    assert [r["file"] for r in evaluation["rows"]] == ["p1/img.tif", "p2/img.tif"]
    assert [r["true"] for r in evaluation["rows"]] == [3.0, 7.0]
    assert evaluation["unlabelled"] == []
    tifffile.imwrite(data / "p2" / "extra.tif", blob_image(2))  # found in the sub-folder
    assert evaluate_folder(data, model=counter)["unlabelled"] == [str(data / "p2" / "extra.tif")]
    index = write_report(evaluation, tmp_path / "r", counter=counter, data=data)
    assert "p2/img.tif" in index.read_text()


def test_a_failed_image_in_a_sub_folder_counts_against_its_own_plate(tmp_path):
    data = tmp_path / "d"
    lines = ["image,count"]
    for plate in ("PlateA", "PlateB"):
        (data / "images" / plate).mkdir(parents=True)
        for site in (1, 2, 3):
            name = f"{plate}/exp1_B02_s{site}_w1.tif"
            other = 3 * (plate == "PlateB")  # other images: the plates' counts differ
            tifffile.imwrite(data / "images" / name, blob_image(site + other, seed=site + other))
            lines.append(f"{name},{site}")
    (data / "images" / "PlateA" / "exp1_B02_s3_w1.tif").write_bytes(b"II*\x00broken")
    (data / "masks").mkdir()  # neither masks/ nor a report's figures are "unlabelled images"
    tifffile.imwrite(data / "masks" / "exp1_B02_s1_w1.tif", np.zeros((8, 8), np.uint8))
    (data / "counts.csv").write_text("\n".join(lines) + "\n")
    # the shipped model: plates told apart by their folders need counts that differ
    evaluation = evaluate_folder(data, model=CellCounter.from_pretrained("bbbc005"))
    assert evaluation["unlabelled"] == []
    failed = {r["plate"]: r["failed"] for r in evaluation["wells"]["rows"]}
    assert failed == {"PlateA/exp1": 1, "PlateB/exp1": 0}


def test_report_says_which_images_the_model_was_made_with(tiny_model, labelled_folder, tmp_path):
    import copy

    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(labelled_folder, model=counter)
    assert evaluation["seen"] == {"training": 0, "calibration": 0, "left_out": False}
    text = write_report(
        evaluation, tmp_path / "r0", counter=counter, data=labelled_folder
    ).read_text()
    assert "Not held-out" not in text and "Held out" not in text
    assert "by celltally" in text and str(labelled_folder.resolve()) in text
    # two of them trained on, as a config would record them
    seen = copy.deepcopy(evaluation)
    seen["seen"] = {"training": 2, "calibration": 0, "left_out": False}
    for row in seen["rows"][:2]:
        row["seen"] = "training"
    text = write_report(seen, tmp_path / "r1", counter=counter, data=labelled_folder).read_text()
    assert "Not held-out figures:</strong> 2 image(s) model tiny was made with" in text
    assert "--held-out" in text
    seen["seen"]["left_out"] = True
    text = write_report(seen, tmp_path / "r2", counter=counter, data=labelled_folder).read_text()
    assert "Held out: 2 image(s) model tiny was made with" in text


def _evaluate(*args):
    return CliRunner().invoke(app, ["evaluate", *(str(a) for a in args), "--no-progress"])


def test_report_names_the_flagged_images_as_evaluate_prints_them(
    tiny_model, labelled_folder, tmp_path
):
    import json

    empty = "SIMCEPImages_A07_C0_F1_s01_w1.TIF"  # an empty well: low contrast, flagged
    tifffile.imwrite(labelled_folder / empty, np.full((130, 174), 3, np.uint8))
    out, report = tmp_path / "e.json", tmp_path / "rep"
    said = _evaluate(labelled_folder, "--model", tiny_model, "--out", out, "--report", report)
    assert said.exit_code == 0, said.output
    flagged = json.loads(out.read_text())["flagged"]
    assert flagged["low_contrast"] == 1 and flagged["unlike"] >= 1
    text = (report / "index.html").read_text()
    unlike = f"{flagged['unlike']} of 6 images flagged as unlike the model&#x27;s calibration"
    assert unlike.replace("&#x27;", "'") in said.output and unlike in text
    empty_said = "1 of 6 images with so little contrast that they may hold no cells"
    assert empty_said in said.output and empty_said in text
    section = text[text.index("<h2 id='flagged'>") :]
    assert f"Flagged images ({flagged['images']} of 6)" in section and empty in section
    assert "the frame may hold no cells" in section


def test_report_mentions_the_images_left_out_without_a_true_count(
    tiny_model, labelled_folder, tmp_path
):
    tifffile.imwrite(labelled_folder / "no_count_here.tif", blob_image(3, seed=8))
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(labelled_folder, model=counter)
    text = write_report(evaluation, tmp_path / "r", counter=counter, data=labelled_folder)
    text = text.read_text()
    assert "1 image(s) of the folder left out: no true count" in text
    assert "They are in no figure below: no_count_here.tif." in text


def test_a_level_beyond_the_calibration_is_noted_in_the_json_and_the_report(
    tiny_model, labelled_folder, tmp_path
):
    import json
    import shutil

    model = tmp_path / "five_scores"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["calibration"] = {"default": "conformal", "scores": [0.2, 0.5, 0.9, 1.3, 2.0]}
    (model / "config.json").write_text(json.dumps(config))
    out, report = tmp_path / "e.json", tmp_path / "rep"
    args = ("--model", model, "--out", out, "--report", report)
    said = _evaluate(labelled_folder, *args, "--level", "0.9")
    assert said.exit_code == 0, said.output
    note = json.loads(out.read_text())["level_note"]
    assert note.startswith("level 0.9 is above the 0.833") and f"note: {note}" in said.output
    assert "Level beyond the calibration:</strong> level 0.9 is above the 0.833" in (
        (report / "index.html").read_text()
    )
    assert _evaluate(labelled_folder, *args, "--level", "0.8").exit_code == 0
    assert json.loads(out.read_text())["level_note"] is None
    assert "Level beyond" not in (report / "index.html").read_text()


def test_a_report_written_into_the_data_folder_is_not_taken_for_its_images(
    tiny_model, labelled_folder, tmp_path
):
    import json

    out = tmp_path / "e.json"
    for report in (labelled_folder, labelled_folder, labelled_folder / "rep", labelled_folder):
        said = _evaluate(labelled_folder, "--model", tiny_model, "--out", out, "--report", report)
        assert said.exit_code == 0, said.output
        assert "left out" not in said.output and "not searched" not in said.output
        evaluation = json.loads(out.read_text())
        assert evaluation["unlabelled"] == [] and evaluation["unsearched"] == []
        assert evaluation["metrics"]["all"]["n"] == 5
    assert (labelled_folder / "pred_vs_true.png").is_file()


def test_report_never_writes_over_a_file_it_did_not_write(tiny_model, labelled_folder, tmp_path):
    from PIL import Image

    out = tmp_path / "e.json"
    args = ("--model", tiny_model, "--out", out, "--report")
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("L", (8, 8)).save(mine / "pred_vs_true.png")  # the user's, unmarked
    (mine / "index.html").write_text("<html>my page</html>")
    folder_page = tmp_path / "dir_page"
    (folder_page / "index.html").mkdir(parents=True)
    file_failures = tmp_path / "file_failures"
    file_failures.mkdir()
    (file_failures / "failures").write_text("notes")
    for report, name, what in (
        (mine, "index.html", "exists and is not a report celltally wrote"),
        (folder_page, "index.html", "is a folder"),
        (file_failures, "failures", "is a file"),
    ):
        said = _evaluate(labelled_folder, *args, report)
        assert said.exit_code == 2, said.output
        assert said.output.startswith(f"error: {report / name}: {what}"), said.output
        assert len(said.output.strip().splitlines()) == 1 and not out.exists()  # not counted
    (mine / "index.html").unlink()
    said = _evaluate(labelled_folder, *args, mine)
    assert said.output.startswith(f"error: {mine / 'pred_vs_true.png'}: exists and is not a")
    assert (mine / "pred_vs_true.png").stat().st_size < 1000 and not out.exists()
    assert sorted(p.name for p in mine.iterdir()) == ["pred_vs_true.png"]
    # a report written before the report marked its figures: its own page shows them
    (mine / "index.html").write_text(
        "<!DOCTYPE html><html><head><title>celltally evaluation: tiny</title></head><body>"
        "<img src='pred_vs_true.png'></body></html>"
    )
    said = _evaluate(labelled_folder, *args, mine)
    assert said.exit_code == 0, said.output
    assert (mine / "pred_vs_true.png").stat().st_size > 1000  # now the report's own


def test_a_reused_report_folder_loses_the_figures_this_run_does_not_draw(tiny_model, tmp_path):
    import copy

    from celltally import io

    folder = _two_wells(tmp_path)
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(folder, model=counter)
    report = tmp_path / "r"
    write_report(evaluation, report, counter=counter, data=folder)
    assert io.is_own_figure(report / "plate_error.png")
    (report / "notes.txt").write_text("mine")
    without_wells = copy.deepcopy(evaluation)
    without_wells["wells"] = None
    text = write_report(without_wells, report, counter=counter, data=folder).read_text()
    assert "plate_error.png" not in text and not (report / "plate_error.png").exists()
    assert (report / "notes.txt").read_text() == "mine"
    assert {"pred_vs_true.png", "error_by_group.png", "reliability.png"} <= {
        p.name for p in report.iterdir()
    }


def test_report_panels_never_replace_a_users_png_nor_the_images_evaluated(
    tiny_model, labelled_folder, tmp_path
):
    import hashlib
    import shutil

    from PIL import Image

    from celltally.evaluation import labelled_files
    from celltally.report import report_outputs

    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    evaluation = evaluate_folder(labelled_folder, model=counter)
    failing = [r["file"] for r in evaluation["rows"] if not r["low"] <= r["true"] <= r["high"]]
    assert failing, "the tiny model is expected to miss some of these"
    report = tmp_path / "r"
    (report / "failures").mkdir(parents=True)
    stem = failing[0].rsplit(".", 1)[0]
    mine = report / "failures" / f"{stem}.png"  # the user's, unmarked, a panel's name
    Image.new("L", (8, 8)).save(mine)
    before = mine.read_bytes()
    for _ in range(2):  # a rerun too: its own panels replaced, the user's file kept
        text = write_report(evaluation, report, counter=counter, data=labelled_folder)
        assert mine.read_bytes() == before
        assert f"failures/{stem}_2.png" in text.read_text()
    # images evaluated in a folder named failures, the report in its parent: untouched
    data = tmp_path / "proj" / "failures"
    shutil.copytree(labelled_folder, data)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
    evaluation = evaluate_folder(data, model=counter, exclude=report_outputs(data.parent))
    write_report(evaluation, data.parent, counter=counter, data=data)
    assert all(hashlib.sha256((data / n).read_bytes()).hexdigest() == d for n, d in digest.items())
    # the data named through a link to the report folder: its images are all kept
    link = tmp_path / "link"
    link.symlink_to(labelled_folder, target_is_directory=True)
    kept = labelled_files(link, exclude=report_outputs(labelled_folder))
    assert len(kept) == 5
