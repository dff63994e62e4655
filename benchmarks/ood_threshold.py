"""False alarms of the feature-distance threshold: set in sample or out of sample.

    python benchmarks/ood_threshold.py [--repeats 6]

The out-of-distribution check flags an image whose deep features lie
farther (Mahalanobis, shrunk covariance) from the calibration images' than
a threshold, a quantile of the calibration images' own distances. Measured
on synthetic Gaussian features shaped like the segmenter's (96 dimensions,
variances falling as 1/k^2), where every new image comes from the
calibration distribution, so each flag is a false alarm: the share of
20,000 new images above the threshold, at a nominal 10% (the 90th
percentile), with the threshold set on distances of the very images the
reference was fitted on (in sample, as celltally did until 2026-11-27) and
on distances measured out of sample
(``celltally.calibration.held_out_distances``: each image against a
reference fitted without its fold; 20 folds of image pairs). Prints a table
and writes benchmarks/results/ood_threshold.json. Needs no data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from provenance import stamp

from celltally.calibration import feature_distance, feature_reference, held_out_distances


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=6, help="calibration sets per size")
    parser.add_argument("--out", default="benchmarks/results/ood_threshold.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scale = 1.0 / np.arange(1, 97)

    def draw(n: int) -> np.ndarray:
        return rng.normal(size=(n, scale.size)) * scale

    new = draw(20_000)
    rows = []
    print(f"{'calibration images':>18} {'in sample':>10} {'out of sample':>14}  (nominal 10%)")
    for n in (20, 100, 1000):
        inside, outside = [], []
        for _ in range(args.repeats):
            x = draw(n)
            distances = feature_distance(new, feature_reference(x))
            in_sample = np.quantile(feature_distance(x, feature_reference(x)), 0.9)
            held = held_out_distances(x, groups=np.arange(n) // 2)
            inside.append(float(np.mean(distances > in_sample)))
            outside.append(float(np.mean(distances > np.quantile(held, 0.9))))
        row = {
            "n": n,
            "in_sample": float(np.mean(inside)),
            "out_of_sample": float(np.mean(outside)),
        }
        rows.append(row)
        print(f"{n:>18} {row['in_sample']:>10.1%} {row['out_of_sample']:>14.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"nominal": 0.1, "features": 96, "new_images": 20_000, "repeats": args.repeats}
    out.write_text(json.dumps(stamp({**record, "results": rows}), indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
