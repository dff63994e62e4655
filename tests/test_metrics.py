"""Tests for celltally.metrics: count metrics, grouping and table formatting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from celltally.metrics import count_metrics, format_table, grouped_metrics


def test_count_metrics_hand_computed() -> None:
    m = count_metrics([1, 2, 3], [1, 3, 5])
    assert m["n"] == 3
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert m["max_abs_error"] == pytest.approx(2.0)
    assert m["r2"] == pytest.approx(1 - 5 / 2)
    assert m["bias"] == pytest.approx(1.0)
    assert "coverage" not in m


def test_count_metrics_perfect_and_constant_truth() -> None:
    assert count_metrics([1.0, 4.0], [1.0, 4.0])["r2"] == pytest.approx(1.0)
    m = count_metrics([5, 5], [4, 7])
    assert math.isnan(m["r2"])
    assert m["bias"] == pytest.approx(0.5)


def test_count_metrics_intervals() -> None:
    true = np.array([10.0, 20.0, 30.0, 40.0])
    low = np.array([8.0, 21.0, 25.0, 40.0])
    high = np.array([12.0, 25.0, 35.0, 44.0])
    before = (true.copy(), low.copy(), high.copy())
    m = count_metrics(true, [10, 22, 31, 41], low=low, high=high)
    assert m["coverage"] == pytest.approx(0.75)  # 20 is below [21, 25]; 40 == low counts
    assert m["mean_interval_width"] == pytest.approx((4 + 4 + 10 + 4) / 4)
    assert m["mean_half_width"] == pytest.approx((2 + 3 + 4 + 3) / 4)  # high - pred
    # a low clipped at 0 does not shrink the half-width: 1 ± 3 is [0, 4]
    clipped = count_metrics([0.0, 2.0], [1.0, 1.0], low=[0.0, 0.0], high=[4.0, 4.0])
    assert clipped["mean_half_width"] == pytest.approx(3.0)
    for a, b in zip((true, low, high), before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "args,kwargs",
    [
        (([1, 2], [1]), {}),
        (([], []), {}),
        (([1, 2], [1, float("nan")]), {}),
        (([1, 2], [1, 2]), {"low": [0, 0]}),
        (([1, 2], [1, 2]), {"low": [0, 0], "high": [1]}),
        (([1, 2], [1, 2]), {"low": [3, 0], "high": [1, 1]}),
        (([[1, 2]], [[1, 2]]), {}),
    ],
)
def test_count_metrics_errors(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        count_metrics(*args, **kwargs)


_NAN = float("nan")  # one object, so rows compare equal by identity


def _rows() -> list[dict]:
    return [
        {"blur": 1, "stain": 1, "true": 10, "count": 11, "low": 9, "high": 12},
        {"blur": 1, "stain": 1, "true": 20, "count": 18, "low": 21, "high": 22},
        {"blur": 10, "stain": 1, "true": 30, "count": 30, "low": 28, "high": 33},
        {"blur": 2, "stain": 2, "true": 40, "count": 44, "low": 38, "high": 41},
        {"blur": 2, "stain": 2, "true": None, "count": 5, "low": 1, "high": 9},
        {"blur": 2, "stain": 2, "true": _NAN, "count": 5, "low": 1, "high": 9},
    ]


def test_grouped_metrics() -> None:
    rows = _rows()
    got = grouped_metrics(rows, by=["blur", "stain"])
    assert list(got) == ["blur=1,stain=1", "blur=2,stain=2", "blur=10,stain=1", "all"]
    assert got["blur=1,stain=1"]["n"] == 2
    assert got["blur=1,stain=1"]["mae"] == pytest.approx(1.5)
    assert got["blur=1,stain=1"]["coverage"] == pytest.approx(0.5)
    assert got["all"]["n"] == 4
    assert got["all"] == count_metrics(
        [10, 20, 30, 40], [11, 18, 30, 44], low=[9, 21, 28, 38], high=[12, 22, 33, 41]
    )
    assert rows == _rows()  # inputs untouched


def test_grouped_metrics_without_bounds_and_custom_keys() -> None:
    rows = [{"g": "a", "y": 1, "p": 2}, {"g": "b", "y": 3, "p": 3}]
    got = grouped_metrics(rows, by=["g"], true_key="y", pred_key="p")
    assert list(got) == ["g=a", "g=b", "all"]
    assert "coverage" not in got["all"]
    assert got["all"]["mae"] == pytest.approx(0.5)
    assert list(grouped_metrics(rows, by=[], true_key="y", pred_key="p")) == ["all"]
    assert grouped_metrics([{"true": None, "count": 1}], by=["x"]) == {}


def test_grouped_metrics_of_unlabelled_images_is_just_all() -> None:
    rows = [{"true": 1, "count": 2}, {"true": 3, "count": 3, "blur": None}]
    assert list(grouped_metrics(rows, by=["blur", "stain"])) == ["all"]
    # with some images labelled, the unlabelled ones keep their own group
    rows.append({"true": 5, "count": 5, "blur": 1, "stain": 1})
    got = grouped_metrics(rows, by=["blur", "stain"])
    assert list(got) == ["blur=1,stain=1", "blur=?,stain=?", "all"]
    assert got["blur=?,stain=?"]["n"] == 2
    # a key only some names carry is left out of a group's name, not printed as None
    rows.append({"true": 4, "count": 4, "stain": 2})
    assert "stain=2" in grouped_metrics(rows, by=["blur", "stain"])


def test_format_table() -> None:
    table = format_table(grouped_metrics(_rows(), by=["blur"]))
    lines = table.split("\n")
    assert lines[0].split() == [
        "group",
        "n",
        "mae",
        "rmse",
        "r2",
        "max_abs_error",
        "coverage",
        "mean_half_width",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert [line.split()[0] for line in lines[2:]] == ["blur=1", "blur=2", "blur=10", "all"]
    assert lines[-1].split()[1:3] == ["4", "1.750"]
    assert len({len(line) for line in lines[:2]}) == 1
    small = format_table({"x": {"n": 2.0, "mae": float("nan")}}, columns=("n", "mae", "coverage"))
    assert small.split("\n")[2].split() == ["x", "2", "nan", "-"]
