"""How close is the simulator to the real BBBC005?  Statistics, a picture and speed.

For each blur level (F1, F23, F48) and stain (w1 nuclei, w2 cell bodies) the
real images and simulated images at the *same counts* (the same count and
site grid as the real files) are measured the same way:

- ``otsu_area_median``: median area (px) of Otsu objects (>= 50 px, not
  touching the border), pooled over the group's images;
- ``otsu_objects_per_cell``: Otsu objects per true cell (merging / clumping);
- ``foreground_mean``: mean grey level above the Otsu threshold;
- ``background_level`` and ``background_std``: mean and sd of the pixels more
  than 10 px from any Otsu object;
- ``mean_per_cell`` and ``mean_at_zero``: slope and intercept of the image
  mean against the count (grey levels per cell);
- ``gradient_energy``: mean squared Sobel gradient (falls with blur).

Also: the nearest-neighbour distances of in-focus nuclei (clustering), the
speed of generation (696 x 520 images per second written by
``simulate_plate`` with 1 and 2 workers) and a side-by-side figure.

Usage::

    python benchmarks/simulator_realism.py [--data ../shared/data/bbbc005]
        [--out benchmarks/results] [--figure docs/simulated_vs_real.png]

Exits 0 with a message when the real data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import stamp

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(
    r"^SIMCEPImages_(?P<well>[A-Z]+\d+)_C(?P<count>\d+)_F(?P<blur>\d+)"
    r"_s(?P<site>\d+)_w(?P<stain>\d+)\.tif$",
    re.IGNORECASE,
)
BLURS = (1, 23, 48)
STAINS = (1, 2)
METRICS = (
    "otsu_area_median",
    "otsu_objects_per_cell",
    "foreground_mean",
    "background_level",
    "background_std",
    "mean_per_cell",
    "mean_at_zero",
    "gradient_energy",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/bbbc005"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "simulated_vs_real.png")
    parser.add_argument(
        "--sites", type=int, default=5, help="use real sites 1..N (of 10) and as many simulations"
    )
    parser.add_argument("--timing-scenes", type=int, default=24, help="scenes per timing run")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument(
        "--cluster-probability",
        type=float,
        default=None,
        help="simulate with this cluster_probability (default: the simulator's default)",
    )
    return parser.parse_args(argv)


def image_stats(image: np.ndarray) -> dict:
    """Per-image measurements (see the module docstring)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    img = image.astype(np.float64)
    threshold = threshold_otsu(image)
    fg = img > threshold
    lab, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(lab.ravel())[1:]
    big = areas >= 50
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    inner = big.copy()
    inner[border[border > 0] - 1] = False
    far = ~ndimage.binary_dilation(fg, iterations=10)
    gy = ndimage.sobel(img, axis=0)
    gx = ndimage.sobel(img, axis=1)
    return {
        "areas": areas[inner].tolist(),
        "n_objects": int(big.sum()),
        "foreground_mean": float(img[fg].mean()) if fg.any() else float("nan"),
        "background_level": float(img[far].mean()) if far.any() else float("nan"),
        "background_std": float(img[far].std()) if far.any() else float("nan"),
        "mean": float(img.mean()),
        "gradient_energy": float(np.mean(gx * gx + gy * gy)),
    }


def group_stats(rows: list[tuple[int, dict]]) -> dict:
    """Aggregate ``(count, image_stats)`` rows of one blur x stain group."""
    counts = np.array([c for c, _ in rows], dtype=float)
    means = np.array([s["mean"] for _, s in rows])
    slope, intercept = np.polyfit(counts, means, 1)
    areas = [a for _, s in rows for a in s["areas"]]
    return {
        "images": len(rows),
        "otsu_area_median": float(np.median(areas)) if areas else float("nan"),
        "otsu_objects_per_cell": float(np.mean([s["n_objects"] / c for c, s in rows if c > 0])),
        "foreground_mean": float(np.nanmean([s["foreground_mean"] for _, s in rows])),
        "background_level": float(np.nanmean([s["background_level"] for _, s in rows])),
        "background_std": float(np.nanmean([s["background_std"] for _, s in rows])),
        "mean_per_cell": float(slope),
        "mean_at_zero": float(intercept),
        "gradient_energy": float(np.mean([s["gradient_energy"] for _, s in rows])),
    }


def nearest_neighbour_fractions(images: list[np.ndarray]) -> list[float]:
    """Fraction of in-focus nuclei whose nearest neighbour is closer than 45 / 60 / 80 px."""
    from scipy.spatial import cKDTree
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    distances: list[float] = []
    for image in images:
        regions = [r for r in regionprops(label(image > threshold_otsu(image))) if r.area >= 200]
        if len(regions) < 2:
            continue
        centres = np.array([r.centroid for r in regions])
        d, _ = cKDTree(centres).query(centres, k=2)
        distances.extend(d[:, 1])
    arr = np.array(distances)
    return [round(float((arr < t).mean()), 3) for t in (45, 60, 80)]


