"""The FastAPI application: a JSON API over :class:`CellCounter` and one static page.

Endpoints
---------
``GET /``
    The page (plain HTML + JavaScript, shipped in ``celltally/web/static``).
``POST /api/count``
    ``multipart/form-data`` with one or more ``files`` (TIFF 8/16-bit, PNG,
    JPEG), and optionally ``level`` (interval level, default 0.95),
    ``saliency`` (``true``/``false``), ``channel`` (0-based plane of
    multi-channel files; empty = the file's only channel, the stain plane the model
    was trained on if it records one, or its colour mean),
    ``model`` (a shipped model; default the server's), ``epistemic``
    (``true``: count with the model's ensemble, its mean and its spread in the interval,
    as ``count --epistemic``) and
    ``rescale`` (resize factor before counting, as ``celltally count
    --rescale``: 2 for images binned 2 x 2; empty = the model's own scale) or
    ``diameter`` (typical object diameter in px, as ``--diameter``: the factor
    from the model's own, for a model that records one, as ``nuclei`` does) or
    ``pixel_size`` (um, as ``--pixel-size``: for a model trained with
    ``train --pixel-size``; no shipped model records one).
    Answers, in the order sent, one entry per file: the count with its
    interval, its ``warning`` (as the results CSV has it) split into ``flags``
    (what each part means: may hold no cells, unlike the calibration images, a
    likely cause) and PNG renderings (data URLs) of the input, mask, uncertainty
    and saliency maps (skipped, with a ``note``, for an image too large to
    explain), or an ``error`` naming the file; and the settings counted with
    (``channel``, ``rescale``, ...).

    Status codes:

    - **200** when at least one file was counted; files that could not be
      counted carry ``ok: false``, their own ``status`` (400 empty, 413 too
      large, 415 unsupported type, 422 unreadable/corrupt) and ``error``.
    - When *no* file could be counted, the same body is returned with the
      files' common status (e.g. 415 when every file was a ``.txt``; 422 when
      the problems differ) and a ``detail`` message.
    - **413** too many files, or a body over the total limit; **415** not a
      multipart upload; **400** malformed multipart; **422** no files, or a bad
      ``level``, ``channel``, ``model``, ``epistemic``, ``rescale``,
      ``diameter`` or ``pixel_size``. These carry only ``detail`` (FastAPI's error shape).
``GET /api/models``
    The loaded model (name, preset, input size, measured figures) and the
    models shipped with the package.
``GET /api/info``
    Version, model name, upload limits and defaults, and per model what the page
    offers (its use, recorded diameter and pixel size, ensemble coverage).
``GET /api/name?file=NAME``
    Plate, well, site, blur, stain and count parsed from a file name, as counting
    parses them (the page asks for files it could not send).
``GET /docs``, ``GET /openapi.json``
    The OpenAPI schema (FastAPI's default pages).

Uploads are streamed into a per-request temporary folder under numbered names
(client file names are display names only) and the folder is deleted when the
request ends; nothing else is written. The model is loaded once, when the app
is created, and used by one request at a time.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, MutableHeaders

from celltally import io, naming
from celltally.calibration import (
    BRIGHT_HINT,
    EMPTY_HINT,
    MAX_LEVEL,
    SIZE_HINT,
    UNLIKE_HINT,
    suggested_rescale,
    valid_level,
)
from celltally.counter import DEFAULT_MODEL, CellCounter, available_models
from celltally.model_folder import (
    held_out_figures,
    is_shipped,
    model_use,
    read_model_config,
    resolve_model,
)
from celltally.scale import model_scale, rescale_factor
from celltally.web import render
from celltally.web.uploads import (
    FILES_WITHOUT_NAME,
    RequestRejected,
    Upload,
    UploadLimits,
    receive_uploads,
    sanitize_name,
)
from celltally.wells import calibrated_correlation

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

__all__ = ["create_app", "STATIC_DIR"]

#: Swagger UI's files, installed with the fastapi-offline package (MIT).
_SWAGGER_SPEC = cast("ModuleSpec", importlib.util.find_spec("fastapi_offline"))  # a dependency
SWAGGER_UI_DIR = Path(cast(str, _SWAGGER_SPEC.origin)).parent / "static"

logger = logging.getLogger("celltally.web")

STATIC_DIR = Path(__file__).parent / "static"

#: Security headers on every response; the page needs nothing outside this server.
#: (The /docs page runs Swagger UI, from the installed fastapi-offline, with an
#: inline script, so it gets every header except the Content-Security-Policy.)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'; object-src 'none'; frame-ancestors 'none'"
    ),
}


# -- response schema (for /docs) -----------------------------------------
class Images(BaseModel):
    """PNG renderings (``data:image/png;base64,...``), all at the same display size."""

    input: str = Field(description="The input, contrast-stretched (0.5-99.8 percentiles).")
    mask: str = Field(description="Predicted foreground probability, black 0 to white 1.")
    uncertainty: str = Field(description="Per-pixel std of the mask (viridis, 0 to scale).")
    saliency: str | None = Field(
        default=None, description="|d count / d mask| (inferno); null when saliency is off."
    )
    width: int
    height: int
    uncertainty_scale: float = Field(description="Mask std at the top of the colour scale.")
    saliency_scale: float | None = None


class Flag(BaseModel):
    """One thing a file's warning says, in words for the page (:func:`warning_flags`)."""

    kind: str = Field(
        description="'empty' (low contrast: may hold no cells; its interval reaches 0), "
        "'unlike' (unlike the calibration images: the interval may not hold), 'bright' "
        "(dark objects on a bright background: invert it), 'size' (objects wider or narrower "
        "than the calibration images': another magnification?) or 'other'."
    )
    title: str = Field(description="A few words naming it, e.g. 'may hold no cells'.")
    text: str = Field(description="What it means and what to do, in a sentence or two.")
    rescale: float | None = Field(
        default=None, description="For 'size': the resize factor to count it again at."
    )


