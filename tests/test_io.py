"""Tests for celltally.io: image reading/writing, file listing, counts and masks."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from celltally.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    InputError,
    iter_images,
    list_images,
    read_counts_csv,
    read_image,
    read_mask,
    write_float_image,
    write_mask,
)


def _ramp(shape: tuple[int, int], dtype: type, top: int) -> np.ndarray:
    n = shape[0] * shape[1]
    return (np.arange(n, dtype=np.float64).reshape(shape) * top / (n - 1)).astype(dtype)


def _assert_one_line(err: pytest.ExceptionInfo[BaseException], name: str) -> str:
    text = str(err.value)
    assert name in text
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- round trips


def test_suffixes() -> None:
    assert IMAGE_SUFFIXES == (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@pytest.mark.parametrize("dtype,top", [(np.uint8, 255), (np.uint16, 65535)])
def test_tiff_roundtrip(tmp_path: Path, dtype: type, top: int) -> None:
    arr = _ramp((20, 30), dtype, top)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, arr)
    out = read_image(path)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, arr)


def test_tiff_float32_and_uppercase_suffix(tmp_path: Path) -> None:
    arr = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "IMG.TIFF"
    tifffile.imwrite(path, arr)
    out = read_image(str(path))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


def test_ome_tiff_singleton_axes_dropped(tmp_path: Path) -> None:
    arr = _ramp((16, 24), np.uint16, 4000)
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, arr[np.newaxis, np.newaxis], ome=True, metadata={"axes": "CZYX"})
    out = read_image(path)
    assert out.shape == (16, 24)
    np.testing.assert_array_equal(out, arr)


def test_png_8bit_roundtrip(tmp_path: Path) -> None:
    arr = _ramp((10, 12), np.uint8, 255)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_png_16bit_roundtrip(tmp_path: Path) -> None:
    arr = _ramp((10, 12), np.uint16, 60000)
    path = tmp_path / "img16.png"
    Image.fromarray(arr).save(path)
    out = read_image(path)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, arr)


def test_jpeg_approximate(tmp_path: Path) -> None:
    arr = np.full((32, 32), 100, dtype=np.uint8)
    arr[8:24, 8:24] = 200
    path = tmp_path / "img.JPG"
    Image.fromarray(arr).save(path, quality=95)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    assert np.abs(out.astype(int) - arr.astype(int)).mean() < 3


def test_rgb_png_mean_and_channel(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 30, 60, 90
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    out = read_image(path)
    # the file's dtype is kept: normalization's empty-frame guard depends on it
    assert out.dtype == np.uint8 and out.shape == (6, 7)
    np.testing.assert_array_equal(out, 60)
    green = read_image(path, channel=1)
    assert green.dtype == np.uint8
    np.testing.assert_array_equal(green, 60)


def test_gray_stored_as_rgba_takes_one_channel(tmp_path: Path) -> None:
    gray = _ramp((5, 8), np.uint8, 255)
    rgba = np.stack([gray, gray, gray, np.full_like(gray, 7)], axis=-1)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, gray)


def test_channels_first_tiff_channel_selection(tmp_path: Path) -> None:
    stack = np.stack([np.full((8, 9), v, dtype=np.uint16) for v in (10, 20)])
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, stack)
    np.testing.assert_array_equal(read_image(path, channel=1), 20)
    with pytest.raises(ImageReadError) as err:
        read_image(path, channel=2)
    assert "out of range" in _assert_one_line(err, "two.tif")


@pytest.mark.parametrize("planes", [2, 3, 4])
def test_channels_first_tiff_is_never_averaged(tmp_path: Path, planes: int) -> None:
    # separate stains: a mean would be a mixture no model was trained on
    stack = np.stack([np.full((8, 9), 10 * (v + 1), dtype=np.uint16) for v in range(planes)])
    path = tmp_path / "stains.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    text = _assert_one_line(err, "stains.tif")
    assert f"has {planes} different channels" in text
    assert f"--channel 0-{planes - 1}" in text
    # the last plane is a stain like the others, not alpha
    np.testing.assert_array_equal(read_image(path, channel=planes - 1), 10 * planes)
    # identical planes are one image stored several times
    tifffile.imwrite(path, np.stack([stack[0]] * planes), photometric="minisblack")
    np.testing.assert_array_equal(read_image(path), 10)


def test_channel_out_of_range_on_gray(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    assert read_image(path, channel=0).shape == (4, 4)
    with pytest.raises(ImageReadError) as err:
        read_image(path, channel=1)
    _assert_one_line(err, "g.png")


def test_bool_tiff_becomes_uint8(tmp_path: Path) -> None:
    arr = np.eye(5, dtype=bool)
    path = tmp_path / "b.tif"
    tifffile.imwrite(path, arr)
    out = read_image(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, 255 * np.eye(5, dtype=np.uint8))  # on: full range
    assert np.array_equal(read_mask(path) > 0, arr)  # as a mask: the same pixels


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("shape", [(20, 64, 64), (2, 3, 16, 16)])
def test_stack_error(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros(shape, dtype=np.uint8), photometric="minisblack")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    text = _assert_one_line(err, "stack.tif")
    assert f"got a stack of shape {shape}" in text
    assert "save one plane" in text and "--channel" not in text  # --channel cannot help


def test_five_planes_need_a_channel(tmp_path: Path) -> None:
    # (5, Y, X): five stains (Cell Painting) or a 5-plane z-stack; only the user knows
    stack = np.stack([np.full((32, 40), 10 * (v + 1), dtype=np.uint16) for v in range(5)])
    path = tmp_path / "five.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    text = _assert_one_line(err, "five.tif")
    assert "stack of 5 planes" in text and "--channel 0-4" in text and "save one plane" in text
    np.testing.assert_array_equal(read_image(path, channel=3), 40)


def test_two_channels_last_need_a_channel(tmp_path: Path) -> None:
    image = np.stack([np.full((32, 40), 7, np.uint8), np.full((32, 40), 9, np.uint8)], -1)
    path = tmp_path / "yx2.tif"
    tifffile.imwrite(path, image)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "--channel 0-1" in _assert_one_line(err, "yx2.tif")
    np.testing.assert_array_equal(read_image(path, channel=1), 9)


def test_ome_axes_pick_the_channel_and_refuse_z_stacks(tmp_path: Path) -> None:
    czyx = np.stack([np.full((1, 32, 40), 10 * (c + 1), np.uint16) for c in range(3)])
    path = tmp_path / "czyx.ome.tif"
    tifffile.imwrite(path, czyx.transpose(1, 0, 2, 3), ome=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_image(path, channel=2), 30)
    zstack = tmp_path / "z.ome.tif"
    tifffile.imwrite(
        zstack, np.zeros((4, 2, 32, 40), np.uint8), ome=True, metadata={"axes": "ZCYX"}
    )
    with pytest.raises(ImageReadError) as err:
        read_image(zstack, channel=0)
    assert "axes ZCYX, Z=4" in _assert_one_line(err, "z.ome.tif")


def test_an_ome_tiff_of_several_images_is_refused_and_a_pyramid_is_not(tmp_path: Path) -> None:
    path = tmp_path / "positions.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:  # two positions: two OME series
        tif.write(np.full((32, 40), 10, np.uint8), metadata={"axes": "YX"})
        tif.write(np.full((32, 40), 200, np.uint8), metadata={"axes": "YX"})
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "holds 2 images (OME series" in _assert_one_line(err, "positions.ome.tif")
    pyramid = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(pyramid, ome=True) as tif:  # one image, a reduced level
        tif.write(np.full((64, 80), 7, np.uint8), subifds=1, metadata={"axes": "YX"})
        tif.write(np.full((32, 40), 7, np.uint8), subfiletype=1)
    np.testing.assert_array_equal(read_image(pyramid), 7)
    assert read_image(pyramid).shape == (64, 80)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.tif"
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert str(err.value) == f"{path}: file not found"
    assert err.value.path == path
    assert err.value.problem == "file not found"
    assert isinstance(err.value, ValueError) and isinstance(err.value, InputError)


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "dir.tif"
    folder.mkdir()
    with pytest.raises(ImageReadError) as err:
        read_image(folder)
    _assert_one_line(err, "dir.tif")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "img.bmp"
    path.write_bytes(b"BM....")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "unsupported file type '.bmp'; use TIFF, PNG or JPEG" in _assert_one_line(err, "img.bmp")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "empty" in _assert_one_line(err, "empty.png")


def test_corrupt_tiff(tmp_path: Path) -> None:
    path = tmp_path / "junk.tif"
    path.write_bytes(b"this is not a tiff file\n" * 20)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "cannot be read as TIFF: " in _assert_one_line(err, "junk.tif")
    assert err.value.__suppress_context__


def test_tiff_with_a_bad_page_offset_names_the_problem(tmp_path, capfd) -> None:
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\x00garbage" * 10)  # a TIFF header pointing nowhere
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    text = _assert_one_line(err, "bad.tif")
    assert "corrupt or truncated" in text and "invalid offset to first page" in text
    assert capfd.readouterr().err == ""  # tifffile's own log line is not printed


def test_tifffile_logging_outside_our_reads_is_untouched(tmp_path, caplog) -> None:
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(ImageReadError):
        read_image(path)
    with caplog.at_level("WARNING", logger="tifffile"):
        logging.getLogger("tifffile").warning("a user's own tifffile warning")
    assert "a user's own tifffile warning" in caplog.text


def test_truncated_tiff(tmp_path: Path) -> None:
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((64, 64), np.uint16))
    data = good.read_bytes()
    path = tmp_path / "trunc.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "cannot be read as TIFF" in _assert_one_line(err, "trunc.tif")


def test_truncated_png(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(good)
    data = good.read_bytes()
    path = tmp_path / "trunc.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "cannot be read as PNG" in _assert_one_line(err, "trunc.png")


def test_zero_size_side(tmp_path: Path) -> None:
    path = tmp_path / "zero.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns about non-conformant zero-size data
        tifffile.imwrite(path, np.zeros((0, 5), np.uint8))
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "zero-size" in _assert_one_line(err, "zero.tif")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf(tmp_path: Path, bad: float) -> None:
    arr = np.ones((4, 4), np.float32)
    arr[1, 2] = bad
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, arr)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "contains NaN or infinite values" in _assert_one_line(err, "nan.tif")


# ---------------------------------------------------------------------------- list_images


def _touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


def test_list_folder_sorted_hidden_and_non_images_skipped(tmp_path: Path) -> None:
    _touch_images(tmp_path, ["b.tif", "a.PNG", ".hidden.tif", "notes.txt", "c.jpeg"])
    _touch_images(tmp_path / "sub", ["d.tif"])
    got = list_images([tmp_path])
    assert [p.name for p in got] == ["a.PNG", "b.tif", "c.jpeg"]
    got_rec = list_images([tmp_path], recursive=True)
    assert [p.name for p in got_rec] == ["a.PNG", "b.tif", "c.jpeg", "d.tif"]


def test_list_order_and_duplicates(tmp_path: Path) -> None:
    _touch_images(tmp_path, ["a.tif", "b.tif", "c.png"])
    got = list_images([tmp_path / "c.png", str(tmp_path), tmp_path / "." / "a.tif"])
    assert [p.name for p in got] == ["c.png", "a.tif", "b.tif"]


def test_list_glob(tmp_path: Path) -> None:
    _touch_images(tmp_path, ["x1.tif", "x2.tif", "y1.tif", "x3.txt"])
    got = list_images([str(tmp_path / "x?.*")])
    assert [p.name for p in got] == ["x1.tif", "x2.tif"]
    got = list_images([str(tmp_path / "[y]*")])
    assert [p.name for p in got] == ["y1.tif"]


def test_list_glob_no_match(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        list_images([str(tmp_path / "*.tif")])
    _assert_one_line(err, "*.tif")


@pytest.mark.parametrize("lister", [list_images, lambda p: list(iter_images(p))])
def test_pattern_in_the_wrong_case_names_a_match(tmp_path: Path, lister) -> None:
    # BBBC's files end in .TIF; a user's '*.tif' matches nothing on Linux
    _touch_images(tmp_path / "Plate", ["w_A01.TIF"])
    with pytest.raises(InputError) as err:
        lister([str(tmp_path / "plate" / "*.tif")])
    text = _assert_one_line(err, "*.tif")
    assert "case-sensitive" in text and "w_A01.TIF" in text
    with pytest.raises(InputError) as err:
        lister([str(tmp_path / "Plate" / "[v]*.TIF")])  # no match in any case: no hint
    assert "case-sensitive" not in _assert_one_line(err, "[v]*.TIF")
    # simulate's layout: sim/images/*.TIF, so 'sim/*.TIF' matches nothing
    _touch_images(tmp_path / "sim" / "images", ["s1.TIF"])
    with pytest.raises(InputError) as err:
        lister([str(tmp_path / "sim" / "*.TIF")])
    text = _assert_one_line(err, "sim/*.TIF")
    assert f"its folder's images/ holds images: count {tmp_path / 'sim' / 'images'}" in text
    (tmp_path / "sim" / "images").rename(tmp_path / "sim" / "Images")  # named as on disk
    with pytest.raises(InputError) as err:
        lister([str(tmp_path / "sim" / "*.tif")])
    assert f"holds images: count {tmp_path / 'sim' / 'Images'}" in _assert_one_line(err, "sim")


def test_list_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "emptyfolder"
    _touch_images(folder, ["readme.txt", ".hidden.png"])
    with pytest.raises(InputError) as err:
        list_images([folder])
    assert "folder contains no TIFF/PNG/JPEG images" in _assert_one_line(err, "emptyfolder")


@pytest.mark.parametrize("lister", [list_images, lambda p: list(iter_images(p))])
def test_folder_whose_images_are_in_a_sub_folder_names_it(tmp_path: Path, lister) -> None:
    # the layout of a data set: plate/counts.csv + plate/images/*.tif
    _touch_images(tmp_path / "plate", ["counts.csv"])
    _touch_images(tmp_path / "plate" / "images", ["a.tif"])
    with pytest.raises(InputError) as err:
        lister([tmp_path / "plate"])
    text = _assert_one_line(err, "plate")
    assert "sub-folder 'images' has" in text and "--recursive" in text
    assert [p.name for p in list_images([tmp_path / "plate"], recursive=True)] == ["a.tif"]
    # a training folder's masks/ and labels/ beside images/ are annotations, not images
    _touch_images(tmp_path / "plate" / "masks", ["a.png"])
    _touch_images(tmp_path / "plate" / "labels", ["a.tif"])
    found = lister([tmp_path / "plate" / "images"])
    assert [p.name for p in found] == ["a.tif"]
    deep = [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path], recursive=True)]
    assert deep == ["plate/images/a.tif"]
    # without an images/ sibling a folder called masks is just a folder of images
    _touch_images(tmp_path / "other" / "masks", ["m.tif"])
    assert "m.tif" in {p.name for p in list_images([tmp_path / "other"], recursive=True)}


def test_a_broken_link_is_listed_so_that_reading_it_reports_it(tmp_path: Path) -> None:
    _touch_images(tmp_path / "plate", ["a.tif"])
    (tmp_path / "plate" / "gone.tif").symlink_to(tmp_path / "nowhere.tif")
    for found in (list_images([tmp_path / "plate"]), list(iter_images([tmp_path / "plate"]))):
        assert sorted(p.name for p in found) == ["a.tif", "gone.tif"]
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "plate" / "gone.tif")


def test_list_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        list_images([tmp_path / "missing.tif"])
    assert "no such file or folder" in _assert_one_line(err, "missing.tif")


def test_list_unsupported_file(tmp_path: Path) -> None:
    _touch_images(tmp_path, ["pic.bmp"])
    with pytest.raises(InputError) as err:
        list_images([tmp_path / "pic.bmp"])
    assert "'.bmp'" in _assert_one_line(err, "pic.bmp")


# ------------------------------------------------------------------------------- writers


def test_write_mask_png_and_tiff(tmp_path: Path) -> None:
    prob = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)
    before = prob.copy()
    png = write_mask(tmp_path / "out" / "deep" / "m.png", prob)
    assert png.exists()
    np.testing.assert_array_equal(prob, before)
    expected = np.array([[0, 128], [64, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(np.array(Image.open(png)), expected)
    tif = write_mask(tmp_path / "m.tif", prob > 0.3)
    out = tifffile.imread(tif)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 255], [0, 255]])


def test_write_mask_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", np.array([[0.0, 1.5]]))
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.jpg", np.zeros((2, 2)))


def test_write_float_image(tmp_path: Path) -> None:
    arr = np.linspace(0, 3, 20).reshape(4, 5)
    path = write_float_image(tmp_path / "unc" / "u.tif", arr)
    out = tifffile.imread(path)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, arr.astype(np.float32))
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression.name in ("ADOBE_DEFLATE", "DEFLATE")
    assert arr.dtype == np.float64


# ------------------------------------------------------------------------------ counts csv


def test_read_counts_csv(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    path.write_text("Filename,Count,notes\na.tif,12,x\n\nb.png, 3.5 ,\n", encoding="utf-8")
    assert read_counts_csv(path) == {"a.tif": 12.0, "b.png": 3.5}
    path2 = tmp_path / "counts2.csv"
    path2.write_text("image\tcount\nc.tif\t0\n", encoding="utf-8")
    assert read_counts_csv(path2) == {"c.tif": 0.0}


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("image,total\na.tif,1\n", "'count'"),
        ("name,count\na.tif,1\n", "'image'"),
        ("image,count\na.tif,1\nb.tif,abc\n", "line 3"),
        ("image,count\na.tif,-2\n", "line 2"),
        ("image,count\na.tif,nan\n", "line 2"),
        ("image,count\na.tif,1\nb.tif,2\na.tif,3\n", "duplicate"),
        ("", "empty"),
    ],
)
def test_read_counts_csv_errors(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "gt.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_counts_csv(path)
    assert fragment in _assert_one_line(err, "gt.csv")


def test_read_counts_csv_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        read_counts_csv(tmp_path / "none.csv")
    assert "file not found" in _assert_one_line(err, "none.csv")


# ------------------------------------------------------------------------------- masks


def test_read_mask_binary_and_labels(tmp_path: Path) -> None:
    binary = np.zeros((6, 8), np.uint8)
    binary[2:4, 3:6] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(binary).save(path)
    out = read_mask(path, shape=(6, 8))
    assert out.shape == (6, 8) and out.dtype.kind == "i"
    np.testing.assert_array_equal(out, binary // 255)

    labels = np.zeros((6, 8), np.uint16)
    labels[0, 0], labels[5, 7] = 1, 300
    lpath = tmp_path / "labels.tif"
    tifffile.imwrite(lpath, labels)
    np.testing.assert_array_equal(read_mask(lpath), labels)


def test_read_mask_colour_coded_instances(tmp_path: Path) -> None:
    """A colour label PNG (as BBBC039 and annotation tools write): one object per
    4-connected region of one colour; a colour reused far away is another object."""
    colour = np.zeros((10, 12, 3), np.uint8)
    colour[1:3, 1:3] = (255, 0, 0)
    colour[1:3, 3:5] = (0, 255, 0)  # touches the red one: still its own object
    colour[7:9, 8:11] = (255, 0, 0)  # red again, elsewhere: a third object
    path = tmp_path / "labels.png"
    Image.fromarray(colour).save(path)
    out = read_mask(path, shape=(10, 12))
    assert out.max() == 3 and len(np.unique(out)) == 4
    assert len({out[1, 1], out[1, 3], out[7, 8]}) == 3 and out[0, 0] == 0
    with pytest.raises(InputError, match="mask is 12x10 but its image is 8x6"):
        read_mask(path, shape=(6, 8))
    # 16-bit colour is not a colour code (its channels would overlap in one): refused
    wide = tmp_path / "wide.tif"
    tifffile.imwrite(wide, colour.astype(np.uint16) * 257)
    with pytest.raises(ImageReadError, match="colour channels differ"):
        read_mask(wide)


def test_read_mask_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(path)
    with pytest.raises(InputError) as err:
        read_mask(path, shape=(520, 696))
    assert str(err.value) == f"{path}: mask is 64x48 but its image is 696x520"


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((20, 20), np.complex64), "unsupported pixel type complex64"),
        (np.zeros((20, 20), "datetime64[s]"), "unsupported pixel type datetime64"),
        (np.full((20, 20), "a"), "unsupported pixel type <U1"),
        (np.zeros((20, 20), object), "unsupported pixel type object"),
        (np.ma.masked_array(np.zeros((20, 20)), mask=True), "masked array"),
        (np.full((20, 20), 1e300), "beyond the float32 range"),
        (np.full((20, 20), np.nan), "NaN or infinite"),
    ],
)
def test_check_pixels_refuses_what_cannot_be_counted(array, message):
    from celltally.io import InputError, check_pixels

    with pytest.raises(InputError, match=message):
        check_pixels(array)


def test_check_pixels_passes_numbers_and_makes_booleans_uint8():
    from celltally.io import check_pixels

    flags = np.eye(4, dtype=bool)
    out = check_pixels(flags)
    assert out.dtype == np.uint8 and out.sum() == 4 * 255 and flags.dtype == bool
    ints = np.arange(6, dtype=np.int16).reshape(2, 3)
    assert check_pixels(ints) is not None and check_pixels(ints).dtype == np.int16


def test_a_float64_tiff_beyond_float32_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.full((16, 16), 1e300))
    with pytest.raises(ImageReadError, match=r"huge.tif: values beyond the float32 range"):
        read_image(path)


def test_an_image_too_large_to_count_is_refused_from_its_header(tmp_path):
    from conftest import write_zero_tiff

    from celltally.io import MAX_IMAGE_PIXELS, header_pixels

    bomb = tmp_path / "bomb.tif"
    write_zero_tiff(bomb, 20000, rows=10)  # announces 400 million pixels in a 1 KB file
    assert bomb.stat().st_size < 5000 and header_pixels(bomb) == 20000 * 20000 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageReadError) as err:
        read_image(bomb)
    message = _assert_one_line(err, "bomb.tif")
    assert (
        "400 million pixel values (an array of 20000 x 20000), more than the 268 million" in message
    )
    fine = tmp_path / "fine.tif"
    write_zero_tiff(fine, 300)
    assert header_pixels(fine) == 90000 and read_image(fine).shape == (300, 300)
    assert header_pixels(tmp_path / "missing.tif") is None


def test_a_grey_tiff_with_three_or_four_planes_last_is_stains_not_colour(tmp_path):
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 4000, (40, 50, 4)).astype(np.uint16)
    grey = tmp_path / "yxc4.tif"
    tifffile.imwrite(grey, planes, photometric="minisblack")
    with pytest.raises(ImageReadError) as err:
        read_image(grey)
    assert "4 different channels" in _assert_one_line(err, "yxc4.tif")
    assert np.array_equal(read_image(grey, channel=3), planes[..., 3])
    # one stain under a colour table: colour (a composite of stains is refused, below)
    g = rng.integers(0, 256, (40, 50))
    tinted = np.stack([g, g // 2, g // 3, g // 4], axis=-1).astype(np.uint8)
    cmyk = tmp_path / "cmyk.tif"  # a colour TIFF of another kind is still colour
    tifffile.imwrite(cmyk, tinted, photometric="separated")
    assert read_image(cmyk).shape == (40, 50)
    samples = tmp_path / "yxs3.tif"  # one grey page of 3 samples per pixel, not RGB
    tifffile.imwrite(samples, planes[..., :3], photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageReadError, match="3 different channels"):
        read_image(samples)
    rgb = tmp_path / "rgb.tif"  # a real RGB TIFF is still a colour image: its mean
    tifffile.imwrite(rgb, tinted[..., :3], photometric="rgb")
    expected = np.rint(tinted[..., :3].astype(np.float32).mean(-1))
    assert np.array_equal(read_image(rgb), expected.astype(np.uint8))


# --------------------------------------------------------------------------- audit, 2026-11-27
def test_a_plain_tiff_of_two_images_of_different_sizes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "two.tif"
    image = _ramp((60, 80), np.uint8, 255)
    with tifffile.TiffWriter(path) as tif:  # not OME: two shaped series
        tif.write(image[:30, :30])
        tif.write(image)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "holds 2 images (pages of different sizes" in _assert_one_line(err, "two.tif")


def test_a_planar_rgb_tiff_reads_as_its_contiguous_twin(tmp_path: Path) -> None:
    grey = _ramp((40, 50), np.uint8, 255)
    planes = np.stack([grey // 2, np.zeros_like(grey), grey])
    tifffile.imwrite(tmp_path / "planar.tif", planes, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "contig.tif", np.moveaxis(planes, 0, -1), photometric="rgb")
    planar, contiguous = read_image(tmp_path / "planar.tif"), read_image(tmp_path / "contig.tif")
    assert planar.shape == (40, 50)
    assert np.array_equal(planar, contiguous)


@pytest.mark.parametrize("lister", [iter_images, list_images])
def test_an_empty_path_is_refused_not_taken_for_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lister
) -> None:
    tifffile.imwrite(tmp_path / "a.tif", _ramp((20, 20), np.uint8, 255))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="an empty path was given"):
        list(lister([""]))


def test_a_file_reached_through_a_linked_folder_is_one_file(tmp_path: Path) -> None:
    (tmp_path / "plate").mkdir()
    tifffile.imwrite(tmp_path / "plate" / "a.tif", _ramp((20, 20), np.uint8, 255))
    (tmp_path / "link").symlink_to(tmp_path / "plate", target_is_directory=True)
    (tmp_path / "plate" / "b.tif").symlink_to(tmp_path / "plate" / "a.tif")  # another name
    args = [tmp_path / "plate", tmp_path / "link"]
    listed = [p.name for p in iter_images(args)]
    assert listed == ["a.tif", "b.tif"]  # the folder link adds nothing; a file link is a file
    assert [p.name for p in list_images(args)] == listed
    pattern = [str(tmp_path / "*")]  # one argument that matches the folder and its link
    assert [p.name for p in iter_images(pattern)] == listed
    assert [p.name for p in list_images(pattern)] == listed


def test_a_read_error_of_the_system_says_so_and_names_no_other_path(tmp_path: Path) -> None:
    from celltally.io import _decoder_reason

    where = Path("imgs/u.tif")
    denied = PermissionError(13, "Permission denied", str(where.absolute()))
    assert _decoder_reason(denied, where) == "cannot open the file: permission denied"
    # a decoder's own message loses the path in whichever form it printed it
    odd = ValueError(f"bad strip in {where.absolute()} at 12")
    assert _decoder_reason(odd, where) == "bad strip in u.tif at 12"


def test_pngs_up_to_celltallys_own_limit_pass_pillows_bomb_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(_ramp((60, 80), np.uint8, 255)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands for Pillow's 89 million
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert read_image(path).shape == (60, 80)
    assert Image.MAX_IMAGE_PIXELS == 1000  # left as it was
    # the header read that size limits (the web server's) rely on sees it too, not None
    from celltally.io import header_pixels

    assert header_pixels(path) == 60 * 80


def test_counts_csv_spellings_of_one_image_are_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    path.write_text("image,count\na.tif,3\n./a.tif,4\n")
    with pytest.raises(InputError, match=r"line 3: duplicate image './a.tif' \(first on line 2\)"):
        read_counts_csv(path)
    path.write_text("image,count\n./sub/a.tif,3\n")
    assert read_counts_csv(path) == {"sub/a.tif": 3.0}


def test_tiff_series_a_preview_is_skipped_and_pages_of_one_shape_are_a_stack(
    tmp_path: Path,
) -> None:
    image = _ramp((64, 80), np.uint16, 4000)
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as tif:  # an unflagged RGB preview
        tif.write(image)
        tif.write(np.zeros((16, 20, 3), np.uint8), photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "thumb.tif"), image)
    for k in range(2):  # a time lapse written page by page
        tifffile.imwrite(tmp_path / "lapse.tif", image // (k + 1), append=True)
    with pytest.raises(ImageReadError, match="2 different channels"):
        read_image(tmp_path / "lapse.tif")
    assert np.array_equal(read_image(tmp_path / "lapse.tif", channel=1), image // 2)


def test_a_path_through_a_linked_folder_and_up_is_the_file_it_reaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "o" / "sub").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "w" / "a.tif", _ramp((20, 20), np.uint8, 255))
    tifffile.imwrite(tmp_path / "o" / "a.tif", _ramp((20, 20), np.uint8, 99))
    (tmp_path / "w" / "link").symlink_to(tmp_path / "o" / "sub", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "w")
    # link/../a.tif is o/a.tif (the link is followed first), not w/a.tif
    assert [str(p) for p in list_images(["a.tif", "link/../a.tif"])] == ["a.tif", "link/../a.tif"]
    assert len(list(iter_images(["a.tif", "link/../a.tif"]))) == 2


@pytest.mark.parametrize("planes", [3, 4])
def test_tifffiles_default_planar_stains_are_stains_not_colours(tmp_path: Path, planes: int):
    # tifffile.imwrite saves a (3|4, Y, X) array as planar RGB(A) unless told otherwise:
    # the mean of 3 stains counted a mixture, and a 4th was dropped as alpha
    stack = np.stack([np.full((8, 9), 100 * (v + 1), dtype=np.uint16) for v in range(planes)])
    path = tmp_path / "stains.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(path, stack)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert f"has {planes} different channels" in _assert_one_line(err, "stains.tif")
    np.testing.assert_array_equal(read_image(path, channel=planes - 1), 100 * planes)
    # an 8-bit planar RGB file is still a colour image: its colours' mean
    rgb = tmp_path / "rgb.tif"
    colours = np.stack([np.full((8, 9), v, np.uint8) for v in (30, 60, 90)])
    tifffile.imwrite(rgb, colours, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(rgb), 60)


def test_sixteen_bit_png_of_any_colour_type_keeps_its_16_bits(tmp_path: Path) -> None:
    import imagecodecs

    dim = _ramp((12, 10), np.uint16, 4095)  # 12-bit camera data: Pillow kept 0-15
    for name, array in (
        ("la.png", np.dstack([dim, np.full_like(dim, 65535)])),
        ("rgb.png", np.dstack([dim] * 3)),
        ("rgba.png", np.dstack([dim] * 3 + [np.full_like(dim, 65535)])),
    ):
        path = tmp_path / name
        path.write_bytes(imagecodecs.png_encode(array))
        image = read_image(path)
        assert image.dtype == np.uint16, name
        np.testing.assert_array_equal(image, dim)


def test_a_tiff_under_a_png_name_is_read_as_a_tiff(tmp_path: Path) -> None:
    path = tmp_path / "stains.png"
    tifffile.imwrite(path, np.stack([np.full((8, 9), v, np.uint16) for v in (10, 20)]))
    np.testing.assert_array_equal(read_image(path, channel=1), 20)  # was plane 0 alone
    with pytest.raises(ImageReadError, match="has 2 different channels"):
        read_image(path)


def test_the_size_limit_names_the_arrays_shape(tmp_path: Path, monkeypatch) -> None:
    import celltally.io as io

    monkeypatch.setattr(io, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "colour.png"
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(path)  # 80 pixels, 240 values
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "(an array of 8 x 10 x 3)" in _assert_one_line(err, "colour.png")


def test_a_tiff_of_thousands_of_pages_is_refused_before_its_series_are_parsed(tmp_path):
    from celltally.io import MAX_TIFF_PAGES, header_pixels

    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as writer:  # a 5 MB file of 20,000 took minutes
        for _ in range(MAX_TIFF_PAGES + 1):
            writer.write(np.zeros((1, 1), np.uint8), contiguous=False)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert f"holds {MAX_TIFF_PAGES + 1} pages" in _assert_one_line(err, "pages.tif")
    assert header_pixels(path) is None  # unreadable from its header: decoding says why


def test_a_png_cut_inside_its_header_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    buffer = __import__("io").BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:20])  # the signature and part of IHDR
    with pytest.raises(ImageReadError) as err:  # an IndexError stopped a whole run
        read_image(path)
    _assert_one_line(err, "cut.png")


def test_files_celltally_does_not_read_are_tallied_once_from_folders_and_patterns(tmp_path):
    import collections

    from celltally.io import iter_images

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    (tmp_path / "b.czi").write_bytes(b"ZISRAWFILE")
    (tmp_path / "c.nd2").write_bytes(b"\x00")
    for args, expected in [
        ([tmp_path, f"{tmp_path}/./"], {".czi": 1, ".nd2": 1}),  # one folder given twice
        ([f"{tmp_path}/*"], {".czi": 1, ".nd2": 1}),  # a pattern matching them
        ([f"{tmp_path}/*", tmp_path], {".czi": 1, ".nd2": 1}),
        ([f"{tmp_path}/*.tif"], {}),
    ]:
        unread: collections.Counter[str] = collections.Counter()
        files = list(iter_images(args, unread=unread))
        assert [p.name for p in files] == ["a.tif"]
        assert dict(unread) == expected, args


def _fiji_fire() -> np.ndarray:
    """Fiji's "Fire" colour table, (3, 256) uint8, from its 32 control points."""
    points = [
        [0, 0, 1, 25, 49, 73, 98, 122, 146, 162, 173, 184, 195, 207, 217, 229]
        + [240, 252]
        + [255] * 14,
        [0] * 13
        + [14, 35, 57, 79, 101, 117, 133, 147, 161, 175, 190, 205, 219, 234, 248]
        + [255] * 4,
        [0, 61, 96, 130, 165, 192, 220, 227, 210, 181, 151, 122, 93, 64, 35, 5]
        + [0] * 11
        + [35, 98, 160, 223, 255],
    ]
    x = np.linspace(0, 255, 32)
    return np.stack([np.interp(np.arange(256), x, c) for c in points]).round().astype(np.uint8)


