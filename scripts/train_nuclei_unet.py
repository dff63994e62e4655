"""Train the `nuclei` model's U-Net counter (``celltally.models.unet``) on real BBBC039.

    python scripts/train_nuclei_unet.py --epochs 100 --lr 2e-3 --seed 0 \\
        --sampling permutation --out runs/nuc2/u0
    python scripts/train_nuclei_unet.py --epochs 100 --lr 1e-3 --seed 1 \\
        --init runs/nuc2/u0/counter.safetensors --out runs/nuc2/u1

Same split as ``scripts/train_nuclei.py`` (60 training images; the 20
calibration images only report progress; the test images are never read).
The planes are the shipped ``nuclei`` segmenter's mask, the image averaged
onto the mask's grid and the mask's log-variance (eval mode, computed once).
Target: one normalized Gaussian (sigma 1.5 plane px) at each annotated
nucleus' centroid, cut at the frame's edge and renormalized, so each frame's
density sums to its count. Each step takes ``--batch`` whole training frames (drawn at random, or
in turn from a fresh permutation each epoch),
one of the 8 flips/rotations and a random gain on the image plane. Loss:
100 x the per-frame sum of squared density errors + 0.01 x the squared count
error + the Gaussian NLL of 8 x 8-pixel block counts under the summed
per-pixel variances (block counts detached: the variance head learns the
error it makes, without bending the density). Adam with a one-cycle
schedule; the weights kept are an exponential moving average (0.99,
BatchNorm statistics included).

``--rescale LO HI`` resizes each batch by a random factor (``rescale_batch``):
the counters' counts moved by 0.3-3.5% when an image was rescaled by only
0.1-1% (docs/finetuning.md), which this augmentation is meant to remove.

``--fibres P`` paints one or two bright bands (``paint_fibres``) on a
fraction P of the training frames, whose planes the segmenter then
recomputes each step. With ``--mosaic`` the bands are painted on the
frames before they are tiled into mosaics (each band stays within its
frame). On whole frames it was tried once and not adopted (see
docs/finetuning.md); inside the mosaic phase it is untried.

On a GPU (``--device cuda``) ``--budget SECONDS`` caps a run's time: at
epoch 5, then every 10 epochs, the pace since the last check is measured
and, where the rest would not fit, the epoch count is cut and the one-cycle
schedule rebuilt for it (``result.json`` records the epochs run). (The
GPU runs of 2026-11-26 checked at epoch 5 only, and some overran.)

Writes ``counter.safetensors`` (the counter's weights, ``UNetCounter``
keys) and ``result.json`` (calibration-image counts, flip-averaged). The
model folder is assembled by ``scripts/train_nuclei.py --unet ...``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy import ndimage as ndi
from train_nuclei import read_instances, split_names

from celltally import io
from celltally.models.pipeline import load_model_folder
from celltally.models.unet import UNetCounter
from celltally.transforms import flip_rotate, prepare_image


def centroid_density(labels: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """One Gaussian per instance at its centroid, on a ``shape`` grid; sums to the count."""
    H, W = labels.shape
    h, w = shape
    out = np.zeros(shape, np.float64)
    idx = np.arange(1, labels.max() + 1)
    present = np.bincount(labels.ravel(), minlength=labels.max() + 1)[1:] > 0
    centres = ndi.center_of_mass(np.ones_like(labels), labels, idx[present])
    yy = np.arange(h)[:, None]
    xx = np.arange(w)[None, :]
    for cy, cx in centres:
        y = (cy + 0.5) * h / H - 0.5
        x = (cx + 0.5) * w / W - 0.5
        y0, y1 = max(0, int(y - 4 * sigma)), min(h, int(y + 4 * sigma) + 2)
        x0, x1 = max(0, int(x - 4 * sigma)), min(w, int(x + 4 * sigma) + 2)
        g = np.exp(-((yy[y0:y1] - y) ** 2 + (xx[:, x0:x1] - x) ** 2) / (2 * sigma**2))
        out[y0:y1, x0:x1] += g / g.sum()
    return out.astype(np.float32)


def d8(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0-7) flip/rotation of the plane: a transpose for k >= 4, then a flip."""
    return flip_rotate([x.transpose(-1, -2) if k & 4 else x], k)[0]


