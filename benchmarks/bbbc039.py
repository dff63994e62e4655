"""Real nuclei (BBBC039): held-out accuracy, tiled vs whole-image counts, memory on 4096 x 4096.

    python benchmarks/bbbc039.py [--data ../shared/data/bbbc039] [--model nuclei] [--epistemic]

1. Accuracy on the model's 20 held-out test images (the list is in the model
   folder's config.json, chosen by a seeded hash, see scripts/train_nuclei.py):
   MAE, max error, bias, 95% interval coverage; beside Otsu + watershed
   (CellProfiler IdentifyPrimaryObjects style), whose peak spacing is chosen
   on the 60 training images.
2. Tiled vs whole: 2048 x 2048 mosaics of real held-out images (12 frames in
   a 4 x 3 grid with random flips, cropped), counted once in 512-px windows
   with 64-px margins (model px) and once in a single whole-image pass; and
   the full 2080 x 2088 mosaics against the sum of their 12 frames counted
   one by one. The truth of a crop is the sum of its instances' area
   fractions inside it.
3. Peak memory (max RSS of a fresh process) counting one 4096 x 4096 16-bit
   image with the default tiles, and with one whole-image pass.
4. What a perfect foreground mask allows: the annotated union masks of the 60
   training images, counted by connected components and by distance-transform
   watershed (the best peak spacing), against their instance counts.

Prints tables and writes benchmarks/results/bbbc039.json (with --epistemic:
bbbc039_epistemic.json). Skips cleanly when
the data (or the model) is absent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from provenance import stamp  # noqa: E402 (benchmarks/, this script's folder)
from train_nuclei import read_instances, split_names  # noqa: E402

from celltally import io  # noqa: E402
from celltally.baselines import otsu_watershed_count as _otsu_watershed  # noqa: E402
from celltally.counter import CellCounter, resolve_model  # noqa: E402
from celltally.metrics import count_metrics  # noqa: E402
from celltally.tiling import count_density  # noqa: E402

MOSAIC_GRID = (4, 3)  # rows x columns of 520 x 696 frames: 2080 x 2088, cropped to 2048 x 2048
CROP = 2048


def otsu_watershed_count(image: np.ndarray, *, min_distance: int) -> int:
    """The classical baseline with hole filling and a 30 px minimum object area."""
    return _otsu_watershed(image, min_distance=min_distance, min_area=30, fill_holes=True)


def crop_truths(labels: np.ndarray, window: tuple[slice, slice]) -> tuple[int, float]:
    """Instances visible in ``window`` (BBBC039's convention: a cut nucleus counts 1),
    and the sum of the fractions of their areas inside it."""
    areas = np.bincount(labels.ravel())
    inside = np.bincount(labels[window].ravel(), minlength=areas.size)
    seen = (inside[1:] > 0) & (areas[1:] > 0)
    return int(seen.sum()), float((inside[1:][seen] / areas[1:][seen]).sum())


def mosaic(frames, rng):
    """Stitch frames (image, labels) into a MOSAIC_GRID mosaic with random flips."""
    rows, cols = MOSAIC_GRID
    picks = rng.choice(len(frames), size=rows * cols, replace=False)
    tiles_i, tiles_l, offset = [], [], 0
    for k in picks:
        image, labels = frames[k]
        flip = rng.integers(0, 4)
        dims = {0: (), 1: (0,), 2: (1,), 3: (0, 1)}[int(flip)]
        image = np.flip(image, dims) if dims else image
        labels = np.flip(labels, dims) if dims else labels
        tiles_i.append(image)
        tiles_l.append(np.where(labels > 0, labels + offset, 0))
        offset += int(labels.max())
    big_i = np.block([[tiles_i[r * cols + c] for c in range(cols)] for r in range(rows)])
    big_l = np.block([[tiles_l[r * cols + c] for c in range(cols)] for r in range(rows)])
    return big_i, big_l, [tiles_i, picks]


MEMORY_CODE = """
import resource, sys, time
import numpy as np, tifffile, torch
torch.set_num_threads(1)
from celltally.counter import CellCounter
counter = CellCounter.from_pretrained(sys.argv[1], device="cpu")
image = tifffile.imread(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if sys.argv[3] == "whole":
    from celltally.scale import model_shape
    from celltally.tiling import count_density
    from celltally.transforms import prepare_image
    shape = model_shape(image.shape, counter.scale)
    prepared = prepare_image(image, size=shape, norm=counter.norm)
    count = count_density(counter.model, prepared, tile=None).count
else:
    count = counter.count(image).count
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{count} {before / 1024:.1f} {peak / 1024:.1f} {seconds:.2f}")
"""


def annotated_mask_counts(data: Path, names: list[str]) -> dict:
    """Count the union of each image's annotated instances: components and watershed."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    truth, components, peaks = [], [], {5: [], 7: [], 9: []}
    for name in names:
        labels = read_instances(data / "masks" / (Path(name).stem + ".png"))
        foreground = labels > 0
        blobs, n_blobs = ndi.label(foreground)
        smooth = ndi.gaussian_filter(ndi.distance_transform_edt(foreground), 1)
        truth.append(int(len(np.unique(labels)) - 1))
        components.append(n_blobs)
        for md in peaks:
            found = peak_local_max(smooth, min_distance=md, labels=blobs, exclude_border=False)
            peaks[md].append(len(found))
    by_md = {md: count_metrics(truth, p)["mae"] for md, p in peaks.items()}
    best = min(by_md, key=by_md.get)
    return {
        "n": len(names),
        "components": count_metrics(truth, components),
        "watershed": {**count_metrics(truth, peaks[best]), "min_distance": best},
        "watershed_mae_by_min_distance": by_md,
    }


def peak_memory(model: str, path: Path, mode: str) -> dict:
    """Max RSS (MiB) of a fresh process counting ``path`` ('tiles' or one 'whole' pass)."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CODE, model, str(path), mode],
        capture_output=True,
        text=True,
        check=True,
    )
    count, before, peak, seconds = out.stdout.split()
    return {
        "windows": mode,
        "count": round(float(count), 2),
        "rss_before_count_mib": float(before),
        "peak_rss_mib": float(peak),
        "seconds": float(seconds),
    }


def data_and_model(data: Path, model: str) -> Path | None:
    """The model folder, or None (with a 'skipped' line) when the data or the model is absent."""
    if not (data / "counts.csv").exists():
        print(f"skipped: {data} not found (real BBBC039 is not part of the repository)")
        return None
    try:
        return resolve_model(model)
    except io.InputError as err:
        print(f"skipped: {err}")
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc039")
    parser.add_argument("--model", default="nuclei")
    parser.add_argument("--mosaics", type=int, default=5)
    parser.add_argument(
        "--out",
        help="JSON to write (default: benchmarks/results/bbbc039.json, "
        "or bbbc039_epistemic.json with --epistemic)",
    )
    parser.add_argument(
        "--epistemic", action="store_true", help="count with the model's ensemble (mean of heads)"
    )
    args = parser.parse_args()
    data = Path(args.data)
    folder = data_and_model(data, args.model)
    if folder is None:
        return 0
    import torch

    torch.set_num_threads(1)
    counter = CellCounter.from_pretrained(folder, device="cpu", epistemic=args.epistemic)
    config = counter.config
    table = io.read_counts_csv(data / "counts.csv")
    test = config.get("training", {}).get("split", {}).get("test")
    if not test:
        test = split_names(list(table))["test"]
    train = [n for n in split_names(list(table))["train"] if n not in test]
    report: dict = {
        "model": str(args.model),
        "epistemic": bool(args.epistemic),
        "data": str(data),
        "n_test": len(test),
        "tile": list(counter.tile),
        "margin": counter.margin,
    }

    # 1. accuracy on the held-out images ----------------------------------------------
    frames = {n: (io.read_image(data / "images" / n), None) for n in test}
    rows = []
    for name in test:
        res = counter.count(frames[name][0])
        rows.append(
            {
                "file": name,
                "true": table[name],
                "count": round(res.count, 2),
                "low": round(res.low, 2),
                "high": round(res.high, 2),
            }
        )
    truth = [r["true"] for r in rows]
    net = count_metrics(
        truth,
        [r["count"] for r in rows],
        low=[r["low"] for r in rows],
        high=[r["high"] for r in rows],
    )
    train_images = [(io.read_image(data / "images" / n), table[n]) for n in train]
    fits = {}
    for md in (4, 5, 6, 7, 8, 10, 12):
        pred = [otsu_watershed_count(img, min_distance=md) for img, _ in train_images]
        fits[md] = count_metrics([t for _, t in train_images], pred)["mae"]
    best = min(fits, key=fits.get)
    classical = [otsu_watershed_count(frames[n][0], min_distance=best) for n in test]
    for r, c in zip(rows, classical, strict=True):
        r["otsu_watershed"] = c
    base = count_metrics(truth, classical)
    dense = [i for i, t in enumerate(truth) if t >= 150]
    # The calibration images were not trained on either (they only set the
    # interval's scale), so they are a second held-out set for the count itself.
    cal_names = config.get("training", {}).get("split", {}).get("calibration", [])
    cal_truth, cal_net, cal_classic = [], [], []
    for name in cal_names:
        image = io.read_image(data / "images" / name)
        cal_truth.append(table[name])
        cal_net.append(counter.count(image).count)
        cal_classic.append(otsu_watershed_count(image, min_distance=best))
    if cal_names:
        report["calibration_images"] = {
            "n": len(cal_names),
            "network": count_metrics(cal_truth, cal_net),
            "otsu_watershed": count_metrics(cal_truth, cal_classic),
        }
    report["accuracy"] = {
        "network": net,
        "otsu_watershed": {**base, "min_distance": best, "train_mae_by_min_distance": fits},
        "network_on_counts_150_plus": count_metrics(
            [truth[i] for i in dense], [rows[i]["count"] for i in dense]
        )
        if dense
        else None,
        "rows": rows,
    }
    print(f"== held-out BBBC039 images ({len(test)}, mean count {np.mean(truth):.1f}) ==")
    print(f"{'method':<22}{'MAE':>8}{'max err':>9}{'bias':>8}{'coverage':>10}")
    print(
        f"{'nuclei model':<22}{net['mae']:>8.2f}{net['max_abs_error']:>9.2f}"
        f"{net['bias']:>8.2f}{net['coverage']:>10.0%}"
    )
    print(
        f"{'Otsu+watershed md=' + str(best):<22}{base['mae']:>8.2f}"
        f"{base['max_abs_error']:>9.2f}{base['bias']:>8.2f}{'-':>10}"
    )
    if cal_names:
        c = report["calibration_images"]
        print(
            f"the {c['n']} calibration images (not trained on): network MAE "
            f"{c['network']['mae']:.2f} (max {c['network']['max_abs_error']:.1f}), "
            f"Otsu+watershed MAE {c['otsu_watershed']['mae']:.2f} "
            f"(max {c['otsu_watershed']['max_abs_error']:.1f})"
        )
    if dense:
        d = report["accuracy"]["network_on_counts_150_plus"]
        print(
            f"network on the {len(dense)} images with >= 150 nuclei: MAE {d['mae']:.2f}, "
            f"bias {d['bias']:+.2f}, largest count {max(rows[i]['count'] for i in dense):.1f}"
        )

    # 2. tiled vs whole on mosaics ------------------------------------------------------
    rng = np.random.default_rng(0)
    labelled = [
        (frames[n][0], read_instances(data / "masks" / (Path(n).stem + ".png"))) for n in test
    ]
    mosaics = []
    for k in range(args.mosaics):
        big, labels, (parts, _) = mosaic(labelled, rng)
        y0 = (big.shape[0] - CROP) // 2 if big.shape[0] >= CROP else 0
        x0 = (big.shape[1] - CROP) // 2
        window = (slice(y0, y0 + CROP), slice(x0, x0 + CROP))
        crop = np.ascontiguousarray(big[window])
        prepared = counter.prepare_any(crop).prepared
        t0 = time.perf_counter()
        whole = count_density(counter.model, prepared, tile=None)
        t1 = time.perf_counter()
        tiled = count_density(counter.model, prepared, tile=counter.tile, margin=counter.margin)
        t2 = time.perf_counter()
        visible, fraction = crop_truths(labels, window)
        full = counter.count(big).count
        parts_sum = sum(counter.count(p).count for p in parts)
        mosaics.append(
            {
                "mosaic": k,
                "crop_shape": list(crop.shape),
                "truth": visible,
                "truth_area_fractions": round(fraction, 2),
                "whole": round(whole.count, 2),
                "tiled": round(tiled.count, 2),
                "tiles": tiled.tiles,
                "relative_difference": (tiled.count - whole.count) / whole.count,
                "whole_seconds": round(t1 - t0, 2),
                "tiled_seconds": round(t2 - t1, 2),
                "full_mosaic_shape": list(big.shape),
                "full_mosaic_truth": int(len(np.unique(labels)) - 1),
                "full_mosaic_count": round(full, 2),
                "sum_of_frame_counts": round(parts_sum, 2),
            }
        )
    report["mosaics"] = mosaics
    print(f"\n== {CROP} x {CROP} mosaics of held-out images: tiled vs one whole-image pass ==")
    print("(truth: nuclei visible in the crop; cut ones count 1, as in BBBC039's counts)")
    print(f"{'#':>2}{'truth':>8}{'whole':>9}{'tiled':>9}{'tiles':>6}{'tiled-whole %':>15}")
    for m in mosaics:
        print(
            f"{m['mosaic']:>2}{m['truth']:>8}{m['whole']:>9.1f}{m['tiled']:>9.1f}"
            f"{m['tiles']:>6}{100 * m['relative_difference']:>15.4f}"
        )
    print(
        f"\n== full {MOSAIC_GRID[0]} x {MOSAIC_GRID[1]}-frame mosaics vs the sum of their frames =="
    )
    print(f"{'#':>2}{'truth':>8}{'mosaic':>9}{'frames':>9}{'diff %':>9}")
    for m in mosaics:
        diff = 100 * (m["full_mosaic_count"] - m["sum_of_frame_counts"]) / m["sum_of_frame_counts"]
        print(
            f"{m['mosaic']:>2}{m['full_mosaic_truth']:>8}{m['full_mosaic_count']:>9.1f}"
            f"{m['sum_of_frame_counts']:>9.1f}{diff:>9.2f}"
        )

    # 3. memory on a 4096 x 4096 image ------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        import tifffile

        big, labels, _ = mosaic(labelled, np.random.default_rng(1))
        rows_needed = -(-4096 // big.shape[0])
        cols_needed = -(-4096 // big.shape[1])
        huge = np.tile(big, (rows_needed, cols_needed))[:4096, :4096]
        path = Path(tmp) / "huge.tif"
        tifffile.imwrite(path, huge)
        memory = [peak_memory(str(folder), path, mode) for mode in ("tiles", "whole")]
    report["memory_4096"] = memory
    print("\n== one 4096 x 4096 16-bit image, fresh process (1 torch thread) ==")
    print(f"{'windows':<14}{'count':>9}{'RSS before':>12}{'peak RSS':>10}{'seconds':>9}")
    for m in memory:
        print(
            f"{m['windows']:<14}{m['count']:>9.1f}{m['rss_before_count_mib']:>10.0f} M"
            f"{m['peak_rss_mib']:>8.0f} M{m['seconds']:>9.1f}"
        )

    # 4. counting from a perfect mask -------------------------------------------------
    perfect = annotated_mask_counts(data, train)
    report["annotated_masks"] = perfect
    print(f"\n== the {perfect['n']} training images' annotated masks (no network) ==")
    print(
        f"connected components: MAE {perfect['components']['mae']:.2f} "
        f"(bias {perfect['components']['bias']:+.2f}); watershed (min distance "
        f"{perfect['watershed']['min_distance']}): MAE {perfect['watershed']['mae']:.2f} "
        f"(bias {perfect['watershed']['bias']:+.2f})"
    )
    out = Path(
        args.out or f"benchmarks/results/bbbc039{'_epistemic' if args.epistemic else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(report), indent=2, default=float) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