class FileResult(BaseModel):
    """The outcome for one uploaded file."""

    name: str = Field(description="Sanitized display name of the upload.")
    ok: bool
    status: int = Field(description="200, or the HTTP-style status of this file's problem.")
    error: str | None = Field(default=None, description="One line naming the file and the problem.")
    count: float | None = None
    std: float | None = None
    low: float | None = None
    high: float | None = None
    level: float | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Parsed from the name: plate, well, row, column, site, blur, stain, count.",
    )
    warning: str | None = Field(
        default=None,
        description="Set when the input looks unlike the model's calibration images or may "
        "hold no cells (the results CSV's warning, as `celltally count` writes it).",
    )
    flags: list[Flag] = Field(
        default_factory=list, description="The warning, split into what each part says."
    )
    note: str | None = Field(
        default=None, description="What was left out, e.g. a skipped saliency map."
    )
    width: int | None = Field(default=None, description="Input width in pixels.")
    height: int | None = Field(default=None, description="Input height in pixels.")
    seconds: float | None = Field(default=None, description="Server time spent on this file.")
    images: Images | None = None


class CountResponse(BaseModel):
    """``POST /api/count``'s answer."""

    model: str
    level: float
    counted: int
    failed: int
    results: list[FileResult]
    detail: str | None = Field(default=None, description="Set when no file could be counted.")
    well_correlation: float | None = Field(
        default=None, description="The model's within-well error correlation (per-well totals)."
    )
    level_note: str | None = Field(
        default=None, description="Set when the level is above what the calibration can guarantee."
    )
    rescale: float | None = Field(
        default=None,
        description="The resize factor the images were counted at (the request's, or the "
        "one its diameter or pixel size gave).",
    )
    diameter: float | None = Field(
        default=None, description="The object diameter (px) the request gave, if any."
    )
    pixel_size: float | None = Field(
        default=None, description="The pixel size (um) the request gave, if any."
    )
    epistemic: bool = Field(
        default=False, description="Whether the intervals include the ensemble's spread."
    )
    channel: int | None = Field(
        default=None,
        description="The channel (0-based) the request gave; null: the file's only one, the "
        "model's recorded one, or the colour mean.",
    )


class Limits(BaseModel):
    max_files: int
    max_bytes: int
    max_mb: float
    max_pixels: int


class Info(BaseModel):
    version: str
    model: str
    limits: Limits
    level: float
    saliency: bool
    accept: list[str]
    well_correlation: float = Field(
        description="Within-well error correlation used for per-well totals (celltally.wells)."
    )
    models: list[str] = Field(
        description="Models a request may name in its 'model' field (the default first)."
    )
    model_uses: dict[str, str] = Field(
        default_factory=dict,
        description="What each shipped model is for, in a line (empty for other models).",
    )
    pixel_sizes: dict[str, float] = Field(
        default_factory=dict,
        description="The pixel size (um) each model was trained at, for the 'pixel_size' "
        "field; models that record none are left out (no shipped model records one).",
    )
    diameters: dict[str, float] = Field(
        default_factory=dict,
        description="The object diameter (px) each model was trained at, for the 'diameter' "
        "field; models that record none are left out.",
    )
    ensemble_coverage: dict[str, float] = Field(
        default_factory=dict,
        description="For models with an ensemble: the share of held-out truths inside its "
        "95% intervals with 'epistemic', as measured when the model was made.",
    )


#: An optional form field left empty (not given). Declared beside the field's own type,
#: with an empty default, so that /docs's "Try it out" sends no made-up example values.
_EMPTY_FIELD = {"type": "string", "maxLength": 0}

