"""Tests for celltally.naming: file-name metadata parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from celltally.naming import (
    BBBC005_PATTERN,
    ImageName,
    field_stem,
    parse_name,
    plate_label,
    scene_id,
)


def test_bbbc005_canonical() -> None:
    got = parse_name("SIMCEPImages_A10_C40_F1_s01_w1.TIF")
    assert got == ImageName(
        well="A10", row="A", column=10, site=1, blur=1, stain=1, count=40, plate=None
    )
    assert got.as_dict() == {
        "well": "A10",
        "row": "A",
        "column": 10,
        "site": 1,
        "blur": 1,
        "stain": 1,
        "count": 40,
        "plate": None,
        "time": None,
    }


def test_bbbc005_folder_ignored_and_path_accepted() -> None:
    got = parse_name(Path("/data/BBBC005_C99_F9_s99_w9/SIMCEPImages_P24_C100_F48_s25_w2.TIF"))
    assert (got.well, got.row, got.column, got.count, got.blur, got.site, got.stain) == (
        "P24",
        "P",
        24,
        100,
        48,
        25,
        2,
    )
    assert parse_name(r"C:\imgs\SIMCEPImages_B03_C5_F4_s02_w1.tif").well == "B03"


def test_bbbc005_pattern_case_insensitive() -> None:
    assert BBBC005_PATTERN.match("simcepimages_a01_c1_f1_s01_w1.tif")
    assert parse_name("simcepimages_a01_c1_f1_s01_w1.tif").well == "A01"


def test_bbbc039_name() -> None:
    name = "IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E847D81B174.tif"
    got = parse_name(name)
    assert (got.plate, got.well, got.row, got.column, got.site, got.stain) == (
        "IXMtest",
        "A02",
        "A",
        2,
        1,
        1,
    )
    assert got.count is None and got.blur is None


def test_generic_well_and_count() -> None:
    got = parse_name("plate7_B12_C35_s3_w2.png")
    assert (got.plate, got.well, got.column, got.count, got.site, got.stain) == (
        "plate7",
        "B12",
        12,
        35,
        3,
        2,
    )
    # "_C10_" with no other well is the well, not a count.
    lone = parse_name("exp_C10_s2.tif")
    assert (lone.well, lone.count, lone.plate) == ("C10", None, "exp")
    # The plate is all the text before the well, '_' included.
    assert parse_name("exp_run2_D05.tif").plate == "exp_run2"
    assert parse_name("exp_run2_D05.tif").well == "D05"


@pytest.mark.parametrize(
    ("name", "plate", "well", "site", "stain"),
    [
        ("Plate1_B03_s1_w01.tif", "Plate1", "B03", 1, 1),  # zero-padded channel
        ("Plate1_B03_s1_w10.tif", "Plate1", "B03", 1, 10),  # was read as channel 1
        # BBBC039: a GUID whose first 8 hex digits are all decimal is no channel number
        ("IXMtest_E19_s4_w129545707-4CD3-4498-AC27-E4AE24D0253C.tif", "IXMtest", "E19", 4, 1),
        ("P01_B02_s1_w1.tif", None, "P01", 1, 1),  # a plate named like a well is the well
        ("Plate1_B02_T01_s1_w1.tif", "Plate1", "B02", 1, 1),  # a time point after the well
        ("Plate_B02_F01_C01.tif", "Plate", "B02", None, None),  # a field and a channel
        ("B02_T01.tif", None, "B02", None, None),
        ("Screen_P1_B03_s1_w1.tif", "Screen_P1", "B03", 1, 1),  # '_' in the plate name
        ("MFGTMP_230101_A01_s1_w1.tif", "MFGTMP_230101", "A01", 1, 1),
        ("B02_s1_w1.tif", None, "B02", 1, 1),
        ("A01_w2_B12.tif", None, "A01", None, 2),
    ],
)
def test_screen_names(name: str, plate, well, site, stain) -> None:
    got = parse_name(name)
    assert (got.plate, got.well, got.site, got.stain) == (plate, well, site, stain)


@pytest.mark.parametrize("name", ["", "junk.tif", "cells_0001.png", "a_b_c", "IMG-2024.jpeg"])
def test_junk_names(name: str) -> None:
    assert parse_name(name) == ImageName()
    assert scene_id(name) is None


def test_scene_id_shared_across_blur_and_stain() -> None:
    names = [
        "SIMCEPImages_A10_C40_F1_s01_w1.TIF",
        "SIMCEPImages_A10_C40_F1_s01_w2.TIF",
        "SIMCEPImages_F10_C40_F16_s01_w1.TIF",
        "SIMCEPImages_P10_C40_F48_s01_w2.TIF",
    ]
    assert {scene_id(n) for n in names} == {"C10_s01"}
    assert scene_id("SIMCEPImages_A10_C40_F1_s02_w1.TIF") == "C10_s02"
    assert scene_id("SIMCEPImages_A11_C44_F1_s01_w1.TIF") == "C11_s01"


def test_scene_id_generic() -> None:
    a = scene_id("IXMtest_A02_s1_w1051DAA7C.tif")
    b = scene_id("IXMtest_A02_s1_w2AAAA.tif")
    assert a == b == "IXMtest_A02_s01"
    assert scene_id("IXMtest_A02_w1.tif") is None


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("field1_t01.tif", "field1"),
        ("field1_t02.tif", "field1"),
        ("cells_T003_Z02.png", "cells"),
        ("run2/img-t7.tif", "run2/img"),
        ("img3.tif", "img3"),  # no time token: the stem
        ("t01.tif", "t01"),  # nothing else left: the stem
        ("field1/t01.tif", "field1"),  # ... or the folder, a field per folder
        ("field6_t01_w2.tif", "field6"),  # channels of one field too
        ("img_ch2_z1.tif", "img"),
        ("stat_total.tif", "stat_total"),  # 'total' is no time token
    ],
)
def test_field_stem_drops_time_points_and_planes(name: str, field: str) -> None:
    assert field_stem(name) == field


def test_time_points_are_read_after_the_well_and_label_the_plate() -> None:
    got = parse_name("Plate1_B03_s1_t02_w1.tif")
    assert (got.plate, got.well, got.site, got.time, got.stain) == ("Plate1", "B03", 1, 2, 1)
    assert plate_label(got.plate, got.time) == "Plate1 t02"
    assert parse_name("Plate1_B03_s1_w1.tif").time is None
    assert parse_name("t01_B03_s1.tif").time is None  # before the well: not its time point
    assert plate_label(None, 3) == "t03" and plate_label("P", None) == "P"


@pytest.mark.parametrize(
    "name",
    [
        "Plate1_B3_s1_w1.png",  # unpadded wells are not read (wells names such files)
        "VID12_B7_1_00d00h00m.tif",  # Incucyte: its time stamps are not read either
        "Plate1_b03_s1.png",  # lower-case rows are not read: 's01', 'w01', 't01' would be too
        "exp_s01_w01.tif",
        "Plate1_Z99_s1.tif",  # on no plate: columns run 1-48
        "Plate1_A00_s1.tif",
        "Plate1_B49_s1.tif",
        "Plate1_AG01_s1.tif",  # rows run A-AF (1536 wells)
        "Plate1_ZZ12_s1.tif",
        "Plate1_B003_s1.tif",
    ],
)
def test_tokens_on_no_plate_are_no_well(name: str) -> None:
    got = parse_name(name)
    assert (got.well, got.row, got.column, got.plate) == (None, None, None, None)
    assert scene_id(name) is None


@pytest.mark.parametrize(
    ("name", "well"),
    [
        ("Plate1_Q03_s1.tif", "Q03"),  # 1536-well rows and columns
        ("Plate1_Z48_s1.tif", "Z48"),
        ("Plate1_AF48_s1.tif", "AF48"),
        ("Plate1_AA01_s1.tif", "AA01"),
        ("PL01_A01_w1.tif", "A01"),  # row PL is on no plate: the plate's name
    ],
)
def test_1536_well_names(name: str, well: str) -> None:
    assert parse_name(name).well == well


@pytest.mark.parametrize(
    ("name", "plate", "well", "count"),
    [
        ("A05_C5_F1_s1.png", None, "A05", 5),  # BBBC005-like: A05 the well, C5 the count
        ("img0_C4_s1.tif", None, None, 4),  # a training image's count tag
        ("Plate1_C3_s1_w1.png", None, None, 3),
        ("exp_C10_s1.tif", "exp", "C10", None),  # alone, padded: the well (as it was)
        ("exp_C99_s1.tif", None, None, 99),  # on no plate: a count
    ],
)
def test_counts_and_wells(name: str, plate, well, count) -> None:
    got = parse_name(name)
    assert (got.plate, got.well, got.count) == (plate, well, count)


def test_bbbc005_names_unchanged() -> None:
    got = parse_name("SIMCEPImages_A05_C18_F1_s09_w2.TIF")
    assert (got.well, got.count, got.blur, got.site, got.stain, got.plate) == (
        "A05",
        18,
        1,
        9,
        2,
        None,
    )
    assert scene_id("SIMCEPImages_A05_C18_F1_s09_w2.TIF") == "C05_s09"
    assert parse_name("SIMCEPImages_A5_C5_F1_s1_w1.TIF").well == "A05"  # one spelling
