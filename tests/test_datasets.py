"""Tests for celltally.datasets: the BBBC005 reader and its cache of prepared images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from conftest import blob_image

from celltally import datasets


def bbbc005_folder(root):
    folder = root / "images"
    folder.mkdir(parents=True)
    for well, count in (("A01", 3), ("A02", 6)):
        for blur in (1, 23):
            image = blob_image(count, seed=count)
            if blur == 23:  # a blurred copy of the same scene
                image = (image.astype(float) * 0.8).astype(np.uint8)
            name = f"SIMCEPImages_{well}_C{count}_F{blur}_s01_w1.TIF"
            tifffile.imwrite(folder / name, image)
    return root


def test_bbbc005_reader_counts_from_names_and_masks_from_the_in_focus_image(tmp_path):
    data = datasets.load_bbbc005(bbbc005_folder(tmp_path / "b"), size=(64, 96))
    assert len(data) == 4 and sorted(data.counts.tolist()) == [3.0, 3.0, 6.0, 6.0]
    by_name = {m["name"]: i for i, m in enumerate(data.meta)}
    sharp = by_name["SIMCEPImages_A02_C6_F1_s01_w1.TIF"]
    blurred = by_name["SIMCEPImages_A02_C6_F23_s01_w1.TIF"]
    assert bool(data.masks[sharp].any())
    assert np.array_equal(data.masks[sharp].numpy(), data.masks[blurred].numpy())


def test_the_cache_of_prepared_images_is_keyed_by_the_preparing_code(tmp_path, monkeypatch):
    root, cache = bbbc005_folder(tmp_path / "b"), tmp_path / "cache"
    first = datasets.load_bbbc005(root, size=(64, 96), cache_dir=cache)
    assert len(list(cache.glob("bbbc005_*.pt"))) == 1
    again = datasets.load_bbbc005(root, size=(64, 96), cache_dir=cache)
    assert np.array_equal(first.images.numpy(), again.images.numpy())
    assert len(list(cache.glob("bbbc005_*.pt"))) == 1  # read back, not rebuilt
    # other preparation code (a changed celltally.transforms) never reads the old arrays
    monkeypatch.setattr(datasets, "preparation_digest", lambda: "changed-code")
    datasets.load_bbbc005(root, size=(64, 96), cache_dir=cache)
    assert len(list(cache.glob("bbbc005_*.pt"))) == 2
    # another folder of the same names (another plate) is not the first one's arrays
    other = bbbc005_folder(tmp_path / "other")
    for image in (other / "images").iterdir():
        tifffile.imwrite(image, 255 - tifffile.imread(image))
    read = datasets.load_bbbc005(other, size=(64, 96), cache_dir=cache)
    assert not np.array_equal(read.images.numpy(), first.images.numpy())
    # nor the same folder's files rewritten since
    for image in (root / "images").iterdir():
        tifffile.imwrite(image, 255 - tifffile.imread(image))
    read = datasets.load_bbbc005(root, size=(64, 96), cache_dir=cache)
    assert not np.array_equal(read.images.numpy(), first.images.numpy())


def test_a_label_image_of_another_size_is_refused_even_beside_binary_masks(tmp_path):
    import pytest

    from celltally import io

    root = tmp_path / "data"
    for sub in ("images", "masks", "labels"):
        (root / sub).mkdir(parents=True)
    image = blob_image(5, shape=(96, 128))
    tifffile.imwrite(root / "images" / "img00.tif", image)
    tifffile.imwrite(root / "masks" / "img00.tif", (image > image.mean()).astype(np.uint8) * 255)
    labels = np.zeros((100, 100), dtype=np.uint16)  # 40 objects, the wrong size
    for k in range(40):
        labels[(k // 8) * 20 : (k // 8) * 20 + 5, (k % 8) * 12 : (k % 8) * 12 + 5] = k + 1
    tifffile.imwrite(root / "labels" / "img00.tif", labels)
    with pytest.raises(io.InputError, match=r"labels/img00.tif: mask is 100x100 but its image"):
        datasets.load_folder(root, size=(96, 128))


def test_a_folder_counted_by_its_label_images_reads_each_image_once(tmp_path, monkeypatch):
    from celltally import io

    root = tmp_path / "data"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        labels = np.zeros((48, 64), dtype=np.uint16)
        for k in range(i + 2):
            labels[4 + 10 * k : 9 + 10 * k, 5:12] = k + 1
        tifffile.imwrite(root / "labels" / f"img{i}.tif", labels)
        tifffile.imwrite(root / "images" / f"img{i}.tif", (labels > 0).astype(np.uint8) * 200)
    reads: list[str] = []
    real_read = io.read_image

    def counting_read(path, **kwargs):
        reads.append(Path(path).name)
        return real_read(path, **kwargs)

    monkeypatch.setattr(io, "read_image", counting_read)
    data = datasets.load_folder(root, size=(48, 64))
    assert data.counts.tolist() == [2.0, 3.0, 4.0]
    assert sorted(reads) == ["img0.tif", "img1.tif", "img2.tif"]


def test_counts_csv_naming_sub_folders_loads_each_file_under_its_own_name(tmp_path):
    root = tmp_path / "data"
    lines = ["image,count"]
    for k, plate in enumerate(("PlateA", "PlateB")):  # the same file name in two folders
        (root / plate).mkdir(parents=True)
        tifffile.imwrite(root / plate / "img.tif", blob_image(2 + 3 * k, seed=k))
        lines.append(f"{plate}/img.tif,{2 + 3 * k}")
    (root / "counts.csv").write_text("\n".join(lines) + "\n")
    data = datasets.load_folder(root, size=(64, 96))  # was a KeyError on 'img.tif'
    assert data.counts.tolist() == [2.0, 5.0]
    assert [m["name"] for m in data.meta] == ["PlateA/img.tif", "PlateB/img.tif"]
    assert [datasets.source_file(m) for m in data.meta] == [
        root / "PlateA" / "img.tif",
        root / "PlateB" / "img.tif",
    ]
    assert data.meta[0]["scene"] != data.meta[1]["scene"]


def test_frames_of_one_field_named_by_time_point_are_one_scene(tmp_path):
    root = tmp_path / "lapse"
    root.mkdir()
    names = ["field1_t01.tif", "field1_t02.tif", "field2_t01.tif", "other.tif"]
    for k, name in enumerate(names):
        tifffile.imwrite(root / name, blob_image(2 + k, seed=k))
    (root / "counts.csv").write_text(
        "image,count\n" + "".join(f"{n},{2 + k}\n" for k, n in enumerate(names))
    )
    scenes = [m["scene"] for m in datasets.load_folder(root, size=(64, 96)).meta]
    assert scenes == ["field1", "field1", "field2", "other"]  # each frame was its own scene


def test_a_boolean_subset_picks_the_images_it_marks():
    import pytest
    import torch

    data = datasets.LabeledSet(
        images=torch.rand(4, 1, 8, 8),
        masks=torch.full((4, 1, 8, 8), float("nan")),
        counts=torch.tensor([86.0, 27.0, 8.0, 82.0]),
    )
    picked = data.subset(np.array([False, True, False, True]))
    assert picked.counts.tolist() == [27.0, 82.0]  # not rows 0, 1, 0, 1
    assert data.subset(torch.tensor([True, False, False, False])).counts.tolist() == [86.0]
    assert len(data.subset(data.has_mask)) == 0  # no image has a mask here
    with pytest.raises(ValueError, match="needs 4 values"):
        data.subset(np.array([True, False]))


def test_a_labeled_set_whose_parts_do_not_fit_is_refused():
    import pytest
    import torch

    images = torch.rand(3, 1, 8, 8)
    counts = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="masks must have the images' shape"):
        datasets.LabeledSet(images, torch.rand(3, 1, 5, 5), counts)
    with pytest.raises(ValueError, match=r"counts must be \(3,\), one per image"):
        datasets.LabeledSet(images, torch.rand(3, 1, 8, 8), counts[:2])
    with pytest.raises(ValueError, match=r"images must be \(N, 1, H, W\)"):
        datasets.LabeledSet(images[:, 0], torch.rand(3, 8, 8), counts)
    with pytest.raises(ValueError, match="one dict per image"):
        datasets.LabeledSet(images, torch.rand(3, 1, 8, 8), counts, [{}])


def _blob_folder(root, n_images=3, *, sub=""):
    """images/<sub>img<i>.tif (named without a count) and their 0/255 masks' arrays."""
    (root / "images" / sub).mkdir(parents=True)
    masks = []
    for i in range(n_images):
        image = blob_image(4 + 3 * i, shape=(96, 128), seed=i)
        tifffile.imwrite(root / "images" / sub / f"img{i}.tif", image)
        masks.append((image > 80).astype(np.uint8) * 255)
    return masks