def mosaic_crops(
    planes: torch.Tensor,
    density: torch.Tensor,
    idx: torch.Tensor,
    *,
    margin: int = 8,
    partners: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frame-sized crops of 2 x 2 mosaics of flipped frames, and their loss weights.

    Each crop's first frame is ``idx``'s; three others fill the mosaic (row j of
    ``partners``, shape (len(idx), 3), else drawn at random). Each
    offset is snapped to the mosaic's start or end half the time (so whole frames
    and real borders are seen too), else uniform. A nucleus cut by a crop side
    inside the mosaic has only part of its target in the crop, while one cut by a
    real border counts whole: the network cannot tell these apart, so pixels
    within ``margin`` of a cutting side get weight 0 (as the grid counter's cells).
    """
    n, _, h, w = planes.shape
    xs, ds, ws = [], [], []
    for j, first in enumerate(idx.tolist()):
        others = torch.randint(0, n, (3,)) if partners is None else partners[j]
        frames = [first, *others.tolist()]
        flips = torch.randint(0, 4, (4,)).tolist()
        tiles = [
            flip_rotate([planes[i], density[i]], f) for i, f in zip(frames, flips, strict=True)
        ]
        mx = torch.cat(
            [torch.cat([tiles[0][0], tiles[1][0]], -1), torch.cat([tiles[2][0], tiles[3][0]], -1)],
            -2,
        )
        md = torch.cat(
            [torch.cat([tiles[0][1], tiles[1][1]], -1), torch.cat([tiles[2][1], tiles[3][1]], -1)],
            -2,
        )
        y0, x0 = (_snapped_offset(side) for side in (h, w))
        weight = torch.ones(1, h, w)
        if y0 > 0:
            weight[:, :margin] = 0
        if y0 < h:
            weight[:, -margin:] = 0
        if x0 > 0:
            weight[:, :, :margin] = 0
        if x0 < w:
            weight[:, :, -margin:] = 0
        xs.append(mx[:, y0 : y0 + h, x0 : x0 + w])
        ds.append(md[:, y0 : y0 + h, x0 : x0 + w])
        ws.append(weight)
    return torch.stack(xs), torch.stack(ds), torch.stack(ws)


def paint_fibres(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add one or two bright, smooth, curved bands to each prepared image (a new tensor).

    BBBC039 holds a few frames crossed by bright fibres, and the nuclei under
    and beside them are where the counters miss most. Each band follows a
    gently bent line across the frame (a sine bend of random amplitude),
    with a Gaussian cross-section (sigma 6-18 px at the model input) and a
    peak of 0.2-0.8 of the normalized range, added to the image. The nuclei
    stay where they are, so the count target does not change.
    """
    n, _, h, w = images.shape
    dev = images.device
    yy = torch.arange(h, device=dev, dtype=torch.float32)[:, None]
    xx = torch.arange(w, device=dev, dtype=torch.float32)[None, :]
    out = images.clone()

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=generator))

    t = torch.linspace(-0.75, 0.75, 192, device=dev)
    for i in range(n):
        for _ in range(1 + int(torch.rand(1, generator=generator) < 0.3)):
            angle = uniform(0, np.pi)
            cy, cx = uniform(0.2, 0.8) * h, uniform(0.2, 0.8) * w
            span = float(np.hypot(h, w))
            bend = (
                uniform(0.0, 0.08)
                * span
                * torch.sin(2 * np.pi * (t * uniform(0.5, 1.5) + uniform(0, 1)))
            )
            py = cy + t * span * np.sin(angle) + bend * np.cos(angle)
            px = cx + t * span * np.cos(angle) - bend * np.sin(angle)
            d2 = ((yy[None] - py[:, None, None]) ** 2 + (xx[None] - px[:, None, None]) ** 2).amin(0)
            sigma = uniform(6.0, 18.0)
            out[i, 0] += uniform(0.2, 0.8) * torch.exp(-d2 / (2 * sigma**2))
    return out


