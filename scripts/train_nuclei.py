"""Train the shipped `nuclei` model on real BBBC039 (Hoechst-stained U2OS nuclei, 16-bit).

    python scripts/train_nuclei.py --data ../shared/data/bbbc039 --out runs/nuclei

Split (fixed, by a seeded hash of the file name, see ``split_names``): the 20
images with the smallest ``sha1("bbbc039-split-0:" + name)`` are the test set
(never used for training or calibration), the next 20 the calibration set
(split-conformal scores), the remaining 60 the training set. The lists are
written into the model folder's config.json.

Recipe (the small preset's architecture, at the BBBC005 model's scale: a
696 x 520 frame is 256 x 192 model pixels, ~2.71 raw px per model px):

1. Segmenter (FPN) on whole frames: foreground = union of the instance masks
   (BBBC039's label PNGs: channel 0, the 4-connected components of each colour).
2. Counter (VGG density head) on random crops of the frozen segmenter's mask +
   image, with the 8 flips/rotations. Each crop is supervised cell by cell: the
   true density puts ``1 / area`` on every pixel of an instance, so a cell's
   target is the (fractional) number of nuclei it holds and the cells of a
   frame sum to its count. Loss: beta-NLL per cell + beta-NLL of the crop total.
3. Calibration (``celltally.uncertainty.calibrate_model``, as for the BBBC005
   model): split-conformal scores |y - mu| / sigma, temperature scaling and
   out-of-distribution thresholds on the whole calibration frames; test
   metrics on the 20 held-out frames, counted by ``CellCounter`` from the
   saved folder (exactly what ``celltally count`` does).

``--members RUN...`` adds the counters of other runs of this script that
started from this run's segmenter (``--init THIS_RUN --seg-epochs 0 --seed
K``) as ``ensemble_<k>.safetensors`` (``--epistemic``), calibrated too.

``--simulated N`` adds N simulated 16-bit nuclei scenes (celltally.simulate,
stain 1, in focus, counts 0-230, exact instance labels) to both stages.

``--planes-at input`` gives the counter the full model input (the mask
upsampled), as the shipped ``bbbc005`` model has: density targets are then
made at the input's size and ``--crop`` (in mask pixels) is doubled, the same
field of view. ``--device`` trains on a GPU (default: CUDA when available).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from celltally import io
from celltally.counter import CellCounter
from celltally.datasets import LabeledSet
from celltally.losses import gaussian_nll
from celltally.metrics import count_metrics
from celltally.models.pipeline import (
    PLANES_AT,
    CountingPipeline,
    add_counter_inputs,
    planes_shape,
)
from celltally.models.presets import get_preset
from celltally.models.vgg import TTA
from celltally.train import (
    default_device,
    one_cycle,
    predict_masks,
    save_model_folder,
    train_segmenter,
)
from celltally.transforms import prepare_image, resize_area
from celltally.uncertainty import COUNT_SCALE_BLOCKS, calibrate_model

SPLIT_SALT = "bbbc039-split-0"
N_TEST = 20
N_CAL = 20
NATIVE = (520, 696)


def split_names(names: list[str], *, n_test: int = N_TEST, n_cal: int = N_CAL) -> dict:
    """Test / calibration / train lists ordered by ``sha1(SPLIT_SALT + ':' + name)``."""
    order = sorted(names, key=lambda n: hashlib.sha1(f"{SPLIT_SALT}:{n}".encode()).hexdigest())
    return {
        "test": sorted(order[:n_test]),
        "calibration": sorted(order[n_test : n_test + n_cal]),
        "train": sorted(order[n_test + n_cal :]),
    }


def read_instances(path: Path) -> np.ndarray:
    """BBBC039 label PNG -> instance labels (the 4-connected components of each colour)."""
    # the same on all 100 BBBC039 masks as reading channel 0 alone, as this did before
    return io.colour_labels(np.asarray(Image.open(path))[..., :3]).astype(np.int32)


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix summing fractional pixel overlaps: preserves totals exactly."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    starts, stops = np.arange(n_in), np.arange(1, n_in + 1)
    lo = np.maximum(edges[:-1, None], starts[None])
    hi = np.minimum(edges[1:, None], stops[None])
    return np.clip(hi - lo, 0.0, None)


def instance_density(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Count density at ``shape``: each instance spreads 1 over its pixels; sums to the count."""
    areas = np.bincount(labels.ravel()).astype(np.float64)
    weight = np.zeros_like(areas)
    weight[1:] = np.where(areas[1:] > 0, 1.0 / np.maximum(areas[1:], 1), 0.0)
    dens = weight[labels]
    out = _pool_matrix(labels.shape[0], shape[0]) @ dens @ _pool_matrix(labels.shape[1], shape[1]).T
    return out.astype(np.float32)


