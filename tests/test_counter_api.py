"""The Python API as a pipeline embeds it: arguments checked on entry, objects that travel."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image

from celltally.counter import CellCounter
from celltally.io import InputError
from celltally.objects import label_objects, save_objects
from celltally.simulate import empty_frame, simulate_plate, simulate_scene
from celltally.training_data import build_and_fit
from celltally.wells import aggregate_wells


@pytest.fixture(scope="module")
def counter(tiny_model):
    return CellCounter.from_pretrained(tiny_model, device="cpu")


def test_a_counter_pickles_and_counts_the_same(counter):
    image = blob_image(9, seed=4)
    again = pickle.loads(pickle.dumps(counter))  # as Dask, joblib or multiprocessing send it
    first, second = counter.count(image), again.count(image)
    assert second.count == first.count and second.std == first.std
    assert second.ood == first.ood
    assert first == first and first != second  # results compare by identity (they hold arrays)


def test_bad_batch_sizes_and_levels_are_refused_on_entry(counter, tmp_path):
    prepared = [counter.prepare(blob_image(3, seed=s)) for s in range(3)]
    for size in (0, -1):
        with pytest.raises(InputError, match="batch_size"):
            next(counter.count_paths([tmp_path / "a.tif"], batch_size=size))
        with pytest.raises(InputError, match="batch_size"):
            counter.count_prepared(prepared, batch_size=size)
        with pytest.raises(InputError, match="batch_size"):
            counter.embed(prepared, batch_size=size)
    for level in (0, 1.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="level must be between 0 and 1"):
            counter.level_note(level)
        with pytest.raises(InputError, match="level must be between 0 and 1"):
            counter.count(prepared[0], level=level)
    assert len(counter.count_prepared(prepared, batch_size=np.int64(2))) == 3  # numpy ints
    bad = [prepared[0], np.full_like(prepared[1], np.nan)]
    with pytest.raises(InputError, match="prepared image 1: .* NaN"):
        counter.count_prepared(bad)
    raw = [prepared[0], blob_image(3, seed=5)]  # a raw image: other size, not normalized
    for method in (counter.count_prepared, counter.embed):
        with pytest.raises(InputError, match="prepared image 1 is .* not model .* input of"):
            method(raw)


def test_normalization_options_add_to_the_models_and_are_checked():
    partial = CellCounter.from_pretrained("bbbc005", norm={"low": 0.5, "high": 99.9})
    assert partial.norm["background"] == "quadratic"  # the model's own step is kept
    ramps = [empty_frame(seed=s, illumination="ramp", bit_depth=8) for s in range(2)]
    assert max(partial.count(frame).count for frame in ramps) < 1.0
    for bad, words in (
        ({"background": "Quadratic"}, "background"),
        ({"low": 5, "high": 1}, "percentiles"),
        ({"method": "zscore"}, "method"),
    ):
        with pytest.raises(InputError, match=words):
            CellCounter.from_pretrained("bbbc005", norm=bad)


def test_build_and_fit_refuses_negative_epochs(tmp_path):
    for option in ({"seg_epochs": -1}, {"count_epochs": -2}, {"simulated": -3}):
        with pytest.raises(InputError, match="0 or more"):
            build_and_fit(out=tmp_path / "m", **{"simulated": 2, **option}, progress=False)
    assert not (tmp_path / "m").exists()


def test_well_totals_take_rows_as_python_builds_them():
    rows = [
        {"file": f"P1_B03_s{site}_w1.tif", "count": 10.0 * site, "std": 1.0, "low": 8.0,
         "high": 10.0 * site + 2.0, "level": 0.95, "model": "m", "plate": "P1", "well": "B03",
         "site": site, "stain": 1}
        for site in (1, 2)
    ]  # fmt: skip
    (well,), skipped = aggregate_wells(rows, correlation=np.float32(0.1))
    assert skipped == 0 and well["count"] == 30.0 and well["sites"] == "1;2"


def test_plate_counts_must_be_whole_numbers(tmp_path):
    with pytest.raises(ValueError, match="whole number"):
        simulate_plate(tmp_path / "a", images=1, counts=[2.7])
    with pytest.raises(ValueError, match="sequence of counts"):
        simulate_plate(tmp_path / "b", images=1, counts="59")
    made = simulate_plate(tmp_path / "c", images=2, counts=(c for c in [3, 4]), size=(64, 80))
    assert sorted(p.name.split("_C")[1].split("_")[0] for p in made.glob("images/*")) == [
        "3", "3", "3", "3", "3", "3", "4", "4", "4", "4", "4", "4"
    ]  # fmt: skip
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.TIF"))


def test_object_output_checks_before_writing(tmp_path):
    mask = np.zeros((20, 20), dtype=np.float32)
    mask[5:10, 5:10] = 1.0
    with pytest.raises(ValueError, match="finite"):
        label_objects(mask, float("nan"), shape=(40, 40))
    with pytest.raises(ValueError, match="2-D"):
        save_objects(tmp_path, "A01", np.zeros((3, 40, 40)), mask, 2.0)
    assert list(Path(tmp_path).iterdir()) == []


def test_from_folder_takes_a_string_and_bad_options_fail_at_construction(tmp_path):
    from celltally.counter import WEIGHTS_DIR

    counter = CellCounter.from_folder(str(WEIGHTS_DIR / "bbbc005"))  # was a TypeError
    assert counter.name == "bbbc005"
    with pytest.raises(InputError, match="noise_range must be a number >= 0, got 'abc'"):
        CellCounter.from_pretrained(norm={"noise_range": "abc"})
    result = counter.count(blob_image(5), level=np.float32(0.9))
    assert type(result.level) is float and result.level == pytest.approx(0.9)


def test_arrays_are_reduced_to_2d_as_files_are(counter):
    image = blob_image(7, seed=2)
    plain = counter.count(image).count
    for shaped in (image[None], image[..., None], np.stack([image] * 3, axis=-1)):
        assert counter.count(shaped).count == pytest.approx(plain)  # was "expected a 2-D image"
    for stack in (np.stack([image, image // 2]), np.zeros((3, 20, 30))):
        with pytest.raises(InputError, match=r"got an array of shape .*: pass one plane"):
            counter.count(stack)


def test_paths_of_any_kind_and_non_paths_given_as_paths(counter, tmp_path):
    import os

    import tifffile

    class Where(os.PathLike):  # a path-like that is not a pathlib.Path
        def __init__(self, path):
            self.path = str(path)

        def __fspath__(self):
            return self.path

    image = blob_image(6, seed=3)
    tifffile.imwrite(tmp_path / "a.tif", image)
    result = counter.count(Where(tmp_path / "a.tif"))  # was "unsupported pixel type object"
    assert result.source == str(tmp_path / "a.tif")
    assert result.count == pytest.approx(counter.count(image).count)
    with pytest.raises(InputError, match="count_paths takes file paths, got a ndarray"):
        list(counter.count_paths([image]))  # was a TypeError from pathlib


def test_bad_counter_options_are_one_line_errors(tiny_model):
    for options, words in (
        ({"device": "gpu"}, "device 'gpu': use 'cpu'"),
        ({"channel": "a"}, "channel must be 0 or more"),
        ({"rescale": "x"}, "rescale must be a positive number, got 'x'"),
        ({"rescale": True}, "rescale must be a positive number"),
        ({"norm": {"lo": 1}}, "unknown normalization key.*'lo'"),
    ):
        with pytest.raises(InputError, match=words):
            CellCounter.from_pretrained(tiny_model, **options)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(InputError, match="sees no CUDA GPU"):
            CellCounter.from_pretrained(tiny_model, device="cuda")  # was an AssertionError


def test_results_print_briefly_and_celltally_exports_the_counter(counter):
    import celltally

    result = counter.count(blob_image(4, seed=1), level=np.float32(0.9))
    assert "mask=" not in repr(result) and "array(" not in repr(result)  # brief in a notebook
    assert str(result).endswith("cells (90%)")  # float32 0.9 read 89.99999762%
    assert celltally.CellCounter is CellCounter


def test_a_channel_picks_an_arrays_plane_and_a_trained_one_only_stain_planes(
    counter, tiny_model, tmp_path
):
    import json
    import shutil

    from PIL import Image

    image = blob_image(7, seed=2)
    plain = counter.count(image).count
    two = np.stack([np.zeros_like(image), image])  # (C, H, W) stain planes
    picked = CellCounter.from_pretrained(tiny_model, device="cpu", channel=1)
    assert picked.count(two).count == pytest.approx(plain)  # was refused, channel ignored
    trained = tmp_path / "trained_on_1"
    shutil.copytree(tiny_model, trained)
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "channel": 1}))
    model = CellCounter.from_pretrained(trained, device="cpu")
    assert model.count(two).count == pytest.approx(plain)
    assert model.count(image).count == pytest.approx(plain)  # single-channel: as it is
    # a colour file stays the mean of its colours: the 4th plane of RGBA is alpha (a model
    # trained on plane 3 of 4-plane TIFFs read a grey PNG's alpha: an empty frame)
    rgba = np.dstack([image, image, image, np.full_like(image, 255)])
    Image.fromarray(rgba).save(tmp_path / "grey.png")
    config["channel"] = 3
    (trained / "config.json").write_text(json.dumps(config))
    model = CellCounter.from_pretrained(trained, device="cpu")
    assert model.count(tmp_path / "grey.png").count == pytest.approx(plain)


def test_the_counter_keeps_its_own_ood_reference_and_colour_tables_are_read_only():
    from celltally.web.render import colormap

    shipped = CellCounter.from_pretrained("bbbc005")
    mine = {k: np.array(v, dtype=np.float64) for k, v in shipped.ood_reference.items()}
    counter = CellCounter(shipped.model, shipped.config, ood_reference=mine)
    image = simulate_scene(30, stain=1, seed=4).image
    before = counter.count(image).ood
    for values in mine.values():
        values *= 0  # the caller's arrays, edited after the counter was made
    assert counter.count(image).ood == before
    with pytest.raises(ValueError, match="read-only"):
        colormap("inferno")[:] = 0


def test_an_rgb_array_composite_of_stains_is_refused_with_the_python_way_out():
    from celltally.io import InputError, image_plane
    from celltally.simulate import simulate_scene

    nuclei = simulate_scene(40, blur=1, stain=1, seed=1).image
    bodies = simulate_scene(90, blur=1, stain=2, seed=2).image
    with pytest.raises(InputError, match=r"Pass one plane \(e.g. image\[..., 2\] for blue\)"):
        image_plane(np.dstack([np.zeros_like(nuclei), bodies, nuclei]))


def test_a_frame_that_may_hold_no_cells_has_an_interval_reaching_zero():
    counter = CellCounter.from_pretrained("nuclei")
    for frame in (np.zeros((520, 696), np.uint16), np.full((520, 696), 37, np.uint8)):
        result = counter.count(frame)
        assert "may hold no cells" in result.warning
        assert result.low == 0.0 and result.high > result.count  # was 0.82-2.64 around 1.73


def test_a_binary_image_counts_as_its_full_range_not_as_a_faint_frame(tmp_path: Path):
    from PIL import Image

    counter = CellCounter.from_pretrained()
    scene = simulate_scene(18, blur=1, stain=1, seed=4).image
    binary = scene > 100
    expected = counter.count(binary.astype(np.uint8) * 255)
    Image.fromarray(binary).save(tmp_path / "binary.png")  # a 1-bit PNG
    for given in (binary, tmp_path / "binary.png"):
        result = counter.count(given)
        # on as 1 of 255 was a frame "that may hold no cells", its interval forced to 0
        assert "may hold no cells" not in result.warning, given
        assert result.low > 0 and result.count == pytest.approx(expected.count, abs=1e-4)


def test_python_mistakes_get_python_words_not_a_traceback():
    import celltally

    counter = CellCounter.from_pretrained()
    image = np.zeros((64, 64), np.uint8)
    for call, words in [
        (lambda: CellCounter.from_pretrained(norm="none"), "norm must be a dict"),  # was 'e', 'n'
        (lambda: CellCounter.from_pretrained(tile=(320, 320, 320)), "tile must be a side"),
        (lambda: CellCounter.from_pretrained(tile="abc"), "tile must be a side"),
        (lambda: CellCounter.from_pretrained(margin="x"), "margin a whole number"),
        (
            lambda: CellCounter.from_pretrained(channel=-1),
            "channel must be 0 or more (0-based; --channel)",
        ),
        (lambda: counter.count(["a.tif", "b.tif"]), "use count_paths(paths)"),  # was '<U5'
        (lambda: counter.count([image, image]), "count takes one image"),
        (
            lambda: CellCounter.from_pretrained(norm={"method": "none"}).count(image + 200),
            "method 'none'",
        ),
    ]:
        with pytest.raises(InputError) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value)
    result = counter.count(image)
    row = result.to_dict()  # the numbers for a table, without the maps
    assert row["count"] == result.count and row["low"] == result.low and "mask" not in row
    assert {"CellCounter", "CountResult"} <= set(dir(celltally)) and "Any" not in dir(celltally)


def test_counter_options_a_counter_cannot_take_are_refused_in_one_line():
    image = np.zeros((64, 64), np.uint8)
    for options, words in [
        ({"chanel": 1}, "unknown option(s) 'chanel'; a counter takes channel"),  # TypeError
        ({"calibration": "bogus"}, "unknown calibration method 'bogus'"),  # ValueError
        ({"tile": (256.7, 256)}, "whole pixels"),  # truncated to 256
        ({"margin": 2.9}, "margin 2.9"),  # was 2
        ({"tile": True}, "whole pixels"),  # was a tile of 1
    ]:
        with pytest.raises(InputError, match=re.escape(words)):
            CellCounter.from_pretrained(**options)
    assert CellCounter.from_pretrained(tile=256.0).tile == (256, 256)
    counter = CellCounter.from_pretrained()
    assert counter.count((image,)).count == counter.count(image).count  # (1, H, W)
