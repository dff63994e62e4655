"""Continue training a BBBC005 model's counter on fresh simulated scenes, then calibrate and test.

The shipped ``bbbc005`` model's counter came from this, run on a lent GPU
(NVIDIA H200, float32; its ``config.json`` records the command)::

    python scripts/continue_bbbc005.py --init bbbc005 --out runs/bbbc005 --scenes 16000 \
        --sim-seed 5000 --epochs 55 --lr 0.003 --batch-size 32 --seed 12 \
        --new-counter --planes-at input

where ``--init bbbc005`` was the model shipped before it, whose segmenter it
keeps (``train_bbbc005.py --train-data simulated``, never a real image;
docs/experiments.md, fifth round).

The segmenter is kept. The counter starts from ``--init``'s and trains on
``--scenes`` new simulated scenes (the same generator settings as
``train_bbbc005.py``, another seed, so scenes it has not seen), with a one-cycle
schedule peaking at ``--lr``. Real BBBC005 is only used afterwards: the
``--init`` model's calibration sites calibrate the intervals, sites 9-10 test.
``--weights FILE`` skips training and finalizes a ``model.safetensors`` trained
elsewhere (how the GPU run's weights were brought back).
``--members-from-init`` keeps ``--init``'s counter and its ensemble as the new
model's ``--epistemic`` members.
``--cell-loss`` supervises the counter cell by cell, as ``train_nuclei.py``
does: the simulator's instance labels give each density cell its exact
(fractional) number of cells, instead of one total per frame.

``--new-counter`` trains a counter from scratch instead (seeded by
``--seed``), optionally of another shape: ``--counter-width`` (VGG width
multiplier) and ``--planes-at input`` (the counter reads the full model input,
the mask upsampled, rather than the mask's half-size grid). The segmenter is
still ``--init``'s. ``--sim-cache DIR`` keeps the simulated
scenes on disk, so runs that share them (several variants at once on one
GPU) simulate them once; ``--simulate-only`` stops after writing them. When
``--data`` is absent (a GPU machine without the real images) the model folder
is written uncalibrated, to be finalized with ``--weights`` where the data is.

``--real-sites 1 2 3 4`` adds the real BBBC005 images of those sites to the
counter's training scenes (each real image at its scene's count; its mask is
the frozen segmenter's, as at counting time). Those sites then leave the
calibration split: the intervals are calibrated on the remaining sites.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from celltally.counter import resolve_model
from celltally.datasets import (
    LabeledSet,
    calibration_sites,
    load_bbbc005,
    preparation_digest,
    simulate_set,
    simulate_set_with_maps,
    split_bbbc005,
)
from celltally.models.pipeline import (
    COUNTER_INPUTS,
    PLANES_AT,
    CountingPipeline,
    add_counter_inputs,
    load_model_folder,
    planes_shape,
    widen_counter_state,
)
from celltally.train import default_device, interval_metrics, save_model_folder, train_counter
from celltally.uncertainty import calibrate_model, ensemble_files

sys.path.insert(0, str(Path(__file__).parent))
from train_bbbc005 import simulation_settings  # noqa: E402
from train_nuclei import instance_density, train_counter_cells  # noqa: E402

MEMBERS_NOTE = (
    "ensemble_1..{n}: the --init model's counter (ensemble_1) and its own ensemble members, "
    "kept as the --epistemic ensemble of this continued counter ({init})"
)


def _train_cells(model: CountingPipeline, args: argparse.Namespace, kw: dict) -> list[dict]:
    half = planes_shape(kw["size"], model.planes_at)  # the targets at the counter's planes
    data, density = simulate_set_with_maps(
        args.scenes, seed=args.sim_seed, label_map=partial(instance_density, shape=half), **kw
    )
    val = simulate_set(max(16, args.scenes // 20), seed=args.sim_seed + 999, **kw)
    for i in range(0, len(data.counts), 997):  # the targets sum to the counts
        assert abs(float(density[i].sum()) - float(data.counts[i])) < 1e-3
    return train_counter_cells(
        model,
        data,
        density,
        val=val,
        epochs=args.epochs,
        steps=len(data.counts) // args.batch_size,
        batch_size=args.batch_size,
        crop=(0, 0),
        lr=args.lr,
        beta=0.5,
        seed=args.seed,
        frames=True,
    )


#: options that do not change the model (left out of the recorded command)
LOCAL_OPTIONS = ("weights", "workers", "out", "trained_on", "cache", "data", "sim_cache")


def _command(args: argparse.Namespace) -> str:
    """The command recorded in the model: the options that shape it (not LOCAL_OPTIONS)."""
    return "python scripts/continue_bbbc005.py " + " ".join(
        f"--{k.replace('_', '-')}"
        + ("" if v is True else f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
        for k, v in vars(args).items()
        if v not in (None, False, []) and k not in LOCAL_OPTIONS
    )


def _schedule(args: argparse.Namespace) -> str:
    return f"one-cycle lr {args.lr}, batch {args.batch_size}, seed {args.seed}, float32"


def _epochs_run(args: argparse.Namespace, history: list[dict] | None) -> str:
    """The epochs the counter trained, and the budget that cut them if one did."""
    ran = len(history) if history else args.epochs
    if ran < args.epochs:
        budget = f" {args.budget:g} s" if args.budget else ""
        return f"{ran} epochs (--budget{budget} cut the {args.epochs} asked for)"
    return f"{ran} epochs"


def _describe_new_counter(
    config: dict, previous: dict, args: argparse.Namespace, history: list[dict] | None
) -> None:
    """Rewrite ``config``'s training record for a counter trained from scratch (in place).

    The data lines of earlier counter training ('continued: ...') and their
    logs are replaced by this counter's; the segmenter's command and log are kept.
    """
    training = config["training"]
    counter = config["counter"]
    training["data"] = [d for d in training["data"] if not d.startswith("continued:")] + [
        f"new counter (width {counter['width']}, planes at the "
        f"{counter.get('planes_at', 'mask')}) trained from scratch, replacing the counter "
        f"above: {_epochs_run(args, history)} on {args.scenes} new simulated scenes "
        f"(same settings, seed {args.sim_seed}), {_schedule(args)}"
    ]
    training["segmenter_command"] = (
        previous.get("segmenter_command") or previous.get("continued_from") or previous["command"]
    )
    training["trained_on"] = training.pop("continued_on")
    training.pop("continued_from", None)
    logs = config.get("history", {})
    config["history"] = {
        "segmenter": logs.get("segmenter"),
        "counter": logs.get("counter_continued"),
    }


def _simulated(args: argparse.Namespace, kw: dict) -> tuple[LabeledSet, LabeledSet]:
    """The training and validation scenes, from ``--sim-cache`` when they are there."""
    n_val = max(16, args.scenes // 20)
    if args.sim_cache:
        # keyed by what shapes the arrays: the settings (size, normalization, ...) and
        # the preparing code, so a changed model or celltally.transforms never reads old ones
        spec = json.dumps({k: v for k, v in kw.items() if k != "workers"}, sort_keys=True)
        key = hashlib.sha1(f"{spec} {preparation_digest()}".encode()).hexdigest()[:12]
        path = Path(args.sim_cache) / f"sim_{args.scenes}_{args.sim_seed}_{key}.pt"
        if path.exists():
            parts = torch.load(path, weights_only=False)
            return LabeledSet(**parts["train"]), LabeledSet(**parts["val"])
    data = simulate_set(args.scenes, seed=args.sim_seed, **kw)
    val = simulate_set(n_val, seed=args.sim_seed + 999, **kw)
    if args.sim_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"train": vars(data), "val": vars(val)}, tmp)
        tmp.replace(path)
    return data, val


def _real_sites(args: argparse.Namespace, config: dict) -> LabeledSet:
    """The real BBBC005 images of ``--real-sites`` (which must be calibration sites)."""
    sites = calibration_sites(config)
    outside = sorted(set(args.real_sites) - set(sites))
    if outside:
        sys.exit(f"--real-sites {outside}: not calibration sites of --init ({sites})")
    if len(set(sites) - set(args.real_sites)) == 0:
        sys.exit("--real-sites: no calibration site would be left")
    real = load_bbbc005(
        args.data, size=config["input_size"], norm=config["normalization"], cache_dir=args.cache
    )
    rows = [i for i, m in enumerate(real.meta) if m["site"] in set(args.real_sites)]
    return real.subset(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="bbbc005", help="model name or folder to continue")
    parser.add_argument("--out", default="runs/bbbc005_continued")
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--scenes", type=int, default=8000)
    parser.add_argument("--sim-seed", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds the counter's epochs may take at most: fewer epochs, the one-cycle "
        "schedule rebuilt for them, where the rest would not fit (a lent GPU's time limit)",
    )
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--weights", help="a model.safetensors trained by this script elsewhere")
    parser.add_argument("--members-from-init", action="store_true")
    parser.add_argument("--cell-loss", action="store_true", help="per-cell density targets")
    parser.add_argument("--trained-on", help="the device --weights were trained on (recorded)")
    parser.add_argument("--new-counter", action="store_true", help="train a counter from scratch")
    parser.add_argument("--counter-width", type=float, help="VGG width multiplier (--new-counter)")
    parser.add_argument("--planes-at", choices=PLANES_AT, help="where the new counter reads")
    parser.add_argument("--sim-cache", help="folder keeping the simulated scenes")
    parser.add_argument("--simulate-only", action="store_true")
    parser.add_argument(
        "--real-sites",
        nargs="+",
        type=int,
        default=[],
        help="real BBBC005 sites added to the counter's training data (leave calibration)",
    )
    parser.add_argument(
        "--add-inputs",
        nargs="+",
        default=[],
        choices=[c for c in COUNTER_INPUTS if c not in ("mask", "image")],
        help="new counter input planes (their first-layer weights start at zero)",
    )
    args = parser.parse_args()
    command = _command(args)
    trained_elsewhere: dict = {}
    if args.weights:
        # finalizing needs the real images, and the options the weights were trained with
        if not Path(args.weights).is_file():
            parser.error(f"--weights {args.weights}: no such file")
        if not Path(args.data).exists():
            parser.error(f"--data {args.data}: not found; --weights finalizes (calibrates) there")
        written = Path(args.weights).with_name("config.json")
        if written.exists():
            trained_elsewhere = json.loads(written.read_text()).get("training", {})
            theirs = trained_elsewhere.get("command")
            if theirs and theirs != command:
                parser.error(
                    f"--weights {args.weights}: trained by `{theirs}`; finalize with the same "
                    f"options (this run's: `{command}`)"
                )
    os.environ.setdefault("CELLTALLY_AMP", "0")  # float32 (TF32) on GPU: how it was trained
    init = resolve_model(args.init)
    model, config = load_model_folder(init)
    if args.add_inputs:
        model, config = add_counter_inputs(model, config, args.add_inputs)
    if (args.counter_width or args.planes_at) and not args.new_counter:
        parser.error("--counter-width and --planes-at need --new-counter")
    if args.new_counter:
        if args.members_from_init or args.add_inputs:
            parser.error("--new-counter is not used with --members-from-init or --add-inputs")
        counter = dict(config["counter"])
        counter["width"] = args.counter_width or counter["width"]
        counter["planes_at"] = args.planes_at or counter.get("planes_at", "mask")
        config = {**config, "counter": counter}
        torch.manual_seed(args.seed)
        fresh = CountingPipeline(config)
        fresh.segmenter.load_state_dict(model.segmenter.state_dict())
        model = fresh
    if args.weights:
        model.load_state_dict(load_file(args.weights))
        # the run's log, if it was brought back beside the weights (history.json,
        # or the uncalibrated config.json the run wrote)
        log = Path(args.weights).with_name("history.json")
        written = Path(args.weights).with_name("config.json")
        if log.exists():
            history = json.loads(log.read_text())
        elif written.exists():
            logs = json.loads(written.read_text()).get("history", {})
            history = logs.get("counter_continued") or (
                logs.get("counter") if args.new_counter else None
            )
        else:
            history = None
    else:
        kw = simulation_settings(config["input_size"], config["normalization"], args.workers)
        if args.cell_loss:
            if args.real_sites:
                parser.error("--cell-loss needs per-cell targets, which real images lack")
            history = _train_cells(model, args, kw)
        else:
            data, val = _simulated(args, kw)
            if args.simulate_only:
                print(f"simulated {len(data)} + {len(val)} scenes into {args.sim_cache}")
                return
            if args.real_sites:
                real = _real_sites(args, config)
                print(f"training on {len(real)} real images of sites {args.real_sites}")
                data = LabeledSet.concat([data, real])
            history = train_counter(
                model,
                data,
                val=val,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                beta=float(config["train"]["counter"].get("beta", 0.5)),
                seed=args.seed,
                checkpoint=Path(args.out) / "checkpoints" / "counter.pt",
                device=default_device(),
                progress=False,
                budget=args.budget,
            )
    out = Path(args.out)
    config = dict(config)
    previous = config["training"]
    config["training"] = {
        **previous,
        "data": previous["data"]
        + [
            f"continued: the counter trained {_epochs_run(args, history)} more on "
            f"{args.scenes} new "
            f"simulated scenes (same settings, seed {args.sim_seed})"
            + (
                f" and the real BBBC005 images of sites {args.real_sites}"
                if args.real_sites
                else ""
            )
            + f", {_schedule(args)}"
        ],
        "continued_from": previous.get("command"),
        "continued_on": args.trained_on
        # weights trained elsewhere: where their own config says (its continued_on is the
        # run's own; trained_on, without --new-counter, the starting model's)
        or trained_elsewhere.get("continued_on")
        or trained_elsewhere.get("trained_on")
        or (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"),
        "command": command,
    }
    if args.real_sites:  # the sites trained on no longer calibrate
        split = dict(previous["split"])
        kept = [s for s in split["calibration_sites"] if s not in args.real_sites]
        split["calibration_sites"] = kept
        split["train_sites"] = sorted(set(split.get("train_sites", [])) | set(args.real_sites))
        config["training"]["split"] = split
        config["training"]["data"] = [
            f"BBBC005 real: sites {split['train_sites']} (counter only)"
            if line.startswith("BBBC005 real:")
            else line
            for line in config["training"]["data"]
        ]
    if history is not None:
        config["history"] = {**config.get("history", {}), "counter_continued": history}
    if args.new_counter:  # the old counter's lines and log no longer describe this model
        _describe_new_counter(config, previous, args, history)
    members = []
    config["training"].pop("ensemble", None)  # how `celltally ensemble` made --init's members
    if args.members_from_init:
        weights = load_file(str(init / "model.safetensors"))
        members = [
            {k.removeprefix("counter."): v for k, v in weights.items() if k.startswith("counter.")}
        ]
        members += [load_file(str(p)) for p in ensemble_files(init)]
        # with --add-inputs, the old counters ignore the new planes (zero weights)
        extra = len(config["counter_inputs"]) - members[0]["features.0.weight"].shape[1]
        members = [widen_counter_state(m, extra) for m in members]
        config["training"]["ensemble_note"] = MEMBERS_NOTE.format(
            n=len(members), init=config["training"]["continued_from"]
        )
    else:  # --init's members are not carried over
        config["training"].pop("ensemble_note", None)
    save_model_folder(model, config, out)
    for old in ensemble_files(out):
        old.unlink()
    for k, state in enumerate(members, start=1):
        save_file(state, str(out / f"ensemble_{k}.safetensors"))
    if not Path(args.data).exists():
        print(f"{args.data} not found: {out} is written uncalibrated (finalize it with --weights)")
        return
    sites = config["training"]["split"]["calibration_sites"]
    size, norm = config["input_size"], config["normalization"]
    real = load_bbbc005(args.data, size=size, norm=norm, cache_dir=args.cache)
    parts = split_bbbc005(real.meta, calibration_sites=sites)
    block = calibrate_model(out, real.subset(parts["calibration"]))
    config = json.loads((out / "config.json").read_text())
    config["training"]["split"]["n_calibration"] = int(parts["calibration"].size)
    test = real.subset(parts["test"])
    config["metrics"] = {
        "test": interval_metrics(model, test, block["scores"], device=default_device())
    }
    save_model_folder(model, config, out)
    overall = config["metrics"]["test"]["all"]
    print(
        f"test MAE {overall['mae']:.3f}, max {overall['max_abs_error']:.2f}, "
        f"95% coverage {overall['coverage']:.3f}"
    )


if __name__ == "__main__":
    main()