def _encoded(path: Path, rgb: np.ndarray) -> Path:
    """``rgb`` saved at ``path`` as PNG or, for a .jpg name, JPEG at quality 90."""
    Image.fromarray(rgb.astype(np.uint8)).save(
        path, format="JPEG" if path.suffix == ".jpg" else "PNG", quality=90
    )
    return path


def test_a_colour_composite_of_stains_is_refused_one_stain_under_a_colour_table_is_not(
    tmp_path: Path,
) -> None:
    from celltally.simulate import simulate_scene

    nuclei = simulate_scene(40, blur=1, stain=1, seed=1).image
    bodies = simulate_scene(90, blur=1, stain=2, seed=2).image  # another stain, other cells
    other = simulate_scene(25, blur=1, stain=1, seed=7).image  # more nuclei, other cells
    same = simulate_scene(40, blur=1, stain=2, seed=1).image  # the bodies of ``nuclei``' cells
    zero = np.zeros_like(nuclei)
    hot = np.dstack([np.clip(3 * nuclei.astype(int) - k, 0, 255) for k in (0, 255, 510)])
    composite = _encoded(tmp_path / "composite.png", np.dstack([zero, bodies, nuclei]))
    with pytest.raises(ImageReadError) as err:
        read_image(composite)
    message = _assert_one_line(err, "composite.png")
    assert "a composite of stains? Choose the stain to count with --channel 0-2" in message
    assert "colour channels hold different images" in message
    assert np.array_equal(read_image(composite, channel=2), nuclei)
    # Fiji's "RGB Color" of two channels, each way round, lossless or not: luma told a sparse
    # blue from green, and nuclei with their own cells' bodies had 0.95-0.97 of their colour
    # set by brightness (counted 30 for 18 cells); a table whose mean is not monotone in the
    # stain ("fire"), or "hot" saved as JPEG (its colour table no longer exact), too
    refused = {
        "blue_green.png": np.dstack([zero, other, nuclei]),
        "blue_green.jpg": np.dstack([zero, other, nuclei]),
        "green_blue.png": np.dstack([zero, nuclei, other]),
        "same_cells.png": np.dstack([zero, same, nuclei]),
        "same_cells.jpg": np.dstack([same, nuclei, zero]),
        "fire.png": np.moveaxis(_fiji_fire()[:, nuclei], 0, -1),
        "hot.jpg": hot,
    }
    for name, rgb in refused.items():
        with pytest.raises(ImageReadError, match="composite of stains"):
            read_image(_encoded(tmp_path / name, rgb))
    # one stain under a grey or one-colour table, lossless or JPEG, is counted as the mean of
    # its colours; so is one with a camera's noise in an unused channel, a colour camera's
    # planes of one dye, or "hot" saved losslessly (its mean is the stain)
    rng = np.random.default_rng(0)
    noise = np.clip(10 + rng.normal(0, 4, nuclei.shape), 0, 255)
    dye = np.dstack(
        [np.clip(f * nuclei + rng.normal(0, 2, nuclei.shape), 0, 255) for f in (0.3, 1, 0.5)]
    )
    ramp = np.tile(np.arange(nuclei.shape[1]) % 256, (nuclei.shape[0], 1))
    for name, rgb in [
        ("camera_noise", np.dstack([zero, nuclei, noise])),
        ("green", np.dstack([zero, nuclei, zero])),
        ("cyan", np.dstack([zero, nuclei, nuclei])),
        ("colour_camera", dye),
    ]:
        for suffix in (".png", ".jpg"):
            path = _encoded(tmp_path / (name + suffix), rgb)
            assert read_image(path).shape == nuclei.shape, path.name
    assert np.array_equal(
        read_image(_encoded(tmp_path / "hot.png", hot)), np.rint(hot.mean(axis=2))
    )
    # two colours that trade places at a constant brightness once stopped a whole run (NaN
    # bins): two images, refused in one line; one flat colour is read
    crossed = _encoded(tmp_path / "crossed.png", np.dstack([ramp, 255 - ramp, zero]))
    with pytest.raises(ImageReadError, match="composite of stains"):
        read_image(crossed)
    flat = _encoded(tmp_path / "flat.png", np.dstack([zero + 10, zero + 200, zero + 30]))
    assert read_image(flat).shape == nuclei.shape


