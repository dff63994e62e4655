"""Per-well totals on real BBBC005: do the wells' intervals hold their truths?

    python benchmarks/wells.py [--data ../shared/data/bbbc005] [--model bbbc005]

A BBBC005 well (row x column) is imaged at sites 1-10 in two stains; a well's
total is the sum of its sites' counts (each stain separately), as
``celltally count --wells`` and ``celltally wells`` compute it. Two measures,
each out of sample:

* test: the model as shipped (intervals and within-well correlation fitted on
  its calibration sites 1-8) on the wells' test sites 9-10 (144 well x stain
  totals of 2 images);
* swapped halves: intervals and correlation refitted on sites 1-4, totals over
  sites 5-8 (4 images per well), and the other way round (144 totals each way).

Each at 0.8 / 0.9 / 0.95, with the correlation as fitted, 0 (errors taken as
independent) and 1 (stds simply added), by the images' conformal multiplier;
and ``temperature``: the fitted correlation with the temperature-scaled Gaussian
multiplier (T z) instead. Prints a table and writes
benchmarks/results/wells.json. Skips cleanly without the data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from celltally import naming
from celltally.calibration import calibrate, fit_group_correlation, interval_multiplier
from celltally.counter import CellCounter
from celltally.evaluation import labelled_files, summarize_wells
from celltally.wells import aggregate_wells, well_key

sys.path.insert(0, str(Path(__file__).parent))
from calibration import predict as predict_pairs  # noqa: E402  (the sibling benchmark)
from provenance import stamp

LEVELS = (0.8, 0.9, 0.95)


def predict(counter: CellCounter, data: Path) -> dict[str, np.ndarray]:
    """Truths, counts, stds, names and sites of every labelled image (calibration.py's count)."""
    pred = predict_pairs(counter, labelled_files(data))
    pred["name"] = np.array(pred.pop("names"))
    pred["site"] = np.array([naming.parse_name(n).site for n in pred["name"]])
    return pred


def totals(pred: dict, sel: np.ndarray, multiplier: float, correlation: float) -> dict:
    """Coverage, width and error of the well totals over the images ``sel``."""
    rows = [
        {
            "file": name,
            "count": f"{mu:.4f}",
            "std": f"{sigma:.6f}",
            "high": f"{mu + multiplier * sigma:.6f}",
            "true_count": f"{y:g}",
            "model": "m",
            "level": "",  # one level per call: its multiplier is given
        }
        for name, y, mu, sigma in zip(
            pred["name"][sel], pred["y"][sel], pred["mu"][sel], pred["sigma"][sel], strict=True
        )
    ]
    return summarize_wells(aggregate_wells(rows, correlation=correlation)[0])


def measure(pred: dict, fit: np.ndarray, held: np.ndarray) -> dict:
    """Fit intervals and correlation on images ``fit``; totals over images ``held``."""
    block = calibrate(pred["y"][fit], pred["mu"][fit], pred["sigma"][fit])
    keys = [well_key(n) for n in pred["name"][fit]]
    fitted = fit_group_correlation(pred["y"][fit], pred["mu"][fit], pred["sigma"][fit], keys)
    rho = fitted["value"] if fitted else 0.0
    out: dict = {"correlation": rho}
    for name, value in (("fitted", rho), ("independent", 0.0), ("added", 1.0)):
        out[name] = {
            f"{lv:g}": totals(pred, held, interval_multiplier(block, lv), value) for lv in LEVELS
        }
    # the fitted correlation with a Gaussian multiplier scaled by the temperature (T z):
    # the limit a sum over many sites tends to, instead of single images' conformal one
    out["temperature"] = {
        f"{lv:g}": totals(pred, held, interval_multiplier(block, lv, "temperature"), rho)
        for lv in LEVELS
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument("--model", default="bbbc005")
    parser.add_argument("--out", default="benchmarks/results/wells.json")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.exists():
        print(f"skipped: {data} not found (real BBBC005 is not part of the repository)")
        return 0
    t0 = time.perf_counter()
    counter = CellCounter.from_pretrained(args.model)
    pred = predict(counter, data)
    site = pred["site"]
    stored = counter.calibration.get("well_correlation") or {}
    results = {
        "test sites 9-10 (fitted on 1-8)": measure(pred, site <= 8, site >= 9),
        "sites 5-8 (fitted on 1-4)": measure(pred, site <= 4, (site >= 5) & (site <= 8)),
        "sites 1-4 (fitted on 5-8)": measure(pred, (site >= 5) & (site <= 8), site <= 4),
    }
    print(
        f"model {args.model}: stored within-well correlation {stored.get('value')} "
        f"({stored.get('groups')} calibration wells)"
    )
    print(
        f"{'held-out wells':<34} {'rho':>6}  {'errors':<12}"
        + "".join(f" cover@{lv:g}" for lv in LEVELS)
        + "  ±95%   MAE"
    )
    for name, res in results.items():
        for kind in ("fitted", "independent", "added", "temperature"):
            rho = {"independent": 0.0, "added": 1.0}.get(kind, res["correlation"])
            cells = res[kind]
            print(
                f"{name:<34} {rho:>6.3f}  {kind:<12}"
                + "".join(f" {cells[f'{lv:g}']['coverage']:>8.3f}" for lv in LEVELS)
                + f"  {cells['0.95']['mean_half_width']:>5.2f}  {cells['0.95']['mae']:.2f}"
            )
    first = next(iter(results.values()))["fitted"]["0.95"]
    print(f"({first['n_wells']} test totals of {first['images_per_well']:.0f} images each)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "stored_correlation": stored,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    out.write_text(json.dumps(stamp(record), indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