def rescale_batch(
    planes: torch.Tensor,
    density: torch.Tensor,
    weight: torch.Tensor,
    factor: float,
    *,
    margin: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Planes, target density and loss weights of a batch resized by ``factor``.

    One factor for the whole batch (bilinear, antialiased when shrinking).
    The density is renormalized so each frame keeps its sum, i.e. its count:
    its Gaussians widen or narrow with the factor, as the nuclei do. An
    enlarged batch is cropped back to its size at a random offset; pixels
    within ``margin`` of a side that cut the frame get weight 0 (as for
    mosaic crops). A shrunk batch stays smaller (the U-Net takes any size).
    """
    n, _, h, w = planes.shape
    size = (max(8, round(h * factor)), max(8, round(w * factor)))
    kw = {"mode": "bilinear", "align_corners": False, "antialias": factor < 1}
    x = F.interpolate(planes, size=size, **kw)
    d = F.interpolate(density, size=size, **kw).clamp(min=0)
    d = d * (density.sum((1, 2, 3), keepdim=True) / d.sum((1, 2, 3), keepdim=True).clamp(min=1e-8))
    wt = F.interpolate(weight, size=size, mode="nearest")
    if factor <= 1:
        return x, d, wt
    y0 = int(torch.randint(0, size[0] - h + 1, (1,)))
    x0 = int(torch.randint(0, size[1] - w + 1, (1,)))
    crop = (slice(None), slice(None), slice(y0, y0 + h), slice(x0, x0 + w))
    x, d, wt = x[crop], d[crop], wt[crop].clone()
    if y0 > 0:
        wt[:, :, :margin] = 0
    if y0 < size[0] - h:
        wt[:, :, -margin:] = 0
    if x0 > 0:
        wt[:, :, :, :margin] = 0
    if x0 < size[1] - w:
        wt[:, :, :, -margin:] = 0
    return x, d, wt


def _snapped_offset(side: int) -> int:
    """0 or ``side`` (a whole frame of the mosaic) half the time, else uniform in between."""
    mode = int(torch.randint(0, 4, (1,)))
    if mode < 2:
        return 0 if mode == 0 else side
    return int(torch.randint(0, side + 1, (1,)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/bbbc039")
    p.add_argument("--segmenter", default="src/celltally/weights/nuclei")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--steps", type=int, default=15, help="batches per epoch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--sigma", type=float, default=1.5)
    p.add_argument(
        "--sampling",
        choices=("random", "permutation"),
        default="random",
        help="frames of a step: drawn with replacement, or each epoch a fresh permutation",
    )
    p.add_argument(
        "--mosaic",
        action="store_true",
        help="train on frame-sized crops of 2 x 2 mosaics of flipped frames, not whole frames",
    )
    p.add_argument(
        "--fibres",
        type=float,
        default=0.0,
        help="probability that a training frame gets bright fibres painted on (paint_fibres); "
        "its planes are then recomputed by the segmenter each step (with --mosaic: on the "
        "frames before they are tiled)",
    )
    p.add_argument(
        "--rescale",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="resize each batch (planes and target) by a factor drawn log-uniformly from "
        "[LO, HI] (rescale_batch), e.g. 0.9 1.1: counts that do not move with resampling",
    )
    p.add_argument("--init", help="counter.safetensors of an earlier run to start from")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument(
        "--budget",
        type=float,
        help="seconds of training at most: from epoch 5, every 10 epochs, fewer epochs if the "
        "rest would not fit (the one-cycle schedule is rebuilt; result.json records the epochs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/nuc2/u0")
    args = p.parse_args()
    if not Path(args.data).is_dir():  # before any simulation or output
        raise SystemExit(f"--data {args.data}: no such folder")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    names = sorted(p.name for p in (root / "images").glob("*.tif"))
    split = split_names(names)
    device = torch.device(args.device)
    seg, cfg = load_model_folder(args.segmenter)
    seg.eval().to(device)
    size = tuple(cfg["input_size"])

    def load(part: list[str]):
        planes_all, dens, counts, prepared = [], [], [], []
        for name in part:
            raw = io.read_image(root / "images" / name)
            labels = read_instances(root / "masks" / (name[:-4] + ".png"))
            img = prepare_image(raw, size=size, norm=cfg["normalization"])
            img = torch.from_numpy(img)[None, None].to(device)
            with torch.no_grad():
                m, lv = seg.segmenter(img, levels=1)[0]
            planes = seg.counter_planes(m, lv, img)  # mask, image, mask log-variance
            planes_all.append(planes[0].cpu())
            prepared.append(img[0].cpu())
            target = centroid_density(labels, planes.shape[-2:], args.sigma)
            dens.append(torch.from_numpy(target))
            counts.append(len(np.unique(labels)) - 1)
        return (
            torch.stack(planes_all),
            torch.stack(dens)[:, None],
            torch.tensor(counts, dtype=torch.float32),
            torch.stack(prepared),
        )

    t0 = time.time()
    x_train, d_train, _, img_train = load(split["train"])
    x_cal, _, c_cal, _ = load(split["calibration"])

    def planes_with_fibres(idx: torch.Tensor) -> torch.Tensor:
        """The frames' planes, recomputed by the segmenter where fibres were painted on."""
        x = x_train[idx].clone()
        painted = torch.rand(len(idx)) < args.fibres
        if painted.any():
            img = paint_fibres(img_train[idx[painted]].to(device))
            with torch.no_grad():
                m, lv = seg.segmenter(img, levels=1)[0]
                x[painted] = seg.counter_planes(m, lv, img).cpu()
        return x

    x_cal = x_cal.to(device)
    print(f"loaded {len(x_train)} training frames in {time.time() - t0:.0f}s", flush=True)
    net = UNetCounter(3, width=args.width, levels=args.levels, count_scale=0.05, tta="flip")
    if args.init:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(args.init))
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    def one_cycle(total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=args.lr, total_steps=total_steps, pct_start=0.1
        )

    epochs = args.epochs
    sched = one_cycle(epochs * args.steps)
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99), use_buffers=True
    )

    def evaluate(model) -> tuple[float, float, np.ndarray]:
        model.eval()
        preds = []
        with torch.no_grad():  # eval mode: the counter averages the 4 flips itself
            for i in range(len(x_cal)):
                preds.append(model(x_cal[i : i + 1])[0].item())
        model.train()
        preds = np.array(preds)
        err = preds - c_cal.numpy()
        return float(np.abs(err).mean()), float(err.mean()), preds

    ep = 0
    t_train = time.time()
    while ep < epochs:
        if args.budget and ep == 2:
            t_mark, ep_mark = time.time(), ep  # the first epochs warm up: not timed
        if args.budget and ep % 10 == 5 and ep < epochs:
            # fewer epochs if the rest would not fit, at the pace since the last check
            per_epoch = (time.time() - t_mark) / (ep - ep_mark)
            fit = ep + int((args.budget - (time.time() - t_train)) / per_epoch)
            t_mark, ep_mark = time.time(), ep
            if fit < epochs:
                epochs = max(fit, ep + 1)
                sched = one_cycle(epochs * args.steps)
                for _ in range(ep * args.steps):
                    sched.step()
                print(f"budget {args.budget:.0f}s: {epochs} epochs (at epoch {ep})", flush=True)
        tot = 0.0
        perm = torch.randperm(len(x_train)) if args.sampling == "permutation" else None
        for step in range(args.steps):
            if perm is None:
                idx = torch.randint(0, len(x_train), (args.batch,))
            else:
                idx = perm[step * args.batch : (step + 1) * args.batch]
            k = int(torch.randint(0, 8, (1,)))
            if args.mosaic and args.fibres:
                # paint the frames first, then tile: only the frames this step uses
                partners = torch.randint(0, len(x_train), (len(idx), 3))
                used, where = torch.unique(
                    torch.cat([idx[:, None], partners], 1), return_inverse=True
                )
                x, d, weight = mosaic_crops(
                    planes_with_fibres(used), d_train[used], where[:, 0], partners=where[:, 1:]
                )
            elif args.mosaic:
                x, d, weight = mosaic_crops(x_train, d_train, idx)
            elif args.fibres:
                x, d = planes_with_fibres(idx), d_train[idx]
                weight = torch.ones_like(d)
            else:
                x, d, weight = x_train[idx], d_train[idx], torch.ones_like(d_train[idx])
            x, d, weight = d8(x, k), d8(d, k), d8(weight, k)
            if args.rescale:
                lo, hi = np.log(args.rescale)
                factor = float(np.exp(lo + (hi - lo) * float(torch.rand(1))))
                x, d, weight = rescale_batch(x, d, weight, factor)
            x, d, weight = x.to(device), d.to(device), weight.to(device)
            gain = torch.exp(torch.randn(len(idx), 1, 1, 1) * 0.1).to(device)
            x = torch.cat([x[:, :1], x[:, 1:2] * gain, x[:, 2:]], 1)
            pd, lv = net.density(x)
            pd, lv = pd[:, None], lv[:, None]
            pix = (weight * (pd - d) ** 2).sum((1, 2, 3)).mean() * 100
            cnt = (((weight * pd).sum((1, 2, 3)) - (weight * d).sum((1, 2, 3))) ** 2).mean()
            cnt = cnt * 0.01
            bs = F.avg_pool2d(pd.detach(), 8) * 64
            bt = F.avg_pool2d(d, 8) * 64
            blv = torch.logsumexp(F.unfold(lv, 8, stride=8), 1).view_as(bs[:, 0])[:, None]
            whole = F.avg_pool2d(weight, 8) > 0.99  # blocks clear of cut mosaic sides
            block_nll = (0.5 * torch.exp(-blv) * (bs - bt) ** 2 + 0.5 * blv) * whole
            nll = block_nll.sum() / whole.sum().clamp(min=1)
            loss = pix + cnt + nll
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(net)
            tot += loss.item()
        ep += 1
        if ep % 10 == 0 or ep == epochs:
            mae, bias, _ = evaluate(ema.module)
            print(
                f"epoch {ep} loss {tot / args.steps:.3f} calibration MAE {mae:.2f} "
                f"bias {bias:+.2f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    mae, bias, preds = evaluate(ema.module)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()}
    save_file(state, str(out / "counter.safetensors"))
    result = {
        "calibration_mae": mae,
        "bias": bias,
        "preds": preds.tolist(),
        "epochs_trained": epochs,
        "seconds": round(time.time() - t0, 1),
        "args": vars(args),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"calibration MAE {mae:.3f}; saved {out}")


if __name__ == "__main__":
    main()
