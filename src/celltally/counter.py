"""CellCounter: load a model folder and count cells, with intervals (the public API).

Everything that counts (CLI, evaluation, batch) goes through this class, so
they can never disagree.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from celltally import io, naming
from celltally.calibration import (
    FRAME_CORRELATION,
    LOW_CONTRAST,
    MAX_LEVEL,
    beyond_calibration,
    feature_distance,
    interval_multiplier,
    level_text,
    object_size,
    ood_features,
    ood_warning,
    parts_variance_factor,
    size_ratio,
    valid_level,
)
from celltally.model_folder import (  # noqa: F401 (re-exported: the public names)
    DEFAULT_MODEL,
    UNFINISHED,
    WEIGHTS_DIR,
    _whole,
    available_models,
    recorded_channel,
    resolve_model,
)
from celltally.models.inference import inference_copy
from celltally.models.pipeline import (
    CounterHead,
    CountingPipeline,
    first_line,
    load_model_folder,
)
from celltally.scale import model_scale, model_shape, rescale_factor
from celltally.tiling import (
    DEFAULT_MARGIN,
    DEFAULT_TILE,
    FRAME_TOLERANCE,
    check_tiles,
    count_density,
    tile_sides,
    whole_pixels,
)
from celltally.transforms import background_level, contrast, prepare_image

#: Smallest image side (raw px) counted: below it there is not one whole cell.
MIN_SIDE = 8
#: In a model folder: mean and precision of the calibration images' deep
#: features (see ``CellCounter.embed`` and ``celltally.uncertainty.calibrate_model``).
OOD_REFERENCE_FILE = "ood.safetensors"


@dataclass(eq=False)  # holds arrays: compared by identity, not field by field
class CountResult:
    """The count of one image.

    Attributes
    ----------
    count : predicted number of cells (continuous).
    std : the model's aleatoric standard deviation of the count.
    low, high : the calibrated interval at ``level`` (low clipped at 0).
    level : the interval's level (e.g. 0.95).
    mask : foreground probability at half the model's input size; for an image
        counted in tiles (not one native frame), at half the size of the whole
        image at the model's pixel scale, stitched from the windows' cores.
    mask_std : per-pixel standard deviation of the mask (aleatoric), same size.
    source : the file path (as a string) when the image was given as a path,
        else None.
    metadata : fields parsed from the file name by
        ``celltally.naming.parse_name`` (well, row, column, site, blur, stain,
        count: the true count, plate; None where not parsed); empty without a
        path.
    warning : non-empty when the image looks unlike the model's calibration
        images (its uncertainty features exceed their calibration range): the
        interval may not mean what it says.
    epistemic_std : with an ensemble (``epistemic=True``), the std of the
        members' counts; ``std`` is then the total,
        ``sqrt(aleatoric**2 + epistemic**2)``. None without an ensemble.
    ood : the out-of-distribution features the warning was decided on
        (``celltally.calibration.OOD_FEATURES``, and ``contrast``: below 1
        when the frame's range is so low that it may hold no cells; with a
        model calibrated for it, ``size_ratio``: the objects' width over the
        calibration images' at the same foreground fraction, e.g. 1.5 for an
        image at 1.5x the magnification, and ``size_shift``, the ratio or its
        inverse, whichever is above 1: a warning names it when it is beyond
        the calibration's range, but it raises none by itself).
    """

    count: float
    std: float
    low: float
    high: float
    level: float
    mask: np.ndarray = field(repr=False)  # a notebook's repr shows the numbers, not the maps
    mask_std: np.ndarray = field(repr=False)
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    warning: str = ""
    epistemic_std: float | None = None
    ood: dict[str, float] = field(default_factory=dict)

    @property
    def half_width(self) -> float:
        """``high - count``: the interval's half-width before ``low`` is clipped at 0."""
        return self.high - self.count

    def __str__(self) -> str:
        return f"{_short(self.count)} ± {_short(self.half_width)} cells ({level_text(self.level)})"

    def to_dict(self) -> dict[str, Any]:
        """The numbers without the maps, for a table: ``pandas.DataFrame([r.to_dict() ...])``.

        ``metadata`` (the name's fields; its ``count`` is the true count a name
        such as ``_C18_`` gives) and ``ood`` stay nested dicts.
        """
        return {
            "source": self.source,
            "count": self.count,
            "std": self.std,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "epistemic_std": self.epistemic_std,
            "warning": self.warning,
            "metadata": dict(self.metadata),
            "ood": dict(self.ood),
        }


def _short(x: float) -> str:
    """One decimal; two below 1, so a near-empty image's ± 0.04 does not read ± 0.0."""
    return f"{x:.2f}" if 0 < abs(x) < 1 else f"{x:.1f}"


class _EmbeddingHook:
    """Forward hook keeping the pooled output of a block, per thread, while asked to.

    A counter and its :meth:`CellCounter.with_rescale` twins share one, as they
    share the model it hooks; pickled with them (Dask, joblib), it stays shared
    and starts with fresh per-thread state.
    """

    def __init__(self) -> None:
        self.local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"local": None}  # not empty: a false state would skip __setstate__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.local = threading.local()

    def __call__(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if getattr(self.local, "collect", False):
            pooled = [output.mean((2, 3)), output.std((2, 3), unbiased=False)]
            self.local.embedding = torch.cat(pooled, 1).float().cpu().numpy()


_FC_CANNOT_RESCALE = (
    "model {name} has the paper's fixed-frame 'fc' head, which cannot rescale images; "
    "--pixel-size/--diameter/--rescale need a density-head model"
)

#: Most pixels an image may be enlarged to at a model's scale (16384 x 16384; images
#: shrunk or kept at their size are not limited): a mistyped --rescale, --diameter or --pixel-size
#: would otherwise ask for terabytes.
MAX_MODEL_PIXELS = 16384 * 16384


@dataclass(frozen=True)
class ModelScaleImage:
    """An image prepared at the model's pixel scale (not one native frame): counted in tiles."""

    prepared: np.ndarray
    raw_shape: tuple[int, ...]


def ensemble_mixture(
    outs: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deep-ensemble mixture of counters' ``(count, log-variance)`` outputs.

    Returns the mean of their counts, the total variance (their mean aleatoric
    variance + the variance of their counts) and that epistemic variance alone.
    One counter's output is its own count and variance (epistemic 0).
    """
    means = torch.stack([o[0] for o in outs])
    variances = torch.stack([torch.exp(o[1]) for o in outs])
    epistemic = means.var(0, unbiased=False)
    return means.mean(0), variances.mean(0) + epistemic, epistemic


def _checked_batch(batch_size: int) -> int:
    try:
        size = None if isinstance(batch_size, bool) else operator.index(batch_size)
    except TypeError:  # a float, a string: not a whole number
        size = None
    if size is None or size < 1:
        raise io.InputError(f"batch_size must be a whole number of 1 or more, got {batch_size!r}")
    return size


#: The keys of a ``norm`` (see :func:`celltally.transforms.prepare_image`).
NORM_KEYS = ("method", "low", "high", "background", "noise_range")


def _checked_device(device: str | torch.device | None) -> torch.device:
    """The torch device to count on (default: the GPU if there is one), or InputError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise io.InputError(f"device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise io.InputError(
            f"device {device!r}: this torch sees no CUDA GPU (torch.cuda.is_available() is "
            "False); use 'cpu'"
        )
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise io.InputError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
            f"(the last is cuda:{torch.cuda.device_count() - 1})"
        )
    return chosen


def _file_path(path: Any) -> Path:
    """``path`` as a Path, or InputError when it is not one (an array given to count_paths)."""
    if not isinstance(path, str | os.PathLike):
        raise io.InputError(
            f"count_paths takes file paths, got a {type(path).__name__}: "
            "count an array with count()"
        )
    return Path(path)


def _checked_level(level: float) -> float:
    if not valid_level(level):
        raise io.InputError(
            f"level must be between 0 and 1 (e.g. 0.95; at most {MAX_LEVEL:.9f}), got {level!r}"
        )
    if isinstance(level, np.floating) and level.dtype.itemsize < 8:
        return float(str(level))  # float32 0.9 is 0.899999976: the level meant, 0.9
    return float(level)


def _checked_norm(norm: dict[str, Any]) -> dict[str, Any]:
    """``norm`` if :func:`prepare_image` can use it, else InputError saying why."""
    from celltally.transforms import BACKGROUNDS, DEFAULT_NORMALIZATION

    full = {**DEFAULT_NORMALIZATION, **norm}
    if full["method"] not in ("percentile", "fixed", "none"):
        raise io.InputError(
            f"normalization method {full['method']!r}: use percentile, fixed or none"
        )
    if full.get("background", "none") not in BACKGROUNDS:
        raise io.InputError(
            f"normalization background {full['background']!r}: use quadratic or none"
        )
    try:
        low, high = float(full["low"]), float(full["high"])
    except (TypeError, ValueError):
        low, high = math.nan, math.nan
    if full["method"] == "percentile" and not 0.0 <= low < high <= 100.0:
        raise io.InputError(
            f"normalization percentiles must satisfy 0 <= low < high <= 100, got "
            f"{full['low']!r} and {full['high']!r}"
        )
    if "noise_range" in full:  # the empty-frame guard's multiple of the noise std
        try:
            ok = float(full["noise_range"]) >= 0.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise io.InputError(
                f"normalization noise_range must be a number >= 0, got {full['noise_range']!r}"
            )
    return norm


def _out_of_memory(
    err: MemoryError | RuntimeError, path: Path, shape: Sequence[int] | None = None
) -> io.ImageReadError:
    """The error of a file this machine had no memory to count: one line, and the run goes on.

    ``err`` is re-raised unless it is NumPy's MemoryError or torch's CPU allocator
    failing (a RuntimeError).
    """
    text = str(err)
    if not (
        isinstance(err, MemoryError) or "DefaultCPUAllocator" in text or "not enough memory" in text
    ):
        raise err
    size = f" ({shape[-1]} x {shape[-2]} px)" if shape is not None and len(shape) >= 2 else ""
    return io.ImageReadError(
        path,
        f"ran out of memory counting it{size}: cut it into smaller images, or count it on "
        "a machine with more memory",
    )


class _InlineExecutor(Executor):
    """Runs each task at submit time, in the caller's thread (``read_threads=0``)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # delivered by .result(), as a pool would
            future.set_exception(exc)
        return future


class CellCounter:
    """Count cells with a trained two-stage model.

    ``model`` and ``members`` are not modified: the counter keeps eval-mode
    copies with batch norm folded into the convolutions (channels-last on
    CPU; :mod:`celltally.models.inference`) in ``self.model`` and
    ``self.members``. They compute the same function about twice as fast;
    to train further, use the original modules or the model folder.

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
        members: Sequence[CounterHead] = (),
        calibration: str | None = None,
        channel: int | None = None,
        norm: dict[str, Any] | None = None,
        pixel_size: float | None = None,
        diameter: float | None = None,
        rescale: float | None = None,
        tile: int | Sequence[int] | None = None,
        margin: int | None = None,
        ood_reference: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.device = _checked_device(device)
        # Copies for inference (batch norm folded, channels-last on CPU; see
        # models.inference): about twice the speed, the caller's modules untouched.
        self.model = inference_copy(model, self.device)
        self.members = [inference_copy(m, self.device) for m in members]
        self.config = config
        self.input_size = tuple(config["input_size"])
        # the caller's keys override the model's (a partial {'low', 'high'} keeps its
        # background step); checked here, not at the first image of a batch
        if norm is not None and not isinstance(norm, Mapping):
            raise io.InputError(
                f"norm must be a dict such as {{'method': 'none'}} or {{'low': 1, 'high': "
                f"99.8}}, not {norm!r}"
            )
        if unknown := sorted(set(norm or {}) - set(NORM_KEYS)):
            raise io.InputError(
                f"unknown normalization key(s) {', '.join(map(repr, unknown))}: use "
                + ", ".join(NORM_KEYS)
            )
        self.norm = _checked_norm({**dict(config.get("normalization") or {}), **(norm or {})})
        self.name = str(config.get("name", "model"))
        # Reading and scale options (see celltally.scale, celltally.tiling): images that
        # are not one native frame are counted at the model's pixel scale, in tiles.
        if channel is not None and not _whole(channel):
            raise io.InputError(f"channel must be 0 or more (0-based; --channel), got {channel!r}")
        self.channel = None if channel is None else int(channel)
        #: The plane stain-plane files and arrays give without ``channel`` (train --channel).
        self.trained_channel = recorded_channel(config)
        self.scale = model_scale(config)
        self.factor = rescale_factor(
            self.scale,
            pixel_size=pixel_size,
            diameter=diameter,
            rescale=rescale,
            model_name=f"model {self.name}",
        )
        # Window geometry: the caller's, else the model folder's ("tiling"), else the default.
        tiling = dict(config.get("tiling") or {})
        chosen = tile if tile is not None else tiling.get("tile", DEFAULT_TILE)
        try:
            self.tile = tile_sides(chosen)
            self.margin = whole_pixels(
                margin if margin is not None else tiling.get("margin", DEFAULT_MARGIN)
            )
        except (TypeError, ValueError):
            raise io.InputError(
                f"tile must be a side or a (height, width) pair of whole pixels and margin "
                f"a whole number of pixels; got tile {chosen!r}, margin {margin!r}"
            ) from None
        self.density_head = bool(getattr(model.counter, "counts_any_size", False))
        if self.density_head:
            # checked here, not at the first large image, so a batch fails before it starts
            try:
                check_tiles(self.tile, margin=self.margin, stride=int(model.density_stride))
            except ValueError as err:
                raise io.InputError(f"the tile does not fit model {self.name}: {err}") from None
        if not self.density_head and self.factor != 1.0:
            raise io.InputError(_FC_CANNOT_RESCALE.format(name=self.name))
        if config.get("untrained_counter"):
            raise io.InputError(
                f"model {self.name}: its counter is untrained (a --stage segmenter model); "
                f"train it with `celltally train --stage counter --from MODEL_FOLDER`"
            )
        self.calibration_method = calibration
        block = dict(config.get("calibration") or {})
        if self.members and block.get("epistemic"):
            # Scores and thresholds fitted on the ensemble's total sigma. (Without
            # them the aleatoric block applies: total sigma >= aleatoric, so wider.)
            block = dict(block["epistemic"])
        self.calibration = block
        # frames' worth of an image counted in tiles: their errors correlate as a well's
        # sites do (calibration.FRAME_CORRELATION)
        self.frame_correlation = FRAME_CORRELATION
        # A count correction fitted on the calibration split (uncertainty.calibrate_model
        # count_scale): a factor, so tile sums stay additive. 1 where none was fitted.
        self.count_scale = float(block.get("count_scale", 1.0))
        try:  # fail early on an unknown method
            interval_multiplier(block, 0.5, calibration)
        except ValueError as err:
            raise io.InputError(str(err)) from None
        self.ood_reference = (
            None
            if ood_reference is None
            # a copy: the caller's later edits must not move the out-of-distribution check
            else {k: np.array(v, dtype=np.float64) for k, v in ood_reference.items()}
        )
        # The deepest encoder block's output, pooled, is the image's embedding
        # (for the feature-distance OOD check); kept per thread for web servers.
        self._hook = _EmbeddingHook()
        blocks = getattr(self.model.segmenter, "down", None)
        if blocks is not None and len(blocks):
            blocks[-1].register_forward_hook(self._hook)

    def with_rescale(self, rescale: float | None) -> CellCounter:
        """This counter resizing images by ``rescale`` (``--rescale``); None: the model's scale.

        The twin shares the model, its calibration and the embedding hook on it
        (no copy of the weights), so it must be used under the same lock as this
        counter where one is held.
        """
        factor = 1.0
        if rescale is not None:
            factor = rescale_factor(self.scale, rescale=rescale, model_name=f"model {self.name}")
        if not self.density_head and factor != 1.0:
            raise io.InputError(_FC_CANNOT_RESCALE.format(name=self.name))
        twin = copy.copy(self)  # the same model, and the same hook on it
        twin.factor = factor
        return twin

    @property
    def epistemic(self) -> bool:
        """Whether counts include an ensemble's epistemic spread."""
        return bool(self.members)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        epistemic: bool = False,
        calibration: str | None = None,
        **options: Any,
    ) -> CellCounter:
        """Load a shipped model by name, or any model folder (config.json + model.safetensors).

        Parameters
        ----------
        name_or_path : str or Path, default "bbbc005"
            A shipped model's name (``celltally models`` lists them) or a model
            folder; a ``Path`` is always a folder.
        device : str or torch.device, optional
            Where the network runs; default: CUDA when available, else the CPU.
        epistemic : bool, default False
            Also load the folder's ensemble of counter heads
            (``ensemble_<k>.safetensors``, see ``celltally.uncertainty``) and add
            their spread to the std.
        calibration : {"conformal", "temperature", "gaussian"}, optional
            The interval method (default: the one the model folder records, conformal
            for the shipped models; see ``celltally.calibration``).
        **options
            Keyword arguments of the constructor:

            - ``channel`` (int): the plane of multi-channel files and arrays;
            - ``norm`` (dict): keys overriding the model's normalization, e.g.
              ``{'low': 1, 'high': 99.9}``, ``{'method': 'none'}`` or
              ``{'background': 'none'}`` (see ``tiling.merge_normalization``);
            - one of ``pixel_size`` (micrometres), ``diameter`` (typical object
              diameter, px) or ``rescale`` (the factor itself), to bring images to
              the model's scale;
            - ``tile`` (a side or a (height, width) pair) and ``margin`` (model px)
              for images counted in tiles.

        Returns
        -------
        CellCounter

        Raises
        ------
        celltally.io.InputError
            One line saying why: an unknown name, a folder that is not a model
            (or one whose training has not finished), an unknown option or
            calibration method, or an option value it cannot use.
        """
        folder = resolve_model(name_or_path)
        if (folder / UNFINISHED).exists():
            raise io.InputError(
                f"{folder}: its training run stopped before it finished (no calibrated "
                "intervals yet); run the same `celltally train` command again with --resume"
            )
        return cls.from_folder(
            folder, device=device, epistemic=epistemic, calibration=calibration, **options
        )

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device | None = None,
        epistemic: bool = False,
        calibration: str | None = None,
        **options: Any,
    ) -> CellCounter:
        """:meth:`from_pretrained` for a model folder, also one a ``train`` run is still writing.

        Calibration uses it while training finishes the folder; everything else
        should use :meth:`from_pretrained`, which refuses such a folder.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        model, config = load_model_folder(folder)
        members = []
        if epistemic:
            from celltally.uncertainty import load_members

            members = load_members(folder, config)
        reference = None
        if (ood_file := folder / OOD_REFERENCE_FILE).exists():
            from safetensors import SafetensorError

            try:
                reference = {k: v.numpy() for k, v in load_file(str(ood_file)).items()}
            except (SafetensorError, OSError) as err:
                raise io.InputError(f"{ood_file}: corrupt file ({first_line(err)})") from None
        fixed = {"model", "config", "members", "ood_reference", "device", "calibration"}
        known = set(inspect.signature(cls).parameters) - fixed
        if unknown := sorted(set(options) - known):
            raise io.InputError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; a counter takes "
                f"{', '.join(sorted(known))}"
            )
        return cls(
            model,
            config,
            device=device,
            members=members,
            calibration=calibration,
            ood_reference=reference,
            **options,
        )

    # -- intervals -------------------------------------------------------
    @property
    def calibration_used(self) -> str:
        """The interval method counting uses: the one asked for, else the model's default.

        'none' for a model folder without calibration (Gaussian intervals).
        """
        if not self.calibration:
            return "none"
        return self.calibration_method or str(self.calibration.get("default", "conformal"))

    def multiplier(self, level: float = 0.95, method: str | None = None) -> float:
        """Half-width of the interval in units of the model's std at ``level``.

        By default split-conformal: the quantile of |y - mu| / sigma on the
        calibration split stored in the model folder (the Gaussian quantile
        if there is none). ``method`` overrides the counter's method.
        """
        return interval_multiplier(self.calibration, level, method or self.calibration_method)

    def level_note(self, level: float = 0.95) -> str | None:
        """A one-line note when ``level`` is above what the calibration can guarantee."""
        return beyond_calibration(self.calibration, _checked_level(level), self.calibration_method)

    # -- counting --------------------------------------------------------
    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Resize and normalize a raw 2-D image as the model expects."""
        return prepare_image(image, size=self.input_size, norm=self.norm)

    def read(self, path: str | Path) -> np.ndarray:
        """Read an image file with this counter's ``channel``; without one, a multi-channel
        file gives the channel the model was trained on (``config['channel']``), if any."""
        return io.read_image(path, channel=self.channel, default_channel=self.trained_channel)

    def prepare_any(self, image: np.ndarray) -> np.ndarray | ModelScaleImage:
        """``prepare`` for a native frame; otherwise the image at the model's pixel scale.

        A native frame (its size at the model's scale is the input size) is
        resized to ``input_size`` and counted in batches. Any other size is
        resized by the model's pixel scale (times the ``pixel_size``/``diameter``/
        ``rescale`` factor), normalized as a whole and returned wrapped, to be counted in
        tiles (density head). The paper's 'fc' head counts one fixed frame: an
        image up to 10% larger than its native frame (or any smaller one) is
        resized into it, a larger one is refused.
        """
        if min(image.shape) < MIN_SIDE:
            raise io.InputError(
                f"image of {image.shape[1]}x{image.shape[0]} px is too small to count "
                f"(each side needs at least {MIN_SIDE} px)"
            )
        top = float(np.max(image)) if self.norm.get("method") == "none" and image.size else 0.0
        if top > 2.0:
            raise io.InputError(
                f"no normalization (--no-norm, method 'none') expects intensities scaled to "
                f"0-1, but this {image.dtype} image reaches {top:g}; normalize it (or scale "
                "it first)"
            )
        shape = model_shape(image.shape, self.scale, self.factor)
        if shape[0] * shape[1] > max(MAX_MODEL_PIXELS, image.shape[0] * image.shape[1]):
            raise io.InputError(
                f"image of {image.shape[1]}x{image.shape[0]} px would be {shape[1]}x{shape[0]} "
                f"px at model {self.name}'s scale (more than {MAX_MODEL_PIXELS / 1e6:g} million "
                "pixels); check --rescale / --diameter / --pixel-size"
            )
        if min(shape) < MIN_SIDE <= min(model_shape(image.shape, self.scale)):
            # only the --rescale / --diameter / --pixel-size factor shrinks it so (2830 for 28.3)
            raise io.InputError(
                f"image of {image.shape[1]}x{image.shape[0]} px would be {shape[1]}x{shape[0]} "
                f"px at model {self.name}'s scale, too small to count (each side needs at "
                f"least {MIN_SIDE} px); check --rescale / --diameter / --pixel-size"
            )
        if not self.counts_in_tiles(image.shape):  # one rule, shared with calibration
            too_large = any(
                s > FRAME_TOLERANCE * n for s, n in zip(shape, self.input_size, strict=True)
            )
            if not self.density_head and too_large:
                native = self.scale.native_size
                raise io.InputError(
                    f"image of {image.shape[1]}x{image.shape[0]} px is larger than the "
                    f"{native[1]}x{native[0]} frame that model {self.name} (the paper's "
                    "fixed-size 'fc' head) counts; use a density-head model such as "
                    "bbbc005 or nuclei, which count any size in tiles"
                )
            return self.prepare(image)
        return ModelScaleImage(prepare_image(image, size=shape, norm=self.norm), image.shape)

    def counts_in_tiles(self, shape: Sequence[int]) -> bool:
        """Whether :meth:`prepare_any` gives an image of raw ``shape`` a ``ModelScaleImage``.

        True when its size at the model's scale (times the rescale factor) is
        not the input size and the counter has a density head (counts any size).
        """
        return self.density_head and model_shape(shape, self.scale, self.factor) != self.input_size

    def _count_scaled(self, item: ModelScaleImage) -> tuple:
        """Raw result tuple (as ``_forward``'s) of a model-scale image, counted in tiles.

        Its aleatoric variance, the sum of its density cells', grows by
        :func:`~celltally.calibration.parts_variance_factor` for the frames it spans
        (its area over the model input's), at :attr:`frame_correlation`.
        """
        out = count_density(
            self.model,
            item.prepared,
            tile=self.tile,
            margin=self.margin,
            device=self.device,
            members=self.members,
        )
        frames = item.prepared.size / (self.input_size[0] * self.input_size[1])
        spread = 0.0 if out.epistemic_std is None else out.epistemic_std**2
        factor = parts_variance_factor(frames, self.frame_correlation)
        return (
            out.count,
            math.sqrt((out.variance - spread) * factor + spread),
            out.mask,
            out.mask_std,
            out.epistemic_std,
            self._embeddings([self._central_frame(item.prepared)])[0],
            self._levels(item.prepared),
        )

    def _levels(self, prepared: np.ndarray) -> tuple[float | None, float | None]:
        """A prepared image's contrast and background level (the low-contrast flag, the
        interval reaching 0 and the bright-background hint read them)."""
        return contrast(prepared, norm=self.norm), background_level(prepared)

    def _central_frame(self, image: np.ndarray) -> np.ndarray:
        """The central ``input_size`` window of a model-scale image, for the deep-feature check.

        An image counted in tiles is checked on one frame-sized window: the
        calibration frames were that size. A smaller image is reflect-padded
        up to it (on BBBC005 calibration sites that halved the false alarms
        on true-scale crops, 18% -> 8%, and still flagged 62% of frames shrunk
        to 0.5x). ``python benchmarks/ood.py`` measures both kinds of image.
        """
        h, w = self.input_size
        top, left = max(0, (image.shape[0] - h) // 2), max(0, (image.shape[1] - w) // 2)
        frame = image[top : top + h, left : left + w]
        ph, pw = h - frame.shape[0], w - frame.shape[1]
        if ph or pw:
            pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
            frame = np.pad(frame, pad, mode="reflect")
        return np.ascontiguousarray(frame, dtype=np.float32)

    def _segment(
        self, prepared: Sequence[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """The batch on the device, its mask and log-variance, and its embeddings (or Nones)."""
        # unsqueeze, not NumPy's [:, None]: a zero stride that cuDNN misreads on GPU
        x = torch.from_numpy(np.stack(prepared)).unsqueeze(1).to(self.device)
        local = self._hook.local
        local.collect, local.embedding = True, None
        try:
            mask, mask_logvar = self.model.segmenter(x, levels=1)[0]
        finally:
            local.collect = False
        embeddings = local.embedding
        if embeddings is None:
            embeddings = [None] * len(x)
        return x, mask, mask_logvar, embeddings

    @torch.inference_mode()
    def _embeddings(self, prepared: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """The images' embeddings: the segmenter alone, no counter."""
        return list(self._segment(prepared)[3])

    @torch.inference_mode()
    def _forward(self, prepared: Sequence[np.ndarray]) -> list[tuple]:
        x, mask, mask_logvar, embeddings = self._segment(prepared)
        planes = self.model.counter_planes(mask, mask_logvar, x)
        outs = [self.model.counter(planes)] + [m(planes) for m in self.members]
        counts, variance, epistemic_var = ensemble_mixture(outs)
        stds = torch.sqrt(variance).cpu().numpy()
        spreads = torch.sqrt(epistemic_var).cpu().numpy() if self.members else [None] * len(x)
        masks = mask[:, 0].cpu().numpy()
        mask_stds = torch.exp(0.5 * mask_logvar[:, 0]).cpu().numpy()
        levels = [self._levels(a) for a in prepared]
        return list(
            zip(
                counts.cpu().numpy(),
                stds,
                masks,
                mask_stds,
                spreads,
                embeddings,
                levels,
                strict=True,
            )
        )

    def _checked_prepared(self, i: int, image: np.ndarray) -> np.ndarray:
        """Prepared image ``i`` as float32; InputError unless finite and of the input size.

        A raw image (another size, not normalized) would be counted at the wrong
        scale and intensity without a word.
        """
        a = np.asarray(image, dtype=np.float32)
        if a.ndim != 2 or not np.isfinite(a).all():
            raise io.InputError(
                f"prepared image {i}: expected a finite 2-D array, got shape "
                f"{a.shape}" + ("" if a.ndim != 2 else " with NaN or infinite values")
            )
        if a.shape != self.input_size:
            (h, w), (mh, mw) = a.shape, self.input_size
            raise io.InputError(
                f"prepared image {i} is {w}x{h} px, not model {self.name}'s input of "
                f"{mw}x{mh}: prepare it with prepare_any() first, or count the raw image "
                "with count()"
            )
        return a

    def embed(
        self, prepared: Sequence[np.ndarray | ModelScaleImage], *, batch_size: int = 32
    ) -> np.ndarray:
        """Deep-feature embeddings (n, d) of prepared images (for the feature-distance OOD check).

        The output of the segmenter's deepest encoder block, mean- and
        std-pooled over space, so ``d`` is twice its width. A ``ModelScaleImage``
        is embedded by its central frame, as ``count`` checks it.
        """
        _checked_batch(batch_size)
        frames = [
            self._central_frame(a.prepared) if isinstance(a, ModelScaleImage) else a
            for a in prepared
        ]
        rows = []
        for start in range(0, len(frames), batch_size):
            chunk = [
                self._checked_prepared(start + k, a)
                for k, a in enumerate(frames[start : start + batch_size])
            ]
            rows += self._embeddings(chunk)
        if any(r is None for r in rows):
            raise ValueError(f"model {self.name}'s segmenter has no encoder blocks to embed with")
        return np.stack(cast("list[np.ndarray]", rows))  # no None: checked above

    def _result(
        self, raw: tuple, level: float, source: str | None, name: str | None = None
    ) -> CountResult:
        """A raw result tuple as a ``CountResult``; metadata from ``source``, else ``name``."""
        count, std, mask, mask_std, spread, embedding, (frame_contrast, background) = raw
        if self.count_scale != 1.0:
            count, std = count * self.count_scale, std * self.count_scale
            spread = None if spread is None else spread * self.count_scale
        half = self.multiplier(level) * float(std)
        named = source or name
        meta = naming.parse_name(named).as_dict() if named else {}
        distance = None
        if embedding is not None and self.ood_reference is not None:
            distance = float(feature_distance(embedding, self.ood_reference)[0])
        ratio = None
        curves = (self.calibration.get("ood") or {}).get("size")
        # a frame that may hold no cells has a mask of noise: no object size to speak of
        readable = frame_contrast is None or frame_contrast >= LOW_CONTRAST
        if curves and readable and (size := object_size(mask)) is not None:
            ratio = size_ratio(*size, curves, label=meta.get("stain"))
        features = ood_features(
            count, mask_std, spread, distance, frame_contrast, ratio, background
        )
        return CountResult(
            count=float(count),
            std=float(std),
            # a frame that may hold no cells: its interval reaches 0 (the model's own
            # sigma, fitted on frames with cells, does not know that; docs/uncertainty.md)
            low=0.0 if not readable else max(0.0, float(count) - half),
            high=float(count) + half,
            level=level,
            mask=mask,
            mask_std=mask_std,
            source=source,
            metadata=meta,
            # the factor a warning suggests is the whole one (this counter's times the
            # size's); a fixed-frame counter cannot rescale: none
            warning=ood_warning(
                features,
                self.calibration.get("ood"),
                rescale=self.factor if self.density_head else None,
            ),
            epistemic_std=None if spread is None else float(spread),
            ood=features,
        )

    def count_prepared(
        self,
        prepared: Sequence[np.ndarray | ModelScaleImage],
        *,
        level: float = 0.95,
        batch_size: int = 32,
    ) -> list[CountResult]:
        """Count images already prepared by :meth:`prepare` (e.g. a ``LabeledSet``'s).

        Items :meth:`prepare_any` returned as ``ModelScaleImage`` are counted in
        tiles, as ``count`` counts them; results keep the order of ``prepared``.
        """
        level = _checked_level(level)
        _checked_batch(batch_size)
        results: list[CountResult | None] = [None] * len(prepared)
        frames = [i for i, a in enumerate(prepared) if not isinstance(a, ModelScaleImage)]
        for i, item in enumerate(prepared):
            if isinstance(item, ModelScaleImage):
                results[i] = self._result(self._count_scaled(item), level, None)
        for start in range(0, len(frames), batch_size):
            index = frames[start : start + batch_size]
            # not ModelScaleImage: those were counted above
            chunk = [self._checked_prepared(i, cast("np.ndarray", prepared[i])) for i in index]
            for i, r in zip(index, self._forward(chunk), strict=True):
                results[i] = self._result(r, level, None)
        return cast("list[CountResult]", results)  # every slot filled above

    def count(
        self, image: np.ndarray | str | Path, *, level: float = 0.95, name: str | None = None
    ) -> CountResult:
        """Count one image, given as an array or a file path (str or path-like).

        Parameters
        ----------
        image : numpy.ndarray, str or Path
            A file (TIFF, PNG, JPEG), or an array reduced to 2-D as a file's pixels
            are (:func:`celltally.io.image_plane`: size-1 axes dropped, RGB of one
            stain averaged, a stack's plane picked by ``channel`` or the model's
            recorded one). Integers are taken at their type's scale, booleans as
            0/255, floats as 0-1 (a 16-bit image divided by 65535 is recognised).
            The array is not modified. One image: for many files, :meth:`count_paths`.
        level : float, default 0.95
            The interval's level.
        name : str, optional
            For an array: the file name it came from (e.g. an upload's), read for
            its metadata as a path's would be (well, site, stain; the stain picks
            the object-size curve of a model calibrated per stain).

        Returns
        -------
        CountResult
            The count, its std and interval, the mask and its uncertainty, and a
            warning where the image is unlike the calibration images.

        Raises
        ------
        celltally.io.InputError
            One line, naming the file, for an image that cannot be counted.
        """
        return self.count_with_input(image, level=level, name=name)[0]

    def count_with_input(
        self, image: np.ndarray | str | Path, *, level: float = 0.95, name: str | None = None
    ) -> tuple[CountResult, np.ndarray | ModelScaleImage]:
        """:meth:`count` (``name`` as there), and the model input it counted (what
        ``explain`` draws).

        Returns
        -------
        result : CountResult
        prepared : the image resized and normalized to the model's input size,
            or, for an image counted in tiles, a ``ModelScaleImage`` holding it
            at the model's pixel scale.
        """
        level = _checked_level(level)
        source = None
        if isinstance(image, list | tuple) and (
            any(isinstance(item, str | os.PathLike) for item in image)
            or sum(isinstance(item, np.ndarray) for item in image) > 1
        ):  # np.asarray would make a 'pixel type <U41' or a 3-D stack of them
            raise io.InputError(
                f"count takes one image; for {len(image)}, use count_paths(paths) (files) "
                "or count each array"
            )
        if isinstance(image, str | os.PathLike):
            source = os.fspath(image)
            image = self.read(image)
        try:
            array = io.check_pixels(image)
        except io.InputError as err:
            raise io.about_file(err, source) from None
        try:
            array = io.image_plane(  # (1, H, W), (H, W, 1), RGB, planes: as a file's pixels
                array,
                channel=self.channel if source is None else None,  # a file's: read already
                default_channel=None if source else self.trained_channel,
            )
            prepared = self.prepare_any(array)
        except io.InputError as err:
            raise io.about_file(err, source) from None
        if isinstance(prepared, ModelScaleImage):
            return self._result(self._count_scaled(prepared), level, source, name), prepared
        return self._result(self._forward([prepared])[0], level, source, name), prepared

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
        time, so memory stays flat whatever the number of files; with
        ``read_threads=0`` it runs in the calling thread (a strictly one-core
        job, e.g. one per cluster slot). A file that cannot be read yields its
        ``ImageReadError`` and the rest go on.
        """
        if read_threads < 0:
            raise io.InputError(f"read_threads must be 0 or more, got {read_threads}")
        _checked_batch(batch_size)
        level = _checked_level(level)

        def load(path: Path) -> np.ndarray | ModelScaleImage | Exception:
            try:
                return self.prepare_any(self.read(path))
            except io.InputError as err:
                return io.about_file(err, path)
            except (MemoryError, RuntimeError) as err:
                return _out_of_memory(err, path)

        if isinstance(paths, str | os.PathLike):  # one file, not the characters of its name
            paths = [paths]
        with ThreadPoolExecutor(read_threads) if read_threads else _InlineExecutor() as pool:
            pending: list[tuple[Path, Any]] = []
            iterator = iter(_file_path(p) for p in paths)
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
                good = [(p, a) for p, a in loaded if isinstance(a, np.ndarray)]
                outs = self._forward([a for _, a in good]) if good else []
                by_path = {id(a): o for (_, a), o in zip(good, outs, strict=True)}
                for path, item in loaded:
                    if isinstance(item, Exception):
                        yield path, item
                    elif isinstance(item, ModelScaleImage):
                        try:
                            raw = self._count_scaled(item)
                        except (MemoryError, RuntimeError) as err:
                            yield path, _out_of_memory(err, path, item.raw_shape)
                            continue
                        yield path, self._result(raw, level, str(path))
                    else:
                        yield path, self._result(by_path[id(item)], level, str(path))
