"""Tests for celltally.simulate: the SIMCEP-style BBBC005 simulator (no real data needed)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from celltally.simulate import (
    BLUR_LEVELS,
    SimulatedImage,
    SimulationParams,
    blur_sigma,
    empty_frame,
    focus_blur,
    image_scale,
    parse_count_range,
    simulate_plate,
    simulate_scene,
)

SMALL = (130, 174)  # a quarter of 696 x 520
NAME = re.compile(
    r"^SIMCEPImages_(?P<well>[A-Z]+\d+)_C(?P<count>\d+)_F(?P<blur>\d+)_s(?P<site>\d+)_w(?P<stain>\d+)"
)


def small(count: int, **kwargs) -> SimulatedImage:
    kwargs.setdefault("size", SMALL)
    return simulate_scene(count, **kwargs)


def test_blur_levels_are_bbbc005s() -> None:
    assert BLUR_LEVELS == (1, 4, 7, 10, 14, 17, 20, 23, 26, 29, 32, 35, 39, 42, 45, 48)
    assert blur_sigma(1) == 0.0
    assert blur_sigma(23) == 6.0  # measured on the real F23 images
    assert blur_sigma(48) == 12.0  # measured on the real F48 images
    sigmas = [blur_sigma(b) for b in BLUR_LEVELS]
    assert sigmas == sorted(sigmas)


def test_same_seed_same_bytes_and_different_seeds_differ() -> None:
    a = small(25, blur=23, stain=2, seed=7)
    b = small(25, blur=23, stain=2, seed=7)
    c = small(25, blur=23, stain=2, seed=8)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes()
    assert a.image.tobytes() != c.image.tobytes()
    assert a.labels.tobytes() != c.labels.tobytes()


def test_generator_seed_is_accepted_and_advanced() -> None:
    rng = np.random.default_rng(5)
    first = small(10, seed=rng)
    second = small(10, seed=rng)
    assert first.image.tobytes() != second.image.tobytes()
    again = small(10, seed=np.random.default_rng(5))
    assert again.image.tobytes() == first.image.tobytes()


@pytest.mark.parametrize("stain", [1, 2])
@pytest.mark.parametrize("count", [1, 17, 80])
def test_truth_is_consistent(count: int, stain: int) -> None:
    sim = small(count, stain=stain, seed=count)
    assert sim.count == count and sim.stain == stain and sim.blur == 1
    assert sim.image.dtype == np.uint8 and sim.image.shape == SMALL
    assert sim.mask.dtype == bool and sim.labels.dtype == np.int32
    assert sim.labels.shape == sim.mask.shape == SMALL
    assert sim.labels.max() == count
    assert np.unique(sim.labels[sim.labels > 0]).size == count
    assert np.array_equal(sim.mask, sim.labels > 0)


def test_full_size_default() -> None:
    sim = simulate_scene(40, seed=1)
    assert sim.image.shape == (520, 696)
    assert np.unique(sim.labels[sim.labels > 0]).size == 40
    # BBBC005-like levels: dark background (~1 grey level), bright nuclei.
    background = sim.image[~sim.mask]
    assert 0.3 < background.mean() < 3
    assert 100 < sim.image[sim.mask].mean() < 200
    areas = np.bincount(sim.labels.ravel())[1:]
    assert 600 < np.median(areas) < 950  # real nuclei: ~790 px


def test_blur_changes_image_not_truth() -> None:
    images = {}
    for blur in (1, 23, 48):
        sim = small(30, blur=blur, seed=11)
        assert sim.blur == blur
        images[blur] = sim
    base = images[1]
    for blur in (23, 48):
        assert np.array_equal(images[blur].labels, base.labels)
        assert np.array_equal(images[blur].mask, base.mask)
        assert images[blur].count == base.count
        assert not np.array_equal(images[blur].image, base.image)

    def sharpness(img: np.ndarray) -> float:
        return float(np.abs(np.diff(img.astype(float), axis=1)).mean())

    assert sharpness(images[1].image) > sharpness(images[23].image) > sharpness(images[48].image)


def test_focus_blur_is_the_scene_blur() -> None:
    sharp = small(30, stain=2, seed=12)
    for blur in (4, 23, 48):
        blurred = small(30, stain=2, seed=12, blur=blur)
        again = focus_blur(sharp.image, blur, scale=image_scale(SMALL))
        assert again.dtype == np.uint8
        assert np.array_equal(again, blurred.image)
    copy = focus_blur(sharp.image, 1)
    assert np.array_equal(copy, sharp.image) and copy is not sharp.image
    floats = focus_blur(sharp.image.astype(np.float32), 48)
    assert floats.dtype == np.float64
    # Zero padding, as MATLAB's imfilter: a flat image darkens towards its border.
    flat = focus_blur(np.full((100, 100), 200, dtype=np.uint8), 48)
    assert flat[50, 50] == 200 and flat[0, 0] < 80
    with pytest.raises(ValueError, match="blur must be one of"):
        focus_blur(sharp.image, 3)


def test_same_scene_in_both_stains() -> None:
    nuclei = simulate_scene(40, blur=1, stain=1, size=SMALL, seed=3)
    bodies = simulate_scene(40, blur=48, stain=2, size=SMALL, seed=3)
    assert np.array_equal(bodies.mask[nuclei.mask], np.ones(nuclei.mask.sum(), dtype=bool))
    assert bodies.mask.sum() > 2 * nuclei.mask.sum()
    agree = bodies.labels[nuclei.mask] == nuclei.labels[nuclei.mask]
    assert agree.mean() > 0.95  # a nucleus pixel belongs to its own cell's body
    # Each nucleus centre lies in the body of the same cell.
    for cell in range(1, 41):
        ys, xs = np.nonzero(nuclei.labels == cell)
        assert (bodies.labels[ys, xs] == cell).any()


def test_count_zero_is_empty() -> None:
    for stain in (1, 2):
        sim = small(0, stain=stain, blur=23, seed=0)
        assert sim.count == 0
        assert not sim.labels.any() and not sim.mask.any()
        assert sim.image.max() < 20


def test_empty_frame_is_background_and_noise_only() -> None:
    from celltally.transforms import noise_std

    a = empty_frame(size=SMALL, bit_depth=8, seed=3)
    assert a.shape == SMALL and a.dtype == np.uint8
    assert np.array_equal(a, empty_frame(size=SMALL, bit_depth=8, seed=3))
    assert not np.array_equal(a, empty_frame(size=SMALL, bit_depth=8, seed=4))
    frames = [empty_frame(size=SMALL, bit_depth=16, seed=s) for s in range(30)]
    assert all(f.dtype == np.uint16 for f in frames)
    for f in frames:
        # no objects: after removing a plane fitted to the frame (ramp or offset),
        # what is left is not much wider than the pixel noise (vignettes bend a little)
        yy, xx = np.mgrid[0 : f.shape[0], 0 : f.shape[1]]
        design = np.stack([np.ones(f.size), yy.ravel(), xx.ravel(), (yy**2 + xx**2).ravel()], 1)
        values = f.astype(float).ravel()
        residual = values - design @ np.linalg.lstsq(design, values, rcond=None)[0]
        assert np.abs(residual).max() < 7 * noise_std(f) + 2
        assert 1.5 < noise_std(f) < 150
    # the illumination can be forced without changing the other draws
    flat = empty_frame(size=SMALL, bit_depth=16, seed=5, illumination="flat")
    ramp = empty_frame(size=SMALL, bit_depth=16, seed=5, illumination="ramp")
    assert abs(float(flat.mean()) - float(ramp.mean())) < 3 * noise_std(flat)
    assert ramp.astype(float).std() >= flat.astype(float).std()
    with pytest.raises(ValueError, match="illumination must be one of"):
        empty_frame(size=SMALL, illumination="spot")
    # two of three frames have uneven illumination, often visible above the noise
    widths = [f.astype(float).std() / noise_std(f) for f in frames]
    assert sum(w > 1.15 for w in widths) >= 6 and min(widths) > 0.9


def test_sixteen_bit_output() -> None:
    eight = small(20, blur=23, seed=4)
    sixteen = small(20, blur=23, seed=4, bit_depth=16)
    assert sixteen.image.dtype == np.uint16
    assert sixteen.image.max() <= SimulationParams().max_value_16bit
    assert sixteen.image.max() > 255
    assert np.array_equal(sixteen.labels, eight.labels)
    full = small(20, seed=4, bit_depth=16, params=SimulationParams(max_value_16bit=65535))
    assert full.image.max() > 4095


def test_small_size_scales_objects() -> None:
    assert image_scale((520, 696)) == 1.0
    size = (192, 256)
    scale = image_scale(size)
    assert abs(scale - 0.368) < 0.01
    areas = []
    for seed in range(3):
        sim = simulate_scene(10, size=size, seed=seed, params=SimulationParams(max_overlap=0.0))
        areas.extend(np.bincount(sim.labels.ravel())[1:])
    # Nuclei of ~790 px at 696 x 520 shrink by scale**2 (about 107 px).
    assert 0.6 * 790 * scale**2 < np.median(areas) < 1.4 * 790 * scale**2


def test_params_change_the_scene() -> None:
    base = small(20, seed=2)
    bigger = small(20, seed=2, params=SimulationParams(nucleus_radius=24.0))
    assert bigger.mask.sum() > 1.5 * base.mask.sum()
    noisy = small(0, seed=2, params=SimulationParams(read_noise=0.05, background=0.02))
    assert noisy.image.mean() > small(0, seed=2).image.mean() + 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": -1}, "count must be >= 0"),
        ({"count": 5, "blur": 2}, r"blur must be one of 1, 4, 7, .*48"),
        ({"count": 5, "stain": 3}, "stain must be 1"),
        ({"count": 5, "size": (0, 10)}, "size must be"),
        ({"count": 5, "size": (10, -3)}, "size must be"),
        ({"count": 5, "bit_depth": 12}, "bit_depth must be 8 or 16"),
        ({"count": 5, "seed": "abc"}, "seed must be"),
    ],
)
def test_bad_scene_arguments(kwargs: dict, message: str) -> None:
    count = kwargs.pop("count")
    kwargs.setdefault("size", SMALL)
    with pytest.raises(ValueError, match=message):
        simulate_scene(count, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_probability": 1.5}, "cluster_probability"),
        ({"nucleus_radius": 0}, "nucleus_radius"),
        ({"read_noise": -0.1}, "read_noise"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"depth_blur": (5.0, 1.0)}, "depth_blur"),
    ],
)
def test_bad_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimulationParams(**kwargs)


def test_parse_count_range() -> None:
    assert parse_count_range("1-100") == (1, 100)
    assert parse_count_range("40") == (40, 40)
    assert parse_count_range(" 5 - 7 ") == (5, 7)
    for bad in ("", "a", "10-5", "-3", "1-2-3", "1.5"):
        with pytest.raises(ValueError, match="count range"):
            parse_count_range(bad)


def read_plate(folder: Path) -> list[dict]:
    with (folder / "counts.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_simulate_plate_files_and_counts(tmp_path: Path) -> None:
    out = simulate_plate(
        tmp_path / "plate",
        images=3,
        counts=(5, 30),
        blurs=(1, 48),
        stains=(1, 2),
        seed=1,
        size=(64, 96),
    )
    assert out == tmp_path / "plate"
    rows = read_plate(out)
    assert list(rows[0]) == ["image", "count", "blur", "stain"]
    assert len(rows) == 3 * 2 * 2
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == sorted(r["image"] for r in rows)
    for row in rows:
        m = NAME.match(row["image"])
        assert m is not None, row["image"]
        assert int(m["count"]) == int(row["count"])
        assert int(m["blur"]) == int(row["blur"]) and int(m["stain"]) == int(row["stain"])
        assert m["well"][0] == ("A" if row["blur"] == "1" else "P")  # BBBC005 rows
        assert 5 <= int(row["count"]) <= 30
        stem = row["image"][: -len(".TIF")]
        image = tifffile.imread(out / "images" / row["image"])
        assert image.dtype == np.uint8 and image.shape == (64, 96)
        labels = tifffile.imread(out / "labels" / f"{stem}.tif")
        assert np.unique(labels[labels > 0]).size == int(row["count"])
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, labels > 0)
    # One scene, one truth: every blur and stain of a well column shares the count.
    by_column: dict[str, set] = {}
    for row in rows:
        by_column.setdefault(NAME.match(row["image"])["well"][1:], set()).add(row["count"])
    assert all(len(v) == 1 for v in by_column.values()) and len(by_column) == 3


def test_simulate_plate_count_sequence_and_sixteen_bit(tmp_path: Path) -> None:
    out = simulate_plate(
        tmp_path, images=3, counts=[0, 7], blurs=(23,), stains=(2,), size=(40, 50), bit_depth=16
    )
    rows = read_plate(out)
    assert [int(r["count"]) for r in rows] == [0, 7, 0]
    assert all(NAME.match(r["image"])["well"].startswith("H") for r in rows)  # F23 = row H
    image = tifffile.imread(out / "images" / rows[1]["image"])
    assert image.dtype == np.uint16


def test_simulate_plate_workers_give_identical_bytes(tmp_path: Path) -> None:
    kwargs = dict(images=4, counts=(1, 20), blurs=(1, 23), stains=(1, 2), seed=9, size=(48, 64))
    one = simulate_plate(tmp_path / "one", workers=1, **kwargs)
    two = simulate_plate(tmp_path / "two", workers=2, **kwargs)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len(files) == 4 * 2 * 2 * 3 + 1
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    again = simulate_plate(tmp_path / "again", workers=1, **kwargs)
    assert (again / "counts.csv").read_bytes() == (one / "counts.csv").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": 0}, r"images \(--images\) must be"),
        ({"images": 1, "blurs": (1, 5)}, "blur must be one of"),
        ({"images": 1, "stains": (0,)}, "stain must be"),
        ({"images": 1, "counts": (10, 5)}, "counts range"),
        ({"images": 1, "counts": [-1]}, "must be >= 0"),
        ({"images": 1, "size": (0, 5)}, "size must be"),
        ({"images": 1, "bit_depth": 32}, "bit_depth must be 8 or 16"),
        ({"images": 1, "workers": 0}, "workers must be"),
    ],
)
def test_bad_plate_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate_plate(tmp_path, **kwargs)


def test_simulate_set_with_maps_gives_the_same_scenes_and_a_map_of_their_labels():
    from celltally.datasets import simulate_set, simulate_set_with_maps

    kw = {"size": (64, 96), "counts": (1, 30), "seed": 3, "workers": 2}
    plain = simulate_set(4, **kw)
    data, maps = simulate_set_with_maps(4, label_map=np.max, **kw)  # labels.max() == count
    assert torch.equal(data.images, plain.images) and data.meta == plain.meta
    assert maps.shape == (4, 1) and torch.equal(maps[:, 0], data.counts)


def test_a_plate_folder_holding_another_plate_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "plate"
    kw = dict(blurs=(1,), stains=(1,), size=(40, 56))
    simulate_plate(out, images=3, counts=(1, 20), seed=0, **kw)
    first = sorted(p.name for p in (out / "images").iterdir())
    simulate_plate(out, images=3, counts=(1, 20), seed=0, **kw)  # the same plate again: fine
    assert sorted(p.name for p in (out / "images").iterdir()) == first
    with pytest.raises(ValueError, match=r"already holds \d+ file\(s\) this plate would not"):
        simulate_plate(out, images=1, counts=(1, 20), seed=7, **kw)
    assert sorted(p.name for p in (out / "images").iterdir()) == first  # nothing written
    mine = tmp_path / "mine"  # a user's folder: images at its top, their own counts.csv
    mine.mkdir()
    (mine / "counts.csv").write_text("image,count\nmine.tif,42\n")
    with pytest.raises(ValueError, match=r"e\.g\. counts\.csv"):  # it was replaced silently
        simulate_plate(mine, images=1, counts=(1, 20), seed=0, **kw)
    assert (mine / "counts.csv").read_text() == "image,count\nmine.tif,42\n"


def test_a_size_larger_than_celltally_reads_is_refused_before_any_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from celltally.cli import app

    out = tmp_path / "big"
    args = ["simulate", "--out", str(out), "--images", "1", "--size", "100000x100000"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "larger than celltally reads" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_scene_numbers_that_are_not_whole_numbers_of_1_or_more_are_refused(tmp_path):
    from celltally.datasets import simulate_set

    for bad in (None, "3", 2.5, 0, True):
        with pytest.raises(ValueError, match="images \\(--images\\) must be a whole number"):
            simulate_plate(tmp_path / "p", images=bad)
    with pytest.raises(ValueError, match="scenes must be a whole number >= 1, got 0"):
        simulate_set(0, size=(32, 48))


def test_an_interrupted_plate_leaves_no_partial_folder(tmp_path: Path, monkeypatch) -> None:
    import celltally.simulate as simulate

    written = []
    real = simulate._write_scene

    def interrupted_after_one(job):
        if written:
            raise KeyboardInterrupt
        written.append(job)
        return real(job)

    monkeypatch.setattr(simulate, "_write_scene", interrupted_after_one)
    out = tmp_path / "plate"
    with pytest.raises(KeyboardInterrupt):
        simulate_plate(out, images=3, blurs=(1,), stains=(1,), size=(40, 56))
    assert written and not out.exists()
    assert list(tmp_path.iterdir()) == []  # nor a staging folder beside it
    monkeypatch.setattr(simulate, "_write_scene", real)
    simulate_plate(out, images=3, blurs=(1,), stains=(1,), size=(40, 56))
    assert len(list((out / "images").iterdir())) == 3 and (out / "counts.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["plate"]
    mode = out.stat().st_mode & 0o777
    probe = tmp_path / "probe"
    probe.mkdir()
    assert mode == probe.stat().st_mode & 0o777  # the umask's mode, as a plain mkdir


def test_two_runs_into_one_new_folder_and_a_killed_runs_staging(tmp_path: Path, monkeypatch):
    import celltally.simulate as simulate

    kw = dict(images=2, blurs=(1,), stains=(1,), size=(40, 56))
    out = tmp_path / "plate"
    killed = tmp_path / ".plate.partial-999999999-0000"  # a pid no process has
    (killed / "images").mkdir(parents=True)
    real = simulate._write_plate

    def meanwhile(seed):  # another run finishes the folder while this one writes
        def write(*args):
            real(*args)
            monkeypatch.setattr(simulate, "_write_plate", real)  # that run writes as usual
            simulate_plate(out, seed=seed, **kw)

        return write

    monkeypatch.setattr(simulate, "_write_plate", meanwhile(0))
    simulate_plate(out, seed=0, **kw)  # the same plate: fine (it failed to rename)
    assert len(list((out / "images").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["plate"]  # the killed run's removed
    other = tmp_path / "other"
    monkeypatch.setattr(simulate, "_write_plate", meanwhile(5))
    out = other
    with pytest.raises(ValueError, match="another run wrote another plate there"):
        simulate_plate(other, seed=0, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "plate"]


def test_sigterm_leaves_no_partial_plate(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "plate"
    args = ["simulate", "--out", str(out), "--images", "400", "--blur", "1", "--stain", "1"]
    code = "from celltally.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".plate.partial-*/images/*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): the plate in" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