_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "Images: TIFF (8/16-bit), PNG or JPEG.",
                        },
                        "level": {
                            "type": "number",
                            "default": 0.95,
                            "exclusiveMinimum": 0,
                            "exclusiveMaximum": 1,
                        },
                        "saliency": {"type": "boolean", "default": True},
                        "channel": {
                            "anyOf": [{"type": "integer", "minimum": 0}, _EMPTY_FIELD],
                            "default": "",
                            "description": "0-based channel of multi-channel images "
                            "(empty: the model's recorded one, or the colour mean).",
                        },
                        "model": {
                            "type": "string",
                            "default": "",
                            "description": "A model of GET /api/info's 'models' "
                            "(default: the server's).",
                        },
                        "epistemic": {
                            "type": "boolean",
                            "default": False,
                            "description": "Count with the model's ensemble (its mean count, its "
                            "spread added to the interval), as `celltally "
                            "count --epistemic` (slower; the model needs ensemble members).",
                        },
                        "rescale": {
                            "anyOf": [{"type": "number", "exclusiveMinimum": 0}, _EMPTY_FIELD],
                            "default": "",
                            "description": "Resize the images by this factor before "
                            "counting, as `celltally count --rescale`: 2 for images binned "
                            "2 x 2 or at half the model's magnification (default: none).",
                        },
                        "diameter": {
                            "anyOf": [{"type": "number", "exclusiveMinimum": 0}, _EMPTY_FIELD],
                            "default": "",
                            "description": "Typical cell/nucleus diameter in the images, px, "
                            "as `celltally count --diameter`: sets the resize factor from the "
                            "model's own (nuclei: 28.3 px); instead of rescale.",
                        },
                        "pixel_size": {
                            "anyOf": [{"type": "number", "exclusiveMinimum": 0}, _EMPTY_FIELD],
                            "default": "",
                            "description": "Pixel size of the images, um, as `celltally count "
                            "--pixel-size`: sets the resize factor from the model's own (for "
                            "models of GET /api/info's 'pixel_sizes'); instead of rescale.",
                        },
                    },
                }
            }
        },
    }
}


def _package_version() -> str:
    try:
        return version("celltally")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


#: The form fields ``POST /api/count`` reads; any other is refused, not ignored.
COUNT_FIELDS = frozenset(
    {
        "files",
        "level",
        "saliency",
        "channel",
        "model",
        "rescale",
        "diameter",
        "pixel_size",
        "epistemic",
    }
)
#: How many rescaled twins of the models (one per model and ``rescale`` value) stay loaded.
MAX_RESCALED = 16


def _parse_level(text: str | None, default: float) -> float:
    if text is None or text.strip() == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise RequestRejected(
            422, f"level must be a number between 0 and 1, got '{text}'"
        ) from None
    if not valid_level(value):
        raise RequestRejected(
            422, f"level must be between 0 and 1 (at most {MAX_LEVEL:.9f}), got {text}"
        )
    return value


def _parse_channel(text: str | None) -> int | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise RequestRejected(422, f"channel must be a whole number >= 0, got '{text}'")
    return value


def _parse_positive(text: str | None, what: str) -> float | None:
    """A form field's positive number, None when empty; 422 naming ``what`` otherwise."""
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise RequestRejected(422, f"{what}, got '{text}'")
    return value


