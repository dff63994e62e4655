"""Shared fixtures: a tiny model folder and small generated images (never ../shared)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from celltally.models.pipeline import CountingPipeline
from celltally.models.presets import get_preset
from celltally.train import save_model_folder


def tiny_config() -> dict:
    config = get_preset("small")
    config["input_size"] = [64, 96]
    config["segmenter"] = {"encoder": [4, 4, 4, 4], "lateral": 4, "head": [4, 4]}
    config["counter"] = {"width": 0.0625, "fc": [8, 8], "pool_size": [3, 4], "count_scale": 50.0}
    config["train"]["segmenter"]["epochs"] = 1
    config["train"]["counter"]["epochs"] = 1
    config["preset"] = "tiny-test"
    config["name"] = "tiny"
    config["normalization"] = {"method": "percentile", "low": 0.5, "high": 99.95}
    return config


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """An untrained but complete model folder (config.json + model.safetensors)."""
    torch.manual_seed(0)
    config = tiny_config()
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_model_folder(CountingPipeline(config), config, folder)
    return folder


def blob_image(count: int, *, shape=(130, 174), seed=0, dtype=np.uint8) -> np.ndarray:
    """Bright discs on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = rng.normal(3, 1, shape)
    for _ in range(count):
        cy, cx = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8)
        image += 150 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 25)
    top = 255 if dtype == np.uint8 else 4095
    return np.clip(image, 0, top).astype(dtype)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "plate"
    folder.mkdir()
    for i, n in enumerate((3, 8)):
        tifffile.imwrite(
            folder / f"SIMCEPImages_A0{i + 1}_C{n}_F1_s01_w1.TIF", blob_image(n, seed=i)
        )
    return folder


def write_zero_tiff(path, side: int, *, rows: int | None = None) -> None:
    """A deflate TIFF of side x side 8-bit zeros, a few hundred KB: a "decompression bomb".

    ``rows`` (fewer than ``side``) stores only that many rows, so the header
    announces the whole image while the file stays tiny (truncated data).
    """
    import struct
    import zlib

    packer = zlib.compressobj(9)
    row = bytes(side)
    data = b"".join(packer.compress(row) for _ in range(side if rows is None else rows))
    data += packer.flush()
    tags = [
        (256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1),
        (273, 4, 8 + 2 + 12 * 11 + 4), (277, 3, 1), (278, 4, side), (279, 4, len(data)),
        (284, 3, 1), (339, 3, 1),
    ]  # fmt: skip
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    ifd += struct.pack("<I", 0)
    with open(path, "wb") as handle:
        handle.write(b"II*\x00" + struct.pack("<I", 8) + ifd + data)


@pytest.fixture(scope="session")
def pixel_size_model(tmp_path_factory):
    """The shipped ``bbbc005`` folder, renamed ``bbbc005_um``, recording 0.65 um pixels
    (as ``celltally train --pixel-size 0.65`` records them)."""
    import json
    import shutil

    from celltally.model_folder import WEIGHTS_DIR

    folder = tmp_path_factory.mktemp("models") / "bbbc005_um"
    shutil.copytree(WEIGHTS_DIR / "bbbc005", folder)
    config = json.loads((folder / "config.json").read_text())
    config["name"] = "bbbc005_um"
    config["scale"] = {**config.get("scale", {}), "pixel_size_um": 0.65}
    (folder / "config.json").write_text(json.dumps(config))
    return folder
