"""Two-stage training (segmenter, then counter on its masks), checkpoints and resume."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from celltally import distributed
from celltally.datasets import LabeledSet
from celltally.losses import gaussian_nll, segmentation_loss
from celltally.metrics import json_ready
from celltally.models.pipeline import CountingPipeline
from celltally.transforms import dense_strides, flip_rotate

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA (this process's GPU under torchrun) when available, else the CPU."""
    return distributed.device()


def _batches(n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool):
    # Under torchrun every rank draws the same order and takes its own equal share.
    order = distributed.shard(torch.randperm(n, generator=generator))
    n = order.shape[0]
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def _augment(tensors: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One random flip/rotation per batch (cheap; the 4 symmetries keep the shape)."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    return flip_rotate(tensors, k)


def _load_checkpoint(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def _save_checkpoint(path: Path | None, state: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
    except RuntimeError as err:  # torch.save's own for a folder in the way, a full disk
        reason = str(err).split("strerror: ")[-1].strip().splitlines()[0][:200]
        raise OSError(f"{tmp}: cannot write the checkpoint: {reason}") from None
    tmp.replace(path)  # atomic: a kill mid-save never leaves a broken checkpoint


def one_cycle(
    optimizer: torch.optim.Optimizer, *, lr: float, total_steps: int, done_steps: int = 0
) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule peaking at ``lr``: warm-up over 20% of the steps, cosine down.

    The warm-up lasts at least 1.5 steps: OneCycleLR divides by its length,
    which is zero (a crash) or negative for runs of 5 steps or fewer.
    ``done_steps`` starts the schedule that many steps in (a schedule rebuilt
    for fewer steps mid-run; ``optimizer`` must already have run under a
    one-cycle schedule, which left its ``initial_lr``).
    """
    total = max(2, int(total_steps))
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=total,
        pct_start=max(0.2, 1.5 / total),
        last_epoch=int(done_steps) - 1,
    )


def _epochs_within(budget: float, *, epochs: int, done: int, spent: float, pace: float) -> int:
    """How many epochs a run of ``epochs`` may have so that it ends within ``budget`` seconds.

    ``done`` epochs took ``spent`` seconds so far; the rest take ``pace``
    seconds each. Never fewer than ``done + 1`` (the epoch under way is finished).
    """
    fit = done + int(max(0.0, budget - spent) // max(pace, 1e-9))
    return max(done + 1, min(epochs, fit))


#: Learning-rate schedules: ``one_cycle`` (default) or ``constant`` (the paper's).
SCHEDULES = ("one_cycle", "constant")


def _run_epochs(
    *,
    stage: str,
    module: torch.nn.Module,
    params: list[torch.nn.Parameter],
    epochs: int,
    lr: float,
    schedule: str = "one_cycle",
    steps_per_epoch: int,
    train_epoch: Callable[[torch.optim.Optimizer, Any, torch.Generator], float],
    validate: Callable[[], dict[str, float]],
    checkpoint: Path | None,
    resume: bool,
    seed: int,
    log: Log,
    data: Mapping[str, Any] | None = None,
    budget: float | None = None,
) -> list[dict[str, float]]:
    """Generic epoch loop: Adam, validation and a checkpoint per epoch.

    A checkpoint records the run's plan (schedule, steps, epochs, learning rate,
    seed, and ``data``: what identifies the training set); ``resume`` refuses one
    made with another plan.

    ``schedule`` 'one_cycle' (warm up to ``lr``, cosine down to ~0; Adam's
    beta1 cycles 0.95 -> 0.85 -> 0.95 with it) instead of the paper's constant
    rate: on the CPU budget it reaches a lower loss in fewer epochs. 'constant'
    is the paper's (the ``paper`` preset).

    ``budget``: seconds the epochs may take at most (a lent GPU's time limit,
    a cluster job's wall time). After epochs 5, 15, 25, ... the pace since
    epoch 2 is measured (the first epochs warm up), and where the rest would
    not fit the epoch count is cut and the one-cycle schedule rebuilt for it,
    at the step reached: the run still ends annealed, with its weights saved.
    The history's records carry ``epochs_planned``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
    if budget is not None and not budget > 0:
        raise ValueError(f"budget must be a positive number of seconds, not {budget!r}")
    optimizer = torch.optim.Adam(params, lr=lr)
    if schedule == "constant":
        scheduler: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    else:
        scheduler = one_cycle(optimizer, lr=lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    start = 0
    state = _load_checkpoint(checkpoint) if resume else None
    plan = {
        "schedule": schedule,
        "steps_per_epoch": steps_per_epoch,
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        **({"data": dict(data)} if data else {}),
    }
    if state is not None and state.get("stage") == stage:
        saved = {k: state.get("plan", {}).get(k, "not recorded") for k in plan}
        if saved != plan:
            differ = "; ".join(
                f"{k} {saved[k]!r} then, {plan[k]!r} now" for k in plan if saved[k] != plan[k]
            )
            raise ValueError(
                f"{checkpoint}: saved by a run with other settings ({differ}): resume with "
                "the same data and settings, or train into a new --out"
            )
        try:
            module.load_state_dict(state["model"])
        except RuntimeError:
            raise ValueError(
                f"{checkpoint}: holds another architecture's {stage} (trained from another "
                "--from model?): train into a new --out"
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history = state["history"]
        start = state["epoch"] + 1
        log(f"{stage}: resumed from {checkpoint} after epoch {start}")
    # under torchrun every rank reads the checkpoint: one that found another (an --out
    # not shared between machines) would train on and hang the others at the end
    distributed.agree(
        (start, plan),
        what=f"{stage}: the processes start from different "
        + ("checkpoints or training data" if resume else "training data"),
        hint="the data and --out must be the same folders for every process (a file "
        "system they share)",
    )
    # a budget may have cut the plan: the checkpoint knows to how many epochs
    planned = int((state or {}).get("epochs_planned", epochs)) if start else epochs
    if start < planned:
        rate = f"lr {lr:g}" if schedule == "constant" else f"one-cycle lr peaking at {lr:g}"
        within = f", within {budget:g} s" if budget else ""
        log(f"{stage}: {planned - start} epoch(s) of {steps_per_epoch} step(s), {rate}{within}")
    began = time.perf_counter()
    paced: tuple[int, float] | None = None  # (epochs done, time) when the pace clock started
    epoch = start
    while epoch < planned:
        if budget and paced is None and epoch - start == 2:
            paced = (epoch, time.perf_counter())
        if budget and paced is not None and (epoch - start) % 10 == 5:
            now = time.perf_counter()
            pace = (now - paced[1]) / max(epoch - paced[0], 1)
            cut = _epochs_within(budget, epochs=planned, done=epoch, spent=now - began, pace=pace)
            cut = round(distributed.mean(float(cut)))  # under torchrun: every rank the same
            if cut < planned:
                planned = cut
                if schedule != "constant":
                    scheduler = one_cycle(
                        optimizer,
                        lr=lr,
                        total_steps=planned * steps_per_epoch,
                        done_steps=epoch * steps_per_epoch,
                    )
                log(f"{stage}: {planned} epochs fit the budget of {budget:g} s ({pace:.1f} s each)")
        t0 = time.perf_counter()
        module.train()
        rate_used = float(optimizer.param_groups[0]["lr"])  # by the epoch's first step
        loss = distributed.mean(train_epoch(optimizer, scheduler, generator))
        module.eval()
        main = distributed.is_main()  # under torchrun only rank 0 validates, logs, saves
        record = {"epoch": epoch + 1, "loss": loss, **(validate() if main else {})}
        record["lr"] = rate_used
        record["seconds"] = round(time.perf_counter() - t0, 1)
        if budget or planned != epochs:  # a budget's cut, also in its resumed runs
            record["epochs_planned"] = planned
        history.append(record)
        if main:
            log(f"{stage} " + " ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
        _save_checkpoint(
            checkpoint if main else None,
            {
                "stage": stage,
                "epoch": epoch,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "history": history,
                "plan": plan,
                "epochs_planned": planned,
            },
        )
        epoch += 1
    distributed.sync_buffers(module)  # rank 0's BatchNorm statistics on every rank
    return history


def _silent(_: str) -> None:
    return None


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _bad_rows(values: torch.Tensor, bad: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """How many images of ``values`` ``bad`` marks, given their pixels flattened per row;
    in chunks of 256, so a large set is never copied whole."""
    return sum(int(bad(values[i : i + 256].flatten(1)).sum()) for i in range(0, len(values), 256))


def _check_training_set(
    data: LabeledSet, batch_size: int, *, counts: bool, min_images: int = 1, masks: bool = False
) -> None:
    """ValueError, before any training, for a set that cannot train a stage.

    No images, fewer than ``min_images`` (the paper's 'fc' counter: its
    BatchNorm1d needs 2 per batch), a batch size under 1, images with NaN or
    infinite pixels, for the counter (``counts``) counts that are not
    finite numbers of 0 or more, and for the segmenter (``masks``) masks with
    values outside [0, 1] or partly NaN (a 0/255 mask trained it towards 255):
    any of them turned the loss into NaN and the weights with it, failed deep
    in torch, or trained towards a wrong target.
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if len(data) == 0:
        raise ValueError("the training set has no images")
    if len(data) < min_images:
        raise ValueError(
            f"this counter (the paper's 'fc' head, batch norm over the batch) needs "
            f"{min_images} or more training images, got {len(data)}"
        )
    if bad := _bad_rows(data.images, lambda x: (~torch.isfinite(x)).any(1)):
        raise ValueError(f"{bad} training image(s) have NaN or infinite pixels")
    if masks:

        def bad_mask(x: torch.Tensor) -> torch.Tensor:
            missing = torch.isnan(x)
            partly = missing.any(1) & ~missing.all(1)
            return partly | ((x < 0) | (x > 1) | torch.isinf(x)).any(1)

        if bad := _bad_rows(data.masks, bad_mask):
            raise ValueError(
                f"{bad} training mask(s) have values outside [0, 1] or are partly NaN "
                "(a mask holds foreground fractions 0-1; NaN over a whole image means none)"
            )
    if counts:
        c = data.counts
        if bad := int((~torch.isfinite(c) | (c < 0)).sum()):
            raise ValueError(f"{bad} training count(s) are NaN, infinite or negative")


def train_segmenter(
    model: CountingPipeline,
    data: LabeledSet,
    *,
    val: LabeledSet | None = None,
    epochs: int = 8,
    batch_size: int = 8,
    lr: float = 1e-3,
    tv_weight: float = 1e-3,
    schedule: str = "one_cycle",
    seed: int = 0,
    checkpoint: Path | None = None,
    resume: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    log: Log = print,
    budget: float | None = None,
) -> list[dict[str, float]]:
    """Stage 1: fit the FPN on images that have masks (sum of per-level NLL + TV).

    ``budget``: seconds the epochs may take at most; fewer epochs, the one-cycle
    schedule rebuilt for them, where the rest would not fit (see ``_run_epochs``).
    """
    device = device or default_device()
    _check_training_set(data, batch_size, counts=False, masks=True)
    keep = data.has_mask
    if not bool(keep.any()):
        raise ValueError(
            "no training image has a foreground mask, and the segmenter needs masks (to "
            "train only the counter on counts: --from MODEL --stage counter)"
        )
    images, masks = data.images[keep], data.masks[keep]
    seg = model.segmenter.to(device)
    net = distributed.wrap(seg, device)  # DistributedDataParallel under torchrun
    n = images.shape[0]

    def train_epoch(optimizer, scheduler, generator) -> float:
        total, steps = 0.0, 0
        batches = list(_batches(n, batch_size, generator, drop_last=True))
        quiet = not progress or not distributed.is_main()
        for idx in tqdm(batches, desc="segmenter", leave=False, disable=True if quiet else None):
            x, y = _augment([images[idx], masks[idx]], generator)
            with distributed.autocast(device):  # bfloat16 on GPU, nothing on CPU
                out = net(x.to(device))
            loss = segmentation_loss(distributed.to_float(out), y.to(device), tv_weight=tv_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, steps = total + loss.item(), steps + 1
        return total / max(steps, 1)

    def validate() -> dict[str, float]:
        if val is None or not bool(val.has_mask.any()):
            return {}
        vm = val.has_mask
        mask, _ = predict_masks(model, val.images[vm], device=device)
        size = cast("tuple[int, int]", mask.shape[-2:])
        target = torch.nn.functional.adaptive_avg_pool2d(val.masks[vm], size)
        return {"val_mask_mse": float(((mask - target) ** 2).mean())}

    return _run_epochs(
        stage="segmenter",
        module=seg,
        params=list(seg.parameters()),
        epochs=epochs,
        lr=lr,
        schedule=schedule,
        steps_per_epoch=max(1, distributed.shard_size(n) // batch_size),
        train_epoch=train_epoch,
        validate=validate,
        checkpoint=checkpoint,
        resume=resume,
        seed=seed,
        log=log,
        data={"images": n, "mask_total": round(float(masks.sum()), 3)},
        budget=budget,
    )


@torch.inference_mode()
def predict_masks(
    model: CountingPipeline,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finest-level mask and log-variance for a stack of prepared images (eval mode)."""
    device = device or default_device()
    model.segmenter.eval().to(device)
    masks, logvars = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = dense_strides(images[start : start + batch_size]).to(device)
        m, lv = model.segmenter(batch, levels=1)[0]
        masks.append(m.cpu())
        logvars.append(lv.cpu())
    return torch.cat(masks), torch.cat(logvars)


@torch.inference_mode()
def predict_counts(
    model: CountingPipeline,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Count mean and aleatoric std for a stack of prepared images."""
    device = device or default_device()
    model.eval().to(device)
    means, stds = [], []
    for start in range(0, images.shape[0], batch_size):
        out = model(dense_strides(images[start : start + batch_size]).to(device))
        means.append(out.count.cpu())
        stds.append(torch.exp(0.5 * out.count_logvar).cpu())
    return torch.cat(means).numpy(), torch.cat(stds).numpy()


def train_counter(
    model: CountingPipeline,
    data: LabeledSet,
    *,
    val: LabeledSet | None = None,
    epochs: int = 40,
    batch_size: int = 16,
    lr: float = 1e-3,
    beta: float = 0.5,
    schedule: str = "one_cycle",
    seed: int = 0,
    checkpoint: Path | None = None,
    resume: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    log: Log = print,
    budget: float | None = None,
) -> list[dict[str, float]]:
    """Stage 2: fit the VGG counter on the frozen segmenter's masks (aleatoric loss).

    The masks are computed once (eval mode), then flipped/rotated together with
    the image plane each batch, which is exact because the 4 symmetries
    commute with the segmenter up to its padding. ``budget``: as for
    :func:`train_segmenter`.
    """
    device = device or default_device()
    fc_head = not getattr(model.counter, "counts_any_size", False)
    _check_training_set(data, batch_size, counts=True, min_images=2 if fc_head else 1)
    if val is not None and len(val) == 0:
        val = None  # nothing to validate on
    mask, logvar = predict_masks(model, data.images, device=device)
    inputs = model.counter_planes(mask, logvar, data.images)
    targets = data.counts
    if val is not None:
        vmask, vlogvar = predict_masks(model, val.images, device=device)
        val_inputs = model.counter_planes(vmask, vlogvar, val.images)
    counter = model.counter.to(device)
    net = distributed.wrap(counter, device)  # DistributedDataParallel under torchrun
    n = inputs.shape[0]

    def train_epoch(optimizer, scheduler, generator) -> float:
        total, steps = 0.0, 0
        batches = list(_batches(n, batch_size, generator, drop_last=True))
        quiet = not progress or not distributed.is_main()
        for idx in tqdm(batches, desc="counter", leave=False, disable=True if quiet else None):
            (x,) = _augment([inputs[idx]], generator)
            with distributed.autocast(device):  # bfloat16 on GPU, nothing on CPU
                mean, log_var = distributed.to_float(net(x.to(device)))
            loss = gaussian_nll(mean, targets[idx].to(device), log_var, beta=beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, steps = total + loss.item(), steps + 1
        return total / max(steps, 1)

    @torch.inference_mode()
    def validate() -> dict[str, float]:
        if val is None:
            return {}
        means, stds = [], []
        for start in range(0, val_inputs.shape[0], 64):
            m, lv = counter(val_inputs[start : start + 64].to(device))
            means.append(m.cpu())
            stds.append(torch.exp(0.5 * lv).cpu())
        err = torch.cat(means) - val.counts
        z = err.abs() / torch.cat(stds)
        return {
            "val_mae": float(err.abs().mean()),
            "val_max": float(err.abs().max()),
            "val_cover95": float((z <= 1.96).float().mean()),
        }

    return _run_epochs(
        stage="counter",
        module=counter,
        params=list(counter.parameters()),
        epochs=epochs,
        lr=lr,
        schedule=schedule,
        steps_per_epoch=max(1, distributed.shard_size(n) // batch_size),
        train_epoch=train_epoch,
        validate=validate,
        checkpoint=checkpoint,
        resume=resume,
        seed=seed,
        log=log,
        data={"images": n, "count_total": round(float(targets.sum()), 3)},
        budget=budget,
    )


def save_model_folder(model: CountingPipeline, config: dict[str, Any], folder: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors``: a model folder that describes itself."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_readable(state, folder / "model.safetensors")
    write_config(folder, config)
    return folder


def save_readable(tensors: dict[str, torch.Tensor], path: str | Path, **kwargs: Any) -> Path:
    """``safetensors`` ``save_file``, atomically, readable as the umask allows (like config.json).

    safetensors creates its files owner-only (0600); a model folder is meant to be
    shared. Written to a temporary name and renamed, so a kill never leaves half a file.
    """
    import os

    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), **kwargs)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
    return path


def write_config(folder: str | Path, config: dict[str, Any]) -> Path:
    """Write a model folder's ``config.json`` (strict JSON: NaN and inf as null), atomically.

    A temporary file renamed over the old one: a kill mid-write (calibrate, ensemble,
    the end of train) never leaves an empty or half-written config.
    """
    import os

    path = Path(folder) / "config.json"
    tmp = path.with_name(f".config.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(json_ready(config), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def interval_metrics(
    model: CountingPipeline,
    data: LabeledSet,
    scores: np.ndarray,
    *,
    level: float = 0.95,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Count metrics of ``model`` on ``data`` overall and per blur x stain group."""
    from celltally.calibration import conformal_quantile
    from celltally.metrics import grouped_metrics

    mean, std = predict_counts(model, data.images, device=device)
    q = conformal_quantile(scores, level)
    rows = [
        {
            "true": float(t),
            "count": float(m),
            "low": max(0.0, float(m - q * s)),
            "high": float(m + q * s),
            "blur": meta.get("blur"),
            "stain": meta.get("stain"),
        }
        for t, m, s, meta in zip(data.counts.numpy(), mean, std, data.meta, strict=True)
    ]
    return grouped_metrics(rows, by=("blur", "stain"))


def fit(
    *,
    train: LabeledSet,
    calibration: LabeledSet,
    test: LabeledSet | None,
    config: dict[str, Any],
    out: str | Path,
    stages: str = "both",
    segmenter_train: LabeledSet | None = None,
    init: dict[str, torch.Tensor] | None = None,
    init_untrained_counter: bool = False,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Train the stages named by ``stages`` ('both', 'segmenter', 'counter'), calibrate, save.

    ``config`` is a preset (see ``models.presets``) plus bookkeeping; the
    finished model folder at ``out`` holds it with the training history,
    the conformal calibration scores and the test metrics added.
    ``segmenter_train`` (default: ``train``) lets the costly first stage see a
    subset: masks are learnt from far fewer images than counts.
    ``init_untrained_counter``: ``init`` is a segmenter-only model's, whose
    counter never trained; a run that does not train it saves it as such.
    """
    from celltally.calibration import conformal_scores

    if stages not in ("both", "segmenter", "counter"):
        raise ValueError(f"stages must be 'both', 'segmenter' or 'counter', not {stages!r}")
    out = Path(out)
    device = device or default_device()
    if not distributed.is_main():  # under torchrun rank 0 logs and writes the folder
        log, progress = _silent, False
    seed_everything(seed)
    model = CountingPipeline(config)
    if init is not None:
        model.load_state_dict(init)
    hp = config["train"]
    history: dict[str, Any] = dict(config.get("history", {}))
    # A stage given 0 epochs is kept as it is (e.g. --from MODEL --seg-epochs 0), and so
    # is a starting model's segmenter when the data have counts but no masks.
    seg_train = train if segmenter_train is None else segmenter_train
    seg_epochs = hp["segmenter"]["epochs"]
    if stages == "both" and init is not None and seg_epochs > 0 and not seg_train.has_mask.any():
        log("no training image has a mask: the segmenter is kept, only the counter is trained")
        seg_epochs = 0
        hp["segmenter"] = {**hp["segmenter"], "epochs": 0}  # the record says what ran
    if stages in ("both", "segmenter") and seg_epochs > 0:
        s = hp["segmenter"]
        log(
            f"segmenter: {s['epochs']} epochs at lr {s['lr']:g} on the "
            f"{int(seg_train.has_mask.sum())} training images with a mask (--seg-epochs sets "
            "them, 0 keeps the segmenter)"
        )
        history["segmenter"] = train_segmenter(
            model,
            seg_train,
            val=calibration,
            epochs=s["epochs"],
            batch_size=s["batch_size"],
            lr=s["lr"],
            tv_weight=s["tv_weight"],
            schedule=s.get("schedule", "one_cycle"),
            seed=seed,
            resume=resume,
            checkpoint=out / "checkpoints" / "segmenter.pt",
            device=device,
            progress=progress,
            log=log,
        )
    if stages in ("both", "counter") and hp["counter"]["epochs"] > 0:
        c = hp["counter"]
        history["counter"] = train_counter(
            model,
            train,
            val=calibration,
            epochs=c["epochs"],
            batch_size=c["batch_size"],
            lr=c["lr"],
            beta=c.get("beta", 0.0),
            schedule=c.get("schedule", "one_cycle"),
            seed=seed,
            resume=resume,
            checkpoint=out / "checkpoints" / "counter.pt",
            device=device,
            progress=progress,
            log=log,
        )
    if distributed.is_distributed():
        digests = distributed.check_in_sync(model)
        log(f"weights identical on all {len(digests)} ranks (sha256 {digests[0]})")
        if not distributed.is_main():
            return config
    config = dict(config)
    config["history"] = history
    counter_untrained = init is None or init_untrained_counter
    if counter_untrained and (stages == "segmenter" or hp["counter"]["epochs"] <= 0):
        # Its counter never trained: no intervals to calibrate, and CellCounter refuses
        # to count with it; the folder is the first stage's, for `--stage counter --from`.
        config["untrained_counter"] = True
        save_model_folder(model, config, out)
        log(
            f"saved model folder {out} (segmenter only: its counter is untrained; train it "
            f"with `celltally train --stage counter --from {out}`)"
        )
        return config
    mean, std = predict_counts(model, calibration.images, device=device)
    scores = conformal_scores(calibration.counts.numpy(), mean, std)
    config["calibration"] = {
        "method": "split-conformal on |y - mu| / sigma",
        "n": int(scores.size),
        "scores": [round(float(v), 5) for v in scores],
    }
    if test is not None and len(test):
        config["metrics"] = {"test": interval_metrics(model, test, scores, device=device)}
    save_model_folder(model, config, out)
    # Temperature, OOD thresholds and the deep-feature reference on the same split.
    from celltally.uncertainty import calibrate_model

    config["calibration"] = calibrate_model(out, calibration, device=device, log=log)
    log(f"saved model folder {out}")
    return config