def prepare_set(
    items, size, norm, source: str, *, planes_at: str = "mask"
) -> tuple[LabeledSet, torch.Tensor]:
    """(raw image, instance labels, name) items -> LabeledSet + densities at the counter's planes.

    The planes are at the mask's size (half the input) or, with
    ``planes_at='input'``, at the input's size.
    """
    images, masks, counts, meta, dens = [], [], [], [], []
    half = planes_shape(size, planes_at)
    for raw, labels, name in items:
        images.append(prepare_image(raw, size=size, norm=norm))
        masks.append(resize_area(labels > 0, size))
        counts.append(float(len(np.unique(labels)) - 1))
        dens.append(instance_density(labels, half))
        meta.append({"name": name, "scene": name, "source": source})
    data = LabeledSet(
        torch.from_numpy(np.stack(images)).unsqueeze(1),
        torch.from_numpy(np.stack(masks)).unsqueeze(1),
        torch.tensor(counts, dtype=torch.float32),
        meta,
    )
    return data, torch.from_numpy(np.stack(dens)).unsqueeze(1)


def load_bbbc039(
    root: Path, names: list[str], size, norm, *, planes_at: str = "mask"
) -> tuple[LabeledSet, torch.Tensor]:
    table = io.read_counts_csv(root / "counts.csv")
    items = []
    for name in names:
        raw = io.read_image(root / "images" / name)
        labels = read_instances(root / "masks" / (Path(name).stem + ".png"))
        n = len(np.unique(labels)) - 1
        if n != int(table[name]):
            raise SystemExit(f"{name}: {n} instances in the mask but counts.csv says {table[name]}")
        items.append((raw, labels, name))
    return prepare_set(items, size, norm, "bbbc039", planes_at=planes_at)


def simulated_items(n: int, seed: int, counts: tuple[int, int]):
    from celltally.simulate import SimulationParams, simulate_scene

    rng = np.random.default_rng(seed)
    for i in range(n):
        count = int(rng.integers(counts[0], counts[1] + 1))
        params = SimulationParams(cluster_probability=float(rng.choice([0.0, 0.25])))
        sim = simulate_scene(
            count, blur=1, stain=1, bit_depth=16, seed=seed * 100_003 + i, params=params
        )
        yield sim.image, np.asarray(sim.labels, dtype=np.int32), f"sim{seed}_{i}_C{count}"


def _weighted_nll(pred, target, log_var, weight, beta):
    """beta-NLL (see ``losses.gaussian_nll``) averaged with per-element ``weight``."""
    loss = 0.5 * torch.exp(-log_var) * (target - pred) ** 2 + 0.5 * log_var
    if beta:
        loss = loss * torch.exp(beta * log_var).detach()
    return (loss * weight).sum() / weight.sum().clamp(min=1.0)


def _offset(length: int, side: int, gen: torch.Generator) -> int:
    """Crop start: snapped to the start or the end of the mosaic half the time, else uniform."""
    mode = int(torch.randint(0, 4, (1,), generator=gen))
    top = length - side
    if mode == 0:
        return 0
    if mode == 1:
        return top
    return int(torch.randint(0, top + 1, (1,), generator=gen))


