"""Screen-scale batch counting: throughput, flat memory, Dask scaling, kill/resume safety.

    python benchmarks/batch_scaling.py [--model bbbc005] [--sizes 1000,4000]
        [--dask-images 400] [--trials 20] [--trial-images 40]

Images are 696 x 520 8-bit TIFFs from the simulator: ``--unique`` scenes'
worth are simulated (6 files per scene) and hard-linked under new names up to
the size needed, so a 20,000-image folder costs no simulation time (the files
are still listed, opened, decoded and counted one by one).

1. Throughput and peak memory: ``run_batch`` (what ``celltally count`` runs) in a
   fresh process per size, all cores; images/s after the first rows are on disk
   (model load excluded) and the process's peak RSS. Flat memory = the same
   peak RSS at every size.
2. Scaling: one process with one torch thread vs a Dask LocalCluster of 2
   one-thread worker processes, same images; steady rate after the first rows
   (cluster start-up and model loads excluded; both also reported end to end).
   Measured twice: with the default 2 image-reading threads beside each torch
   thread (what a user gets; on 2 cores the baseline already uses part of the
   second core for reading, which caps the ratio), and strictly one thread
   per process (``read_threads=0``: reading inline), the issue's "one-thread"
   comparison and what N one-core cluster slots would do.
3. Kill/resume: ``celltally count`` as a subprocess, SIGKILLed at a random
   moment after its first rows, then rerun to completion; rows lost and
   duplicated are counted over ``--trials`` trials.

Uses the shipped model by default; if there is none, ``--model PATH``, or else
an untrained model of the small preset (same speed; the counts are then
meaningless, which this benchmark does not look at). Prints a table and writes
benchmarks/results/batch_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from provenance import stamp

HERE = Path(__file__).resolve().parent


# -- child: one measured run in a fresh process -------------------------------------


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    from celltally.batch import run_batch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    marks: list[tuple[float, int, float]] = []
    page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20

    def rss_mib() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page_mib

    t0 = time.perf_counter()
    summary = run_batch(
        [args.folder],
        out=args.out,
        model=args.model,
        batch_size=args.batch_size,
        dask=args.dask,
        chunk_size=args.chunk_size,
        read_threads=args.read_threads,
        on_commit=lambda n: marks.append((time.perf_counter(), n, rss_mib())),
    )
    total = time.perf_counter() - t0
    first_t, first_n, _ = marks[0]
    steady = (summary.counted - first_n) / max(1e-9, marks[-1][0] - first_t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(
        json.dumps(
            {
                "counted": summary.counted,
                "failed": summary.failed,
                "seconds_total": round(total, 2),
                "images_per_s_total": round(summary.counted / total, 2),
                "images_per_s_steady": round(steady, 2),
                "peak_rss_mib": round(peak, 1),
                # current RSS after 10%, 25%, 50%, 75% and all of the images: growth or not
                "rss_mib_at": {
                    f"{q:.0%}": round(marks[min(len(marks) - 1, int(q * len(marks)))][2], 1)
                    for q in (0.1, 0.25, 0.5, 0.75, 1.0)
                },
            }
        )
    )


def measure(
    folder: Path,
    out: Path,
    model: str,
    *,
    batch_size: int,
    threads: int | None = None,
    dask: str | None = None,
    chunk_size: int | None = None,
    read_threads: int = 2,
) -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--out", str(out)]
    cmd += ["--model", model, "--batch-size", str(batch_size)]
    env = dict(os.environ)
    if threads:
        cmd += ["--torch-threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    if dask:
        cmd += ["--dask", dask]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    cmd += ["--read-threads", str(read_threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- data ----------------------------------------------------------------------


def make_folder(source: list[Path], folder: Path, n: int) -> Path:
    """``n`` image files in ``folder``, hard links to ``source`` under unique names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = source[i % len(source)]
        dst = folder / f"r{i:06d}_{src.name}"
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
    return folder