def test_an_8_bit_image_under_a_colour_table_saved_as_a_palette_png_reads_its_values(
    tmp_path: Path,
) -> None:
    from celltally.simulate import simulate_scene

    nuclei = simulate_scene(40, blur=1, stain=1, seed=1).image
    table = Image.fromarray(nuclei).convert("P")  # Fiji's PNG of an 8-bit image under "fire"
    table.putpalette(_fiji_fire().T.ravel().tolist())
    table.save(tmp_path / "fire.png")
    # its colours' mean is not monotone in the stain ("fire" as RGB is refused): the
    # palette's indices are the image's values
    assert np.array_equal(read_image(tmp_path / "fire.png"), nuclei)
    few = Image.fromarray(np.where(nuclei > 100, 255, 0).astype(np.uint8)).convert("RGB")
    few.convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(tmp_path / "two.png")
    assert set(np.unique(read_image(tmp_path / "two.png"))) == {0, 255}  # colours, not 0/1


def test_a_scale_bar_drawn_on_one_stain_does_not_make_it_a_composite(tmp_path: Path) -> None:
    from PIL import ImageDraw

    from celltally.simulate import simulate_scene

    nuclei = (simulate_scene(40, blur=1, stain=1, seed=1).image * 0.25).astype(np.uint8)
    zero = np.zeros_like(nuclei)
    for table, rgb in (
        ("grey", np.dstack([nuclei] * 3)),
        ("green", np.dstack([zero, nuclei, zero])),
    ):
        for colour in ((255, 255, 0), (255, 255, 255), (0, 255, 255)):
            image = Image.fromarray(rgb)
            draw = ImageDraw.Draw(image)  # Fiji's scale bar and its label, 0.2% of the image
            draw.rectangle([560, 490, 660, 496], fill=colour)
            draw.text((580, 472), "50 um", fill=colour)
            for suffix in (".png", ".jpg"):
                path = _encoded(tmp_path / f"{table}_{colour[2]}{suffix}", np.asarray(image))
                # refused as "a composite of stains?" (correlation 0.82) before
                assert read_image(path).shape == nuclei.shape, path.name
    # a composite with a bar drawn on it is still a composite
    other = simulate_scene(25, blur=1, stain=1, seed=7).image
    image = Image.fromarray(np.dstack([zero, other, nuclei * 4]))
    ImageDraw.Draw(image).rectangle([560, 490, 660, 496], fill=(255, 255, 255))
    with pytest.raises(ImageReadError, match="composite of stains"):
        read_image(_encoded(tmp_path / "composite_bar.png", np.asarray(image)))


