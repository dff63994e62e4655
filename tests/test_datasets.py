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
