"""Other magnifications with the ``bbbc005`` model: does ``--rescale`` bring resized frames back?

    python benchmarks/rescale.py [--data ../shared/data/bbbc005] [--model bbbc005]

The ``bbbc005`` model records no object diameter (its w1 nuclei and w2 cell
bodies differ about 2x in size), so ``--diameter`` cannot rescale for it;
``--rescale FACTOR`` gives the factor itself. This benchmark resizes the
288 real BBBC005 test images (sites 9-10, never trained or calibrated on) by
a factor g (0.5: a 2 x 2-binned camera; 2: twice the magnification; as
``benchmarks/scale.py`` does) and counts them

* without scale information (the model assumes its own pixel scale),
* with ``--rescale 1/g`` (the true factor),
* with the factor 10% too large and 10% too small.

Per factor and condition it prints MAE (overall and per stain), bias, the
median of count / truth and the share of images the out-of-distribution
check flagged, and writes benchmarks/results/rescale.json. Skips cleanly
when the data are absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from provenance import stamp  # noqa: E402 (benchmarks/, this script's folder)
from scale import resized  # noqa: E402 (benchmarks/, this script's folder)

from celltally import io, naming  # noqa: E402
from celltally.counter import CellCounter  # noqa: E402
from celltally.evaluation import labelled_files  # noqa: E402
from celltally.metrics import count_metrics  # noqa: E402

FACTORS = (0.5, 0.7, 1.0, 1.5, 2.0)
# condition name -> --rescale given, as a multiple of the true factor (None: not given)
CONDITIONS = {
    "no scale given": None,
    "true --rescale": 1.0,
    "--rescale +10%": 1.1,
    "--rescale -10%": 1 / 1.1,
}
TEST_SITES = {9, 10}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument("--model", default="bbbc005")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/rescale.json"))
    args = parser.parse_args()
    data = Path(args.data)
    if not data.exists():
        print(f"skipped: {data} not found")
        return 0
    import torch

    torch.set_num_threads(2)
    files = [p for p, _ in labelled_files(data) if naming.parse_name(p.name).site in TEST_SITES]
    names = [naming.parse_name(p.name) for p in files]
    truth = np.array([float(n.count) for n in names])
    stains = np.array([n.stain for n in names])
    images = [io.read_image(p) for p in files]
    plain = CellCounter.from_pretrained(args.model, device="cpu")

    results: list[dict] = []
    print(f"{len(files)} BBBC005 test images (sites 9-10), model {args.model}")
    header = ("g", "condition", "MAE", "w1", "w2", "bias", "count/truth", "flagged", "s")
    print("{:>4} {:<16} {:>7} {:>6} {:>6} {:>7} {:>12} {:>8} {:>5}".format(*header))
    for factor in FACTORS:
        scaled = [resized(image, factor) for image in images]
        for condition, multiple in CONDITIONS.items():
            if factor == 1.0 and multiple not in (None, 1.1):
                continue  # at the model's own scale: no factor, and one wrong one
            given = None if multiple is None else multiple / factor
            counter = (
                plain
                if given is None
                else (CellCounter.from_pretrained(args.model, device="cpu", rescale=given))
            )
            start = time.perf_counter()
            counted = [counter.count(image) for image in scaled]
            seconds = time.perf_counter() - start
            counts = np.array([r.count for r in counted])
            m = count_metrics(truth, counts)
            per_stain = {
                f"w{s}": round(float(np.mean(np.abs(counts - truth)[stains == s])), 3)
                for s in sorted(set(stains.tolist()))
            }
            results.append(
                {
                    "factor": factor,
                    "condition": condition,
                    "rescale_given": None if given is None else round(given, 4),
                    "mae": round(m["mae"], 3),
                    "mae_by_stain": per_stain,
                    "bias": round(m["bias"], 3),
                    "max_abs_error": round(m["max_abs_error"], 2),
                    "median_count_over_truth": round(
                        float(np.median(counts / np.maximum(truth, 1))), 4
                    ),
                    "flagged": round(float(np.mean([bool(r.warning) for r in counted])), 4),
                    "seconds": round(seconds, 1),
                }
            )
            r = results[-1]
            print(
                f"{factor:>4} {condition:<16} {r['mae']:>7.2f} {per_stain.get('w1', 0):>6.2f} "
                f"{per_stain.get('w2', 0):>6.2f} {r['bias']:>+7.2f} "
                f"{r['median_count_over_truth']:>12.3f} {r['flagged']:>8.1%} {seconds:>5.0f}",
                flush=True,
            )
    report = {"model": args.model, "data": str(data), "images": len(files), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(report), indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
