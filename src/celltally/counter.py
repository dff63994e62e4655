"""CellCounter: load a model folder and count cells, with intervals (the public API).

Everything that counts (CLI, evaluation, batch) goes through this class, so
they can never disagree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltally import io, naming
from celltally.calibration import conformal_quantile, gaussian_quantile
from celltally.models.pipeline import CountingPipeline
from celltally.transforms import prepare_image

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "bbbc005"


@dataclass
class CountResult:
    """The count of one image.

    Attributes
    ----------
    count : predicted number of cells (continuous).
    std : the model's aleatoric standard deviation of the count.
    low, high : the calibrated interval at ``level`` (low clipped at 0).
    mask : foreground probability at half the model's input size.
    mask_std : per-pixel standard deviation of the mask (aleatoric).
    """

    count: float
    std: float
    low: float
    high: float
    level: float
    mask: np.ndarray
    mask_std: np.ndarray
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        half = (self.high - self.low) / 2
        return f"{self.count:.1f} ± {half:.1f} cells ({self.level:.0%})"


def resolve_model(name_or_path: str | Path) -> Path:
    """A shipped model name ('bbbc005') or a path to a model folder -> the folder."""
    path = Path(name_or_path)
    if (path / "config.json").exists():
        return path
    shipped = WEIGHTS_DIR / str(name_or_path)
    if (shipped / "config.json").exists():
        return shipped
    names = ", ".join(available_models()) or "none"
    raise io.InputError(f"{name_or_path}: no such model (shipped models: {names})")


def available_models() -> list[str]:
    """Names of the model folders shipped inside the package."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").exists())


class CellCounter:
    """Count cells with a trained two-stage model.

    Examples
    --------
    >>> counter = CellCounter.from_pretrained()            # doctest: +SKIP
    >>> result = counter.count("plate/A01_s1.tif")         # doctest: +SKIP
    >>> print(result)                                      # doctest: +SKIP
    42.3 ± 2.1 cells (95%)
    """

    def __init__(
        self,
        model: CountingPipeline,
        config: dict[str, Any],
        *,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.config = config
        self.input_size = tuple(config["input_size"])
        self.norm = dict(config.get("normalization", {}))
        self.name = str(config.get("name", "model"))
        self._scores = np.asarray(config.get("calibration", {}).get("scores", []), dtype=float)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = DEFAULT_MODEL, *, device: str | None = None
    ) -> CellCounter:
        """Load a shipped model by name, or any model folder (config.json + model.safetensors)."""
        from safetensors.torch import load_file

        folder = resolve_model(name_or_path)
        config = json.loads((folder / "config.json").read_text())
        model = CountingPipeline(config)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return cls(model, config, device=device)

    # -- intervals -------------------------------------------------------
    def multiplier(self, level: float = 0.95) -> float:
        """Half-width of the interval in units of the model's std at ``level``.

        Split-conformal quantile of |y - mu| / sigma on the calibration split
        stored in the model folder; the Gaussian quantile if there is none.
        """
        if self._scores.size:
            return conformal_quantile(self._scores, level)
        return gaussian_quantile(level)

    # -- counting --------------------------------------------------------
    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Resize and normalize a raw 2-D image as the model expects."""
        return prepare_image(image, size=self.input_size, norm=self.norm)

    @torch.inference_mode()
    def _forward(self, prepared: Sequence[np.ndarray]) -> list[tuple]:
        x = torch.from_numpy(np.stack(prepared)[:, None]).to(self.device)
        out = self.model(x)
        counts = out.count.cpu().numpy()
        stds = torch.exp(0.5 * out.count_logvar).cpu().numpy()
        masks = out.mask[:, 0].cpu().numpy()
        mask_stds = torch.exp(0.5 * out.mask_logvar[:, 0]).cpu().numpy()
        return list(zip(counts, stds, masks, mask_stds, strict=True))

    def _result(self, raw: tuple, level: float, source: str | None) -> CountResult:
        count, std, mask, mask_std = raw
        half = self.multiplier(level) * float(std)
        meta = naming.parse_name(source).as_dict() if source else {}
        return CountResult(
            count=float(count),
            std=float(std),
            low=max(0.0, float(count) - half),
            high=float(count) + half,
            level=level,
            mask=mask,
            mask_std=mask_std,
            source=source,
            metadata=meta,
        )

    def count(self, image: np.ndarray | str | Path, *, level: float = 0.95) -> CountResult:
        """Count one image, given as a 2-D array or a file path."""
        source = None
        if isinstance(image, str | Path):
            source = str(image)
            image = io.read_image(image)
        array = np.asarray(image)
        if array.ndim != 2:
            raise io.InputError(f"expected a 2-D image, got an array of shape {array.shape}")
        if not np.isfinite(array).all():
            raise io.InputError("image contains NaN or infinite values")
        return self._result(self._forward([self.prepare(array)])[0], level, source)

    def count_paths(
        self,
        paths: Iterable[str | Path],
        *,
        level: float = 0.95,
        batch_size: int = 16,
        read_threads: int = 2,
    ) -> Iterator[tuple[Path, CountResult | Exception]]:
        """Count many files in order, yielding ``(path, result_or_error)`` as they finish.

        Reading and preparing runs in ``read_threads`` threads ahead of the
        network (decoding and resizing release the GIL), a bounded window at a
        time, so memory stays flat whatever the number of files. A file that
        cannot be read yields its ``ImageReadError`` and the rest go on.
        """

        def load(path: Path) -> np.ndarray | Exception:
            try:
                return self.prepare(io.read_image(path))
            except (io.ImageReadError, io.InputError) as err:
                return err

        with ThreadPoolExecutor(max(1, read_threads)) as pool:
            pending: list[tuple[Path, Any]] = []
            iterator = iter(Path(p) for p in paths)
            window = batch_size * 3

            def refill() -> None:
                for path in iterator:
                    pending.append((path, pool.submit(load, path)))
                    if len(pending) >= window:
                        break

            refill()
            while pending:
                chunk, pending[:] = pending[:batch_size], pending[batch_size:]
                refill()
                loaded = [(p, f.result()) for p, f in chunk]
                good = [(p, a) for p, a in loaded if not isinstance(a, Exception)]
                outs = self._forward([a for _, a in good]) if good else []
                by_path = {id(a): o for (_, a), o in zip(good, outs, strict=True)}
                for path, item in loaded:
                    if isinstance(item, Exception):
                        yield path, item
                    else:
                        yield path, self._result(by_path[id(item)], level, str(path))