def test_a_stain_saturating_in_two_colours_beside_another_is_still_a_composite(
    tmp_path: Path,
) -> None:
    from scipy import ndimage as ndi

    from celltally.simulate import simulate_scene

    dense = simulate_scene(120, blur=1, stain=2, seed=4).image
    sparse = np.clip(simulate_scene(5, blur=1, stain=1, seed=3).image * 3.0, 0, 255)
    sparse = sparse.astype(np.uint8)  # 5 nuclei, saturated: magenta blobs, not a drawn bar
    dense = np.where(ndi.binary_dilation(sparse > 20, iterations=4), 0, dense)
    for suffix in (".png", ".jpg"):  # was read as one stain: counted 129.6 (120 + 5 cells)
        path = _encoded(tmp_path / f"merge{suffix}", np.dstack([sparse, dense, sparse]))
        with pytest.raises(ImageReadError, match="composite of stains"):
            read_image(path)
    # a dim stain under a one-colour table as JPEG: the colour noise left in the unused
    # channels (std 0.4-1.3) is no second stain
    dim = (simulate_scene(60, blur=1, stain=1, seed=11).image * (50 / 255)).astype(np.uint8)
    zero = np.zeros_like(dim)
    for name, rgb in (("green", (zero, dim, zero)), ("yellow", (dim, dim, zero))):
        for quality in (50, 75):
            path = tmp_path / f"{name}{quality}.jpg"
            Image.fromarray(np.dstack(rgb)).save(path, quality=quality)
            assert read_image(path).shape == dim.shape, path.name


