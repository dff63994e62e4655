"""Model folders: where the shipped ones live, how a name or path finds one, its config.

A model is a folder that describes itself (``config.json`` + ``model.safetensors``,
optionally ``ensemble_<k>.safetensors`` and ``ood.safetensors``). This module
reads folders without importing PyTorch, so commands that only list models or
read their calibration (``celltally models``, ``celltally wells``) start fast.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celltally.io import InputError

#: The folder of the models shipped inside the package.
WEIGHTS_DIR = Path(__file__).parent / "weights"
#: The model counted with when none is named.
DEFAULT_MODEL = "bbbc005"
#: Keys every model config must have.
CONFIG_KEYS = ("input_size", "segmenter", "counter", "counter_inputs")
_MEMBER = re.compile(r"^ensemble_(\d+)\.safetensors$")


def first_line(err: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none)."""
    return (str(err).splitlines() or [type(err).__name__])[0]


def available_models() -> list[str]:
    """Names of the model folders shipped inside the package."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").exists())


#: What each shipped model is for, in a line (``celltally models``, the web page).
SHIPPED_USES = {
    "bbbc005": "BBBC005-like images: SIMCEP-simulated U2OS cells, 8-bit, 1-100 cells in a "
    "696 x 520 frame at BBBC005's scale (other magnifications: rescale by the factor, "
    "2 for 2 x 2 binning)",
    "nuclei": "fluorescent nuclei (Hoechst, U2OS, BBBC039-like), 16-bit, hundreds per image, "
    "about 28 px across (other magnifications: --diameter, or rescale by 28.3 / their "
    "diameter)",
}


def held_out_figures(config: Mapping[str, Any], *, epistemic: bool = False) -> dict[str, Any]:
    """The held-out test figures a model's config records (MAE, coverage, ...; with
    ``epistemic``, its ensemble's), all images together; {} where none were measured."""
    metrics = dict(config.get("metrics") or {})
    if epistemic:
        metrics = dict(metrics.get("epistemic") or {})
    return dict((metrics.get("test") or {}).get("all") or {})


def model_use(name: str) -> str:
    """:data:`SHIPPED_USES`'s line for a shipped model; '' for any other."""
    return SHIPPED_USES.get(name, "")


def _whole(value: Any) -> bool:
    """Whether ``value`` is a whole number of 0 or more (not a bool)."""
    try:
        return not isinstance(value, bool) and int(value) == value >= 0
    except (TypeError, ValueError, OverflowError):
        return False


def recorded_channel(config: Mapping[str, Any]) -> int | None:
    """The channel a model was trained on (``config['channel']``, ``train --channel``), or None.

    InputError for a damaged value (not a whole number of 0 or more).
    """
    value = config.get("channel")
    if value is None:
        return None
    if not _whole(value):
        raise InputError(
            f"model {config.get('name', 'model')}: config.json's channel {value!r} is not a "
            "whole number of 0 or more"
        )
    return int(value)


def is_shipped(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is one of the package's own model folders (not a user's namesake)."""
    try:
        return Path(folder).resolve().parent == WEIGHTS_DIR.resolve()
    except OSError:
        return False


#: In a model folder while a ``celltally train`` run writes it; removed when the model is complete.
UNFINISHED = ".unfinished"


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A shipped model name ('bbbc005') or a path to a model folder -> the folder.

    A shipped model's name given as a string means the shipped model, even where
    a folder of that name is in the working folder (name that one ``./bbbc005``,
    or as a ``Path``): the default model is never replaced by a folder here.
    """
    shipped = WEIGHTS_DIR / str(name_or_path)
    if isinstance(name_or_path, str) and name_or_path in available_models():
        return shipped
    path = Path(name_or_path)
    if (path / "config.json").exists():
        return path
    if (shipped / "config.json").exists():
        return shipped
    names = ", ".join(available_models()) or "none"
    if path.is_dir() and (path / UNFINISHED).exists():
        raise InputError(
            f"{name_or_path}: a training run into it has not finished; run the same "
            "`celltally train` command again with --resume"
        )
    if path.is_dir():
        raise InputError(
            f"{name_or_path}: a folder but not a model (no config.json; shipped models: {names})"
        )
    if path.is_file():  # e.g. its model.safetensors or config.json, or an image
        raise InputError(
            f"{name_or_path}: a file, not a model; give the model's folder (the one holding "
            f"config.json) or a shipped model's name ({names})"
        )
    raise InputError(f"{name_or_path}: no such model (shipped models: {names})")


def check_new_model_folder(out: str | Path, option: str = "--out") -> None:
    """Refuse a new model folder named as a shipped model ('bbbc005'), which that name means."""
    if str(out) in available_models():
        raise InputError(
            f"{option} {out}: the name of a shipped model, which `--model {out}` means; "
            "give your model folder another name"
        )
    if Path(out).name in available_models():  # its results would name the shipped model
        raise InputError(
            f"{option} {out}: a folder named like the shipped model {Path(out).name!r}, whose "
            "name its results would carry; give your model folder another name"
        )


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """A model folder's ``config.json``, or InputError naming the file and the problem."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder}: not a model folder (no config.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: not a readable model config ({first_line(err)})") from None
    missing = [k for k in CONFIG_KEYS if k not in config] if isinstance(config, dict) else None
    if missing is None or missing:
        what = f"no {missing[0]!r}" if missing else "not a JSON object"
        raise InputError(f"{path}: not a celltally model config ({what})")
    return config


def ensemble_files(folder: str | Path) -> list[Path]:
    """The folder's ``ensemble_<k>.safetensors`` files, by ``k``."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _MEMBER.match(p.name))]
    return [p for _, p in sorted(found)]