def pick_model(requested: str | None, tmp: Path) -> tuple[str, str]:
    from celltally.counter import available_models

    if requested:
        return requested, requested
    if "bbbc005" in available_models():
        return "bbbc005", "bbbc005 (shipped)"
    import torch

    from celltally.models.pipeline import CountingPipeline
    from celltally.models.presets import get_preset
    from celltally.train import save_model_folder
    from celltally.transforms import DEFAULT_NORMALIZATION

    torch.manual_seed(0)
    config = get_preset("small")
    config.update(preset="small", name="untrained-small")
    config["normalization"] = dict(config.get("normalization", DEFAULT_NORMALIZATION))
    folder = save_model_folder(CountingPipeline(config), config, tmp / "untrained-small")
    return str(folder), "untrained small preset (no shipped model; speed only)"


# -- kill / resume trials ----------------------------------------------------------


def kill_resume_trials(
    folder: Path, tmp: Path, model: str, *, trials: int, batch_size: int, seed: int
) -> dict:
    from celltally.batch import read_results

    rng = random.Random(seed)
    expected = sorted(str(p) for p in folder.iterdir())
    lost = duplicated = killed = torn = 0

    def start(out: Path) -> tuple[list[str], subprocess.Popen, float]:
        cmd = [sys.executable, "-m", "celltally.cli", "count", str(folder), "-o", str(out)]
        cmd += ["--model", model, "--batch-size", str(batch_size), "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < 2):
            time.sleep(0.002)
        return cmd, proc, time.perf_counter()

    _, proc, t_first = start(tmp / "trial-timing.csv")  # how long a run lasts after its 1st rows
    proc.wait()
    rest = time.perf_counter() - t_first
    for trial in range(trials):
        out = tmp / f"trial{trial}.csv"
        cmd, proc, _ = start(out)
        time.sleep(rng.uniform(0, 0.9 * rest))  # a random moment in the rest of the run
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        torn += not out.read_bytes().endswith(b"\n")
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        seen = Counter(r["file"] for r in read_results(out))
        lost += sum(1 for f in expected if f not in seen)
        duplicated += sum(n - 1 for n in seen.values() if n > 1)
        print(f"  trial {trial + 1}/{trials}: killed={killed} torn={torn} lost={lost} "
              f"dup={duplicated}", flush=True)  # fmt: skip
    return {
        "trials": trials,
        "killed_mid_run": killed,
        "torn_last_row_seen": torn,
        "rows_lost": lost,
        "rows_duplicated": duplicated,
        "images_per_trial": len(expected),
        "seconds_after_first_rows": round(rest, 2),
    }


# -- main ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or folder")
    parser.add_argument("--sizes", default="1000,4000", help="folder sizes for memory")
    parser.add_argument("--dask-images", type=int, default=400)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--trial-images", type=int, default=40)
    parser.add_argument("--unique", type=int, default=8, help="simulated scenes (x6 files)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for the throughput runs"
    )
    parser.add_argument("--skip", default="", help="comma list of: memory,dask,kill")
    parser.add_argument("--out", default=str(HERE / "results" / "batch_scaling.json"))
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--dask", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--torch-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--read-threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    from celltally.simulate import simulate_plate

    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict = {
        "machine": {
            "cpu_cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "settings": {
            "batch_size": args.batch_size,
            "image_size": "696x520 8-bit TIFF",
            "torch_threads_throughput": args.threads or "torch default (one per core)",
        },
    }
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model, model_text = pick_model(args.model, tmp)
        report["model"] = model_text
        print(f"model: {model_text}")
        plate = simulate_plate(tmp / "plate", images=args.unique, seed=1, workers=2)
        source = sorted((plate / "images").glob("*.TIF"))

        if "memory" not in skip:
            rows = []
            for n in sizes:
                folder = make_folder(source, tmp / f"n{n}", n)
                print(f"counting {n} images ...", flush=True)
                r = measure(
                    folder,
                    tmp / f"n{n}.csv",
                    model,
                    batch_size=args.batch_size,
                    threads=args.threads,
                )
                rows.append({"images": n, **r})
            report["throughput_memory"] = rows

        if "dask" not in skip:
            folder = make_folder(source, tmp / "dask", args.dask_images)
            scaling = {"images": args.dask_images}
            for key, reading in (("default_reading", 2), ("strict_one_thread", 0)):
                print(f"{args.dask_images} images, {reading} read threads: one one-thread "
                      "process ...", flush=True)  # fmt: skip
                one = measure(
                    folder,
                    tmp / f"one{reading}.csv",
                    model,
                    batch_size=args.batch_size,
                    threads=1,
                    read_threads=reading,
                )
                print(f"{args.dask_images} images, {reading} read threads: Dask LocalCluster, "
                      "2 one-thread workers ...", flush=True)  # fmt: skip
                two = measure(
                    folder,
                    tmp / f"dask{reading}.csv",
                    model,
                    batch_size=args.batch_size,
                    dask="local:2",
                    chunk_size=2 * args.batch_size,
                    read_threads=reading,
                )
                scaling[key] = {
                    "read_threads": reading,
                    "one_process_one_thread": one,
                    "dask_local_2x1": two,
                    "speedup_steady": round(
                        two["images_per_s_steady"] / one["images_per_s_steady"], 2
                    ),
                    "speedup_end_to_end": round(
                        two["images_per_s_total"] / one["images_per_s_total"], 2
                    ),
                }
            report["dask_scaling"] = scaling

        if "kill" not in skip:
            folder = make_folder(source, tmp / "trial", args.trial_images)
            print(f"kill/resume: {args.trials} trials of {args.trial_images} images ...")
            report["kill_resume"] = kill_resume_trials(
                folder, tmp, model, trials=args.trials, batch_size=4, seed=0
            )

    report["machine"]["load_average_at_end"] = os.getloadavg()
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(report), indent=2) + "\n")
    print(f"-> {out}")
    return 0


