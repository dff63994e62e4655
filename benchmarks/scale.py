"""Other magnifications: does ``--diameter`` bring rescaled real nuclei back to their counts?

    python benchmarks/scale.py [--data ../shared/data/bbbc039] [--model nuclei]

A user's microscope may image nuclei larger or smaller than the training
frames (another objective, binning, camera). This benchmark fakes that with
the ``nuclei`` model's 40 held-out BBBC039 images (its 20 calibration and 20
test images: never trained on): each is resized by a factor g (0.5: a
2 x 2-binned camera; 2: twice the magnification; ``skimage.transform.rescale``,
anti-aliased when shrinking) and counted

* without scale information (the model assumes its own pixel scale),
* with ``--diameter`` set to the true object diameter (the model's
  ``object_diameter_px`` x g),
* with ``--diameter`` 10% too large and 10% too small (a rough estimate).

Per factor and condition it prints MAE, bias and the median of count /
truth, and writes benchmarks/results/scale.json. Skips cleanly when the data
(or the model) is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from bbbc039 import data_and_model  # noqa: E402 (benchmarks/, this script's folder)
from provenance import stamp  # noqa: E402 (benchmarks/, this script's folder)

from celltally import io  # noqa: E402
from celltally.counter import CellCounter  # noqa: E402
from celltally.metrics import count_metrics  # noqa: E402

FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
# condition name -> diameter given, as a multiple of the true diameter (None: not given)
CONDITIONS = {
    "no scale given": None,
    "true diameter": 1.0,
    "diameter +10%": 1.1,
    "diameter -10%": 1 / 1.1,
}


def resized(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` resized by ``factor`` (float32), as another magnification would show it."""
    from skimage.transform import rescale

    if factor == 1.0:
        return image.astype(np.float32)
    out = rescale(image.astype(np.float32), factor, anti_aliasing=factor < 1, preserve_range=True)
    return out.astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc039")
    parser.add_argument("--model", default="nuclei")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/scale.json"))
    args = parser.parse_args()
    data = Path(args.data)
    folder = data_and_model(data, args.model)
    if folder is None:
        return 0
    import torch

    torch.set_num_threads(2)
    plain = CellCounter.from_pretrained(folder, device="cpu")
    diameter = plain.scale.object_diameter_px
    if diameter is None:
        print(f"skipped: model {args.model} records no object_diameter_px in its config")
        return 0
    split = plain.config.get("training", {}).get("split", {})
    names = list(split.get("calibration", [])) + list(split.get("test", []))
    if not names:
        print(f"skipped: model {args.model} records no held-out images (training.split)")
        return 0
    table = io.read_counts_csv(data / "counts.csv")
    images = {n: io.read_image(data / "images" / n) for n in names}
    truth = [table[n] for n in names]

    results: list[dict] = []
    print(f"{len(names)} held-out images, model {args.model} (object diameter {diameter:.1f} px)")
    header = ("factor", "condition", "MAE", "bias", "median count/truth", "s")
    print("{:>6} {:<16} {:>7} {:>7} {:>19} {:>6}".format(*header))
    for factor in FACTORS:
        scaled = [resized(images[n], factor) for n in names]
        for condition, multiple in CONDITIONS.items():
            if multiple is None:
                counter = plain
                given = None
            else:
                given = diameter * factor * multiple
                counter = CellCounter.from_pretrained(folder, device="cpu", diameter=given)
            start = time.perf_counter()
            counts = [counter.count(image).count for image in scaled]
            seconds = time.perf_counter() - start
            m = count_metrics(truth, counts)
            ratio = float(np.median(np.array(counts) / np.maximum(truth, 1)))
            results.append(
                {
                    "factor": factor,
                    "condition": condition,
                    "diameter_given_px": None if given is None else round(given, 2),
                    "mae": round(m["mae"], 3),
                    "bias": round(m["bias"], 3),
                    "max_abs_error": round(m["max_abs_error"], 2),
                    "median_count_over_truth": round(ratio, 4),
                    "seconds": round(seconds, 1),
                }
            )
            r = results[-1]
            print(
                f"{factor:>6} {condition:<16} {r['mae']:>7.2f} {r['bias']:>+7.2f} "
                f"{r['median_count_over_truth']:>19.3f} {seconds:>6.0f}",
                flush=True,
            )
    report = {
        "model": args.model,
        "data": str(data),
        "images": len(names),
        "object_diameter_px": diameter,
        "mean_truth": float(np.mean(truth)),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(report), indent=1) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
