"""End-to-end counting throughput on 696 x 520 8-bit TIFFs (read, prepare, network, CSV).

    python benchmarks/throughput.py [--images 300] [--model bbbc005] [--threads 2] [--epistemic]

Writes simulated BBBC005-style TIFFs to a temporary folder, then times
(1) the `celltally count` command as a user runs it (process start included)
and (2) the in-process loop (CellCounter.count_paths). Prints a table and
writes benchmarks/results/throughput.json with the machine named (other
settings their own file: throughput_nuclei.json, throughput_1thread.json, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import stamp

from celltally.counter import CellCounter
from celltally.simulate import simulate_plate


def default_out(model: str, *, epistemic: bool, threads: int) -> Path:
    """Where a run's JSON goes: each setting its own file, so reruns overwrite only their own."""
    name = "throughput"
    name += "" if model == "bbbc005" else f"_{Path(model).name}"
    name += "_epistemic" if epistemic else ""
    name += "" if threads == 2 else f"_{threads}thread"
    return Path("benchmarks/results") / f"{name}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--model", default="bbbc005")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epistemic", action="store_true", help="count with the model's ensemble")
    parser.add_argument(
        "--out",
        help="JSON to write (default: benchmarks/results/throughput[_MODEL][_epistemic]"
        "[_Nthread].json, the model named unless bbbc005, threads unless 2)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        scenes = max(1, args.images // 6)
        plate = simulate_plate(Path(tmp) / "plate", images=scenes, seed=1, workers=2)
        files = sorted((plate / "images").glob("*.TIF"))
        counter = CellCounter.from_pretrained(args.model, epistemic=args.epistemic)
        list(counter.count_paths(files[:16], batch_size=args.batch_size))  # warm-up
        t0 = time.perf_counter()
        n = sum(1 for _ in counter.count_paths(files, batch_size=args.batch_size))
        loop = time.perf_counter() - t0
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

        def command_seconds(target: Path) -> float:
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "celltally.cli", "count", str(target)]
                + ["--out", str(Path(tmp) / "r.csv"), "--overwrite", "--model", args.model]
                + ["--no-progress", "--batch-size", str(args.batch_size)]
                + (["--epistemic"] if args.epistemic else []),
                check=True,
                env=env,
                capture_output=True,
            )
            return time.perf_counter() - t0

        cli = command_seconds(plate / "images")
        # start-up: the whole command on one image (Python, imports, model loading)
        startup = statistics.median(command_seconds(files[0]) for _ in range(5))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": args.threads,
        "images": n,
        "image_size": "696x520 uint8 TIFF (zlib)",
        "model": args.model,
        "epistemic": args.epistemic,
        "count_paths_images_per_s": round(n / loop, 1),
        "cli_images_per_s": round(n / cli, 1),
        "cli_seconds": round(cli, 2),
        "cli_one_image_seconds_median_of_5": round(startup, 2),
    }
    print(f"{'path':<34}{'images/s':>10}")
    print(f"{'CellCounter.count_paths':<34}{result['count_paths_images_per_s']:>10}")
    print(f"{'celltally count (whole command)':<34}{result['cli_images_per_s']:>10}")
    print(f"start-up: the whole command on one image takes {startup:.2f} s (median of 5)")
    out = Path(args.out or default_out(args.model, epistemic=args.epistemic, threads=args.threads))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(result), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