def real_files(data: Path, sites: int) -> list[tuple[Path, dict]]:
    files = []
    for path in sorted((data / "images").iterdir()):
        m = NAME.match(path.name)
        if m is None:
            continue
        meta = {k: (v if k == "well" else int(v)) for k, v in m.groupdict().items()}
        if meta["site"] <= sites and meta["blur"] in BLURS and meta["stain"] in STAINS:
            files.append((path, meta))
    return files


def scene_seed(base: int, count: int, site: int) -> int:
    return base * 100_000 + count * 100 + site


def measure_realism(
    data: Path, sites: int, seed: int, cluster_probability: float | None = None
) -> dict:
    import tifffile

    from celltally.simulate import SimulationParams, simulate_scene

    files = real_files(data, sites)
    real: dict[tuple[int, int], list] = {}
    sim: dict[tuple[int, int], list] = {}
    params = (
        SimulationParams()
        if cluster_probability is None
        else SimulationParams(cluster_probability=cluster_probability)
    )
    for i, (path, meta) in enumerate(files):
        key = (meta["blur"], meta["stain"])
        count = meta["count"]
        image = tifffile.imread(path)
        simulated = simulate_scene(
            count,
            blur=meta["blur"],
            stain=meta["stain"],
            seed=scene_seed(seed, count, meta["site"]),
            params=params,
        ).image
        real.setdefault(key, []).append((count, image_stats(image)))
        sim.setdefault(key, []).append((count, image_stats(simulated)))
        if (i + 1) % 100 == 0:
            print(f"  measured {i + 1}/{len(files)} real + simulated images", flush=True)
    groups = {}
    for key in sorted(real):
        name = f"F{key[0]}_w{key[1]}"
        groups[name] = {"real": group_stats(real[key]), "simulated": group_stats(sim[key])}
    return groups


def measure_clustering(data: Path, seed: int, repeats: int = 3) -> dict:
    """Nearest-neighbour distances of F1 nuclei (counts <= 23, all sites), real vs simulated."""
    import tifffile

    from celltally.simulate import SimulationParams, simulate_scene

    real, default, unclustered = [], [], []
    flat = SimulationParams(cluster_probability=0.0)
    for path, meta in real_files(data, 10):
        if meta["blur"] != 1 or meta["stain"] != 1 or meta["count"] > 23:
            continue
        real.append(tifffile.imread(path))
        for r in range(repeats):
            scene = scene_seed(seed + 1 + r, meta["count"], meta["site"])
            default.append(simulate_scene(meta["count"], seed=scene).image)
            unclustered.append(simulate_scene(meta["count"], seed=scene, params=flat).image)
    return {
        "note": "fraction of F1 nuclei (counts <= 23) with a neighbour closer than 45/60/80 px",
        "real_images": len(real),
        "simulated_images": len(default),
        "real": nearest_neighbour_fractions(real),
        "simulated_default": nearest_neighbour_fractions(default),
        "simulated_cluster_probability_0": nearest_neighbour_fractions(unclustered),
    }


def blur_exactness(data: Path, sites: int) -> dict:
    """Blur each real F1 file with ``focus_blur`` and compare with the real F23 / F48 file."""
    import tifffile

    from celltally.simulate import focus_blur

    files = {
        (m["well"][1:], m["site"], m["stain"], m["blur"]): path
        for path, m in real_files(data, sites)
    }
    out = {}
    for blur in (23, 48):
        same = total = identical_files = n_files = 0
        for (column, site, stain, b), path in files.items():
            target = files.get((column, site, stain, blur))
            if b != 1 or target is None:
                continue
            got = focus_blur(tifffile.imread(path), blur)
            want = tifffile.imread(target)
            same += int((got == want).sum())
            total += want.size
            identical_files += int(np.array_equal(got, want))
            n_files += 1
        out[f"F{blur}"] = {
            "files": n_files,
            "identical_files": identical_files,
            "identical_pixel_fraction": same / total if total else float("nan"),
        }
    return out