def print_table(report: dict) -> None:
    print()
    print(f"model: {report['model']}; {report['machine']['cpu_cores']} cores; "
          f"load average at start {report['machine']['load_average_at_start'][0]:.1f}")  # fmt: skip
    if "throughput_memory" in report:
        threads = report["settings"]["torch_threads_throughput"]
        print(f"throughput and memory, torch threads: {threads}")
        print(f"{'images':>8} {'img/s steady':>13} {'img/s total':>12} {'peak RSS MiB':>13}  "
              "RSS MiB at 10/25/50/75/100% of the run")  # fmt: skip
        for r in report["throughput_memory"]:
            along = "/".join(f"{v:.0f}" for v in r["rss_mib_at"].values())
            print(
                f"{r['images']:>8} {r['images_per_s_steady']:>13.1f} "
                f"{r['images_per_s_total']:>12.1f} {r['peak_rss_mib']:>13.0f}  {along}"
            )
    if "dask_scaling" in report:
        d = report["dask_scaling"]
        for key in ("default_reading", "strict_one_thread"):
            e = d[key]
            one, two = e["one_process_one_thread"], e["dask_local_2x1"]
            print(f"scaling on {d['images']} images, {e['read_threads']} read threads: "
                  f"1 process x 1 thread {one['images_per_s_steady']:.1f} img/s, Dask 2 x 1 "
                  f"thread {two['images_per_s_steady']:.1f} img/s -> {e['speedup_steady']:.2f}x "
                  f"steady ({e['speedup_end_to_end']:.2f}x end to end, start-up "
                  "included)")  # fmt: skip
    if "kill_resume" in report:
        k = report["kill_resume"]
        print(f"kill/resume: {k['trials']} trials, {k['killed_mid_run']} killed mid-run "
              f"({k['torn_last_row_seen']} left a torn last row): {k['rows_lost']} rows lost, "
              f"{k['rows_duplicated']} duplicated")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