def test_a_long_scale_bar_passes_and_two_dim_stains_are_still_two(tmp_path: Path) -> None:
    from PIL import ImageDraw

    from celltally.simulate import simulate_scene

    for (h, w), tall, table, colour, suffix in [
        ((520, 696), 8, "grey", (255, 255, 0), ".png"),
        ((520, 696), 8, "green", (255, 255, 255), ".jpg"),
        ((1024, 1024), 10, "green", (255, 0, 255), ".png"),
        ((256, 256), 4, "grey", (255, 0, 255), ".png"),
    ]:  # a solid bar 3+ sample pixels tall was no "thin" annotation: refused
        stain = simulate_scene(40, blur=1, stain=1, size=(h, w), seed=1).image // 2
        zero = np.zeros_like(stain)
        image = Image.fromarray(np.dstack([stain] * 3 if table == "grey" else [zero, stain, zero]))
        x, y = w - w // 7 - w // 20, h - h // 12
        ImageDraw.Draw(image).rectangle([x, y, x + w // 7, y + tall - 1], fill=colour)
        path = _encoded(tmp_path / f"bar_{h}_{table}{suffix}", np.asarray(image))
        assert read_image(path).shape == (h, w), path.name
    # two dim stains (stds 2.2 and 1.9 grey levels): the JPEG noise floor must not hide one
    first = simulate_scene(20, blur=1, stain=1, seed=1).image.astype(float)
    second = simulate_scene(150, blur=1, stain=2, seed=51).image.astype(float)
    first = np.round(first * 2.2 / first.std()).astype(np.uint8)
    second = np.round(second * 1.9 / second.std()).astype(np.uint8)
    path = _encoded(tmp_path / "dim_two.png", np.dstack([second, first, np.zeros_like(first)]))
    with pytest.raises(ImageReadError, match="composite of stains"):
        read_image(path)  # was read as one: the mean counted 51.3 for 20 + 150 cells
