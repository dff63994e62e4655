"""Held-out accuracy on real BBBC005: the network beside two classical baselines.

Split by scene via the site: sites 9-10 are the test scenes (never used in
training or calibration of the shipped model), sites 1-8 fit the baselines:
the mean-intensity fit's polynomial, and Otsu + watershed's peak spacing
(``min_distance``, chosen per blur x stain group from MIN_DISTANCES by its MAE
on sites 1-8, as CellProfiler's typical-diameter setting is tuned by hand).

    python benchmarks/bbbc005_accuracy.py [--data ../shared/data/bbbc005] [--model bbbc005]

Prints a table per blur x stain group and writes benchmarks/results/bbbc005_accuracy.json.
Skips cleanly when the data folder is absent.
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
from celltally.evaluation import evaluate_folder
from celltally.metrics import format_table, grouped_metrics
from celltally.pools import process_map

TEST_SITES = {9, 10}
#: Peak separations (px) tried for Otsu + watershed; the best on sites 1-8 is used.
MIN_DISTANCES = (2, 3, 4, 5, 6, 8, 10, 12)


def _otsu_counts(path: Path) -> list[int]:
    """Otsu + watershed counts of one image at every spacing of MIN_DISTANCES."""
    image = io.read_image(path)
    return [otsu_watershed_count(image, min_distance=d, opening=True) for d in MIN_DISTANCES]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument("--model", default="bbbc005")
    parser.add_argument("--out", default="benchmarks/results/bbbc005_accuracy.json")
    parser.add_argument("--workers", type=int, default=2, help="Processes for the baseline.")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.exists():
        print(f"skipped: {data} not found (real BBBC005 is not part of the repository)")
        return 0
    files = io.list_images([io.images_folder(data)])
    records = []
    for path in files:
        name = naming.parse_name(path.name)
        if None in (name.count, name.blur, name.stain, name.site):
            print(f"error: {path}: not a BBBC005 name (_C<count>_F<blur>_s<site>_w<stain>)")
            return 2
        image = io.read_image(path)
        records.append(
            {
                "file": path.name,
                "true": float(name.count),
                "blur": name.blur,
                "stain": name.stain,
                "site": name.site,
                "mean": float(image.mean()),
            }
        )
    otsu = list(process_map(_otsu_counts, files, workers=args.workers, chunksize=8))
    test = [r for r in records if r["site"] in TEST_SITES]
    fit = [r for r in records if r["site"] not in TEST_SITES]

    # Mean-intensity regression: per blur x stain quadratic fit on sites 1-8.
    intensity_rows = []
    for r in test:
        group = [f for f in fit if f["blur"] == r["blur"] and f["stain"] == r["stain"]]
        coef = np.polyfit([g["mean"] for g in group], [g["true"] for g in group], 2)
        intensity_rows.append({**r, "count": float(np.polyval(coef, r["mean"]))})
    # Otsu + watershed: per blur x stain, the spacing with the lowest MAE on sites 1-8.
    spacing = {}
    for key in sorted({(r["blur"], r["stain"]) for r in records}):
        group = [i for i, r in enumerate(records) if (r["blur"], r["stain"]) == key]
        fitted = [i for i in group if records[i]["site"] not in TEST_SITES]
        errors = [
            np.mean([abs(otsu[i][k] - records[i]["true"]) for i in fitted])
            for k in range(len(MIN_DISTANCES))
        ]
        spacing[key] = int(np.argmin(errors))
    classical_rows = [
        {**r, "count": float(otsu[i][spacing[(r["blur"], r["stain"])]])}
        for i, r in enumerate(records)
        if r["site"] in TEST_SITES
    ]
    chosen = {f"F{b} w{s}": MIN_DISTANCES[k] for (b, s), k in spacing.items()}
    print(f"Otsu + watershed peak spacing chosen on sites 1-8 (px): {chosen}")
    net = evaluate_folder(data, model=args.model, sites=TEST_SITES)
    by = ("blur", "stain")
    results = {
        "network": net["metrics"],
        "otsu_watershed": grouped_metrics(classical_rows, by=by),
        "mean_intensity": grouped_metrics(intensity_rows, by=by),
    }
    for title, metrics in results.items():
        print(f"\n== {title} (held-out sites 9-10, {len(test)} images) ==")
        print(format_table(metrics))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            stamp(
                {
                    "model": args.model,
                    "test_sites": sorted(TEST_SITES),
                    "n_test": len(test),
                    "otsu_watershed_min_distance": chosen,
                    **results,
                }
            ),
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