def test_a_soft_or_jpeg_mask_is_refused_not_counted_as_a_label_image(tmp_path):
    import pytest
    from PIL import Image, ImageFilter

    from celltally import io

    root = tmp_path / "soft"
    (root / "masks").mkdir(parents=True)
    for i, mask in enumerate(_blob_folder(root)):  # anti-aliased: every grey level was an object
        Image.fromarray(mask).filter(ImageFilter.GaussianBlur(1)).save(
            root / "masks" / f"img{i}.png"
        )
    with pytest.raises(io.InputError, match=r"masks/img0.png: looks like a soft \(blurred"):
        datasets.load_folder(root, size=(48, 64))
    with pytest.raises(io.InputError, match="soft"):
        datasets.labels_diameter(root)
    jpeg = tmp_path / "jpeg"
    (jpeg / "masks").mkdir(parents=True)
    for i, mask in enumerate(_blob_folder(jpeg)):
        Image.fromarray(mask).save(jpeg / "masks" / f"img{i}.jpg", quality=95)
    with pytest.raises(
        io.InputError, match=r"masks/img0.jpg: masks and label images cannot be JPEG"
    ):
        datasets.load_folder(jpeg, size=(48, 64))
    # real label images stay label images: touching objects, and one-pixel objects apart
    labels = np.zeros((96, 128), dtype=np.uint16)
    for k in range(12):  # a row of touching 6 x 8 cells, ids 1-12
        labels[10:16, 8 * k : 8 * k + 8] = k + 1
    labels[40, 40], labels[60, 90] = 13, 14
    (root / "masks" / "img0.png").unlink()
    tifffile.imwrite(root / "masks" / "img0.tif", labels)
    assert len(np.unique(io.read_mask(root / "masks" / "img0.tif"))) == 15
    # touching thin objects (2 px rods, 2 x 2 px cells) are bands, but one piece each
    rods = np.zeros((64, 64), dtype=np.uint16)
    for k, (r, c) in enumerate((r, c) for r in range(4, 60, 2) for c in range(4, 56, 10)):
        rods[r : r + 2, c : c + 8] = k + 1
    grid = (np.arange(400, dtype=np.uint16).reshape(20, 20) + 1).repeat(2, 0).repeat(2, 1)
    for name, image in (("rods.tif", rods), ("grid.tif", grid)):
        tifffile.imwrite(tmp_path / name, image)
        assert np.array_equal(io.read_mask(tmp_path / name), image.astype(np.int64))