def _mosaic_crops(
    inputs: torch.Tensor,
    density: torch.Tensor,
    *,
    batch_size: int,
    size: tuple[int, int],
    cell: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops of ``size`` from 2 x 2 mosaics of randomly flipped training frames.

    Mosaics let a crop be larger than one frame, so the counter sees cells far
    from any border (as inside a tiled large image) as well as near one; the
    density targets are stitched the same way, so they stay exact.

    Returns inputs, densities and per-cell loss weights. A crop side that cuts
    through the mosaic is an artificial border: nuclei cut there have
    fractional targets, while at a real image border a cut nucleus counts 1
    (the annotation's convention, and what counting a whole image needs), and
    the network cannot tell the two apart. So the cells along artificial
    sides get weight 0 (like a tile's margin); along real sides (the mosaic's
    outer edge, where half the crops are snapped) weight 1.
    """
    n, _, h, w = inputs.shape
    xs, ds, ws = [], [], []
    for _ in range(batch_size):
        idx = torch.randint(0, n, (4,), generator=gen)
        flips = torch.randint(0, 4, (4,), generator=gen)
        tiles_x, tiles_d = [], []
        for i, k in zip(idx.tolist(), flips.tolist(), strict=True):
            dims = {0: (), 1: (-2,), 2: (-1,), 3: (-2, -1)}[k]
            tiles_x.append(inputs[i].flip(dims) if dims else inputs[i])
            tiles_d.append(density[i].flip(dims) if dims else density[i])
        mx = torch.cat([torch.cat(tiles_x[:2], -1), torch.cat(tiles_x[2:], -1)], -2)
        md = torch.cat([torch.cat(tiles_d[:2], -1), torch.cat(tiles_d[2:], -1)], -2)
        y0, x0 = _offset(2 * h, size[0], gen), _offset(2 * w, size[1], gen)
        xs.append(mx[:, y0 : y0 + size[0], x0 : x0 + size[1]])
        ds.append(md[:, y0 : y0 + size[0], x0 : x0 + size[1]])
        weight = torch.ones(size[0] // cell, size[1] // cell)
        if y0 > 0:
            weight[0] = 0
        if y0 + size[0] < 2 * h:
            weight[-1] = 0
        if x0 > 0:
            weight[:, 0] = 0
        if x0 + size[1] < 2 * w:
            weight[:, -1] = 0
        ws.append(weight)
    return torch.stack(xs), torch.stack(ds), torch.stack(ws)


def train_counter_cells(
    model: CountingPipeline,
    data: LabeledSet,
    density: torch.Tensor,
    *,
    val: LabeledSet,
    epochs: int,
    steps: int,
    batch_size: int,
    crop: tuple[int, int],
    lr: float,
    beta: float,
    seed: int,
    frames: bool = False,
    bn_freeze: float = 0.0,
    ema: float = 0.0,
    log=print,
    device: torch.device | None = None,
) -> list[dict]:
    """Counter stage with per-cell targets, on whole frames or on crops of frame mosaics.

    ``frames``: batches of whole training frames, each flipped at random (the
    counter then sees exactly what it sees when counting one frame).
    Otherwise crop sides are drawn per batch, in whole density cells, from
    ``crop[0]`` to ``crop[1]`` mask pixels (up to twice a frame; with planes
    at the input, twice as many plane pixels: the same field of view).
    ``bn_freeze``: the last fraction of the epochs keeps batch norm in eval
    mode (fixed running statistics), so the weights settle on the statistics
    that counting uses. ``ema`` > 0: validate and keep an exponential moving
    average of the weights and batch-norm statistics (decay ``ema`` per step),
    which smooths the step-to-step noise of 60 training images.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    device = device or torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    mask, logvar = predict_masks(model, data.images, device=device)
    inputs = model.counter_planes(mask, logvar, data.images)
    vmask, vlogvar = predict_masks(model, val.images, device=device)
    val_inputs = model.counter_planes(vmask, vlogvar, val.images).to(device)
    counter = model.counter.to(device)
    cell = counter.stride
    h, w = inputs.shape[-2:]
    scale = w // mask.shape[-1]  # plane pixels per mask pixel
    lo, hi = crop[0] * scale, crop[1] * scale
    sides_y = [s for s in range(lo, min(hi, 2 * h) + 1, cell)]
    sides_x = [s for s in range(lo, min(hi, 2 * w) + 1, cell)]
    optimizer = torch.optim.Adam(counter.parameters(), lr=lr)
    schedule = one_cycle(optimizer, lr=lr, total_steps=epochs * steps)
    averaged = (
        AveragedModel(counter, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)
        if ema
        else None
    )
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        counter.train()
        if epoch >= epochs * (1.0 - bn_freeze):
            for module in counter.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()
        total = 0.0
        for _ in range(steps):
            if frames:
                idx = torch.randint(0, inputs.shape[0], (batch_size,), generator=gen)
                flips = torch.randint(0, 4, (batch_size,), generator=gen).tolist()
                dims = [{0: (), 1: (-2,), 2: (-1,), 3: (-2, -1)}[k] for k in flips]
                x = torch.stack([inputs[i].flip(dm) for i, dm in zip(idx, dims, strict=True)])
                d = torch.stack([density[i].flip(dm) for i, dm in zip(idx, dims, strict=True)])
                weight = torch.ones(batch_size, h // cell, w // cell)
            size = (
                sides_y[int(torch.randint(0, len(sides_y), (1,), generator=gen))],
                sides_x[int(torch.randint(0, len(sides_x), (1,), generator=gen))],
            )
            if not frames:
                x, d, weight = _mosaic_crops(
                    inputs, density, batch_size=batch_size, size=size, cell=cell, gen=gen
                )
            x, d, weight = x.to(device), d.to(device), weight.to(device)
            target = torch.nn.functional.avg_pool2d(d, cell)[:, 0] * cell * cell
            dens, lv = counter.density(x)
            cell_loss = _weighted_nll(dens, target, lv, weight, beta)
            keep = weight > 0
            crop_loss = gaussian_nll(
                (dens * weight).sum((-2, -1)),
                (target * weight).sum((-2, -1)),
                torch.logsumexp(lv.masked_fill(~keep, -30.0).flatten(1), 1),
                beta=beta,
            )
            loss = cell_loss + crop_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if averaged is not None:
                averaged.update_parameters(counter)
            total += loss.item()
        counter.eval()
        judged = counter if averaged is None else averaged.module.eval()
        with torch.inference_mode():
            m, lv = judged(val_inputs)
            rows = [torch.cat([val_inputs[i], val_inputs[i + 1]], -1) for i in (0, 2)]
            whole, _ = judged(torch.cat(rows, -2)[None])
        m, whole = m.cpu(), whole.cpu()
        err = m - val.counts
        record = {
            "epoch": epoch + 1,
            "loss": round(total / steps, 4),
            "val_mae": round(float(err.abs().mean()), 3),
            "val_bias": round(float(err.mean()), 3),
            "val_max": round(float(err.abs().max()), 2),
            "val_mosaic_minus_parts": round(float(whole[0] - m[:4].sum()), 2),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        history.append(record)
        log("counter " + " ".join(f"{k}={v}" for k, v in record.items()))
    if averaged is not None:
        counter.load_state_dict(averaged.module.state_dict())
    model.cpu()
    return history


def command_line(script: str, args: dict) -> str:
    """The command that gives ``args``: switches alone, values and lists after their names.

    Unset options (None, False, an empty list) are left out: they are the defaults.
    """
    words = ["python", script]
    for key, value in args.items():
        if value is None or value is False or (isinstance(value, list | tuple) and not value):
            continue
        words.append(f"--{key.replace('_', '-')}")
        if value is not True:
            words.extend(map(str, value) if isinstance(value, list | tuple) else [str(value)])
    return " ".join(words)


def add_members(
    folder: Path,
    runs: list[str],
    model: CountingPipeline,
    *,
    unet: list[str] = (),
    counter_config: dict | None = None,
    unet_float16: bool = False,
    unet_tta: str | None = None,
) -> None:
    """Copy the counters of ``runs`` into ``folder`` as ``ensemble_<k>.safetensors``.

    Each run must share this model's segmenter (trained with ``--init`` of this
    run and ``--seg-epochs 0``), or its counter read other masks than it will get.
    With ``unet`` (one U-Net counter file per run), member ``k`` is the average
    of run ``k``'s counter and U-Net ``k``, as the model's own counter is; where
    that U-Net's shape differs from the model's (``counter_config``), the
    member's file records its own counter block in its metadata
    (``celltally.uncertainty.load_members`` reads it). ``unet_float16`` stores
    the U-Net parts' floating-point tensors at half precision (they load into
    float32 counters; the calibration that follows is fitted on them as stored).
    ``unet_tta`` sets the members' U-Net test-time averaging (default: the model's).
    """
    from safetensors.torch import load_file, save_file

    if unet and counter_config is None:
        raise ValueError("add_members: pairing U-Nets needs the model's counter_config")
    own = {k: v for k, v in model.state_dict().items() if k.startswith("segmenter.")}
    for k, run in enumerate(runs, start=1):
        state = load_file(str(Path(run) / "model.safetensors"))
        if any(not torch.equal(state[key], value) for key, value in own.items()):
            raise SystemExit(f"--members {run}: its segmenter differs from this run's")
        counter = {
            key.removeprefix("counter."): value.contiguous()
            for key, value in state.items()
            if key.startswith("counter.")
        }
        metadata = None
        if unet:
            counter = averaged_counter_state(counter, Path(unet[k - 1]))
            if unet_float16:
                counter = {
                    key: value.half()
                    if key.startswith("counters.1.") and value.is_floating_point()
                    else value
                    for key, value in counter.items()
                }
            tta = unet_tta or counter_config["average_with"][0]["tta"]
            block = unet_block(Path(unet[k - 1]), tta=tta)
            if block != counter_config["average_with"][0]:
                metadata = {"counter": json.dumps({**counter_config, "average_with": [block]})}
        save_file(counter, str(folder / f"ensemble_{k}.safetensors"), metadata=metadata)


def with_unet(
    model: CountingPipeline, config: dict, unet: Path, *, tta: str
) -> tuple[CountingPipeline, dict]:
    """``model`` with its counter averaged with the U-Net counter in ``unet`` (a new model)."""
    block = unet_block(unet, tta=tta)
    config = {**config, "counter": {**config["counter"], "average_with": [block]}}
    paired = CountingPipeline(config)
    state = model.state_dict()
    grid = {k.removeprefix("counter."): v for k, v in state.items() if k.startswith("counter.")}
    paired.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("counter.")}
        | {f"counter.{k}": v for k, v in averaged_counter_state(grid, unet).items()}
    )
    return paired, config


def unet_block(unet: Path, *, tta: str) -> dict:
    """The ``average_with`` counter block of the U-Net counter in ``unet`` (its run's shape)."""
    trained = json.loads((unet.parent / "result.json").read_text())["args"]
    return {
        "head": "unet",
        "width": int(trained.get("width", 16)),
        "levels": int(trained.get("levels", 3)),
        "count_scale": 0.05,
        "tta": tta,
    }


def averaged_counter_state(grid: dict, unet: Path) -> dict:
    """An ``AverageCounter``'s weights: the grid counter's ``grid`` and the U-Net file's."""
    from safetensors.torch import load_file

    return {f"counters.0.{k}": v.contiguous() for k, v in grid.items()} | {
        f"counters.1.{k}": v.contiguous() for k, v in load_file(str(unet)).items()
    }


def unet_commands(unet: Path) -> list[str]:
    """The scripts/train_nuclei_unet.py commands that made ``unet``, first run first."""
    result = json.loads((unet.parent / "result.json").read_text())
    args = result["args"]
    line = f"python scripts/train_nuclei_unet.py --epochs {args['epochs']} --lr {args['lr']}"
    line += f" --seed {args['seed']}"
    if args.get("width", 16) != 16:
        line += f" --width {args['width']}"
    if args.get("sampling", "permutation" if "steps" not in args else "random") != "random":
        line += " --sampling permutation"  # the first runs always drew frames this way
    if args.get("mosaic"):
        line += " --mosaic"
    if args.get("device", "cpu") != "cpu":
        line += f" --device {args['device']}"
    if args.get("budget"):  # the budget cut the epochs: say how many ran
        line += f" --budget {args['budget']:g} (ran {result['epochs_trained']} epochs)"
    earlier = []
    if args.get("init"):
        init = Path(args["init"]).parent / "counter.safetensors"
        earlier = unet_commands(init)
        line += f" --init {init}"
        if args.get("init_as"):  # a lent GPU got the start weights rounded for the trip
            line += f" (init stored as {args['init_as']})"
    return [*earlier, f"{line} --out {args['out']}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc039")
    parser.add_argument("--out", default="runs/nuclei")
    parser.add_argument("--simulated", type=int, default=0)
    parser.add_argument("--simulated-stages", choices=("counter", "both"), default="counter")
    parser.add_argument("--seg-epochs", type=int, default=60)
    parser.add_argument("--seg-lr", type=float, default=2e-3)
    parser.add_argument("--count-epochs", type=int, default=30)
    parser.add_argument("--count-steps", type=int, default=60, help="batches per counter epoch")
    parser.add_argument("--count-lr", type=float, default=2e-3)
    parser.add_argument(
        "--crop", type=int, nargs=2, default=(64, 192), help="counter crop sides (mask px)"
    )
    parser.add_argument("--count-batch", type=int, default=16)
    parser.add_argument(
        "--frames", action="store_true", help="train the counter on whole frames, not mosaics"
    )
    parser.add_argument("--counter-width", type=float, default=0.125)
    parser.add_argument(
        "--counter-inputs", nargs="+", default=["mask", "image"], help="planes the counter reads"
    )
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of counter weights")
    parser.add_argument(
        "--bn-freeze", type=float, default=0.0, help="last fraction of counter epochs, BN fixed"
    )
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--init", help="model folder whose weights start training")
    parser.add_argument(
        "--init-segmenter", help="model folder whose segmenter weights start training"
    )
    parser.add_argument(
        "--init-counter",
        help="model folder whose counter weights start training, whatever planes it read "
        "(the layers must have the same shapes)",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="model input size for a 696 x 520 frame (default: the preset's, 192 256)",
    )
    parser.add_argument(
        "--members",
        nargs="+",
        default=[],
        help="finished runs (--init THIS_RUN --seg-epochs 0) whose counters join as an ensemble",
    )
    parser.add_argument(
        "--unet",
        help="counter.safetensors of scripts/train_nuclei_unet.py: its U-Net counter is "
        "averaged with this model's counter (models.average)",
    )
    parser.add_argument(
        "--count-scale",
        nargs="+",
        default=[],
        choices=COUNT_SCALE_BLOCKS,
        help="blocks whose counts get a factor sum(y) / sum(mu) fitted on the calibration "
        "images (celltally.uncertainty.calibrate_model)",
    )
    parser.add_argument(
        "--unet-tta",
        choices=tuple(TTA),
        help="test-time averaging of the --unet counter (default: --tta, as the grid counter's)",
    )
    parser.add_argument(
        "--unet-members-float16",
        action="store_true",
        help="store the --unet-members' weights at half precision "
        "(half the bytes; the calibration is fitted on them as stored)",
    )
    parser.add_argument(
        "--unet-members-tta",
        choices=tuple(TTA),
        help="test-time averaging of the --unet-members (default: --tta, as the model's own)",
    )
    parser.add_argument(
        "--unet-members",
        nargs="+",
        default=[],
        help="U-Net counters paired, in order, with the --members runs' counters",
    )
    parser.add_argument(
        "--tta",
        choices=tuple(TTA),
        default="none",
        help="counter test-time averaging over flips (eval only; the shipped model: flip)",
    )
    parser.add_argument(
        "--planes-at", choices=PLANES_AT, default="mask", help="where the counter reads"
    )
    parser.add_argument("--device", help="torch device (default: CUDA when available, else CPU)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.data).is_dir():  # before any simulation or output
        raise SystemExit(f"--data {args.data}: no such folder")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    root = Path(args.data)
    config = get_preset("small")
    config["preset"] = "small"
    config["name"] = "nuclei"
    config["normalization"] = {"method": "percentile", "low": 0.5, "high": 99.95}
    config["counter"]["width"] = args.counter_width
    config["counter"]["tta"] = args.tta
    config["counter_inputs"] = list(args.counter_inputs)
    config["counter"]["planes_at"] = args.planes_at
    if args.input_size:
        config["input_size"] = list(args.input_size)
    size = config["input_size"]
    norm = config["normalization"]
    table = io.read_counts_csv(root / "counts.csv")
    split = split_names(list(table))
    t0 = time.perf_counter()
    planes_at = args.planes_at
    train, train_dens = load_bbbc039(root, split["train"], size, norm, planes_at=planes_at)
    cal, _ = load_bbbc039(root, split["calibration"], size, norm, planes_at=planes_at)
    print(
        f"loaded {len(train)} train / {len(cal)} calibration images "
        f"in {time.perf_counter() - t0:.0f}s (the test images are counted at the end)"
    )
    sources = [f"BBBC039 real, {len(train)} training images (16-bit Hoechst U2OS nuclei)"]
    seg_train = train
    if args.simulated:
        sim, sim_dens = prepare_set(
            simulated_items(args.simulated, 5000 + args.seed, (0, 230)),
            size,
            norm,
            "simulated",
            planes_at=planes_at,
        )
        train = LabeledSet.concat([train, sim])
        train_dens = torch.cat([train_dens, sim_dens])
        if args.simulated_stages == "both":
            seg_train = train
        sources.append(
            f"simulated: {args.simulated} 16-bit in-focus nuclei scenes (celltally.simulate "
            f"stain 1, counts 0-230, cluster probability 0 or 0.25, seed {5000 + args.seed}), "
            f"used by the {'segmenter and the ' if args.simulated_stages == 'both' else ''}"
            "counter"
        )
    model = CountingPipeline(config)
    if args.init:
        from safetensors.torch import load_file

        # --init's counter may read fewer planes: widened, computing the same counts
        init_config = json.loads((Path(args.init) / "config.json").read_text())
        if init_config["counter"].get("planes_at", "mask") != args.planes_at:
            raise SystemExit(
                f"--init {args.init}: its counter reads planes at the "
                f"{init_config['counter'].get('planes_at', 'mask')}, not the {args.planes_at} "
                "(start from its segmenter alone: --init-segmenter)"
            )
        planes = init_config["counter_inputs"]
        model = CountingPipeline({**config, "counter_inputs": planes})
        model.load_state_dict(load_file(str(Path(args.init) / "model.safetensors")))
        if planes != config["counter_inputs"]:
            model, config = add_counter_inputs(
                model, {**config, "counter_inputs": planes}, config["counter_inputs"]
            )
    if args.unet:
        if args.count_epochs or args.seg_epochs:
            raise SystemExit(
                "--unet only assembles trained counters: use --seg-epochs 0 --count-epochs 0"
            )
        if len(args.unet_members) != len(args.members):
            raise SystemExit("--unet-members must pair one U-Net counter with each --members run")
        model, config = with_unet(model, config, Path(args.unet), tta=args.unet_tta or args.tta)
    if args.init_segmenter:
        from safetensors.torch import load_file

        state = load_file(str(Path(args.init_segmenter) / "model.safetensors"))
        seg = {
            k.removeprefix("segmenter."): v for k, v in state.items() if k.startswith("segmenter.")
        }
        model.segmenter.load_state_dict(seg)
    if args.init_counter:
        from safetensors.torch import load_file

        state = load_file(str(Path(args.init_counter) / "model.safetensors"))
        model.counter.load_state_dict(
            {k.removeprefix("counter."): v for k, v in state.items() if k.startswith("counter.")}
        )
    cpu = torch.device("cpu")
    device = torch.device(args.device) if args.device else default_device()
    seg_history = []
    if args.seg_epochs > 0:
        seg_history = train_segmenter(
            model,
            seg_train,
            val=cal,
            epochs=args.seg_epochs,
            batch_size=8,
            lr=args.seg_lr,
            tv_weight=1e-3,
            seed=args.seed,
            device=device,
            progress=False,
        )
        model.cpu()
    count_history = (
        []
        if args.count_epochs == 0
        else train_counter_cells(
            model,
            train,
            train_dens,
            val=cal,
            epochs=args.count_epochs,
            steps=args.count_steps,
            batch_size=args.count_batch,
            crop=tuple(args.crop),
            lr=args.count_lr,
            beta=args.beta,
            seed=args.seed,
            frames=args.frames,
            bn_freeze=args.bn_freeze,
            ema=args.ema,
            device=device,
        )
    )
    model.eval()
    config["scale"] = {
        "native_size": list(NATIVE),
        "object_diameter_px": 28.3,
        "note": "median equivalent diameter of BBBC039's annotated nuclei, raw pixels",
    }
    config["train"]["segmenter"].update(epochs=args.seg_epochs, lr=args.seg_lr, batch_size=8)
    config["train"]["counter"].update(
        epochs=args.count_epochs,
        steps_per_epoch=args.count_steps,
        lr=args.count_lr,
        batch_size=args.count_batch,
        crop=list(args.crop),
        frames=args.frames,
        bn_freeze=args.bn_freeze,
        ema=args.ema,
        beta=args.beta,
        loss="beta-NLL per density cell + beta-NLL of the input's total, on "
        + (
            "whole training frames with random flips"
            if args.frames
            else "random crops of 2 x 2 frame mosaics; cells along crop sides that cut "
            "the mosaic are left out"
        ),
    )
    config["training"] = {
        "data": sources,
        "split": {
            "by": f"sha1('{SPLIT_SALT}:' + file name): 20 smallest test, next 20 calibration",
            "n_train": len(split["train"]),
            "n_calibration": len(split["calibration"]),
            "n_test": len(split["test"]),
            "test": split["test"],
            "calibration": split["calibration"],
            "train": split["train"],  # by name: calibrate --data leaves these out
        },
        "masks": "union of BBBC039's instance masks; counter targets: per-instance 1/area density",
        "command": command_line("scripts/train_nuclei.py", vars(args)),
        "seed": args.seed,
    }
    config["history"] = {"segmenter": seg_history, "counter": count_history}
    if args.init and args.seg_epochs == 0 and args.count_epochs == 0:
        # Nothing trained here: only members and calibration are added to --init's
        # model, so its training record stays (and this command is noted beside it).
        done = json.loads((Path(args.init) / "config.json").read_text())
        for key in ("train", "history"):
            config[key] = done[key]
        config["training"]["finalized_by"] = config["training"]["command"]
        config["training"]["command"] = done["training"]["command"]
        config["training"]["data"] = done["training"]["data"]
    if args.unet:
        config["training"]["unet_counter"] = {
            "averaged_with": "the counter trained by 'command' (models.average)",
            "commands": unet_commands(Path(args.unet)),
            "targets": "one normalized Gaussian (sigma 1.5 mask px) at each instance's centroid",
            "calibration_mae_alone": json.loads(
                (Path(args.unet).parent / "result.json").read_text()
            ).get("calibration_mae"),
        }
        config["training"]["data"] = list(config["training"]["data"]) + [
            "U-Net counter: the same 60 BBBC039 training images (no simulated scenes)"
        ]
        if args.unet_members:
            config["training"]["unet_members"] = [unet_commands(Path(f)) for f in args.unet_members]
            if args.unet_members_float16:
                config["training"]["unet_members_stored_as"] = "float16"
            if args.unet_members_tta:
                config["training"]["unet_members_tta"] = args.unet_members_tta
    if args.members:
        config["training"]["ensemble_members"] = [
            json.loads((Path(run) / "config.json").read_text())["training"]["command"]
            for run in args.members
        ]
    out = Path(args.out)
    save_model_folder(model, config, out)
    add_members(
        out,
        args.members,
        model,
        unet=args.unet_members,
        counter_config=config["counter"],
        unet_float16=args.unet_members_float16,
        unet_tta=args.unet_members_tta,
    )
    calibrate_model(out, cal, count_scale=args.count_scale, log=print)

    def judge(counter: CellCounter, names: list[str]) -> tuple[dict, list]:
        """Rounded count figures of ``counter`` on ``names``, and its results."""
        results = [counter.count(root / "images" / name) for name in names]
        figures = count_metrics(
            np.array([float(table[n]) for n in names]),
            np.array([r.count for r in results]),
            low=np.array([r.low for r in results]),
            high=np.array([r.high for r in results]),
        )
        return {k: round(float(v), 4) for k, v in figures.items()}, results

    counter = CellCounter.from_pretrained(out, device=cpu)
    config = json.loads((out / "config.json").read_text())
    config["metrics"] = {}
    for part in ("calibration", "test"):
        figures, results = judge(counter, split[part])
        config["metrics"][part] = {"all": figures}
        if part == "test":
            config["metrics"][part]["rows"] = [
                {
                    "file": n,
                    "true": float(table[n]),
                    "count": round(r.count, 2),
                    "std": round(r.std, 3),
                }
                for n, r in zip(split[part], results, strict=True)
            ]
    if args.members:  # the same figures counted with the ensemble (--epistemic)
        ensemble = CellCounter.from_pretrained(out, device=cpu, epistemic=True)
        config["metrics"]["epistemic"] = {
            part: {"all": judge(ensemble, split[part])[0]} for part in ("calibration", "test")
        }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cal_all = config["metrics"]["calibration"]["all"]
    print(f"calibration images: MAE {cal_all['mae']:.2f}, max {cal_all['max_abs_error']:.1f}")
    print(json.dumps(config["metrics"]["test"]["all"], indent=1))
    print(f"saved {args.out}  ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
