"""Deep ensemble or MC dropout for ``--epistemic``: which measures better for its cost?

    python benchmarks/mc_dropout.py [--data ../shared/data/bbbc005] [--out runs/mc]

Issue #4 asks for a small deep ensemble or MC dropout, "the one that measures
better for its cost". Both are built on the shipped ``bbbc005`` model (its
segmenter frozen) at matched cost:

- ensemble: the shipped ``--epistemic`` ensemble, the shipped counter plus two
  members, each fine-tuned 5 epochs on 2,000 new simulated scenes (lr 1e-3,
  batch 16); 3 counter passes per image;
- MC dropout: the shipped counter fine-tuned once (half the ensemble's
  training), 5 epochs on 2,000 new simulated scenes, with dropout ``p`` on the
  input of each of the density head's 1x1 convolutions (the head is an FC
  stack applied at every grid cell; Gal & Ghahramani drop before each weight
  layer); at counting, batch norm in eval mode and dropout on, ``T`` passes
  (3 = the ensemble's counter passes; 8 also reported).

Each gives count = mean over passes, std = sqrt(mean aleatoric variance +
variance of the passes' counts), as ``celltally count --epistemic`` does.
All passes average the 4 flips (the model's ``tta``). Measured on real BBBC005
calibration sites 1-8 only (the test sites 9-10 are printed, not used to
decide): 28 cross-site folds, each pair of sites held out and the conformal
multiplier fitted on the other six; per level, coverage and mean half-width.
The decision rule was written before the run; result and rule in
``docs/uncertainty.md`` (the ensemble stays).

Prints a table, writes benchmarks/results/mc_dropout.json. The fine-tuned
dropout counter is kept in ``--out`` so a rerun only measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from celltally.calibration import calibrate, coverage, interval_multiplier
from celltally.counter import resolve_model
from celltally.datasets import load_bbbc005, simulate_set
from celltally.models.pipeline import load_model_folder
from celltally.train import train_counter
from celltally.uncertainty import load_members

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from provenance import stamp
from train_bbbc005 import simulation_settings  # noqa: E402

LEVELS = (0.8, 0.9, 0.95)


def _run_key(args: argparse.Namespace) -> str:
    """The settings a fine-tuned counter depends on (its cached files are named by them)."""
    return f"p{args.p:g}_n{args.scenes}_s{args.sim_seed}_e{args.epochs}_seed{args.seed}"


class DropoutSwitch:
    """Dropout before each 1x1 conv of a density head, on in training or when ``on``."""

    def __init__(self, head: nn.Module, p: float) -> None:
        self.p, self.on = p, False
        for module in head.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_pre_hook(self._drop)

    def _drop(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        active = module.training or self.on
        return (nn.functional.dropout(inputs[0], self.p, training=active),)


def fine_tune(args: argparse.Namespace) -> tuple[nn.Module, DropoutSwitch, float]:
    """The shipped counter with dropout, fine-tuned (or loaded from ``--out``)."""
    model, config = load_model_folder(resolve_model("bbbc005"))
    switch = DropoutSwitch(model.counter.density_head, args.p)
    weights = Path(args.out) / f"dropout_{_run_key(args)}_counter.safetensors"
    seconds = 0.0
    if weights.exists():
        model.counter.load_state_dict(load_file(str(weights)))
    else:
        kw = simulation_settings(
            config["input_size"], config["normalization"], workers=os.cpu_count() or 1
        )
        start = time.perf_counter()
        data = simulate_set(args.scenes, seed=args.sim_seed, **kw)
        val = simulate_set(max(16, args.scenes // 20), seed=args.sim_seed + 999, **kw)
        train_counter(
            model,
            data,
            val=val,
            epochs=args.epochs,
            batch_size=16,
            lr=1e-3,
            beta=float(config["train"]["counter"].get("beta", 0.5)),
            seed=args.seed,
            device=torch.device("cpu"),
            progress=False,
        )
        seconds = time.perf_counter() - start
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.counter.state_dict(), str(weights))
    return model.eval(), switch, seconds


@torch.inference_mode()
def passes(args: argparse.Namespace, dropout: tuple[nn.Module, DropoutSwitch]) -> dict:
    """Per image: truth, names, and each method's (n_images, passes) counts and variances."""
    folder = resolve_model("bbbc005")
    shipped, config = load_model_folder(folder)
    shipped.eval()
    members = [shipped.counter] + load_members(folder, config)
    model, switch = dropout
    real = load_bbbc005(
        args.data, size=config["input_size"], norm=config["normalization"], cache_dir=args.cache
    )
    torch.manual_seed(0)
    out: dict[str, list] = {"ensemble": [], "dropout": [], "dropout_off": []}
    for start in range(0, len(real.counts), 32):
        x = real.images[start : start + 32]
        mask, logvar = shipped.segmenter(x, levels=1)[0]
        planes = shipped.counter_planes(mask, logvar, x)
        out["ensemble"].append([m(planes) for m in members])
        out["dropout_off"].append([model.counter(planes)])
        switch.on = True
        out["dropout"].append([model.counter(planes) for _ in range(args.max_passes)])
        switch.on = False
    stacked = {}
    for name, batches in out.items():
        count = torch.cat([torch.stack([c for c, _ in b], 1) for b in batches]).numpy()
        var = torch.cat([torch.stack([lv.exp() for _, lv in b], 1) for b in batches]).numpy()
        stacked[name] = (count.astype(float), var.astype(float))
    return {"y": real.counts.numpy().astype(float), "meta": real.meta, **stacked}