def test_label_images_of_another_size_are_refused_beside_masks_and_counts_csv(tmp_path):
    import pytest

    from celltally import io

    root = tmp_path / "data"  # simulate's layout: counts.csv, masks/ and labels/
    for sub in ("masks", "labels"):
        (root / sub).mkdir(parents=True)
    rows = ["image,count"]
    for i, mask in enumerate(_blob_folder(root)):
        tifffile.imwrite(root / "masks" / f"img{i}.tif", mask)
        labels = np.zeros((96, 128), dtype=np.uint16)
        labels[10:20, 10:20], labels[40:50, 60:70] = 1, 2
        big = np.kron(labels, np.ones((2, 2), dtype=np.uint16))  # a 2x-upsampled label set
        tifffile.imwrite(root / "labels" / f"img{i}.tif", big)
        rows.append(f"img{i}.tif,{4 + 3 * i}")
    (root / "counts.csv").write_text("\n".join(rows) + "\n")
    message = r"labels/img0.tif: mask is 256x192 but its image is 128x96"
    with pytest.raises(io.InputError, match=message):
        datasets.load_folder(root, size=(48, 64))
    with pytest.raises(io.InputError, match=message):  # was a diameter twice the true one
        datasets.labels_diameter(root)


def test_masks_of_same_named_images_in_sub_folders_are_looked_up_by_path(tmp_path):
    import pytest

    from celltally import io

    root = tmp_path / "data"
    masks = {plate: _blob_folder(root, 1, sub=plate)[0] for plate in ("p1", "p2")}
    (root / "counts.csv").write_text("image,count\np1/img0.tif,4\np2/img0.tif,4\n")
    (root / "masks").mkdir()
    tifffile.imwrite(root / "masks" / "img0.tif", masks["p1"])  # whose?
    with pytest.raises(io.InputError, match=r"masks/img0.tif: several images are named img0"):
        datasets.load_folder(root, size=(48, 64))
    (root / "masks" / "img0.tif").unlink()
    for plate in ("p1", "p2"):  # masks/ mirrors images/
        (root / "masks" / plate).mkdir()
        tifffile.imwrite(root / "masks" / plate / "img0.tif", np.zeros_like(masks[plate]))
    tifffile.imwrite(root / "masks" / "p1" / "img0.tif", masks["p1"])
    data = datasets.load_folder(root, size=(48, 64))
    assert bool(data.has_mask.all())
    assert float(data.masks[0].sum()) > 0 and float(data.masks[1].sum()) == 0
    # a stem no other image has: its mask may sit in masks/ itself
    (root / "images" / "p2" / "img0.tif").rename(root / "images" / "p2" / "img9.tif")
    (root / "masks" / "p2" / "img0.tif").rename(root / "masks" / "img9.tif")
    (root / "counts.csv").write_text("image,count\np1/img0.tif,4\np2/img9.tif,4\n")
    assert bool(datasets.load_folder(root, size=(48, 64)).has_mask.all())
    # images/img9.tif beside images/p2/img9.tif: masks/img9.tif is its own, and the
    # sub-folder's image has none (it was refused as a mask several images could share)
    (root / "images" / "img9.tif").write_bytes((root / "images" / "p2" / "img9.tif").read_bytes())
    (root / "counts.csv").write_text("image,count\nimg9.tif,4\np2/img9.tif,4\n")
    data = datasets.load_folder(root, size=(48, 64))
    assert data.has_mask.tolist() == [True, False]


def test_a_folder_without_bbbc005_names_is_refused_in_one_line(tmp_path):
    import pytest

    from celltally import io

    folder = tmp_path / "other"
    _blob_folder(folder, 2)
    with pytest.raises(io.InputError, match=r"images: no BBBC005 images \(SIMCEPImages_<well>"):
        datasets.load_bbbc005(folder, size=(48, 64))


def test_a_subsets_rows_are_its_own():
    import torch

    data = datasets.LabeledSet(
        images=torch.rand(2, 1, 8, 8),
        masks=torch.full((2, 1, 8, 8), float("nan")),
        counts=torch.tensor([3.0, 4.0]),
        meta=[{"name": "a.tif", "blur": 1}, {"name": "b.tif", "blur": 1}],
    )
    data.subset([0]).meta[0]["blur"] = 99
    assert data.meta[0]["blur"] == 1
