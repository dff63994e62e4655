"""Do the intervals of images counted in tiles hold their truths? Mosaics of real BBBC005.

    python benchmarks/mosaics.py [--data ../shared/data/bbbc005] [--model bbbc005]
                                 [--sites 9,10] [--layouts 2x2,3x4,6x8] [--seed 0]

An image larger than the model's frame is counted in tiles, and the variances
of its density cells add up. Sums of frames whose errors share their density,
blur and stain are not independent, so since 2026-11-27 the sigma of such an
image is widened for the frames it spans, at ``calibration.FRAME_CORRELATION``
(``calibration.parts_variance_factor``). This benchmark stitches
real BBBC005 frames of one blur x stain group, in a seeded random order, into
mosaics of R x C frames (each frame used once per layout; truth = the sum of
their counts), counts each mosaic with ``CellCounter.count``, and reports
95% coverage and half-width with that sigma and with the independent sum
(the sigma divided back by the factor). Sites 9-10 are the model's test
sites; sites 1-8 its calibration sites (its within-well correlation, 0.099,
was fitted on them).
Prints a table and writes benchmarks/results/mosaics.json. Skips cleanly
without the data.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from provenance import stamp

from celltally import io, naming
from celltally.calibration import parts_variance_factor
from celltally.counter import CellCounter
from celltally.evaluation import labelled_files


def layouts(text: str) -> list[tuple[int, int]]:
    """'2x2,3x4' -> [(2, 2), (3, 4)]."""
    pairs = [part.split("x") for part in text.split(",")]
    return [(int(rows), int(cols)) for rows, cols in pairs]


def mosaics(
    pairs: list[tuple[Path, float]], rows: int, cols: int, rng: np.random.Generator
) -> list[tuple[str, list[Path], float]]:
    """Groups of rows x cols frames of one blur x stain, each frame used once."""
    groups: dict[tuple, list[tuple[Path, float]]] = {}
    for path, count in pairs:
        name = naming.parse_name(path.name)
        groups.setdefault((name.blur, name.stain), []).append((path, count))
    out = []
    n = rows * cols
    for (blur, stain), members in sorted(groups.items()):
        order = rng.permutation(len(members))
        for k in range(len(members) // n):
            chosen = [members[i] for i in order[k * n : (k + 1) * n]]
            out.append(
                (
                    f"F{blur} w{stain}",
                    [p for p, _ in chosen],
                    float(sum(c for _, c in chosen)),
                )
            )
    return out


def stitch(paths: list[Path], rows: int, cols: int) -> np.ndarray:
    frames = [io.read_image(p) for p in paths]
    return np.concatenate(
        [np.concatenate(frames[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument("--model", default="bbbc005")
    parser.add_argument("--sites", default="9,10", help="sites whose frames make the mosaics")
    parser.add_argument("--layouts", default="2x2,3x4,6x8", help="rows x columns of frames")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/mosaics.json")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.exists():
        print(f"skipped: {data} not found (real BBBC005 is not part of the repository)")
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    counter = CellCounter.from_pretrained(args.model)
    sites = {int(s) for s in args.sites.split(",")}
    pairs = [(p, c) for p, c in labelled_files(data) if naming.parse_name(p.name).site in sites]
    rng = np.random.default_rng(args.seed)
    rho = counter.frame_correlation
    results = {}
    print(f"model {args.model}, frames of sites {sorted(sites)}, frame correlation {rho:.3f}")
    print(f"{'layout':<7} {'n':>4} {'MAE':>7}  cover@95 widened / independent  ±95% same")
    for rows, cols in layouts(args.layouts):
        found = []
        for group, paths, truth in mosaics(pairs, rows, cols, rng):
            result, prepared = counter.count_with_input(stitch(paths, rows, cols))
            # as the counter does; a mosaic of one frame is counted as a frame, not in tiles
            frames = (
                1.0
                if isinstance(prepared, np.ndarray)
                else prepared.prepared.size / np.prod(counter.input_size)
            )
            factor = parts_variance_factor(frames, rho)
            half = result.high - result.count
            found.append(
                {
                    "group": group,
                    "truth": truth,
                    "count": result.count,
                    "std": result.std,
                    "frames": frames,
                    "factor": factor,
                    "inside": bool(result.low <= truth <= result.high),
                    "inside_independent": bool(abs(result.count - truth) <= half / factor**0.5),
                    "half_width": half,
                }
            )
        errors = np.array([abs(f["count"] - f["truth"]) for f in found])
        row = {
            "n": len(found),
            "frames_per_mosaic": rows * cols,
            "mae": float(errors.mean()),
            "bias": float(np.mean([f["count"] - f["truth"] for f in found])),
            "coverage": float(np.mean([f["inside"] for f in found])),
            "coverage_independent": float(np.mean([f["inside_independent"] for f in found])),
            "mean_half_width": float(np.mean([f["half_width"] for f in found])),
            "mean_half_width_independent": float(
                np.mean([f["half_width"] / f["factor"] ** 0.5 for f in found])
            ),
            "mosaics": found,
        }
        results[f"{rows}x{cols}"] = row
        print(
            f"{rows}x{cols:<5} {row['n']:>4} {row['mae']:>7.2f} "
            f"{row['coverage']:>22.3f} / {row['coverage_independent']:.3f} "
            f"{row['mean_half_width']:>7.2f} / {row['mean_half_width_independent']:.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": args.model,
        "sites": sorted(sites),
        "seed": args.seed,
        "frame_correlation": rho,
        "seconds": round(time.perf_counter() - t0, 1),
        "layouts": results,
    }
    out.write_text(json.dumps(stamp(report), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