def combine(count: np.ndarray, var: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and total std of the first ``k`` passes (law of total variance)."""
    c, v = count[:, :k], var[:, :k]
    return c.mean(1), np.sqrt(v.mean(1) + (c.var(1) if k > 1 else 0.0))


def cross_site(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray, site: np.ndarray) -> dict:
    """Conformal coverage and mean half-width per level over the 28 held-out site pairs."""
    per = {f"{lv:g}": {"coverage": [], "half_width": []} for lv in LEVELS}
    for pair in combinations(sorted(set(site.tolist())), 2):
        held = np.isin(site, pair)
        block = calibrate(y[~held], mu[~held], sigma[~held])
        for lv in LEVELS:
            q = interval_multiplier(block, lv, "conformal")
            per[f"{lv:g}"]["coverage"].append(coverage(y[held], mu[held], sigma[held], q))
            per[f"{lv:g}"]["half_width"].append(float(np.mean(q * sigma[held])))
    return {lv: {k: float(np.mean(v)) for k, v in d.items()} for lv, d in per.items()}


def test_figures(y, mu, sigma, cal, test) -> dict:
    """Conformal fitted on all calibration sites, measured on the test sites."""
    block = calibrate(y[cal], mu[cal], sigma[cal])
    res = {"mae": float(np.mean(np.abs(mu[test] - y[test])))}
    for lv in LEVELS:
        q = interval_multiplier(block, lv, "conformal")
        res[f"coverage_{lv:g}"] = coverage(y[test], mu[test], sigma[test], q)
        res[f"half_width_{lv:g}"] = float(np.mean(q * sigma[test]))
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument("--out", default="runs/mc", help="keeps the fine-tuned dropout counter")
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--p", type=float, default=0.1, help="dropout probability")
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--sim-seed", type=int, default=6300)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--max-passes", type=int, default=8)
    parser.add_argument("--json", default="benchmarks/results/mc_dropout.json")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"{args.data} not found: nothing to measure")
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    model, switch, seconds = fine_tune(args)
    saved = Path(args.out) / f"passes_{_run_key(args)}_T{args.max_passes}.pt"
    if saved.exists():  # the counts of an earlier run of the same counter
        res = torch.load(saved, weights_only=False)
    else:
        res = passes(args, (model, switch))
        torch.save(res, saved)
    y = res["y"]
    site = np.array([m["site"] for m in res["meta"]])
    cal, test = site <= 8, site >= 9
    n_members = res["ensemble"][0].shape[1]
    variants = {
        f"ensemble ({n_members} counters)": combine(*res["ensemble"], n_members),
        "shipped counter alone (no epistemic part)": combine(*res["ensemble"], 1),
        "MC dropout, T = 3": combine(*res["dropout"], 3),
        f"MC dropout, T = {args.max_passes}": combine(*res["dropout"], args.max_passes),
        "dropout counter, dropout off (no epistemic part)": combine(*res["dropout_off"], 1),
    }
    results = {}
    for name, (mu, sigma) in variants.items():
        results[name] = {
            "calibration_sites_mae": float(np.mean(np.abs(mu[cal] - y[cal]))),
            "cross_site": cross_site(y[cal], mu[cal], sigma[cal], site[cal]),
            "test_sites_9_10": test_figures(y, mu, sigma, cal, test),
        }
    print(f"{'method':<50} {'MAE 1-8':>8} " + " ".join(f"cov/hw {lv:g}".rjust(15) for lv in LEVELS))
    for name, r in results.items():
        cells = " ".join(
            f"{r['cross_site'][f'{lv:g}']['coverage']:.3f}/{r['cross_site'][f'{lv:g}']['half_width']:.2f}".rjust(
                15
            )
            for lv in LEVELS
        )
        print(f"{name:<50} {r['calibration_sites_mae']:>8.3f} {cells}")
    print("test sites 9-10 (reported, not used to decide):")
    for name, r in results.items():
        t = r["test_sites_9_10"]
        print(
            f"  {name:<48} MAE {t['mae']:.3f}, coverage "
            + " / ".join(f"{t[f'coverage_{lv:g}']:.3f}" for lv in LEVELS)
            + f", 95% half-width {t['half_width_0.95']:.2f}"
        )
    record = {
        "model": "bbbc005",
        "dropout_p": args.p,
        "fine_tune": {
            "scenes": args.scenes,
            "sim_seed": args.sim_seed,
            "epochs": args.epochs,
            "seed": args.seed,
            "seconds_this_run": round(seconds, 1) or None,
        },
        "n_calibration": int(cal.sum()),
        "n_test": int(test.sum()),
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(stamp(record), indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
