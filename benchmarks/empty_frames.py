"""Empty wells: what the shipped models count in frames without a single cell.

    python benchmarks/empty_frames.py [--models bbbc005 nuclei] [--frames 10]

An empty well (or one whose cells all died) is a common, important result in
a screen, and a model that never saw one may count noise or uneven light as
cells. For each shipped model, with and without ``--background quadratic``
(a smooth background subtracted before normalizing; the model's own
calibration is used either way), this counts ``--frames`` frames of each
kind of ``celltally.simulate.empty_frame`` (flat, ramp, vignette; half
8-bit, half 16-bit; seeds 20,000 on, never used for training or for the
decisions in docs/finetuning.md), BBBC005's own empty background
(``simulate_scene(0, ...)``: 8-bit, blur 1/23/48, both stains) and flat
frames with a dark corner (30 x 30 or 50 x 50 px, 10 noise stds deep: a dust
speck, dead pixels, a field stop), and, as the
check that the option does not lose real cells, 20 sparse simulated scenes
of 1-10 cells (bbbc005: 8-bit, blur 1/23/48, both stains; nuclei: 16-bit in
focus). Prints mean and max count, the share of frames flagged as unlike
the calibration images and the share said to be possibly empty (a low-contrast
warning, ``celltally.calibration.EMPTY_HINT``; on the sparse scenes that share
is a false alarm); writes benchmarks/results/empty_frames.json. Needs no data
from outside the package.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from celltally.calibration import EMPTY_HINT
from celltally.counter import CellCounter
from celltally.simulate import empty_frame, simulate_scene
from celltally.tiling import merge_normalization
from celltally.transforms import noise_std

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from empty_frames import sparse_scenes  # noqa: E402  (the decision's sparse scenes, other seeds)
from provenance import stamp

SEED = 20_000


def dark_corner(frame: np.ndarray, side: int) -> np.ndarray:
    """``frame`` with its top-left ``side`` x ``side`` corner 10 noise stds darker."""
    out = frame.astype(np.float64)
    out[:side, :side] -= 10 * noise_std(frame)
    return np.clip(out, 0, np.iinfo(frame.dtype).max).astype(frame.dtype)


def frames(kind: str, n: int) -> list[np.ndarray]:
    if kind.startswith("dark corner"):
        side = int(kind.split()[-1].split("x")[0])
        return [dark_corner(f, side) for f in frames("flat", n)]
    if kind == "BBBC005 background":
        looks = [(b, s) for s in (1, 2) for b in (1, 23, 48)]
        return [
            simulate_scene(0, blur=looks[i % 6][0], stain=looks[i % 6][1], seed=SEED + i).image
            for i in range(n)
        ]
    return [
        empty_frame(bit_depth=8 if i % 2 else 16, seed=SEED + i, illumination=kind)
        for i in range(n)
    ]


def said_empty(results: list) -> float:
    """Share of ``results`` whose warning says the frame may hold no cells."""
    return float(np.mean([EMPTY_HINT in r.warning for r in results]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["bbbc005", "nuclei"])
    parser.add_argument("--frames", type=int, default=10, help="frames of each kind")
    parser.add_argument("--out", default="benchmarks/results/empty_frames.json")
    args = parser.parse_args()
    kinds = [
        "flat",
        "ramp",
        "vignette",
        "BBBC005 background",
        "dark corner 30x30",
        "dark corner 50x50",
    ]
    made = {kind: frames(kind, args.frames) for kind in kinds}
    results: list[dict] = []
    print(
        f"{'model':8} {'background':10} {'frames':19} {'mean':>7} {'max':>7} {'flagged':>8} "
        f"{'empty?':>7}"
    )
    for model in args.models:
        base = CellCounter.from_pretrained(model, device="cpu")
        for background in ("none", "quadratic"):
            norm = merge_normalization(base.norm, background=background)
            counter = CellCounter.from_pretrained(model, device="cpu", norm=norm)
            for kind in kinds:
                res = [counter.count(f) for f in made[kind]]
                counts = [r.count for r in res]
                row = {
                    "model": model,
                    "background": background,
                    "frames": kind,
                    "n": len(res),
                    "mean_count": float(np.mean(counts)),
                    "max_count": float(np.max(counts)),
                    "flagged": float(np.mean([bool(r.warning) for r in res])),
                    "said_empty": said_empty(res),
                }
                results.append(row)
                print(
                    f"{model:8} {background:10} {kind:19} {row['mean_count']:7.2f} "
                    f"{row['max_count']:7.2f} {row['flagged']:8.0%} {row['said_empty']:7.0%}"
                )
            scenes = sparse_scenes(model, seed=SEED)
            t0 = time.perf_counter()
            res = [counter.count(im) for im, _ in scenes]
            seconds = time.perf_counter() - t0
            errors = [abs(r.count - c) for r, (_, c) in zip(res, scenes, strict=True)]
            results.append(
                {
                    "model": model,
                    "background": background,
                    "frames": "sparse scenes, 1-10 cells (MAE)",
                    "n": len(scenes),
                    "mae": float(np.mean(errors)),
                    "said_empty": said_empty(res),
                    "seconds": seconds,
                }
            )
            print(
                f"{model:8} {background:10} {'sparse, 1-10: MAE':19} {np.mean(errors):7.2f} "
                f"{'':7} {'':8} {said_empty(res):7.0%}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(stamp({"frames_per_kind": args.frames, "results": results}), indent=2) + "\n"
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
