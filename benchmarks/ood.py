"""Out-of-distribution warnings: how often they fire on ordinary and on strange images.

    python benchmarks/ood.py [--model bbbc005] [--bbbc005 ../shared/data/bbbc005]
        [--bbbc039 ../shared/data/bbbc039]

Counts, with the model's stored thresholds, (1) its held-out BBBC005 test
images (sites 9-10: warnings there are false alarms), (2) BBBC039's real
nuclei images (another microscope and stain: a different distribution), and
(3) generated strange frames: uniform noise, a checkerboard, an intensity
gradient and a blank frame, 696 x 520, and (4) the BBBC005 test images at
another size, counted in tiles: shrunk to 0.5x and 0.7x (as if imaged with
another objective or binned: the cells look smaller, so warnings are hits),
enlarged 1.5x and 2x (a higher magnification: hits too),
and at their true scale as central 348 x 260 crops and 2 x 2 mosaics of one
stain
(warnings there are false alarms). Prints the warning rate of each (of the
BBBC005 variants also per stain, with the MAE of the resized ones) and
writes benchmarks/results/ood.json. Real data sets are skipped when absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
from provenance import stamp

from celltally import naming
from celltally.calibration import SIZE_HINT
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


def variants(paths: list[Path]) -> dict[str, list[tuple[np.ndarray, float]]]:
    """The test frames at other scales and sizes, with their true counts (None: unknown)."""
    from skimage.transform import rescale

    from celltally import io

    frames = []
    for p in paths:
        name = naming.parse_name(p.name)
        frames.append((io.read_image(p).astype(np.float32), name.count, name.stain))
    out: dict[str, list] = {
        "shrunk 0.5x": [],
        "shrunk 0.7x": [],
        "enlarged 1.5x": [],
        "enlarged 2x": [],
        "crop": [],
        "mosaic": [],
    }
    for image, count, stain in frames:
        for factor in (0.5, 0.7):
            small = rescale(image, factor, anti_aliasing=True, preserve_range=True)
            out[f"shrunk {factor}x"].append((small, count, stain))
        for factor in (1.5, 2):  # made when counted: 288 of them would fill 2.6 GB
            large = partial(rescale, image, factor, preserve_range=True)
            out[f"enlarged {factor}x"].append((large, count, stain))
        h, w = image.shape
        crop = image[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2]
        out["crop"].append((crop, None, stain))
    # a tiled well is one channel: each mosaic is 4 frames of one stain (until
    # 2026-11-27 it was 4 neighbours in file order, w1 and w2 mixed, a montage no
    # microscope makes)
    for stain in sorted({s for _, _, s in frames}, key=str):
        same = [f for f in frames if f[2] == stain]
        for k in range(0, len(same) - 3, 4):
            four = [f for f, _, _ in same[k : k + 4]]
            total = sum(c for _, c, _ in same[k : k + 4])
            mosaic = np.block([[four[0], four[1]], [four[2], four[3]]])
            out["mosaic"].append((mosaic, total, stain))
    return out


def array_warning_rate(counter: CellCounter, items: list[tuple]) -> dict:
    """Warning rate over (image, true count or None, stain or None) items, also per stain.

    An image may be given as a function that makes it (the enlarged frames)."""
    flagged, named, ratios, by_stain = 0, 0, [], {}
    for image, truth, stain in items:
        result = counter.count(image() if callable(image) else image)
        warned = bool(result.warning)
        flagged += warned
        named += SIZE_HINT in result.warning
        if truth:
            ratios.append(result.count / truth)
        if stain is not None:
            group = by_stain.setdefault(f"w{stain}", {"n": 0, "warned": 0, "errors": []})
            group["n"] += 1
            group["warned"] += warned
            if truth is not None:
                group["errors"].append(abs(result.count - truth))
    out = {"n": len(items), "warned": flagged, "rate": flagged / max(len(items), 1)}
    out["size_named"] = named  # warnings that name the objects' size and a factor
    if ratios:
        out["median_count_over_truth"] = float(np.median(ratios))
    for group in by_stain.values():
        group["rate"] = group["warned"] / group["n"]
        errors = group.pop("errors")
        if errors:
            group["mae"] = float(np.mean(errors))
    if by_stain:
        out["by_stain"] = dict(sorted(by_stain.items()))
    return out


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
        names = {
            "shrunk 0.5x": "same, shrunk 0.5x (cells too small: hits)",
            "shrunk 0.7x": "same, shrunk 0.7x (cells too small: hits)",
            "enlarged 1.5x": "same, enlarged 1.5x (cells too large: hits)",
            "enlarged 2x": "same, enlarged 2x (cells too large: hits)",
            "crop": "same, central half crops, true scale (false alarms)",
            "mosaic": "same, 2 x 2 mosaics, true scale (false alarms)",
        }
        for key, items in variants(test).items():
            results[names[key]] = array_warning_rate(counter, items)
    bbbc039 = Path(args.bbbc039)
    if bbbc039.exists():
        files = [p for p, _ in labelled_files(bbbc039)]
        results["BBBC039 real nuclei (other data set)"] = warning_rate(counter, files)
    for name, frame in strange_frames().items():
        warned = bool(counter.count(frame).warning)
        results[name] = {"n": 1, "warned": int(warned), "rate": float(warned)}
    print(f"{'input':<56}{'n':>6}{'warned':>8}{'rate':>8}  count / truth")
    for name, r in results.items():
        ratio = r.get("median_count_over_truth")
        shown = f"  {ratio:.2f}" if ratio is not None else ""
        named = f"  (size named in {r['size_named']})" if r.get("size_named") else ""
        print(f"{name:<56}{r['n']:>6}{r['warned']:>8}{r['rate']:>8.1%}{shown}{named}")
        for stain, g in (r.get("by_stain") or {}).items():
            mae = f"  MAE {g['mae']:.2f}" if "mae" in g else ""
            print(f"{'  ' + stain:<56}{g['n']:>6}{g['warned']:>8}{g['rate']:>8.1%}{mae}")
    out = Path(args.out)
    missing = [str(p) for p in (bbbc005, bbbc039) if not p.exists()]
    if missing and args.out == parser.get_default("out"):
        # the committed results hold the real sets' rows: a partial run must not replace them
        shown = ", ".join(missing)
        print(f"not written to {out}: {shown} not found; give --out to keep these rows")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp({"model": args.model, "results": results}), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
