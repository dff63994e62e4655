"""How much does resolution limit counting? Classical counts of real BBBC005 at three scales.

    python benchmarks/resolution.py [--data ../shared/data/bbbc005]

The shipped models' counter reads its planes at the mask's size, half the
model input (BBBC005: 96 x 128 for a 520 x 696 frame, 5.4 raw px per
counter px). This measures what is lost on the way, with no network
involved: Otsu + watershed (``celltally.baselines``) counts the held-out
in-focus images (sites 9-10, F1) of both stains after area resizing to the
model input (192 x 256) and to the counter's grid (96 x 128), beside the
full frame. Watershed seeds must be ``min_distance`` apart, so each scale
gets the best of a few distances (chosen on the test images themselves:
this is an upper bound on what the classical method gets at that scale,
not a fair baseline).

Prints a table and writes benchmarks/results/resolution.json. Skips cleanly
when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from provenance import stamp

from celltally import io, naming
from celltally.baselines import otsu_watershed_count
from celltally.evaluation import labelled_files
from celltally.transforms import resize_area

TEST_SITES = {9, 10}
#: (name, size or None for the raw frame, min_area in px at that scale, distances tried)
SCALES = (
    ("full frame 520 x 696", None, 20, (4, 6, 8, 12)),
    ("model input 192 x 256", (192, 256), 3, (2, 3, 4, 6)),
    ("counter grid 96 x 128", (96, 128), 1, (1, 2, 3, 4)),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument("--out", default="benchmarks/results/resolution.json")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.exists():
        print(f"skipped: {data} not found (real BBBC005 is not part of the repository)")
        return 0
    pairs = labelled_files(data)
    results: dict[str, dict] = {}
    for stain in (1, 2):
        chosen = [
            (p, c)
            for p, c in pairs
            if (n := naming.parse_name(p.name)).site in TEST_SITES
            and n.blur == 1
            and n.stain == stain
        ]
        truth = np.array([c for _, c in chosen])
        images = [io.read_image(p).astype(np.float32) for p, _ in chosen]
        for name, size, min_area, distances in SCALES:
            scaled = images if size is None else [resize_area(im, size) for im in images]
            by_distance = {}
            for distance in distances:
                counts = np.array(
                    [
                        otsu_watershed_count(
                            im, min_distance=distance, min_area=min_area, opening=size is None
                        )
                        for im in scaled
                    ]
                )
                by_distance[str(distance)] = float(np.mean(np.abs(counts - truth)))
            best = min(by_distance, key=by_distance.get)
            results[f"F1 w{stain}, {name}"] = {
                "n": len(chosen),
                "best_min_distance": int(best),
                "mae": by_distance[best],
                "mae_by_min_distance": by_distance,
            }
    print(f"{'held-out F1 images (sites 9-10)':<42} {'best MAE':>9}  min_distance")
    for key, row in results.items():
        print(f"{key:<42} {row['mae']:>9.2f}  {row['best_min_distance']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp({"data": str(data), "results": results}), indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
