"""Teach a shipped model's segmenter that an empty frame is empty; measure it.

    python scripts/empty_frames.py --model nuclei --data ../shared/data/bbbc039 --out runs/nuc4/A
    python scripts/empty_frames.py --model bbbc005 --data ../shared/data/bbbc005 --out runs/nuc4/C
    python scripts/empty_frames.py --model nuclei --data ../shared/data/bbbc039 --measure-only \\
        --out runs/nuc4/shipped

Neither shipped model saw a frame without objects that looked like a real
empty well. On camera noise, or on the smooth ramp of uneven illumination
that percentile normalization stretches to full range, their segmenters put
a mask (and, for `nuclei`, a high log-variance) everywhere, and the
counters, which read those planes, count tens to hundreds of cells; with an
empty mask they count about 0. This script fine-tunes only the segmenter of
a model folder (``--init``, default the shipped one) on training data like
its own plus ``--empty`` frames of ``celltally.simulate.empty_frame`` (half
8-bit, half 16-bit, all background), writes a copy of the folder with the
new segmenter (counters and ensemble members untouched), and recalibrates it
(``celltally.uncertainty.calibrate_model``, with the ``count_scale`` blocks
the starting model had):

- ``nuclei``: the 60 BBBC039 training images (``train_nuclei.split_names``);
  recalibrated on the 20 calibration images.
- ``bbbc005``: ``--scenes`` fresh simulated scenes (``train_bbbc005``'s
  generator settings, ``--sim-seed``); recalibrated on the model's real
  calibration sites.

``--background quadratic`` trains nothing: it copies the model with
``normalization.background = 'quadratic'`` (a smooth surface fitted to the
background is subtracted before normalizing: ``celltally.transforms.
background_surface``) and recalibrates the copy.

Either way it then measures the folder (``measure.json`` in ``--out``):

- 30 held-out empty frames: 20 ``empty_frame`` frames (seeds never used in
  training) and 10 ``simulate_scene(0, ...)`` frames (8/16-bit, blur 1/23/48,
  both stains); their mean and max count;
- the calibration images: MAE without and with ``--epistemic`` (BBBC005
  also per blur x stain);
- 20 sparse simulated scenes of 1-10 objects, where a segmenter taught
  "empty" could lose real ones (nuclei: 16-bit in focus; bbbc005: 8-bit,
  blur 1/23/48, both stains): MAE;
- with ``--test``, the test images (report only; not for deciding).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_bbbc005 import cached_simulation  # noqa: E402
from train_nuclei import command_line, load_bbbc039, prepare_set, split_names  # noqa: E402

from celltally import io  # noqa: E402
from celltally.counter import CellCounter  # noqa: E402
from celltally.datasets import LabeledSet, load_bbbc005, split_bbbc005  # noqa: E402
from celltally.models.pipeline import load_model_folder, read_model_config  # noqa: E402
from celltally.naming import parse_name  # noqa: E402
from celltally.simulate import empty_frame, simulate_scene  # noqa: E402
from celltally.train import save_readable, train_segmenter, write_config  # noqa: E402
from celltally.uncertainty import calibrate_model  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "celltally" / "weights"
HELD_OUT_SEED = 10_000  # frames for measuring: seeds from here on, never trained on


def empty_items(n: int, seed: int):
    """``n`` empty frames (half 8-bit, half 16-bit) with all-background labels."""
    for i in range(n):
        frame = empty_frame(bit_depth=8 if i % 2 else 16, seed=seed + i)
        yield frame, np.zeros(frame.shape, dtype=np.int32), f"empty{seed + i}"


def held_out_empty_frames() -> list[np.ndarray]:
    frames = [empty_frame(bit_depth=8 if i % 2 else 16, seed=HELD_OUT_SEED + i) for i in range(20)]
    looks = [(1, 1), (23, 1), (48, 1), (1, 2), (23, 2), (48, 2), (1, 1), (23, 1), (48, 1), (1, 2)]
    for i, (blur, stain) in enumerate(looks):
        bit_depth = 8 if i < 6 else 16
        frames.append(simulate_scene(0, blur=blur, stain=stain, bit_depth=bit_depth, seed=i).image)
    return frames


def sparse_scenes(model: str, seed: int = HELD_OUT_SEED) -> list[tuple[np.ndarray, int]]:
    """20 simulated scenes of 1-10 objects: nuclei, 16-bit in focus; else 8-bit BBBC005 looks."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(20):
        count = int(rng.integers(1, 11))
        if model == "nuclei":
            kw = dict(blur=1, stain=1, bit_depth=16)
        else:
            kw = dict(blur=(1, 23, 48)[i % 3], stain=1 + (i // 3) % 2, bit_depth=8)
        out.append((simulate_scene(count, seed=seed + i, **kw).image, count))
    return out


def _bbbc039_part(args: argparse.Namespace, config: dict, part: str) -> LabeledSet:
    root = Path(args.data)
    split = split_names(list(io.read_counts_csv(root / "counts.csv")))
    return load_bbbc039(root, split[part], config["input_size"], config["normalization"])[0]


def calibration_data(args: argparse.Namespace, config: dict) -> LabeledSet:
    """The model's calibration images, prepared as its config says."""
    if args.model == "nuclei":
        return _bbbc039_part(args, config, "calibration")
    size, norm = config["input_size"], config["normalization"]
    real = load_bbbc005(Path(args.data), size=size, norm=norm, cache_dir=args.cache)
    sites = config["training"]["split"]["calibration_sites"]
    return real.subset(split_bbbc005(real.meta, calibration_sites=sites)["calibration"])


def training_data(args: argparse.Namespace, config: dict) -> LabeledSet:
    """The segmenter's training set, without the empty frames."""
    if args.model == "nuclei":
        return _bbbc039_part(args, config, "train")
    size, norm = config["input_size"], config["normalization"]
    return cached_simulation(args.scenes, args.sim_seed, size, norm, Path(args.cache))


def recalibrate(args: argparse.Namespace, folder: Path, config: dict) -> None:
    """Refit the folder's intervals and OOD thresholds, with the ``count_scale`` blocks it had."""
    calibration = config.get("calibration", {})
    blocks = [
        name
        for name, block in (("plain", calibration), ("epistemic", calibration.get("epistemic")))
        if block and block.get("count_scale") not in (None, 1.0)
    ]
    calibrate_model(folder, calibration_data(args, config), count_scale=blocks)


def finish_copy(args: argparse.Namespace, out: Path, config: dict) -> Path:
    """Write the copy's config (the original's figures kept apart) and recalibrate it."""
    if "metrics" in config:  # measured on the original: not this copy's figures
        config["metrics_of_original"] = config.pop("metrics")
    write_config(out, config)
    recalibrate(args, out, config)
    return out


def with_background(args: argparse.Namespace, config: dict) -> Path:
    """A copy of ``--init`` that subtracts a smooth background before normalizing; recalibrated."""
    out = Path(args.out)
    shutil.copytree(Path(args.init), out)
    config["normalization"] = {**config["normalization"], "background": args.background}
    config["training"]["background"] = {
        "command": command_line("scripts/empty_frames.py", vars(args)),
        "what": f"no retraining: normalization subtracts a {args.background} background "
        "(celltally.transforms.background_surface) first; recalibrated with it",
    }
    return finish_copy(args, out, config)


def fine_tune_segmenter(args: argparse.Namespace, config: dict) -> Path:
    init, out = Path(args.init), Path(args.out)
    train, cal = training_data(args, config), calibration_data(args, config)
    model, _ = load_model_folder(init)
    empty, _ = prepare_set(
        empty_items(args.empty, args.seed * 1000),
        config["input_size"],
        config["normalization"],
        "empty",
    )
    t0 = time.perf_counter()
    history = train_segmenter(
        model,
        LabeledSet.concat([train, empty]),
        val=cal,
        epochs=args.epochs,
        batch_size=8,
        lr=args.lr,
        tv_weight=1e-3,
        seed=args.seed,
        device=torch.device("cpu"),
        progress=False,
    )
    print(f"segmenter: {args.epochs} epochs in {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    shutil.copytree(init, out)
    with safe_open(str(init / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    new = model.state_dict()
    for key in state:
        if key.startswith("segmenter."):
            state[key] = new[key].detach().cpu().contiguous()
    save_readable(state, out / "model.safetensors", metadata=metadata)
    seen = (
        "its 60 BBBC039 training images"
        if args.model == "nuclei"
        else f"{args.scenes} new simulated scenes (train_bbbc005 settings, seed {args.sim_seed})"
    )
    config["training"]["segmenter_empty_frames"] = {
        "command": command_line("scripts/empty_frames.py", vars(args)),
        "what": f"segmenter alone fine-tuned (counters and ensemble members unchanged) on {seen} "
        f"+ {args.empty} celltally.simulate.empty_frame frames (seeds {args.seed * 1000}-"
        f"{args.seed * 1000 + args.empty - 1}, all background)",
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": 8,
    }
    config["training"]["data"] = list(config["training"]["data"]) + [
        f"segmenter fine-tune: {seen} + {args.empty} empty frames (celltally.simulate.empty_frame)"
    ]
    config.setdefault("history", {})["segmenter_empty_frames"] = history
    return finish_copy(args, out, config)


def mae(counts, truths) -> float:
    return float(np.mean(np.abs(np.asarray(counts, float) - np.asarray(truths, float))))


def count_files(counter: CellCounter, paths: list[Path]) -> list[float]:
    out = []
    for path, result in counter.count_paths(paths):
        if isinstance(result, Exception):
            raise SystemExit(f"{path}: {result}")
        out.append(result.count)
    return out


def real_images(args: argparse.Namespace, config: dict, group: str) -> list[tuple[Path, float]]:
    root = Path(args.data)
    if args.model == "nuclei":
        table = io.read_counts_csv(root / "counts.csv")
        return [(root / "images" / n, float(table[n])) for n in split_names(list(table))[group]]
    split = config["training"]["split"]
    sites = split["calibration_sites"] if group == "calibration" else split["test_sites"]
    out = []
    for path in io.list_images([io.images_folder(root)]):
        name = parse_name(path.name)
        if name.site in sites and name.count is not None:
            out.append((path, float(name.count)))
    return out


def group_key(path: Path) -> str:
    name = parse_name(path.name)
    return f"F{name.blur} w{name.stain}"


def measure(args: argparse.Namespace, folder: Path) -> dict:
    config = read_model_config(folder)
    plain = CellCounter.from_pretrained(str(folder))
    result: dict = {"model": str(folder)}
    empties = [plain.count(f).count for f in held_out_empty_frames()]
    result["empty_frames"] = {
        "n": len(empties),
        "mean_count": float(np.mean(empties)),
        "max_count": float(np.max(empties)),
        "counts": [round(c, 2) for c in empties],
    }
    sparse = sparse_scenes(args.model)
    result["sparse_mae"] = mae([plain.count(im).count for im, _ in sparse], [c for _, c in sparse])
    ens = CellCounter.from_pretrained(str(folder), epistemic=True)
    for group in ["calibration"] + (["test"] if args.test else []):
        items = real_images(args, config, group)
        paths, truth = [p for p, _ in items], [t for _, t in items]
        counts = count_files(plain, paths)
        result[f"{group}_n"] = len(paths)
        result[f"{group}_mae"] = mae(counts, truth)
        result[f"{group}_mae_epistemic"] = mae(count_files(ens, paths), truth)
        if args.model == "bbbc005":
            errors = defaultdict(list)
            for path, c, t in zip(paths, counts, truth, strict=True):
                errors[group_key(path)].append(abs(c - t))
            result[f"{group}_mae_by_group"] = {
                k: float(np.mean(v)) for k, v in sorted(errors.items())
            }
    print(json.dumps({k: v for k, v in result.items() if k != "empty_frames"}), flush=True)
    print("empty frames:", result["empty_frames"], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("nuclei", "bbbc005"), default="nuclei")
    parser.add_argument("--data", required=True, help="BBBC039 (nuclei) or BBBC005 folder")
    parser.add_argument("--init", help="model folder to start from (default: the shipped one)")
    parser.add_argument("--out", required=True, help="new model folder (or results folder)")
    parser.add_argument("--empty", type=int, help="empty frames added (nuclei 60, bbbc005 200)")
    parser.add_argument("--scenes", type=int, default=1000, help="bbbc005: simulated scenes")
    parser.add_argument("--sim-seed", type=int, default=9000, help="bbbc005: their seed")
    parser.add_argument("--cache", default="cache", help="bbbc005: prepared-data cache")
    parser.add_argument("--epochs", type=int, help="segmenter epochs (nuclei 8, bbbc005 4)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure-only", action="store_true", help="measure --init, train nothing")
    parser.add_argument("--test", action="store_true", help="also count the test images")
    parser.add_argument(
        "--background",
        choices=("quadratic",),
        help="train nothing: copy --init with this background subtracted before normalizing",
    )
    args = parser.parse_args()
    if not Path(args.data).is_dir():  # before any simulation or output
        raise SystemExit(f"--data {args.data}: no such folder")
    args.init = args.init or str(WEIGHTS / args.model)
    if args.empty is None:
        args.empty = 60 if args.model == "nuclei" else 200
    if args.epochs is None:
        args.epochs = 8 if args.model == "nuclei" else 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.measure_only:
        if args.background:
            raise SystemExit("--measure-only measures --init as it is: leave out --background")
        folder = Path(args.init)
        out.mkdir(parents=True, exist_ok=True)
    else:
        if out.exists():
            raise SystemExit(f"{out}: already exists; give a new --out")
        config = read_model_config(Path(args.init))
        if args.background:
            folder = with_background(args, config)
        else:
            folder = fine_tune_segmenter(args, config)
    result = measure(args, folder)
    (out / "measure.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
