"""Simulator realism by use: a model trained on simulated images only, counting real BBBC005.

Three models of the same preset and recipe, differing only in what they learn from,
are evaluated on the same held-out real scenes (BBBC005 sites 9-10):

* ``simulated`` -- segmenter and counter trained on celltally.simulate scenes only
  (it never sees a real image; its conformal calibration alone uses real sites 1-8):
  the shipped ``bbbc005``,
* ``real`` -- trained on real BBBC005 only (``--train-data real``: sites 1-6 train,
  7-8 calibrate, unless ``--calibration-sites`` says otherwise),
* ``both`` -- real sites plus simulated scenes (``--train-data both``).

Make the model folders with scripts/train_bbbc005.py, e.g.::

    python scripts/train_bbbc005.py --train-data simulated --out runs/sim_only \\
        --counter-images 8000 --segmenter-images 2500 --seg-epochs 3 --count-epochs 30
    python scripts/train_bbbc005.py --train-data real --out runs/real_only \\
        --seg-epochs 3 --count-epochs 30

then::

    python benchmarks/sim_to_real.py --simulated runs/sim_only --real runs/real_only \\
        [--both bbbc005] [--data ../shared/data/bbbc005]

Prints MAE per blur x stain group for each model and the ratio simulated / real
(issue #3's target: <= 2, and a simulated-only MAE below the paper's 2.4), and
writes benchmarks/results/sim_to_real.json. Skips cleanly without the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from provenance import stamp

from celltally import io
from celltally.evaluation import evaluate_folder
from celltally.metrics import format_table

TEST_SITES = {9, 10}
PAPER_MAE = 2.4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc005")
    parser.add_argument(
        "--simulated", required=True, help="model folder trained on simulation only"
    )
    parser.add_argument("--real", required=True, help="model folder trained on real images only")
    parser.add_argument("--both", default="bbbc005", help="model trained on real + simulated")
    parser.add_argument("--out", default="benchmarks/results/sim_to_real.json")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.exists():
        print(f"skipped: {data} not found (real BBBC005 is not part of the repository)")
        return 0
    models = {"simulated": args.simulated, "real": args.real, "both": args.both}
    results: dict[str, dict] = {}
    for name, model in models.items():
        try:
            metrics = evaluate_folder(data, model=model, sites=TEST_SITES)["metrics"]
        except io.InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        results[name] = {"model": str(model), "metrics": metrics}
        print(f"\n== trained on {name} ({model}), real BBBC005 sites 9-10 ==")
        print(format_table(metrics))
    groups = list(results["real"]["metrics"])
    print("\n== MAE by group: simulated-only vs real-only ==")
    print(f"{'group':<18}{'simulated':>10}{'real':>8}{'both':>8}{'sim/real':>10}")
    ratios = {}
    for group in groups:
        sim = results["simulated"]["metrics"][group]["mae"]
        real = results["real"]["metrics"][group]["mae"]
        both = results["both"]["metrics"][group]["mae"]
        ratios[group] = sim / real if real else float("inf")
        print(f"{group:<18}{sim:>10.3f}{real:>8.3f}{both:>8.3f}{ratios[group]:>10.2f}")
    overall = results["simulated"]["metrics"]["all"]["mae"]
    verdict = {
        "ratio_all": ratios["all"],
        "within_2x": ratios["all"] <= 2.0,
        "beats_paper": overall < PAPER_MAE,
    }
    print(
        f"\nsimulated-only MAE {overall:.2f} = {ratios['all']:.2f}x the real-only MAE"
        f" (target <= 2x); paper {PAPER_MAE}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "test_sites": sorted(TEST_SITES),
        "models": results,
        "ratio": ratios,
        **verdict,
    }
    out.write_text(json.dumps(stamp(payload), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