def _parse_bool(text: str | None, default: bool, name: str) -> bool:
    if text is None or text.strip() == "":
        return default
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise RequestRejected(422, f"{name} must be true or false, got '{text}'")


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class _SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response (no CSP on the API docs).

    Plain ASGI: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) would
    hide a client's disconnect from the endpoint, which checks for it before
    counting each file.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = str(scope.get("path", "")).startswith(("/docs", "/redoc"))

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    if key not in headers and not (docs and key == "Content-Security-Policy"):
                        headers.append(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


#: Files read and counted at once over all requests (the rest wait, undecoded).
WORK_SLOTS = 2


class _SameOrigin:
    """Refuses requests from other web pages, and (loopback servers) other host names.

    A page on another site, open in the user's browser, can send a form to a server
    on 127.0.0.1 (no CORS preflight for a plain form post): a POST whose ``Origin``
    is not this server's own is refused (403). With ``hosts`` (a server bound to a
    loopback address), a ``Host`` header naming another host is refused (400), which
    stops DNS rebinding (another site's name resolved to 127.0.0.1 to read answers).
    """

    def __init__(self, app: Any, hosts: frozenset[str] | None = None) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            name = urlsplit(f"//{host}").hostname or ""  # lower-cased, brackets and port off
            # no Host at all (an HTTP/1.0 client) is no rebinding: browsers always send it
            if self.hosts is not None and host and name not in self.hosts:
                await JSONResponse({"detail": "unknown host name"}, 400)(scope, receive, send)
                return
            # no Origin: a script or curl, not a browser page. "null" (a sandboxed frame,
            # a file:// page) is refused too: another site can send it at will.
            origin = headers.get("origin")
            if scope.get("method") not in ("GET", "HEAD", "OPTIONS") and origin is not None:
                if urlsplit(origin).netloc.lower() != host.lower():
                    refused = JSONResponse({"detail": "cross-origin request refused"}, 403)
                    await refused(scope, receive, send)
                    return
        await self.app(scope, receive, send)


#: Host names a server bound to a loopback address answers to.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def _canonical(host: str) -> str:
    """An IPv4 short form as browsers write it in the Host header (127.2 -> 127.0.0.2);
    any other name as it is, lower-cased."""
    import socket

    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return host.lower()


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (a --host value) reaches this machine only: localhost, 127.x.y.z,
    ::1 however spelt."""
    import ipaddress
    import socket

    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.x
    except ValueError:
        pass
    try:  # the short forms bind() takes too: 127.1
        return socket.inet_aton(host)[0] == 127
    except OSError:
        return False


#: Largest image (pixels) the page computes a saliency map for: it needs a backward
#: pass over the whole image at once.
SALIENCY_MAX_PIXELS = 16_000_000


class _Service:
    """The loaded model and what one file goes through."""

    def __init__(
        self, counter: CellCounter, *, saliency: bool, display_side: int, max_pixels: int
    ) -> None:
        self.counter = counter
        # within-well error correlation of per-well totals (celltally.wells)
        self.well_correlation = calibrated_correlation(counter.calibration)[0]
        self.max_pixels = max_pixels
        self.saliency = saliency
        self.display_side = display_side
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        """Count (and explain) one synthetic frame: PyTorch's first calls are slow."""
        rng = np.random.default_rng(0)
        frame = rng.normal(100.0, 10.0, self.counter.input_size).astype(np.float32)
        with self.lock:
            if self.saliency:
                from celltally.explain import explain_image

                explain_image(self.counter, frame)
            else:
                self.counter.count(frame)

    def count_file(
        self,
        upload: Upload,
        level: float,
        saliency: bool,
        channel: int | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> FileResult:
        """Read, count and render one stored upload (runs in a worker thread).

        ``abandoned`` is asked once the model is free: when the client has gone
        (a cleared page, a timed-out script), the file is not counted, so the
        requests queued behind it do not wait for work nobody will read.
        """
        start = time.perf_counter()
        assert upload.path is not None
        # the limits hold for the image as the model gets it: a rescale's area counts too
        area = self.counter.factor**2
        rescaled = f" ({area:.3g}x that once rescaled)" if area != 1.0 else ""
        pixels = io.header_pixels(upload.path)
        if pixels is not None and pixels * area > self.max_pixels:
            return _failure(
                upload.name,
                413,
                f"image has {pixels / 1e6:.1f} million values{rescaled}, more than the limit "
                f"of {self.max_pixels / 1e6:g} million",
            )
        try:
            image = io.read_image(  # the form's channel, else the counter's, else the model's
                upload.path,
                channel=channel if channel is not None else self.counter.channel,
                default_channel=self.counter.trained_channel,
            )
        except io.ImageReadError as err:
            # the problem names the command line's option; here it is the form's field
            return _failure(upload.name, 422, _as_fields(err.problem))
        note = None
        if saliency and image.size * area > SALIENCY_MAX_PIXELS:
            # one backward pass over the whole image: ~7 GB and a minute at 59 M pixels,
            # while every other request waits for the model
            saliency = False
            note = (
                f"saliency map skipped: {image.size / 1e6:.1f} million pixels{rescaled}, "
                f"more than the {SALIENCY_MAX_PIXELS / 1e6:g} million it is computed for here; "
                "the count is not affected"
            )
        elif saliency:
            from celltally.explain import too_large_to_explain

            # explain's own limit, at the model's scale and per ensemble member: past it
            # explain_image refuses, and the file would not be counted at all
            if (problem := too_large_to_explain(self.counter, image.shape)) is not None:
                saliency = False
                note = f"saliency map skipped: the image {problem}; the count is not affected"
        try:
            with self.lock:
                if abandoned is not None and abandoned():
                    return _failure(upload.name, 499, "the client left before it was counted")
                if saliency:
                    from celltally.explain import explain_image

                    expl = explain_image(self.counter, image, level=level, name=upload.name)
                    result, saliency_map = expl.result, expl.mask_saliency
                else:
                    count = self.counter.count(image, level=level, name=upload.name)
                    result, saliency_map = count, None
        except io.InputError as err:  # _failure names the file: the problem alone
            problem = err.problem if isinstance(err, io.ImageReadError) else str(err)
            return _failure(upload.name, 422, _as_fields(problem))
        if not math.isfinite(result.count):
            return _failure(upload.name, 500, "the model gave no finite count for this image")
        size = render.display_size(image.shape, self.display_side)
        uncertainty, unc_scale = render.heat_png(result.mask_std, size, cmap="viridis")
        sal_png, sal_scale = (None, None)
        if saliency_map is not None:
            sal_png, sal_scale = render.heat_png(saliency_map, size, cmap="inferno")
        images = Images(
            input=render.data_url(render.gray_png(image, size)),
            mask=render.data_url(render.gray_png(result.mask, size, low=0.0, high=1.0)),
            uncertainty=render.data_url(uncertainty),
            saliency=None if sal_png is None else render.data_url(sal_png),
            width=size[1],
            height=size[0],
            uncertainty_scale=unc_scale,
            saliency_scale=sal_scale,
        )
        warning = getattr(result, "warning", None)
        return FileResult(
            name=upload.name,
            ok=True,
            status=200,
            count=float(result.count),
            std=_finite(result.std),
            low=_finite(result.low),
            high=_finite(result.high),
            level=level,
            metadata=naming.parse_name(upload.name).as_dict(),
            warning=str(warning) if warning else None,
            flags=warning_flags(str(warning or "")),
            note=note,
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            seconds=round(time.perf_counter() - start, 4),
            images=images,
        )


def warning_flags(warning: str) -> list[Flag]:
    """A counter's warning (:func:`celltally.calibration.ood_warning`) as the flags it
    holds, each in words that say what it is and what to do.

    The warning is one line for the CSV; on the page a low-contrast frame's "may hold no
    cells" (its interval reaches 0 and holds) must not read as "the interval may not hold",
    and a likely cause (a bright background, another magnification) is advice of its own.
    Text the parts do not account for comes back as an 'other' flag, unchanged.
    """
    flags: list[Flag] = []
    rest = warning.strip()
    if EMPTY_HINT in rest:
        head, _, rest = rest.partition(EMPTY_HINT)
        measured = head.strip().rstrip(":").strip()  # "low contrast (range 0.12 of ...)"
        flags.append(
            Flag(
                kind="empty",
                title="may hold no cells",
                text=f"{measured[:1].upper()}{measured[1:]}: this frame may hold no cells "
                "(an empty well?). Check it before trusting its count; its interval reaches "
                "0 to allow for that.",
            )
        )
        rest = rest.strip().removeprefix(";").strip()
    if rest.startswith(f"{UNLIKE_HINT} (") and (close := rest.find(")")) > 0:
        measured = rest[len(UNLIKE_HINT) + 2 : close]
        flags.append(
            Flag(
                kind="unlike",
                title="unlike the calibration images",
                text="This image differs from the images the model was calibrated on, so its "
                f"interval may not hold ({measured}).",
            )
        )
        rest = rest[close + 1 :].strip().removeprefix(";").strip()
        if rest == BRIGHT_HINT:
            flags.append(
                Flag(
                    kind="bright",
                    title="dark objects on a bright background?",
                    text=f"{BRIGHT_HINT[:1].upper()}{BRIGHT_HINT[1:]}, then count it again.",
                )
            )
            rest = ""
        elif rest.startswith("its objects look "):
            size, _, _ = rest.partition(f": {SIZE_HINT}")
            factor = suggested_rescale(rest)
            advice = (
                f": if it was taken at another magnification, count it again with Rescale "
                f"set to about {factor:.2g}"
                if factor is not None
                else ""
            )
            flags.append(
                Flag(
                    kind="size",
                    title="another magnification?",
                    text=f"{size[:1].upper()}{size[1:]}{advice}.",
                    rescale=factor,
                )
            )
            rest = ""
    if rest:  # words this page does not know (a newer counter's): shown as they are
        flags.append(Flag(kind="other", title="unusual input", text=rest))
    return flags


def _as_fields(text: str) -> str:
    """A message naming command-line options, with the form fields' names instead."""
    for flag in ("--rescale", "--diameter", "--pixel-size", "--channel"):
        text = text.replace(flag, flag[2:].replace("-", "_"))
    return text


def _cannot_rescale(field: str, model: str) -> RequestRejected:
    """The refusal of a resize factor (set by form ``field``) for a fixed-frame model."""
    return RequestRejected(
        422,
        f"{field}: model {model!r} has the paper's fixed-frame 'fc' head, which cannot "
        "rescale images",
    )


def _failure(name: str, status: int, problem: str) -> FileResult:
    return FileResult(
        name=name,
        ok=False,
        status=status,
        error=f"{name}: {problem}",
        metadata=naming.parse_name(name).as_dict(),  # its well still misses an image
    )


def _model_summary(counter: CellCounter) -> dict[str, Any]:
    config = counter.config
    return {
        "name": counter.name,
        "preset": config.get("preset"),
        "input_size": list(counter.input_size),
        "training": config.get("training", {}).get("data"),
        "metrics": config.get("metrics", {}),
        "calibrated": bool(config.get("calibration", {}).get("scores")),
    }


def create_app(
    model: str | Path | CellCounter = DEFAULT_MODEL,
    *,
    max_files: int = 32,
    max_bytes: int = 32 * 2**20,
    max_pixels: int = 64_000_000,
    saliency: bool = True,
    level: float = 0.95,
    temp_dir: str | Path | None = None,
    display_side: int = 512,
    warmup: bool = True,
    allowed_hosts: frozenset[str] | None = None,
) -> FastAPI:
    """Build the web application around one loaded model.

    Parameters
    ----------
    model : str, Path or CellCounter
        A shipped model name, a model folder, or an already loaded counter.
        Loaded here, once: errors (no such model) surface before serving.
    max_files : int
        Most files in one ``POST /api/count``.
    max_bytes : int
        Largest single upload, in bytes.
    max_pixels : int
        Most values (pixels x channels x planes) an upload may decode into,
        read from its header before decoding (guards against decompression bombs).
    saliency : bool
        Default for computing saliency maps (a backward pass per image); a
        request can override it with the ``saliency`` form field.
    level : float
        Default interval level.
    temp_dir : str or Path, optional
        Parent of the per-request upload folders (default: the system's).
    display_side : int
        Longest side of the PNG renderings.
    warmup : bool
        Run one blank image through the model (and its backward pass) now, so
        the first request does not pay PyTorch's first-call costs.
    allowed_hosts : frozenset of str, optional
        Host names the ``Host`` header may give (:func:`serve` sets
        :data:`LOOPBACK_NAMES` for a server on a loopback address); None: any.
        POSTs from another origin (a page on another site) are refused either way.

    Returns
    -------
    fastapi.FastAPI

    Raises
    ------
    celltally.io.InputError
        If ``model`` names no model; ``ValueError`` for invalid limits.
    """
    limits = UploadLimits(max_files=int(max_files), max_bytes=int(max_bytes))
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    counter = model if isinstance(model, CellCounter) else CellCounter.from_pretrained(model)
    service = _Service(
        counter, saliency=saliency, display_side=display_side, max_pixels=int(max_pixels)
    )
    if warmup:
        service.warm_up()
    temp_parent = None if temp_dir is None else Path(temp_dir)
    # Other shipped models, and ensembles (the 'epistemic' field), loaded on first use.
    services: dict[tuple[str, bool], _Service] = {(counter.name, counter.epistemic): service}
    choices = [counter.name, *(m for m in available_models() if m != counter.name)]
    # what each shipped model is for; the server's own model only if it is the shipped one
    # (a user's folder may carry a shipped name)
    own_shipped = not isinstance(model, CellCounter) and is_shipped(resolve_model(model))
    uses = {m: use for m in choices if (m != counter.name or own_shipped) and (use := model_use(m))}
    configs = {
        m: counter.config if m == counter.name else read_model_config(resolve_model(m))
        for m in choices
    }
    scales = {m: model_scale(c) for m, c in configs.items()}
    pixel_sizes = {m: s.pixel_size_um for m, s in scales.items() if s.pixel_size_um is not None}
    diameters = {
        m: s.object_diameter_px for m, s in scales.items() if s.object_diameter_px is not None
    }
    ensemble_coverage = {
        m: float(test["coverage"])
        for m, c in configs.items()
        if "coverage" in (test := held_out_figures(c, epistemic=True))
    }
    loading = threading.Lock()
    # Files being read and counted at once, over all requests: a decoded upload can take
    # 1.5 GB, and each request used to decode its file before waiting for the model
    # (six at once reached 9 GB). The others wait with their file still on disk.
    work_slots = threading.BoundedSemaphore(WORK_SLOTS)

    def service_for(name: str | None, epistemic: bool = False) -> _Service:
        name = (name or "").strip() or counter.name
        if name not in choices:
            raise RequestRejected(
                422, f"model: unknown model {name!r}; choose one of {', '.join(choices)}"
            )
        # the server's own model from where it was loaded (a folder may carry a shipped name)
        source = name if name != counter.name else model
        with loading:
            if (name, epistemic) not in services:
                if isinstance(source, CellCounter):
                    raise RequestRejected(
                        422,
                        f"epistemic {str(epistemic).lower()}: model {name!r} was handed to "
                        "this server loaded, with no folder to load it from otherwise",
                    )
                try:
                    loaded = CellCounter.from_pretrained(source, epistemic=epistemic)
                except io.InputError as err:  # e.g. a model without ensemble members
                    raise RequestRejected(422, f"epistemic: {err}".splitlines()[0]) from None
                except Exception as err:  # a damaged install: a JSON answer, not a bare 500
                    logger.exception("loading model %s failed", name)
                    raise RequestRejected(
                        500, f"model {name!r} could not be loaded: {err}".splitlines()[0]
                    ) from None
                services[name, epistemic] = _Service(
                    loaded,
                    saliency=saliency,
                    display_side=display_side,
                    max_pixels=int(max_pixels),
                )
        return services[name, epistemic]

    rescaled: OrderedDict[tuple[str, bool, float], _Service] = OrderedDict()

    def scale_factor(
        name: str | None, epistemic: bool, given: Mapping[str, float], rescale: float | None
    ) -> float:
        """The resize factor the one ``given`` field (``diameter`` or ``pixel_size``) gives
        with the named model (as ``--diameter`` / ``--pixel-size``)."""
        fields = ["rescale"] * (rescale is not None) + list(given)
        if len(fields) > 1:
            what = "a diameter" if "diameter" in given else "a pixel size"
            raise RequestRejected(
                422, f"{' and '.join(fields)}: give only one ({what} sets the resize factor)"
            )
        ((field, value),) = given.items()
        counter = service_for(name, epistemic).counter
        try:
            return rescale_factor(
                counter.scale, **{field: value}, model_name=f"model {counter.name!r}"
            )
        except io.InputError as err:
            if not counter.density_head:  # "give the resize factor instead": it cannot
                raise _cannot_rescale(field, counter.name) from None
            raise RequestRejected(422, _as_fields(str(err))) from None

    def rescaled_service(
        name: str | None, epistemic: bool, rescale: float | None, *, field: str = "rescale"
    ) -> _Service:
        """:func:`service_for`'s model resizing images by ``rescale`` (a twin sharing its lock);
        ``field`` is the form field that set the factor, for the refusal of a fixed frame."""
        base = service_for(name, epistemic)
        if rescale is None:
            return base
        key = (base.counter.name, epistemic, rescale)
        with loading:
            if key not in rescaled:
                if not base.counter.density_head:
                    raise _cannot_rescale(field, base.counter.name)
                try:
                    twin = base.counter.with_rescale(rescale)
                except io.InputError as err:  # the command line's option is the form's field
                    raise RequestRejected(422, _as_fields(str(err))) from None
                rescaled[key] = _Service(
                    twin, saliency=saliency, display_side=display_side, max_pixels=int(max_pixels)
                )
                rescaled[key].lock = base.lock  # one model: one file at a time, as before
                while len(rescaled) > MAX_RESCALED:
                    rescaled.popitem(last=False)
            rescaled.move_to_end(key)
            return rescaled[key]

    app = FastAPI(
        title="celltally",
        version=_package_version(),
        description=(
            "Count cells in microscopy images with calibrated intervals "
            "(Hernández, Sultan & Pande 2018). See `POST /api/count`."
        ),
        docs_url=None,  # served below from the installed fastapi-offline, not a CDN:
        redoc_url=None,  # lab computers are often offline
    )
    app.state.counter = counter
    app.state.limits = limits

    app.add_middleware(_SameOrigin, hosts=allowed_hosts)
    app.add_middleware(_SecurityHeaders)  # outermost: on every answer, refusals included

    @app.exception_handler(RequestRejected)
    async def rejected(_request: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-static", StaticFiles(directory=SWAGGER_UI_DIR), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="celltally API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    @app.get("/api/info", response_model=Info)
    async def info() -> Info:
        """Version, the loaded model, upload limits and defaults."""
        return Info(
            version=_package_version(),
            model=counter.name,
            limits=Limits(
                max_files=limits.max_files,
                max_bytes=limits.max_bytes,
                max_mb=limits.max_mb,
                max_pixels=service.max_pixels,
            ),
            level=level,
            saliency=saliency,
            accept=list(io.IMAGE_SUFFIXES),
            well_correlation=service.well_correlation,
            models=choices,
            model_uses=uses,
            pixel_sizes=pixel_sizes,
            diameters=diameters,
            ensemble_coverage=ensemble_coverage,
        )

    @app.get("/api/name")
    async def name_fields(file: str) -> dict[str, Any]:
        """Plate, well, site, blur, stain and count parsed from a file name (as counting does).

        The page asks for the files it could not send (over the size limit), so
        their wells still say an image is missing.
        """
        return naming.parse_name(sanitize_name(file, 0)).as_dict()

    @app.get("/api/models")
    async def models() -> dict[str, Any]:
        """The loaded model and the names of the models shipped with the package."""
        return {"active": _model_summary(counter), "available": available_models()}

    @app.post(
        "/api/count",
        response_model=CountResponse,
        openapi_extra=_UPLOAD_SCHEMA,
        responses={
            400: {"description": "Malformed multipart body, or every file empty."},
            413: {"description": "Too many files, or files/body over the size limits."},
            415: {"description": "Not a multipart upload, or every file of unsupported type."},
            422: {"description": "No files, a bad level, or no file could be counted."},
        },
    )
    async def count(request: Request) -> JSONResponse:
        """Count cells in each uploaded image; per-file results in upload order."""
        folder = Path(tempfile.mkdtemp(prefix="celltally-upload-", dir=temp_parent))
        try:
            uploads, fields = await receive_uploads(
                request.headers.get("content-type"),
                request.headers.get("content-length"),
                request.stream(),
                folder,
                limits,
            )
            if unknown := sorted(set(fields) - COUNT_FIELDS):  # e.g. a misspelt 'levle'
                raise RequestRejected(
                    422,
                    f"unknown form field '{unknown[0]}': this endpoint takes "
                    f"{', '.join(sorted(COUNT_FIELDS))}",
                )
            req_level = _parse_level(fields.get("level"), level)
            req_saliency = _parse_bool(fields.get("saliency"), saliency, "saliency")
            req_channel = _parse_channel(fields.get("channel"))
            req_rescale = _parse_positive(
                fields.get("rescale"),
                "rescale must be a positive number (2 for 2 x 2-binned images)",
            )
            req_diameter = _parse_positive(
                fields.get("diameter"),
                "diameter must be a positive number of pixels (the typical cell or nucleus "
                "width in the images)",
            )
            req_pixel_size = _parse_positive(
                fields.get("pixel_size"),
                "pixel_size must be a positive number of micrometres (the images' pixel size)",
            )
            req_epistemic = _parse_bool(fields.get("epistemic"), False, "epistemic")
            given = {
                field: value
                for field, value in (("diameter", req_diameter), ("pixel_size", req_pixel_size))
                if value is not None
            }
            if given:
                req_rescale = scale_factor(fields.get("model"), req_epistemic, given, req_rescale)
            # a factor of exactly 1 (the model's own diameter or pixel size): the model as
            # it is, which any model, the fixed-frame ones too, counts with
            twin = None if req_rescale == 1.0 and given else req_rescale
            field = next(iter(given), "rescale")
            used = rescaled_service(fields.get("model"), req_epistemic, twin, field=field)
            if not uploads and "files" in fields:  # e.g. curl -F files=image.tif (no @)
                raise RequestRejected(400, FILES_WITHOUT_NAME)
            if not uploads:
                raise RequestRejected(422, "no files uploaded (send them as the 'files' field)")
            results: list[FileResult] = []

            def abandoned() -> bool:  # asked from the worker thread
                return anyio.from_thread.run(request.is_disconnected)

            for upload in uploads:
                if upload.error is not None:
                    results.append(
                        FileResult(
                            name=upload.name,
                            ok=False,
                            status=upload.status,
                            error=upload.error,
                            metadata=naming.parse_name(upload.name).as_dict(),
                        )
                    )
                    continue

                def bounded(upload: Upload = upload) -> FileResult:
                    with work_slots:
                        return used.count_file(
                            upload, req_level, req_saliency, req_channel, abandoned
                        )

                try:
                    result = await anyio.to_thread.run_sync(bounded)
                except Exception:  # a bug must not lose the rest of the batch
                    logger.exception("counting %s failed", upload.name)
                    result = _failure(upload.name, 500, "internal error while counting")
                results.append(result)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        counted = sum(r.ok for r in results)
        body = CountResponse(
            model=used.counter.name,
            level=req_level,
            counted=counted,
            failed=len(results) - counted,
            results=results,
            well_correlation=used.well_correlation,
            level_note=used.counter.level_note(req_level),
            rescale=req_rescale,
            diameter=req_diameter,
            pixel_size=req_pixel_size,
            epistemic=used.counter.epistemic,
            channel=req_channel if req_channel is not None else used.counter.channel,
        )
        status = 200
        if counted == 0:
            codes = {r.status for r in results}
            status = codes.pop() if len(codes) == 1 else 422
            body.detail = "no file could be counted: " + "; ".join(
                r.error or "" for r in results[:5]
            )
        return JSONResponse(body.model_dump(), status_code=status)

    return app


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str | Path = DEFAULT_MODEL,
    max_files: int = 32,
    max_mb: float = 32.0,
    saliency: bool = True,
    threads: int | None = None,
    log_level: str = "info",
    allowed_hosts: Collection[str] = (),
) -> None:
    """Load the model, then serve the app with uvicorn until interrupted.

    ``threads`` sets PyTorch's intra-op threads (default: PyTorch's choice);
    on a machine shared with other work, 1 is often faster. A server on a
    loopback address answers to loopback host names and ``allowed_hosts`` (a
    reverse proxy's name) only.

    Raises
    ------
    celltally.io.InputError
        No such model.
    OSError
        The address cannot be bound (port in use, bad host).
    """
    import socket

    import uvicorn

    if max_mb <= 0:
        raise ValueError(f"--max-mb must be positive, got {max_mb:g}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    # Fail with a clear message before uvicorn would (it logs and exits).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    loopback = _is_loopback(host)
    app = create_app(
        model,
        max_files=max_files,
        max_bytes=int(max_mb * 2**20),
        saliency=saliency,
        allowed_hosts=LOOPBACK_NAMES
        | {host.lower(), _canonical(host), *(h.lower() for h in allowed_hosts)}
        if loopback
        else None,
    )
    shown = f"[{host}]" if ":" in host else host
    print(f"celltally: model '{app.state.counter.name}' at http://{shown}:{port}/", flush=True)
    if not loopback:
        print(
            f"warning: listening on {host}, not only this machine: anyone who can reach "
            f"port {port} can count images here (there is no log-in); use a firewall, or "
            "--host 127.0.0.1 with an SSH tunnel",
            flush=True,
        )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
