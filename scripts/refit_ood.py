"""Refit a model's out-of-distribution check; check nothing else moved.

    python scripts/refit_ood.py --model bbbc005 --data ../shared/data/bbbc005 --out runs/ood/bbbc005
    python scripts/refit_ood.py --model nuclei --data ../shared/data/bbbc039 --out runs/ood/nuclei

Copies the model folder to ``--out`` and recalibrates the copy on the
model's own calibration images (those of ``scripts/empty_frames.py``:
BBBC005 calibration sites, or the nuclei model's 20 BBBC039 calibration
images), with the ``count_scale`` blocks it had. It prints the old and new
thresholds and the shapes of a feature reference that changed, and fails
unless everything else in the calibration (conformal scores, temperatures,
count scales, well correlation) is unchanged. The command is recorded in
the copy's ``training.ood_refit``. Two refits so far (2026-11-27): the
feature-distance threshold from distances measured out of sample
(``calibration.held_out_distances``, 20 folds by scene; before, from the
calibration images' own distances, biased small), then one Gaussian of deep
features per stain where the calibration names give two (BBBC005's w1 and w2).
A third (2026-11-27) added the object sizes (``calibration.ood.size``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from empty_frames import recalibrate  # noqa: E402
from train_nuclei import command_line  # noqa: E402

from celltally.model_folder import read_model_config, resolve_model  # noqa: E402
from celltally.train import write_config  # noqa: E402


def differences(old: object, new: object, where: str = "calibration") -> list[str]:
    """Paths where two calibration blocks differ, leaving out the ``ood`` thresholds."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key == "ood":
                continue
            out += differences(old.get(key), new.get(key), f"{where}.{key}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        same = np.allclose(np.asarray(old, float), np.asarray(new, float), rtol=0, atol=1.5e-5)
        return [] if same else [where]
    if isinstance(old, float) and isinstance(new, float):
        return [] if abs(old - new) <= 1.5e-5 else [f"{where}: {old} -> {new}"]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("bbbc005", "nuclei"), required=True)
    parser.add_argument("--data", required=True, help="BBBC005 or BBBC039 folder")
    parser.add_argument("--out", required=True, help="new folder for the recalibrated copy")
    parser.add_argument("--cache", default="cache", help="prepared-image cache (BBBC005)")
    args = parser.parse_args()
    if not Path(args.data).is_dir():  # before any simulation or output
        raise SystemExit(f"--data {args.data}: no such folder")
    source, out = resolve_model(args.model), Path(args.out)
    if out.exists():
        raise SystemExit(f"{out}: already exists; give a new --out")
    shutil.copytree(source, out)
    config = read_model_config(out)
    old = config["calibration"]
    config["training"]["ood_refit"] = {
        "command": command_line("scripts/refit_ood.py", vars(args)),
        "what": "out-of-distribution check refitted: the feature reference (one Gaussian per "
        "stain where the calibration names give two or more), its threshold on out-of-sample "
        "distances (held_out_distances, 20 folds by scene), and the object sizes "
        "(calibration.ood.size: log object width against foreground fraction per stain; "
        "size_shift, from held_out_size_ratios and at least MIN_SIZE_SHIFT, the factor beyond "
        "which a warning names the size; the size raises no warning itself); nothing else "
        "changed",
        "before": {"plain": old.get("ood"), "epistemic": (old.get("epistemic") or {}).get("ood")},
        "earlier": config["training"].get("ood_refit"),  # the refits before this one
    }
    write_config(out, config)
    recalibrate(args, out, config)
    new = read_model_config(out)["calibration"]
    changed = differences(old, new)
    for name in ("ood.safetensors",):
        a, b = load_file(str(source / name)), load_file(str(out / name))
        for k in a:
            if a[k].size != b[k].size:  # one Gaussian per class: a new reference
                print(f"{name}:{k}: shape {a[k].shape} -> {b[k].shape}")
            elif not np.allclose(a[k].reshape(b[k].shape), b[k], atol=1.5e-5):
                print(f"{name}:{k}: refitted, same shape {b[k].shape}")
    for label, before, after in (
        ("plain", old.get("ood"), new.get("ood")),
        (
            "epistemic",
            (old.get("epistemic") or {}).get("ood"),
            (new.get("epistemic") or {}).get("ood"),
        ),
    ):
        if before or after:
            print(f"{label}: {json.dumps(before)}\n   -> {json.dumps(after)}")
    if changed:
        print("changed besides the thresholds:\n  " + "\n  ".join(changed))
        return 1
    print(f"only the out-of-distribution check changed -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
