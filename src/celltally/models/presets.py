"""Model presets as data: the paper's full-size network and the small CPU default."""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Hernández et al. (2018): 256 x 192 input, 128-filter cross-links,
    # (256, 256, 1) heads, VGG-11-BN at full width, FC 1024-512-1, mask-only counter.
    "paper": {
        "input_size": [192, 256],
        "segmenter": {"encoder": [64, 128, 256, 512], "lateral": 128, "head": [256, 256]},
        "counter": {"width": 1.0, "fc": [1024, 512], "pool_size": [3, 4], "count_scale": 50.0},
        "counter_inputs": ["mask"],
        # The paper's constant Adam rates; its TV term has no stated weight (1e-3 here,
        # on a per-pixel mean) and its loss form is replaced by Kendall & Gal's
        # (losses.py says why).
        "train": {
            "segmenter": {
                "lr": 1e-3,
                "batch_size": 2,
                "epochs": 50,
                "tv_weight": 1e-3,
                "schedule": "constant",
            },
            "counter": {"lr": 1e-4, "batch_size": 5, "epochs": 50, "schedule": "constant"},
        },
    },
    # Same architecture at ~1/8 width: trains on 2 CPU cores in well under an hour.
    # The counter's FC head is applied per grid cell and summed ('density'):
    # counting is additive, so this works at any image size and tiles exactly.
    # The counter also reads the (half-size) image beside the mask: overlapping
    # cells merge into one mask blob but stay brighter, and the mask alone throws
    # that evidence away (the paper's overlap failure case).
    "small": {
        "input_size": [192, 256],
        "segmenter": {"encoder": [16, 24, 32, 48], "lateral": 24, "head": [24, 24]},
        "counter": {
            "width": 0.125,
            "fc": [128, 64],
            "pool_size": [3, 4],
            "count_scale": 1.0,
            "head": "density",
            # counting averages the counter over the 4 flips of its input (eval only):
            # the shipped bbbc005's calibration-site MAE 0.739 -> 0.641
            "tta": "flip",
        },
        "counter_inputs": ["mask", "image"],
        "train": {
            "segmenter": {"lr": 2e-3, "batch_size": 8, "epochs": 6, "tv_weight": 1e-3},
            "counter": {"lr": 3e-3, "batch_size": 16, "epochs": 30, "beta": 0.5},
        },
    },
}

DEFAULT_PRESET = "small"


def get_preset(name: str) -> dict[str, Any]:
    """Return a deep copy of preset ``name`` ('paper' or 'small')."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
