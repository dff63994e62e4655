"""Out-of-distribution warnings: how often they fire on ordinary and on strange images.

    python benchmarks/ood.py [--model bbbc005] [--bbbc005 ../shared/data/bbbc005]
        [--bbbc039 ../shared/data/bbbc039]

Counts, with the model's stored thresholds, (1) its held-out BBBC005 test
images (sites 9-10: warnings there are false alarms), (2) BBBC039's real
nuclei images (another microscope and stain: a different distribution), and
(3) generated strange frames: uniform noise, a checkerboard, an intensity
gradient and a blank frame, 696 x 520. Prints the warning rate of each and
writes benchmarks/results/ood.json. Real data sets are skipped when absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from celltally import naming
from celltally.counter import CellCounter
from celltally.evaluation import labelled_files

TEST_SITES = {9, 10}


def strange_frames(shape: tuple[int, int] = (520, 696), seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return {
        "uniform noise": rng.integers(0, 256, shape).astype(np.uint8),
        "checkerboard": (((yy // 32) + (xx // 32)) % 2 * 255).astype(np.uint8),
        "gradient": (xx / xx.max() * 255).astype(np.uint8),
        "blank": np.zeros(shape, dtype=np.uint8),
    }


def warning_rate(counter: CellCounter, paths: list[Path]) -> dict[str, float | int]:
    flagged = total = 0
    for _, result in counter.count_paths(paths):
        if isinstance(result, Exception):
            raise result
        total += 1
        flagged += bool(result.warning)
    return {"n": total, "warned": flagged, "rate": flagged / max(total, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bbbc005")
    parser.add_argument("--bbbc005", default="../shared/data/bbbc005")
    parser.add_argument("--bbbc039", default="../shared/data/bbbc039")
    parser.add_argument("--out", default="benchmarks/results/ood.json")
    args = parser.parse_args()
    counter = CellCounter.from_pretrained(args.model)
    results: dict[str, dict] = {}
    bbbc005 = Path(args.bbbc005)
    if bbbc005.exists():
        files = [p for p, _ in labelled_files(bbbc005)]
        test = [p for p in files if naming.parse_name(p.name).site in TEST_SITES]
        results["BBBC005 held-out sites 9-10 (false alarms)"] = warning_rate(counter, test)
    bbbc039 = Path(args.bbbc039)
    if bbbc039.exists():
        files = [p for p, _ in labelled_files(bbbc039)]
        results["BBBC039 real nuclei (other data set)"] = warning_rate(counter, files)
    for name, frame in strange_frames().items():
        warned = bool(counter.count(frame).warning)
        results[name] = {"n": 1, "warned": int(warned), "rate": float(warned)}
    print(f"{'input':<45}{'n':>6}{'warned':>8}{'rate':>8}")
    for name, r in results.items():
        print(f"{name:<45}{r['n']:>6}{r['warned']:>8}{r['rate']:>8.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