def measure_speed(scenes: int, seed: int) -> dict:
    from celltally.simulate import simulate_plate, simulate_scene

    out = {}
    simulate_scene(50, seed=0)  # warm up caches and imports
    for count in (10, 100):
        start = time.perf_counter()
        for s in range(5):
            simulate_scene(count, seed=s)
        out[f"simulate_scene_ms_count{count}_F1"] = round(
            (time.perf_counter() - start) / 5 * 1000, 1
        )
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            simulate_plate(tmp, images=scenes, counts=(1, 100), seed=seed, workers=workers)
            elapsed = time.perf_counter() - start
            n_files = len(os.listdir(Path(tmp) / "images"))
        out[f"plate_images_per_s_workers{workers}"] = round(n_files / elapsed, 1)
        out[f"plate_seconds_workers{workers}"] = round(elapsed, 2)
    out["plate"] = (
        f"{scenes} scenes x 3 blurs x 2 stains = {scenes * 6} images (696 x 520, counts 1-100) "
        "with masks, labels and counts.csv"
    )
    out["cpu_count"] = os.cpu_count()
    out["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    out["note"] = "wall clock on a shared machine; other jobs' load slows both runs"
    return out


def print_table(groups: dict) -> None:
    header = f"{'metric':<24}" + "".join(f"{g:>22}" for g in groups)
    print(header)
    print(" " * 24 + "".join(f"{'real':>11}{'sim':>11}" for _ in groups))
    for metric in METRICS:
        line = f"{metric:<24}"
        for g in groups.values():
            line += f"{g['real'][metric]:>11.3g}{g['simulated'][metric]:>11.3g}"
        print(line)


def make_figure(data: Path, path: Path, seed: int, count: int = 48, site: int = 1) -> None:
    """Real and simulated images at the same count, for each blur x stain."""
    import tifffile

    from celltally.simulate import BLUR_LEVELS, simulate_scene

    panels = []
    for blur in BLURS:
        row = []
        for stain in STAINS:
            well = f"{chr(ord('A') + BLUR_LEVELS.index(blur))}"
            matches = sorted(
                (data / "images").glob(
                    f"SIMCEPImages_{well}*_C{count}_F{blur}_s{site:02d}_w{stain}.*"
                )
            )
            real = tifffile.imread(matches[0])
            sim = simulate_scene(count, blur=blur, stain=stain, seed=seed).image
            row.append((f"F{blur} w{stain}", real, sim))
        panels.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, axes = plt.subplots(len(BLURS), 4, figsize=(16, 3 * len(BLURS) + 0.6))
        for r, row in enumerate(panels):
            for c, (title, real, sim) in enumerate(row):
                for k, (kind, img) in enumerate((("real", real), ("simulated", sim))):
                    ax = axes[r, 2 * c + k]
                    ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="lanczos")
                    ax.set_title(f"{title} {kind} (C{count})", fontsize=10)
                    ax.axis("off")
        fig.suptitle("BBBC005 real vs celltally.simulate (same count, independent scenes)")
        fig.tight_layout()
        fig.savefig(path, dpi=72)
        plt.close(fig)
        return
    from PIL import Image, ImageDraw

    tiles = []
    for row in panels:
        line = []
        for title, real, sim in row:
            for kind, img in (("real", real), ("sim", sim)):
                tile = Image.fromarray(img).resize((348, 260))
                ImageDraw.Draw(tile).text((4, 4), f"{title} {kind}", fill=255)
                line.append(np.asarray(tile))
        tiles.append(np.hstack(line))
    Image.fromarray(np.vstack(tiles)).save(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data if args.data.is_absolute() else (Path.cwd() / args.data)
    if not (data / "images").is_dir():
        print(f"real BBBC005 data not found at {data}: skipping the realism benchmark")
        return 0
    sys.path.insert(0, str(REPO / "src"))
    print(f"measuring real vs simulated BBBC005 (sites 1-{args.sites}) ...", flush=True)
    start = time.perf_counter()
    groups = measure_realism(data, args.sites, args.seed, args.cluster_probability)
    print(f"done in {time.perf_counter() - start:.0f} s\n")
    print_table(groups)
    clustering = measure_clustering(data, args.seed)
    print("\nclustering:", json.dumps(clustering))
    exact = blur_exactness(data, args.sites)
    print("focus_blur(real F1) vs real F23 / F48:", json.dumps(exact))
    print("\ntiming generation ...", flush=True)
    speed = measure_speed(args.timing_scenes, args.seed)
    print(json.dumps(speed, indent=1))
    make_figure(data, args.figure, args.seed)
    print(f"figure -> {args.figure}")

    from celltally.simulate import BLUR_LEVELS, blur_sigma

    report = {
        "data": str(args.data),
        "sites": args.sites,
        "cluster_probability": args.cluster_probability,
        "groups": groups,
        "clustering": clustering,
        "blur_sigma": {f"F{b}": blur_sigma(b) for b in BLUR_LEVELS},
        "blur_kernel_size": {f"F{b}": b for b in BLUR_LEVELS},
        "focus_blur_of_real_f1_vs_real": exact,
        "speed": speed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "simulator_realism.json"
    out.write_text(json.dumps(stamp(report), indent=2) + "\n")
    print(f"results -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
