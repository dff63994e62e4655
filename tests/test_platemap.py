"""Plate maps: wells placed on their plate's grid and drawn into a PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from celltally.platemap import plate_grids, plot_plate_maps, well_position


@pytest.mark.parametrize(
    ("well", "position"),
    [("A01", (0, 0)), ("B3", (1, 2)), ("H12", (7, 11)), ("P24", (15, 23)), ("AF48", (31, 47))],
)
def test_well_position(well, position):
    assert well_position(well) == position


@pytest.mark.parametrize("bad", ["", "3B", "B", "B00", "b-3"])
def test_well_position_refuses_non_wells(bad):
    with pytest.raises(ValueError, match="not a well name"):
        well_position(bad)


def rows():
    return [
        {"plate": "P1", "well": "A01", "stain": "1", "count": "10.5", "warnings": "0", "failed": 0},
        {"plate": "P1", "well": "H12", "stain": "1", "count": "80", "warnings": "2", "failed": 0},
        {"plate": "P1", "well": "B03", "stain": "2", "count": "7", "warnings": "0", "failed": 1},
        {"plate": "P2", "well": "O20", "stain": "1", "count": "3", "warnings": "0", "failed": 0},
        {"plate": "P2", "well": "xx", "stain": "1", "count": "1", "warnings": "0", "failed": 0},
    ]


def test_grids_put_each_well_in_its_place_on_the_smallest_standard_plate():
    grids = plate_grids(rows())
    assert [(g.plate, g.stain, g.values.shape) for g in grids] == [
        ("P1", "1", (8, 12)),  # H12: a 96-well plate
        ("P1", "2", (8, 12)),  # the plate's format, though B03 alone would fit 6 wells
        ("P2", "1", (16, 24)),  # O20: 384 wells ('xx' is no well and is left out)
    ]
    first = grids[0]
    assert first.values[0, 0] == 10.5 and first.values[7, 11] == 80
    assert int(np.isfinite(first.values).sum()) == 2
    assert first.flagged[7, 11] and not first.flagged[0, 0]  # warnings
    assert grids[1].failed[1, 2] and not grids[1].flagged[1, 2]  # an image not counted
    twice = plate_grids([{**r, "repeated_sites": "2"} if r["well"] == "A01" else r for r in rows()])
    assert twice[0].repeated[0, 0] and not twice[0].repeated[7, 11]  # its total counts it twice
    assert grids[2].values[14, 19] == 3 and grids[2].wells == 384
    # a plate format given: every plate drawn on it, and a well beyond it refused
    assert [g.wells for g in plate_grids(rows(), plate_format=384)] == [384, 384, 384]
    with pytest.raises(ValueError, match="beyond a 96-well plate"):
        plate_grids(rows(), plate_format=96)  # O20
    with pytest.raises(ValueError, match="plate format must be one of"):
        plate_grids(rows(), plate_format=100)


def test_plot_writes_a_png_and_refuses_rows_without_wells(tmp_path):
    twice = [{**r, "repeated_sites": "2"} if r["well"] == "A01" else r for r in rows()]
    path = plot_plate_maps(twice, tmp_path / "maps" / "plate.png")  # a '2' on A01
    with Image.open(path) as image:
        width, height = image.size
    assert path.suffix == ".png" and width > 300 and height > 200
    with pytest.raises(ValueError, match="no row names a well"):
        plot_plate_maps([{"plate": "", "well": "", "stain": "", "count": 1}], tmp_path / "x.png")


def test_mean_per_image_can_be_mapped():
    data = [{**r, "mean_per_image": float(r["count"]) / 2} for r in rows()[:2]]
    grid = plate_grids(data, value="mean_per_image")[0]
    assert grid.values[0, 0] == 5.25 and math.isnan(grid.values[3, 3])
