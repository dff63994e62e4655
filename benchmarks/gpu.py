"""GPU figures: inference and training throughput, precision, NCCL data parallelism.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--quick]

Needs a CUDA GPU (``--quick --device cpu`` runs every section at toy sizes, to
check the script itself). Sections, each timed with CUDA events after a
warm-up, the median of five repeats, on random inputs (never zeros):

1. Network inference (segmenter at its finest level + counter, as counting
   runs it) for the paper preset and the small default, batch 64, in strict
   float32, TF32 (PyTorch's default for convolutions), bfloat16 autocast,
   bfloat16 with channels-last memory, and that with cuDNN autotuning. The
   count's relative difference from strict float32 is reported beside each.
2. ``CellCounter.count_prepared`` at batch 64 (the package's own path: host to
   device copies, results, OOD features per image).
3. Training throughput of the real ``train_segmenter`` / ``train_counter``
   loops (bfloat16 autocast, as ``celltally train`` runs on GPU, and float32
   with ``CELLTALLY_AMP=0``) at the paper's batch sizes (2 and 5) and larger.
4. DistributedDataParallel over NCCL: one rank joins an NCCL process group and
   trains both stages through ``celltally.distributed`` (a one-GPU machine
   cannot hold two NCCL ranks; the two-rank path is tested on CPU with gloo).
5. End to end: ``CellCounter.count_paths`` on simulated 696 x 520 TIFFs with
   the shipped ``bbbc005`` model, reading in threads.

Each section is written to the JSON as it finishes, so a timeout keeps the
sections before it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from provenance import stamp

from celltally.counter import CellCounter
from celltally.datasets import LabeledSet
from celltally.models.pipeline import CountingPipeline
from celltally.models.presets import get_preset


def timed(fn, *, device: torch.device, iters: int, warmup: int, repeats: int = 5) -> float:
    """Median seconds per call of ``fn`` (CUDA events on GPU, a host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def flops_per_image(model: CountingPipeline, size) -> float:
    """Forward FLOPs of one image (2 per multiply-add), as counting runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 1, *size)
    model = model.eval().cpu()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        mask, logvar = model.segmenter(x, levels=1)[0]
        model.count_from_mask(mask, logvar, x)
    return float(counter.get_total_flops())


def forward(model: CountingPipeline, x: torch.Tensor) -> torch.Tensor:
    mask, logvar = model.segmenter(x, levels=1)[0]
    return model.count_from_mask(mask, logvar, x)[0]


def precision_mode(name: str, device: torch.device):
    """Context for one precision mode; sets the TF32 switches it needs."""
    tf32 = name != "fp32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    if name.startswith("bf16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_section(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    batch = 4 if quick else 64
    for preset in ("paper", "small"):
        config = get_preset(preset)
        size = tuple(config["input_size"])
        torch.manual_seed(0)
        model = CountingPipeline(config)
        flops = flops_per_image(model, size)
        model = model.eval().to(device)
        g = torch.Generator(device="cpu").manual_seed(1)
        # Four batches to rotate through (more data than the L2 cache holds).
        inputs = [torch.rand(batch, 1, *size, generator=g).to(device) for _ in range(4)]
        reference = None
        modes = ["fp32", "tf32", "bf16", "bf16+channels_last", "bf16+channels_last+autotune"]
        for mode in modes:
            torch.backends.cudnn.benchmark = mode.endswith("autotune")
            channels_last = "channels_last" in mode
            net = model.to(memory_format=torch.channels_last) if channels_last else model
            xs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
            xs = xs if channels_last else inputs
            state = {"i": 0}

            def step(net=net, xs=xs, mode=mode, state=state):
                with torch.inference_mode(), precision_mode(mode, device):
                    state["i"] += 1
                    return forward(net, xs[state["i"] % len(xs)])

            with torch.inference_mode(), precision_mode(mode, device):
                counts = forward(net, xs[0]).float().cpu()
            if reference is None:
                reference = counts
            rel = float((counts - reference).norm() / reference.norm().clamp_min(1e-12))
            seconds = timed(step, device=device, iters=2 if quick else 20, warmup=2 if quick else 5)
            row = {
                "preset": preset,
                "mode": mode,
                "batch": batch,
                "images_per_s": round(batch / seconds, 1),
                "ms_per_batch": round(seconds * 1000, 3),
                "tflop_per_s": round(batch * flops / seconds / 1e12, 1),
                "gflop_per_image": round(flops / 1e9, 2),
                "count_rel_diff_vs_fp32": rel,
            }
            rows.append(row)
            print(
                f"  {preset:<6} {mode:<20} {row['images_per_s']:>9.0f} img/s "
                f"{row['tflop_per_s']:>7.1f} TFLOP/s  rel.diff {rel:.1e}",
                flush=True,
            )
            model = model.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = False  # PyTorch's defaults again
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def counter_section(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    n = 16 if quick else 1024
    batch = 4 if quick else 64
    rng = np.random.default_rng(2)
    for preset in ("paper", "small"):
        config = get_preset(preset)
        config["name"] = f"{preset} (random weights)"
        torch.manual_seed(0)
        counter = CellCounter(CountingPipeline(config), config, device=device)
        prepared = [
            rng.random(tuple(config["input_size"]), dtype=np.float32) for _ in range(n // 4)
        ] * 4
        counter.count_prepared(prepared[: 2 * batch], batch_size=batch)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        results = counter.count_prepared(prepared, batch_size=batch)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "preset": preset,
                "batch": batch,
                "images": len(results),
                "images_per_s": round(len(results) / seconds, 1),
            }
        )
        print(f"  CellCounter.count_prepared {preset:<6} {len(results) / seconds:>9.0f} img/s")
    return rows


def synthetic_set(n: int, size, seed: int) -> LabeledSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, *size, generator=g)
    masks = (torch.rand(n, 1, *size, generator=g) > 0.7).float()
    counts = torch.randint(0, 120, (n,), generator=g).float()
    meta = [{"name": f"img{i}", "scene": str(i)} for i in range(n)]
    return LabeledSet(images, masks, counts, meta)


def training_section(device: torch.device, quick: bool) -> list[dict]:
    from celltally.train import train_counter, train_segmenter

    rows = []
    cases = [
        ("paper", "segmenter", 2),
        ("paper", "segmenter", 16),
        ("paper", "counter", 5),
        ("paper", "counter", 64),
        ("small", "segmenter", 8),
        ("small", "counter", 16),
    ]
    for preset, stage, batch in cases:
        for amp in ("1", "0"):
            if preset == "small" and amp == "0":
                continue
            os.environ["CELLTALLY_AMP"] = amp
            config = get_preset(preset)
            size = tuple(config["input_size"])
            n = (1 if quick else 128 if batch < 16 else 24) * batch  # steps per epoch x batch
            data = synthetic_set(n, size, seed=3)
            torch.manual_seed(0)
            model = CountingPipeline(config)
            train = train_segmenter if stage == "segmenter" else train_counter
            ends: list[float] = []  # the loop logs once at the end of each epoch
            history = train(
                model,
                data,
                val=None,
                epochs=2,
                batch_size=batch,
                lr=1e-4,
                device=device,
                progress=False,
                log=lambda _, ends=ends: ends.append(time.perf_counter()),
            )
            seconds = ends[1] - ends[0]  # the second epoch: warm
            steps = n // batch
            row = {
                "preset": preset,
                "stage": stage,
                "batch": batch,
                "precision": "bf16 autocast" if amp == "1" and device.type == "cuda" else "fp32",
                "images_per_s": round(steps * batch / seconds, 1),
                "ms_per_step": round(1000 * seconds / steps, 2),
                "final_loss": history[-1]["loss"],
            }
            rows.append(row)
            print(
                f"  train {preset:<6} {stage:<9} batch {batch:<3} {row['precision']:<14}"
                f"{row['images_per_s']:>9.0f} img/s  {row['ms_per_step']:>7.2f} ms/step",
                flush=True,
            )
    os.environ.pop("CELLTALLY_AMP", None)
    return rows


def nccl_section(device: torch.device, quick: bool) -> dict:
    import torch.distributed as dist

    from celltally import distributed
    from celltally.train import train_counter, train_segmenter

    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group(backend)
    try:
        config = get_preset("small")
        data = synthetic_set(64, tuple(config["input_size"]), seed=4)
        torch.manual_seed(0)
        model = CountingPipeline(config)
        before = distributed.weights_digest(model)
        common = dict(epochs=1, lr=1e-3, device=device, progress=False, log=lambda _: None)
        seg = train_segmenter(model, data, batch_size=8, **common)
        cnt = train_counter(model, data, batch_size=8, **common)
        digests = distributed.check_in_sync(model)
        wrapped = type(distributed.wrap(model.counter, device)).__name__
        result = {
            "backend": dist.get_backend(),
            "world_size": distributed.world_size(),
            "wrapped_as": wrapped,
            "segmenter_loss": seg[-1]["loss"],
            "counter_loss": cnt[-1]["loss"],
            "trained": digests[0] != before,
            "finite": all(np.isfinite([seg[-1]["loss"], cnt[-1]["loss"]])),
        }
    finally:
        dist.destroy_process_group()
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
    print(f"  DDP over {result['backend']}: {result}", flush=True)
    return result


def files_section(device: torch.device, quick: bool) -> list[dict]:
    from celltally.simulate import simulate_plate

    rows = []
    workers = max(1, min(16, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        scenes = 2 if quick else 320
        plate = simulate_plate(Path(tmp) / "plate", images=scenes, seed=1, workers=workers)
        files = sorted((plate / "images").glob("*.TIF"))
        counter = CellCounter.from_pretrained("bbbc005", device=str(device))
        for threads in (4, max(4, workers - 2)):
            list(counter.count_paths(files[:128], batch_size=64, read_threads=threads))
            t0 = time.perf_counter()
            n = sum(1 for _ in counter.count_paths(files, batch_size=64, read_threads=threads))
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "model": "bbbc005 (shipped, flip averaging)",
                    "images": n,
                    "read_threads": threads,
                    "batch": 64,
                    "images_per_s": round(n / seconds, 1),
                }
            )
            print(f"  count_paths {n} TIFFs, {threads} reading threads: {n / seconds:.0f} img/s")
    return rows


SECTIONS = {
    "inference": inference_section,
    "count_prepared": counter_section,
    "training": training_section,
    "ddp": nccl_section,
    "files": files_section,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes (checks the script)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU here (use --device cpu --quick to check the script)")
        return 1
    result: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        },
        "quick": args.quick,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(result["machine"]), flush=True)
    for name in args.sections.split(","):
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            result[name] = SECTIONS[name](device, args.quick)
        except Exception as error:  # keep the other sections' figures
            traceback.print_exc()
            result[name] = {"error": f"{type(error).__name__}: {error}"}
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(stamp(result), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
