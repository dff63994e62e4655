"""One Gaussian of deep features, or one per stain? Decided on BBBC005 calibration sites 1-8.

    python benchmarks/ood_classes.py [--data ../shared/data/bbbc005] [--model bbbc005]

The out-of-distribution check compares an image's deep features (the
segmenter's deepest block, pooled) with those of the calibration images.
This script measures, on calibration sites 1-8 only (the test sites 9-10
play no part), how often the check flags

* the true-scale frames themselves, each against a reference fitted
  without its scene's fold (20 folds by scene, as the threshold is set):
  false alarms, 1% by construction;
* the same frames shrunk to 0.7x and 0.5x (the model miscounts them: hits);
* their central half crops at the true scale (false alarms),

with one Gaussian of all frames or one per stain (w1 nuclei, w2 cell
bodies), per stain, and writes benchmarks/results/ood_classes.json. The
threshold is the 99th percentile of the cross-fitted distances, as in
``celltally.uncertainty.calibrate_model``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from provenance import stamp  # noqa: E402 (benchmarks/, this script's folder)

from celltally import io, naming  # noqa: E402
from celltally.calibration import (  # noqa: E402
    feature_distance,
    feature_reference,
    held_out_distances,
)
from celltally.counter import CellCounter  # noqa: E402
from celltally.evaluation import labelled_files  # noqa: E402

CALIBRATION_SITES = set(range(1, 9))
VARIANTS = ("0.7x", "0.5x", "crop")


def embeddings(counter: CellCounter, files: list[Path]) -> dict[str, np.ndarray]:
    from skimage.transform import rescale

    rows: dict[str, list] = {"1x": [], **{v: [] for v in VARIANTS}}
    for path in files:
        image = io.read_image(path).astype(np.float32)
        h, w = image.shape
        frames = {
            "1x": image,
            "0.7x": rescale(image, 0.7, anti_aliasing=True, preserve_range=True),
            "0.5x": rescale(image, 0.5, anti_aliasing=True, preserve_range=True),
            "crop": image[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2],
        }
        for name, frame in frames.items():
            rows[name].append(counter.embed([counter.prepare_any(frame)])[0])
    return {k: np.stack(v) for k, v in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument("--model", default="bbbc005")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ood_classes.json"))
    args = parser.parse_args()
    data = Path(args.data)
    if not data.exists():
        print(f"skipped: {data} not found")
        return 0
    import torch

    torch.set_num_threads(2)
    files = [
        p for p, _ in labelled_files(data) if naming.parse_name(p.name).site in CALIBRATION_SITES
    ]
    names = [naming.parse_name(p.name) for p in files]
    stains = np.array([str(n.stain) for n in names])
    scenes = [naming.scene_id(p.name) for p in files]
    counter = CellCounter.from_pretrained(args.model, device="cpu")
    x = embeddings(counter, files)
    results = {}
    print(f"{len(files)} frames of calibration sites 1-8; share flagged, w1 / w2")
    print(f"{'reference':<16}" + "".join(f"{v:>16}" for v in ("1x (held out)", *VARIANTS)))
    for label, classes in (("one Gaussian", None), ("one per stain", list(stains))):
        held = held_out_distances(x["1x"], groups=scenes, classes=classes)
        limit = float(np.quantile(held, 0.99))
        reference = feature_reference(x["1x"], classes=classes)
        rates = {"1x (held out)": held > limit}
        for v in VARIANTS:
            rates[v] = feature_distance(x[v], reference) > limit
        results[label] = {
            "threshold": round(limit, 4),
            **{
                k: {f"w{s}": round(float(np.mean(r[stains == s])), 4) for s in ("1", "2")}
                for k, r in rates.items()
            },
        }
        shown = [
            f"{v['w1']:.2f} / {v['w2']:.2f}" for k, v in results[label].items() if k != "threshold"
        ]
        print(f"{label:<16}" + "".join(f"{s:>16}" for s in shown), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(stamp({"model": args.model, "frames": len(files), "results": results}), indent=1)
        + "\n"
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
