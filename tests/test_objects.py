"""Per-object output (labels, object table, overlay) and CellProfiler-style per-image rows."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from celltally.objects import (
    CELLPROFILER_COLUMNS,
    cellprofiler_rows,
    label_objects,
    object_table,
    overlay_image,
    save_objects,
    write_cellprofiler_csv,
)
from celltally.simulate import simulate_scene
from celltally.transforms import resize_area


@pytest.fixture(scope="module")
def scene():
    return simulate_scene(60, blur=1, stain=1, bit_depth=16, seed=11)


def half_model_mask(mask: np.ndarray) -> np.ndarray:
    """A truth mask at the resolution ``CountResult.mask`` has for a 696 x 520 frame."""
    return resize_area(mask.astype(np.float32), (96, 128))


def test_labels_follow_the_count_and_find_the_true_objects(scene):
    labels = label_objects(half_model_mask(scene.mask), 60.0, shape=scene.image.shape)
    assert labels.shape == scene.image.shape and labels.dtype == np.int32
    found = np.unique(labels[labels > 0])
    assert found.size == 60  # one object per seed: round(count)
    ids = np.unique(scene.labels[scene.labels > 0])
    centres = ndi.center_of_mass(np.ones(scene.labels.shape), scene.labels, ids)
    hits = [labels[int(round(y)), int(round(x))] for y, x in centres]
    assert np.mean(np.asarray(hits) > 0) > 0.95
    assert len({h for h in hits if h}) / ids.size > 0.9  # distinct objects, not one blob


def test_fewer_seeds_than_blobs_keeps_the_largest(scene):
    labels = label_objects(half_model_mask(scene.mask), 5.4, shape=scene.image.shape)
    assert np.unique(labels[labels > 0]).size == 5


def test_crowded_small_blobs_get_exactly_the_count():
    """More seeds than a blob has peaks: distinct seeds, never a lost label."""
    yy, xx = np.mgrid[0:40, 0:40]
    for radius in (2, 3, 4, 5, 6):
        disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= radius**2).astype(np.float32)
        for count in range(2, 8):
            labels = label_objects(disc, count, shape=(40, 40))
            assert np.unique(labels[labels > 0]).size == count, (radius, count)
    dots = np.zeros((100, 120), dtype=np.float32)
    for i in range(10):
        dots[10 * i + 3 : 10 * i + 6, 10:13] = 1.0
    for count in (15, 30, 90, 120):  # 90 pixels in all: at most 90 objects
        labels = label_objects(dots, count, shape=(100, 120))
        assert np.unique(labels[labels > 0]).size == min(count, 90), count


def test_empty_mask_or_zero_count_gives_no_objects():
    mask = np.zeros((96, 128), dtype=np.float32)
    assert not label_objects(mask, 12.0, shape=(520, 696)).any()
    mask[10:20, 10:20] = 1.0
    assert not label_objects(mask, 0.3, shape=(520, 696)).any()


def test_object_table_centroids_and_areas():
    labels = np.zeros((50, 60), dtype=np.int32)
    labels[10:20, 5:15] = 1
    labels[30:34, 40:50] = 3
    rows = object_table(labels)
    assert rows == [
        {"label": 1, "centroid_y": 14.5, "centroid_x": 9.5, "area": 100},
        {"label": 3, "centroid_y": 31.5, "centroid_x": 44.5, "area": 40},
    ]
    assert object_table(np.zeros((5, 5), dtype=np.int32)) == []


def test_overlay_marks_each_point():
    image = np.full((100, 120), 1000, dtype=np.uint16)
    rgb = overlay_image(image, [(10, 10), (50.4, 99.6), (99, 119)])
    assert rgb.shape == (100, 120, 3) and rgb.dtype == np.uint8
    red = (rgb[..., 0] == 255) & (rgb[..., 1] == 40)
    assert red[10, 10] and red[50, 100] and red[99, 119]
    assert not red[80, 30]
    assert np.array_equal(image, np.full((100, 120), 1000, dtype=np.uint16))  # input untouched


def test_save_objects_writes_labels_table_and_overlay(scene, tmp_path):
    out = save_objects(tmp_path / "objs", "a01", scene.image, half_model_mask(scene.mask), 60.2)
    labels = tifffile.imread(out["labels"])
    assert labels.shape == scene.image.shape
    with out["objects"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == out["n"] == np.unique(labels[labels > 0]).size
    assert list(rows[0]) == ["label", "centroid_y", "centroid_x", "area"]
    first = rows[0]
    y, x = round(float(first["centroid_y"])), round(float(first["centroid_x"]))
    assert labels[y, x] == int(first["label"])
    overlay = np.asarray(Image.open(out["overlay"]))
    assert overlay.shape == (*scene.image.shape, 3)


def test_cellprofiler_rows_and_file(tmp_path):
    rows = [
        {
            "file": "plate1/SIMCEPImages_A05_C18_F1_s03_w1.TIF",
            "count": "17.90",
            "std": "1.2",
            "low": "15.10",
            "high": "20.70",
            "plate": "",
            "well": "A05",
            "site": "3",
            "stain": "1",
        },
        {
            "file": "x/other.tif",
            "count": "3.00",
            "std": "0.5",
            "low": "2.00",
            "high": "4.00",
            "warning": "unlike the calibration images (...)",
        },
    ]
    table = cellprofiler_rows(rows)
    assert table[0]["ImageNumber"] == "1" and table[1]["ImageNumber"] == "2"
    assert table[0]["FileName"] == "SIMCEPImages_A05_C18_F1_s03_w1.TIF"
    assert table[0]["PathName"] == "plate1"
    assert (table[0]["Metadata_Well"], table[0]["Metadata_Site"]) == ("A05", "3")
    assert table[0]["Metadata_Channel"] == "1"  # w1 and w2 of one site are told apart
    assert table[1]["Metadata_Well"] == table[1]["Metadata_Channel"] == ""
    assert (table[0]["Warning"], table[1]["Warning"]) == ("", rows[1]["warning"])
    assert (table[0]["Count"], table[0]["Count_Low"], table[0]["Count_High"]) == (
        "17.90",
        "15.10",
        "20.70",
    )
    path = write_cellprofiler_csv(tmp_path / "out_Image.csv", rows)
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CELLPROFILER_COLUMNS
        assert len(list(reader)) == 2


def test_cli_writes_per_object_output_and_cellprofiler_table(
    tiny_model, image_folder, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from celltally.cli import app

    # Pillow's decompression-bomb limit, shrunk to stand for its 179 M pixels: the masks
    # are read back under celltally's own limit, as images are
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # the masks here: 1536 pixels
    out = tmp_path / "res.csv"
    objs = tmp_path / "objs"
    args = ["count", image_folder, "--out", out, "--model", tiny_model, "--no-progress"]
    args += ["--save-labels", objs, "--format", "cellprofiler"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    with out.open() as handle:
        rows = {r["file"]: r for r in csv.DictReader(handle)}
    for image in sorted(image_folder.iterdir()):
        labels = tifffile.imread(objs / f"{image.stem}_labels.tif")
        assert labels.shape == tifffile.imread(image).shape
        with (objs / f"{image.stem}_objects.csv").open() as handle:
            table = list(csv.DictReader(handle))
        assert len(table) == np.unique(labels[labels > 0]).size
        assert len(table) <= round(float(rows[str(image)]["count"]))
        assert (objs / f"{image.stem}_overlay.png").exists()
        assert (objs / f"{image.stem}_mask.png").exists()
    with (tmp_path / "res_Image.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CELLPROFILER_COLUMNS
        table = list(reader)
    assert [r["ImageNumber"] for r in table] == ["1", "2"]
    assert sorted(r["Metadata_Well"] for r in table) == ["A01", "A02"]
    for r in table:  # same order, counts and warnings as the results CSV
        assert r["Count"] == rows[str(Path(r["PathName"]) / r["FileName"])]["count"]
        assert r["Warning"] == rows[str(Path(r["PathName"]) / r["FileName"])]["warning"]
    assert [r["FileName"] for r in table] == [Path(f).name for f in rows]
    bad = CliRunner().invoke(app, [str(a) for a in [*args[:7], "--format", "excel"]])
    assert bad.exit_code == 2 and "--format must be" in bad.output


def _count(args):
    from typer.testing import CliRunner

    from celltally.cli import app

    result = CliRunner().invoke(app, [str(a) for a in [*args, "--no-progress"]])
    assert result.exit_code == 0, result.output
    return result


def test_same_named_files_of_two_folders_get_their_own_masks_and_labels(tiny_model, tmp_path):
    from conftest import blob_image

    for folder, n in (("p1", 3), ("p2", 9)):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "A01.tif", blob_image(n, seed=n))
    objs = tmp_path / "objs"
    out = tmp_path / "res.csv"
    _count(
        [
            "count",
            tmp_path / "p1",
            tmp_path / "p2",
            "--out",
            out,
            "--model",
            tiny_model,
            "--save-labels",
            objs,
        ]
    )
    with out.open() as handle:
        rows = {Path(r["file"]).parent.name: r for r in csv.DictReader(handle)}
    for folder in ("p1", "p2"):  # mirrored under the inputs' common folder
        assert (objs / folder / "A01_mask.png").exists()
        assert (objs / folder / "A01_mask_std.tif").exists()
        labels = tifffile.imread(objs / folder / "A01_labels.tif")
        assert labels.max() <= round(float(rows[folder]["count"]))
    assert not (objs / "A01_mask.png").exists()


def test_labels_follow_a_rerun_and_a_resumed_run_writes_missing_masks(
    tiny_model, image_folder, tmp_path
):
    out = tmp_path / "res.csv"
    base = ["count", image_folder, "--out", out, "--model", tiny_model]
    _count(base)
    with out.open() as handle:
        n_rows = len(list(csv.DictReader(handle)))
    # adding --save-labels to a finished run: the images are counted again for their
    # masks only (no duplicate rows), then labelled
    objs = tmp_path / "objs"
    result = _count([*base, "--save-labels", objs])
    assert "counted again for their missing masks" in result.output
    with out.open() as handle:
        assert len(list(csv.DictReader(handle))) == n_rows
    image = sorted(image_folder.iterdir())[0]
    labels = objs / f"{image.stem}_labels.tif"
    assert labels.exists() and (objs / f"{image.stem}_mask.png").exists()
    # a rerun that rewrites the masks (--overwrite) rewrites the labels too
    before = labels.stat().st_mtime_ns
    _count([*base, "--save-labels", objs, "--overwrite"])
    assert labels.stat().st_mtime_ns > before
    # a plain resume leaves them alone
    after = labels.stat().st_mtime_ns
    _count([*base, "--save-labels", objs])
    assert labels.stat().st_mtime_ns == after


def test_output_root_and_stem(tmp_path):
    from celltally import io

    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    assert io.output_root([tmp_path / "a"]) == tmp_path / "a"
    assert io.output_root([tmp_path / "a", tmp_path / "b"]) == tmp_path
    assert io.output_root([str(tmp_path / "a" / "x" / "img*.tif")]) == tmp_path / "a" / "x"
    assert io.output_stem(tmp_path / "a" / "x" / "s.1.TIF", tmp_path) == "a/x/s.1"
    assert io.output_stem(tmp_path / "b" / "s.tif", tmp_path / "a") == "s"


def test_labels_added_on_a_resumed_out_with_other_inputs(tiny_model, image_folder, tmp_path):
    import shutil

    first, second = tmp_path / "p1", tmp_path / "p2"
    first.mkdir()
    second.mkdir()
    images = sorted(image_folder.iterdir())
    shutil.copy(images[0], first / images[0].name)
    shutil.copy(images[1], second / images[1].name)
    out, objs = tmp_path / "r.csv", tmp_path / "L"
    _count(["count", first, "--out", out, "--model", tiny_model])
    result = _count(
        ["count", second, "--out", out, "--model", tiny_model, "--save-labels", objs,
         "--format", "cellprofiler"]
    )  # fmt: skip
    assert "1 earlier row(s)" in result.output
    assert (objs / f"{images[1].stem}_labels.tif").exists()
    assert not (objs / f"{images[0].stem}_labels.tif").exists()
    with (tmp_path / "r_Image.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    # the same with the earlier image in the same folder, named file by file
    both, out2, objs2 = tmp_path / "both", tmp_path / "r2.csv", tmp_path / "L2"
    both.mkdir()
    for image in images[:2]:
        shutil.copy(image, both / image.name)
    _count(["count", both / images[0].name, "--out", out2, "--model", tiny_model])
    result = _count(
        ["count", both / images[1].name, "--out", out2, "--model", tiny_model,
         "--save-labels", objs2]
    )  # fmt: skip
    assert "1 earlier row(s)" in result.output
    assert sorted(p.name for p in objs2.glob("*_labels.tif")) == [f"{images[1].stem}_labels.tif"]


def test_the_cellprofiler_table_keeps_a_file_name_that_is_not_utf8(tmp_path):
    name = "P_A01_s1_" + b"\xff".decode("utf-8", "surrogateescape") + ".tif"
    rows = [{"file": f"plate/{name}", "count": "3.00", "std": "0.5", "low": "2", "high": "4"}]
    path = write_cellprofiler_csv(tmp_path / "out_Image.csv", rows)
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["FileName"] == name  # the same bytes as the file system's name
    assert row["Count"] == "3.00"


def test_cellprofiler_path_names_are_absolute(tiny_model, image_folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from celltally.cli import app

    monkeypatch.chdir(image_folder.parent)  # a relative folder argument, as typed
    out = tmp_path / "res.csv"
    args = ["count", image_folder.name, "--out", out, "--model", tiny_model, "--no-progress"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--format", "cellprofiler"]])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    with (tmp_path / "res_Image.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert table and {r["PathName"] for r in table} == {str(image_folder.resolve())}


def test_adding_a_folder_moves_masks_and_labels_of_a_run_spelt_through_a_link(
    tiny_model, tmp_path, monkeypatch
):
    from conftest import blob_image
    from typer.testing import CliRunner

    from celltally.cli import app

    lab = tmp_path / "lab"
    for plate, seed in (("p1", 1), ("p2", 2), ("../ext/p3", 3)):  # p3: a link in lab
        (lab / plate).mkdir(parents=True)
        for i in range(2):
            tifffile.imwrite(lab / plate / f"A0{i + 1}.tif", blob_image(3 + i, seed=seed + 10 * i))
    (lab / "p3").symlink_to(tmp_path / "ext" / "p3", target_is_directory=True)
    (tmp_path / "link").symlink_to(lab, target_is_directory=True)
    monkeypatch.chdir(lab)
    common = ["-o", "r.csv", "--model", str(tiny_model), "--save-masks", "m", "--no-progress"]
    first = CliRunner().invoke(
        app, ["count", str(tmp_path / "link" / "p1"), *common, "--save-labels", "l"]
    )
    assert first.exit_code == 0, first.output
    # a folder added without --save-labels: the labels move with the masks all the same
    again = CliRunner().invoke(app, ["count", "p1", "p2", "p3", *common])
    assert again.exit_code == 0, again.output
    assert "moved the outputs of 2 image(s)" in again.output
    third = CliRunner().invoke(app, ["count", "p1", "p2", "p3", *common, "--save-labels", "l"])
    assert third.exit_code == 0, third.output
    assert "not among this run's images" not in third.output
    for folder, endings in (
        ("m", ("_mask.png", "_mask_std.tif")),
        ("l", ("_labels.tif", "_objects.csv", "_overlay.png")),
    ):
        assert not [p for p in (lab / folder).iterdir() if p.is_file()]  # none left behind
        for plate in ("p1", "p2", "p3"):  # p3's links kept in its names, not flattened
            got = sorted(p.name for p in (lab / folder / plate).iterdir())
            assert got == sorted(f"A0{i}{e}" for i in (1, 2) for e in endings), (folder, plate)


def test_a_run_stopped_within_an_images_files_leaves_it_to_be_written_again(
    scene, tmp_path, monkeypatch
):
    from celltally.objects import save_objects_for_rows

    tifffile.imwrite(tmp_path / "a01.tif", scene.image)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray((half_model_mask(scene.mask) * 255).astype(np.uint8)).save(
        masks / "a01_mask.png"
    )
    rows = [{"file": str(tmp_path / "a01.tif"), "count": "60.2"}]
    kw = {"masks_dir": masks, "out_dir": tmp_path / "objs", "root": tmp_path}
    save = Image.Image.save

    def killed(self, *args, **kwargs):  # the run dies writing the overlay
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_objects_for_rows(rows, **kw)
    monkeypatch.setattr(Image.Image, "save", save)
    # the labels were written first: the resumed run skipped the image, overlay never made
    assert save_objects_for_rows(rows, **kw) == 1
    written = sorted(p.name for p in (tmp_path / "objs").iterdir())
    assert written == ["a01_labels.tif", "a01_objects.csv", "a01_overlay.png"]  # no temporaries
    assert save_objects_for_rows(rows, **kw) == 0  # complete: skipped


def test_specks_of_a_near_empty_mask_are_not_cut_into_pixels_to_make_up_the_count():
    mask = np.zeros((96, 128), dtype=np.float32)  # the model's mask grid of a 520 x 696 frame
    for y, x in [(10, 10), (40, 70), (80, 20), (60, 100)]:
        mask[y, x] = 1.0  # four one-pixel specks (noise), a count of 74
    mask[20:22, 50:52] = 1.0  # and one 2 x 2 blob: room for 4 objects at most
    labels = label_objects(mask, 74.0, shape=(520, 696))
    table = object_table(labels)
    assert 5 <= len(table) <= 8  # was 74, most of them a pixel or two
    for y, x in [(10, 10), (40, 70), (80, 20), (60, 100)]:  # each speck is one object
        speck = labels[int(y * 520 / 96) - 6 : int(y * 520 / 96) + 12, int(x * 696 / 128) - 6 :]
        assert np.unique(speck[:, :18][speck[:, :18] > 0]).size == 1
    # a foreground with room for the count still gets exactly the count
    assert len(object_table(label_objects(mask, 3.0, shape=(520, 696)))) == 3
    # a visible foreground under half a mask pixel still gets its one object
    small = np.zeros((16, 16), dtype=np.float32)
    small[5, 5], small[5, 6] = 0.55, 0.6
    assert len(object_table(label_objects(small, 3.0, shape=(128, 128)))) == 1
