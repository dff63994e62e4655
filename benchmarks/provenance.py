"""What every benchmark's JSON records so that its figures can be rerun and traced.

``stamp(payload)`` adds a ``provenance`` block: the command as run, the date
(UTC), the git commit (``-dirty`` with uncommitted changes), versions, the
machine (CPU count, torch threads, GPU) and, for each model the payload names
(a ``model`` / ``models`` key, or ``models=``), its weights' sha256, so a
figure can be matched to the exact shipped weights it measured.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # results written by earlier benchmarks of a session do not make the code dirty
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--"]
            + [".", ":(exclude)benchmarks/results"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an installed copy of the scripts)
    return f"{commit}-dirty" if dirty else commit


def _model_digest(model: str) -> dict[str, str] | str:
    from celltally.batch import model_identity
    from celltally.model_folder import resolve_model

    try:
        identity = model_identity(resolve_model(model))
    except Exception as err:  # a name the payload uses loosely: say why, do not fail the run
        return f"not resolved: {err}"
    return {k: identity[k] for k in ("name", "weights_sha256", "files_sha256")}


def _named_models(payload: Any) -> list[str]:
    if not isinstance(payload, dict):
        return []
    found = payload.get("models", payload.get("model"))
    if isinstance(found, str):
        return [found]
    if isinstance(found, list | tuple) and all(isinstance(m, str) for m in found):
        return list(found)
    return []


def provenance(models: Iterable[str] = ()) -> dict[str, Any]:
    """The ``provenance`` block for a benchmark run now (see the module docstring)."""
    import torch

    import celltally

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "celltally": celltally.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": cuda,
        },
        "models": {m: _model_digest(m) for m in dict.fromkeys(models)},
    }


def stamp(payload: dict[str, Any], *, models: Iterable[str] = ()) -> dict[str, Any]:
    """``payload`` with a ``provenance`` block added (a new dict; ``payload`` unchanged).

    The models recorded are ``models`` and those the payload's ``model`` or
    ``models`` key names.
    """
    return {**payload, "provenance": provenance([*models, *_named_models(payload)])}
