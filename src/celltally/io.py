"""Reading and writing images, masks and count tables.

All errors caused by bad user input are raised as :class:`InputError` (or its subclass
:class:`ImageReadError`), whose message is a single line naming the offending path, so a
command-line front end can print ``str(err)`` without a traceback.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import glob
import hashlib
import itertools
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "InputError",
    "about_file",
    "check_pixels",
    "figure_path",
    "iter_images",
    "list_images",
    "output_root",
    "output_stem",
    "read_counts_csv",
    "read_image",
    "read_mask",
    "strided_sample",
    "write_float_image",
    "write_mask",
]

#: File suffixes accepted as images (compared case-insensitively).
IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

_TIFF_SUFFIXES = (".tif", ".tiff")
#: Image formats celltally does not read (microscope vendors', other raster formats):
#: files with these suffixes in a folder are left out, and counted so it can be said.
UNREAD_IMAGE_SUFFIXES = frozenset(
    ".czi .nd2 .lif .lsm .oib .oif .ims .vsi .dv .ics .ids .zvi .stk .mrc .dcm .svs "
    ".ndpi .scn .mrxs .bmp .gif .webp .jp2".split()
)
_PNG_SUFFIXES = (".png",)
_SUPPORTED_TEXT = "use TIFF, PNG or JPEG"
_GLOB_CHARS = ("*", "?", "[")
#: Sub-folders of a training folder (beside ``images/``) that hold annotations, not images.
ANNOTATION_FOLDERS = ("masks", "labels")
#: Most planes a (C, Y, X) TIFF may hold (e.g. a 5-stain Cell Painting image).
MAX_CHANNELS = 16
#: Most pages a TIFF may hold (a stack of more than MAX_CHANNELS planes is refused
#: anyway): tifffile's series analysis takes time that grows with the square of the
#: page count (20,000 one-pixel pages, a 5 MB file: about 2 minutes).
MAX_TIFF_PAGES = 1024
_MAX_REASON = 160


def _one_line(text: str) -> str:
    """Collapse ``text`` to a single line (newlines become spaces)."""
    return " ".join(str(text).split())


class InputError(ValueError):
    """A problem with the user's input files; the message is one line naming the path.

    Parameters
    ----------
    message : str
        The user-facing message. Newlines are collapsed to spaces.
    path : str or Path, optional
        The offending path, kept as the ``path`` attribute.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(_one_line(message))
        self.path = path


def about_file(err: InputError, path: str | os.PathLike[str] | None) -> InputError:
    """``err`` as an :class:`ImageReadError` naming ``path``.

    Returned unchanged when it names a file already or there is no ``path``
    (an array, not a file, was counted).
    """
    if path is None or isinstance(err, ImageReadError):
        return err
    return ImageReadError(path, str(err))


class ImageReadError(InputError):
    """An image file that cannot be used; ``str(err) == f"{path}: {problem}"``.

    Subclass of :class:`InputError` (and hence of :class:`ValueError`).

    Parameters
    ----------
    path : str or Path
        The image file.
    problem : str
        Short, one-line description of what is wrong.

    Attributes
    ----------
    path : str or Path
        The image file, as given.
    problem : str
        The problem text (single line).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.problem = _one_line(problem)
        super().__init__(f"{os.fspath(path)}: {self.problem}", path)
        self.path = path


def _short_reason(exc: BaseException) -> str:
    """First line of an exception message, shortened, or the exception type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 3] + "..."
    return reason


def _format_name(suffix: str) -> str:
    suffix = suffix.lower()
    if suffix in _TIFF_SUFFIXES:
        return "TIFF"
    if suffix in _PNG_SUFFIXES:
        return "PNG"
    return "JPEG"


def _check_image_file(path: Path, original: str | os.PathLike[str]) -> None:
    """Raise ImageReadError unless ``path`` is an existing, non-empty, supported file."""
    if not path.exists():
        raise ImageReadError(original, "file not found")
    if path.is_dir():
        raise ImageReadError(original, "is a folder, not an image file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        shown = path.suffix or "(none)"
        raise ImageReadError(original, f"unsupported file type '{shown}'; {_SUPPORTED_TEXT}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(original, f"cannot access file: {_short_reason(exc)}") from None
    if size == 0:
        raise ImageReadError(original, "file is empty (0 bytes)")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Samples per pixel of the PNG colour types Pillow reads as 8 bits at a bit depth of 16
#: (grey + alpha, RGB, RGBA): it keeps only the high byte of each.
_PNG16_SAMPLES = {4: 2, 2: 3, 6: 4}
#: The first bytes of a classic and a BigTIFF file, little- and big-endian.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _header(path: Path, size: int = 33) -> bytes:
    """The first ``size`` bytes of a file (fewer if it is shorter; b"" if unreadable)."""
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError:  # reported by the decoder, as any unreadable file
        return b""


def _decoder_error(
    exc: BaseException, path: Path, original: str | os.PathLike[str], kind: str
) -> ImageReadError:
    """A decoder's failure as the one-line error (an unopenable file says only that)."""
    reason = _decoder_reason(exc, path)
    if reason.startswith("cannot open"):
        return ImageReadError(original, reason)
    return ImageReadError(original, f"cannot be read as {kind}: {reason}")


def _load_png16(path: Path, original: str | os.PathLike[str], head: bytes) -> np.ndarray | None:
    """A 16-bit grey+alpha, RGB or RGBA PNG at its full 16 bits (None for other files).

    Pillow reads these modes as 8 bits per sample, and a dim 12-bit image then
    counted as an empty frame; imagecodecs decodes them whole.
    """
    if not (
        len(head) >= 26
        and head.startswith(_PNG_SIGNATURE)
        and head[12:16] == b"IHDR"
        and head[24] == 16
    ):  # a truncated header: Pillow says what is wrong with the file
        return None
    samples = _PNG16_SAMPLES.get(head[25])
    if samples is None:
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    _check_size((height, width, samples), original)
    import imagecodecs

    try:
        arr = np.asarray(imagecodecs.png_decode(path.read_bytes()))
    except MemoryError:
        raise
    except Exception as exc:
        raise _decoder_error(exc, path, original, "PNG") from None
    return arr[..., 0] if samples == 2 else arr  # grey + alpha: the grey


def _load_pillow(path: Path, original: str | os.PathLike[str], head: bytes) -> np.ndarray:
    """Decode a PNG/JPEG file with Pillow into a numpy array (2-D or (H, W, C)).

    ``head`` is the file's first bytes (:func:`_header`), read once by the caller.
    """
    from PIL import Image, UnidentifiedImageError

    kind = _format_name(path.suffix)
    if (png16 := _load_png16(path, original, head)) is not None:
        return png16
    img: Image.Image  # the opened file, then its conversions
    try:
        with _pillow_header_only():
            opened = Image.open(path)
        with opened as img:
            _check_size(_pillow_shape(img), original)
            img.load()
            mode = img.mode
            if mode == "P" and "transparency" not in img.info and _palette_is_table(img):
                pass  # an 8-bit image under a colour table (Fiji's PNG of it): its values
            elif mode == "P":
                has_alpha = "transparency" in img.info
                img = img.convert("RGBA" if has_alpha else "RGB")
            elif mode == "PA":
                img = img.convert("RGBA")
            elif mode == "LA":
                img = img.convert("L")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif mode == "I;16B" or mode == "I;16L":
                img = img.convert("I;16")
            arr = np.array(img)
            mode = img.mode
    except (MemoryError, ImageReadError):  # out of memory is not the file's fault
        raise
    except UnidentifiedImageError:  # its message names the path (a server's temporary one)
        raise ImageReadError(
            original, f"is not a valid {kind} file (corrupt, or another format under this name)"
        ) from None
    except Exception as exc:  # any decoder failure is a user-facing read error
        raise _decoder_error(exc, path, original, kind) from None
    if mode == "I" and arr.dtype.kind in "iu" and arr.size:
        if arr.min() >= 0 and arr.max() <= np.iinfo(np.uint16).max:
            arr = arr.astype(np.uint16)
    return arr


def _palette_is_table(img: Any) -> bool:
    """Whether a palette image's 256 colours run smoothly from one to the next, as a
    colour table's do (grey, "fire", "hot", "jet": Fiji saves an 8-bit image under one
    as such a PNG): its indices are then the image's values, whatever the table. A few
    colours, or colours in no order (a quantized photo), are no table."""
    palette = img.getpalette()
    if palette is None or len(palette) != 768 or img.palette.mode != "RGB":
        return False
    colours = np.asarray(palette, np.int16).reshape(256, 3)
    return bool(np.abs(np.diff(colours, axis=0)).max() <= _TABLE_STEP)


#: Largest change of a channel between neighbouring colours of a colour table (Fiji's
#: "fire" and "jet" change by at most 8 per step, grey by 1).
_TABLE_STEP = 16

_PILLOW_OPEN = threading.Lock()


@contextlib.contextmanager
def _pillow_header_only() -> Iterator[None]:
    """Pillow's own size limit off while a file's header is read (``Image.open``).

    Pillow warns above 89 million pixels and refuses twice that, as a
    "decompression bomb"; celltally's limit (:data:`MAX_IMAGE_PIXELS`, checked
    from the header before decoding) is the one that applies, as for TIFF. The
    lock keeps other threads' opens from restoring the limit mid-way.
    """
    from PIL import Image

    with _PILLOW_OPEN:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _decoder_reason(exc: BaseException, path: Path) -> str:
    """A decoder's error as a short reason, without the path (the message names it).

    An operating-system error (no permission, an I/O error) says so; its message
    is not taken for a sign of a corrupt file. The path is cut out in any of the
    forms the library may print (a server's temporary name must not show).
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot open the file: {(exc.strerror or type(exc).__name__).lower()}"
    reason = _short_reason(exc)
    for form in sorted({str(path.absolute()), os.path.abspath(path), str(path)}, key=len)[::-1]:
        reason = reason.replace(form, path.name)
    return reason


def _several_series(tif: Any, original: str | os.PathLike[str]) -> bool:
    """Whether a TIFF's several series (a pyramid is one series' levels) form one stack.

    One series, or a first one followed only by smaller ones (previews, thumbnails
    not flagged as such): False, the first is the image. Series of one shape and
    type (pages written one by one, e.g. a time lapse): True, read as planes (a
    stack ``--channel`` picks from, as a multi-page file's). Anything else, or
    several OME series (positions): ImageReadError, rather than counting one
    of several images silently.
    """
    if len(tif.series) < 2:
        return False
    first, rest = tif.series[0], tif.series[1:]
    if not tif.is_ome:
        if all(s.shape == first.shape and s.dtype == first.dtype for s in rest):
            return True
        values = [int(np.prod(s.shape, dtype=np.int64)) for s in tif.series]
        if all(v < values[0] for v in values[1:]):
            return False
    what = "OME series, e.g. positions" if tif.is_ome else "pages of different sizes or types"
    raise ImageReadError(
        original,
        f"holds {len(tif.series)} images ({what}); "
        "celltally counts one image per file: save each as its own file",
    )


def _check_pages(tif: Any, original: str | os.PathLike[str]) -> None:
    """ImageReadError for a TIFF of more than :data:`MAX_TIFF_PAGES` pages (counted
    without parsing them: a linked list of offsets)."""
    if (pages := len(tif.pages)) > MAX_TIFF_PAGES:
        raise ImageReadError(
            original,
            f"holds {pages} pages; celltally reads one image (up to {MAX_CHANNELS} planes) "
            "per file: save the plane to count as its own file",
        )


def _load_tiff(path: Path, original: str | os.PathLike[str]) -> np.ndarray:
    """Decode a TIFF (including OME-TIFF) with tifffile."""
    import tifffile

    # tifffile logs what it cannot parse (and may then return no data): keep those
    # messages off the terminal and use the first one as the reason.
    with _tifffile_notes() as notes:
        try:
            with tifffile.TiffFile(path) as tif:
                _check_pages(tif, original)
                series = tif.series[0] if tif.series else None
                stacked = _several_series(tif, original)
                _check_size(((len(tif.series),) if stacked else ()) + _tiff_shape(tif), original)
                if stacked:  # pages of one shape written apart: planes, as a multi-page file's
                    arr, axes = np.stack([s.asarray() for s in tif.series]), ""
                else:
                    arr = np.asarray(series.asarray() if series is not None else tif.asarray())
                    axes = series.axes if series is not None else ""
                # a grey page's samples (MINISWHITE 0, MINISBLACK 1) are stains; any other
                # photometric (RGB, YCbCr, CMYK, CIELab...) is a colour image
                first = cast("tifffile.TiffPage", tif.pages[0]) if len(tif.pages) else None
                colour = first is not None and int(first.photometric) not in (0, 1)
                if colour and first is not None and int(first.planarconfig) == 2:
                    # samples stored apart, more than 8 bits each: how tifffile (and
                    # scripts using it) save a (3|4, Y, X) array of stains, not a colour
                    # photograph; their mean would count a mixture, or drop a 4th stain
                    # as alpha
                    colour = first.dtype == np.uint8
        except (MemoryError, ImageReadError):  # out of memory is not the file's fault
            raise
        except Exception as exc:  # any decoder failure is a user-facing read error
            reason = _decoder_reason(exc, path)
            if reason.startswith("cannot open"):
                raise ImageReadError(original, reason) from None
            if not reason.startswith("not a TIFF"):
                reason = f"corrupt or truncated file? ({reason})"
            raise ImageReadError(original, f"cannot be read as TIFF: {reason}") from None
    if arr.size == 0 and (notes or arr.ndim < 2):  # no page, not a 0 x N page
        reason = _short_reason(Exception(notes[0])) if notes else "no pages"
        raise ImageReadError(
            original, f"cannot be read as TIFF (corrupt or truncated file): {reason}"
        )
    arr = _channels_first(arr, axes, original)
    if colour and arr.ndim == 3 and axes.replace("I", "")[-3:] == "SYX":
        arr = np.moveaxis(arr, 0, -1)  # planar colour (samples stored apart): (Y, X, S)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and not colour and min(arr.shape[:2]) > 4:
        # a grey (Y, X, 3|4) TIFF (photometric not RGB): its planes are stains, as a
        # (C, Y, X) file's, not colours to average
        arr = np.moveaxis(arr, -1, 0)
    return arr


def _channels_first(arr: np.ndarray, axes: str, path: str | os.PathLike[str]) -> np.ndarray:
    """An OME-TIFF/ImageJ hyperstack as (C, Y, X); other arrays as they are.

    Only axes named by such metadata (C, Z, T, ... before Y X) are trusted: a
    plain shaped TIFF reports generic ones ('QYX'). A Z or time axis longer
    than one plane is refused (count one plane, or a projection).
    """
    if len(axes) != arr.ndim or not set(axes) & set("CZT") or "YX" not in axes:
        return arr
    stacked = [(a, n) for a, n in zip(axes, arr.shape, strict=True) if a not in "CYXS" and n > 1]
    if stacked:
        shown = ", ".join(f"{a}={n}" for a, n in stacked)
        raise ImageReadError(
            path,
            f"is a stack (axes {axes}, {shown}); save one plane (or a projection) as a 2-D image",
        )
    keep = [i for i, a in enumerate(axes) if a in "CYXS"]
    work = arr.reshape([arr.shape[i] for i in keep])
    kept = "".join(axes[i] for i in keep)
    if "C" in kept:
        work = np.moveaxis(work, kept.index("C"), 0)
    return work


_TIFF_READ = threading.local()


class _TiffNotes(logging.Filter):
    """On the 'tifffile' logger: inside ``_tifffile_notes`` (this thread only), keep a
    record's message for the error and drop the record; elsewhere let it through."""

    def filter(self, record: logging.LogRecord) -> bool:
        notes = getattr(_TIFF_READ, "notes", None)
        if notes is None:
            return True
        text = record.getMessage()
        notes.append(text.split("> ", 1)[-1] if text.startswith("<") else text)
        return False


@contextlib.contextmanager
def _tifffile_notes() -> Iterator[list[str]]:
    """Collect (and silence) what tifffile logs in this thread while the block runs."""
    logger = logging.getLogger("tifffile")
    if not any(isinstance(f, _TiffNotes) for f in logger.filters):
        logger.addFilter(_TiffNotes())
    notes: list[str] = []
    _TIFF_READ.notes = notes
    try:
        yield notes
    finally:
        _TIFF_READ.notes = None


#: Most values (pixels x channels) one image file may hold: 16384 x 16384. Checked on
#: the header, before decoding, so a small compressed file that would decode into
#: gigabytes (a "decompression bomb", or a whole slide) is refused in one line.
MAX_IMAGE_PIXELS = 16384 * 16384


def header_pixels(path: str | os.PathLike[str]) -> int | None:
    """Values (pixels x channels) in the first image of a file, from its header alone.

    None when the header cannot be read: decoding then reports the problem.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with _tifffile_notes(), tifffile.TiffFile(path) as tif:
                _check_pages(tif, path)  # before the series, which would take minutes
                return _values(_tiff_shape(tif))
        from PIL import Image

        with _pillow_header_only():  # Pillow's own limit refuses past 179 M pixels
            opened = Image.open(path)
        with opened as img:
            return _values(_pillow_shape(img))
    except Exception:  # unreadable headers: decoding reports the problem
        return None


def _tiff_shape(tif: Any) -> tuple[int, ...]:
    """The shape of an open TIFF's first series (or first page; (0,) without pages)."""
    if tif.series:
        return tuple(tif.series[0].shape)
    return tuple(tif.pages[0].shape) if len(tif.pages) else (0,)


def _pillow_shape(img: Any) -> tuple[int, int, int]:
    """(height, width, bands) of an open Pillow image, from its header."""
    width, height = img.size
    return int(height), int(width), len(img.getbands())


def _values(shape: Sequence[int]) -> int:
    """Values an array of ``shape`` holds (pixels x channels x planes)."""
    return int(np.prod(shape, dtype=np.int64))


def _check_size(shape: Sequence[int], original: str | os.PathLike[str]) -> None:
    """ImageReadError when a file's header announces more than MAX_IMAGE_PIXELS values.

    The message names ``shape`` (the header's array shape): the limit counts every
    channel's values, so a colour image of fewer pixels reaches it.
    """
    values = _values(shape)
    if values > MAX_IMAGE_PIXELS:
        what = ""
        if len(shape) >= 2:
            what = f" (an array of {' x '.join(str(int(v)) for v in shape)})"
        raise ImageReadError(
            original,
            f"holds {values / 1e6:,.0f} million pixel values{what}, more than the "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} million (16384 x 16384 of one channel) celltally "
            "counts in one piece; cut it into smaller images (or save one channel) first",
        )


def _load_raw(path: str | os.PathLike[str], *, on: int = 1) -> tuple[np.ndarray, bool]:
    """Validate and decode an image file; return the raw array and whether it is a TIFF.

    A 1-bit (boolean) file gives uint8 0 and ``on``."""
    p = Path(path)
    _check_image_file(p, path)
    is_tiff = p.suffix.lower() in _TIFF_SUFFIXES
    head = b"" if is_tiff else _header(p)  # one read, for the magic bytes and a PNG's header
    # a TIFF under a .png or .jpg name (some tools save so) is read as the TIFF it is:
    # Pillow would give its first plane alone
    is_tiff = is_tiff or head[:4] in _TIFF_MAGIC
    arr = _load_tiff(p, path) if is_tiff else _load_pillow(p, path, head)
    if arr.ndim == 0 or arr.size == 0 or 0 in arr.shape:
        raise ImageReadError(path, f"image has a zero-size side (shape {tuple(arr.shape)})")
    try:
        return _countable_type(arr, on=on), is_tiff
    except InputError as err:
        raise ImageReadError(path, str(err)) from None


def _squeeze_singletons(arr: np.ndarray) -> np.ndarray:
    """Drop size-1 axes of an array with more than two axes (never below two axes)."""
    while arr.ndim > 2 and 1 in arr.shape:
        axis = arr.shape.index(1)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4) and axis != 2:
            # (1, W, 3): a one-pixel-tall colour image, keep the colour axis intact.
            break
        arr = arr.reshape(arr.shape[:axis] + arr.shape[axis + 1 :])
    return arr


def _to_2d(
    arr: np.ndarray,
    path: str | os.PathLike[str],
    *,
    is_tiff: bool,
    channel: int | None,
    colour_mean: bool,
    default_channel: int | None = None,
) -> np.ndarray:
    """Reduce a decoded array to 2-D following the rules of :func:`read_image`."""
    original_shape = tuple(arr.shape)
    work = _squeeze_singletons(arr)
    if work.ndim == 2:
        if channel is not None and channel != 0:
            raise ImageReadError(
                path, f"channel {channel} out of range; the image has a single channel (0)"
            )
        return np.array(work, copy=True)
    planes_first = False
    small = min(work.shape[-2:]) if work.ndim == 3 else 0
    if work.ndim == 3 and work.shape[-1] in (3, 4):
        channels = np.moveaxis(work, -1, 0)  # (Y, X, 3|4): colour
    elif work.ndim == 3 and work.shape[-1] == 2 and min(work.shape[:2]) > 2:
        channels, planes_first = np.moveaxis(work, -1, 0), True  # (Y, X, 2): two stains
    elif work.ndim == 3 and is_tiff and work.shape[0] <= MAX_CHANNELS and work.shape[0] < small:
        channels, planes_first = work, True  # (C, Y, X) planes
        n = work.shape[0]
        if n > 4 and channel is None:  # as likely a z-stack or time series as stains
            raise ImageReadError(
                path,
                f"is a stack of {n} planes (shape {original_shape}): if they are channels, "
                f"pick one with --channel 0-{n - 1}; if z-planes or time points, save one "
                "plane (or a projection) as a 2-D image",
            )
    else:
        raise ImageReadError(
            path,
            f"expected a 2-D image (or up to {MAX_CHANNELS} channels), got a stack of shape "
            f"{original_shape}; save one plane (or a projection) as a 2-D image",
        )
    n_channels = channels.shape[0]
    if channel is None and default_channel is not None and planes_first:
        # stain planes only: a colour file stays the mean of its colours (its 4th is alpha)
        channel = default_channel if 0 <= default_channel < n_channels else None
    if channel is not None:
        if not 0 <= channel < n_channels:
            raise ImageReadError(
                path,
                f"channel {channel} out of range; the image has {n_channels} channels "
                f"(0-{n_channels - 1})",
            )
        return np.array(channels[channel], copy=True)
    # (Y, X, 4) is RGBA: ignore alpha. (C, Y, X) planes are stains, all of them kept.
    colour = channels[:3] if n_channels == 4 and not planes_first else channels
    if all(np.array_equal(colour[0], colour[i]) for i in range(1, colour.shape[0])):
        return np.array(colour[0], copy=True)
    if not colour_mean:
        raise ImageReadError(
            path, "colour channels differ; expected a grayscale label or binary mask"
        )
    if planes_first:
        # Separate stains (e.g. nuclei + cytoplasm): averaging them would count a
        # mixture that no model was trained on, so the user must choose.
        raise ImageReadError(
            path,
            f"has {n_channels} different channels (shape {original_shape}); choose the "
            f"one to count with --channel 0-{n_channels - 1}",
        )
    if (correlation := _colour_channels_differ(colour)) is not None:
        # a composite of stains (DAPI blue + another stain green, as Fiji's "RGB Color"
        # exports them): the mean would count a mixture no model was trained on
        raise ImageReadError(
            path,
            f"its colour channels hold different images (correlation {correlation:.3f}; "
            f"one stain under a grey or one-colour table gives {SAME_STAIN_CORRELATION} "
            "or more): a composite of stains? Choose the stain to count with --channel "
            "0-2 (0 red, 1 green, 2 blue), or save it as a greyscale image (a table such "
            "as 'fire' or 'jet' saved in colour: save the image without it)",
        )
    mean = colour.astype(np.float32).mean(axis=0, dtype=np.float32)
    # Keep the file's integer type: normalization's empty-frame guard and 'fixed'
    # scaling are set by the dtype (a float mean would be taken as 0..1 data).
    return np.rint(mean).astype(colour.dtype) if colour.dtype.kind in "ui" else mean


def strided_sample(array: np.ndarray) -> np.ndarray:
    """A 2-D array's pixels at most 256 x 256, spread over the whole image (a strided
    view, no copy of a large image); other arrays as they are."""
    if array.ndim != 2:
        return array
    sy = max(1, -(-array.shape[0] // 256))  # ceiling: at most 256 rows, the whole image
    sx = max(1, -(-array.shape[1] // 256))
    return array[::sy, ::sx]


#: Colour channels that carry a signal and correlate this much or more (after a 3 x 3
#: mean, which calms a JPEG's colour noise) hold one stain: grey, green, cyan or any one
#: colour's table, or a bright colour camera's planes of one dye.
#: benchmarks/colour_composites.py (PNG and JPEG at quality 50-95): none of 260 such images
#: refused; two stains of other cells correlate -0.09 to 0.15, a sparse stain saturating
#: in two colours beside a dense one -0.26 to 0.26, nuclei and cell bodies of the same
#: cells (BBBC005's w1 and w2 of one site) 0.59 to 0.88, "hot" saved as JPEG 0.33 to
#: 0.92, a dim colour camera's planes of one dye 0.85 to 0.94 (14 of 20 refused).
SAME_STAIN_CORRELATION = 0.95

#: Below this std (8-bit grey levels) a colour plane carries no signal of its own: the
#: colour noise JPEG leaves in an unused channel of a dim image reaches about 1.3.
JPEG_NOISE = 2.0

#: An integer colour image whose colour is set by its brightness, with channels that rise
#: together ("hot" and other monotone tables), may have this share of its pixels off the
#: table and still be read as one stain.
OFF_TABLE_SHARE = 0.001

#: Most of an image that thin or long shapes of pure colours (white, yellow, cyan, magenta:
#: a scale bar, text, a line drawn on it), with 5 pixels around them, may cover
#: and be left out of the one-stain tests as annotations.
ANNOTATION_SHARE = 0.05


def _colour_channels_differ(colour: np.ndarray) -> float | None:
    """Why a colour image is not one stain, or None when it is.

    One stain is: fewer than two colour planes carrying a signal (green, or a camera's
    noise in an unused channel), planes that correlate :data:`SAME_STAIN_CORRELATION` or
    more, or an integer image under a table that is monotone in brightness
    (:func:`_monotone_colour_table`). Otherwise the lowest correlation of two planes that
    carry a signal: a composite of stains, or a table such as "fire" or "jet", whose mean
    is no monotone function of the stain. A plane carries one when its std is above 10% of
    the largest and, for 8-bit data, :data:`JPEG_NOISE` (or a quarter of the largest,
    if less), and has spatial structure (a
    3 x 3 mean keeps over 30% of its variance; a camera's white noise keeps ~11%). Marks
    drawn in pure colours are left out (:func:`_annotations`). On a strided sample
    of at most 256 x 256 pixels.
    """
    from scipy import ndimage as ndi

    sample = np.stack([strided_sample(plane) for plane in colour[:3]])
    planes = sample.astype(np.float32)
    keep = ~_annotations(sample).ravel()
    flat = planes.reshape(planes.shape[0], -1)[:, keep]
    spread = flat.std(axis=1)
    if not spread.max() > 0:
        return None
    smooth = [ndi.uniform_filter(plane, 3).ravel()[keep] for plane in planes]
    # JPEG's colour noise in an unused channel of a dim 8-bit image: a std of 0.4-1.3
    # (a quarter of the brightest plane's std at most: two dim stains both count)
    floor = min(JPEG_NOISE, 0.25 * float(spread.max())) if sample.dtype == np.uint8 else 0.0
    live = [
        i
        for i in range(planes.shape[0])
        if spread[i] > max(0.1 * spread.max(), floor) and smooth[i].var() > 0.3 * spread[i] ** 2
    ]
    if len(live) < 2:
        return None
    lowest = min(
        float(np.corrcoef(smooth[i], smooth[j])[0, 1]) for i in live for j in live if i < j
    )
    if lowest >= SAME_STAIN_CORRELATION:
        return None
    pixels = sample.reshape(sample.shape[0], -1)[:, keep]
    if sample.dtype.kind in "ui" and _monotone_colour_table(pixels):
        return None
    return lowest


def _annotations(sample: np.ndarray) -> np.ndarray:
    """Where ``sample`` (3, Y, X) holds a thin or long shape of a pure colour (each channel within
    10% of 0 or of full scale, two or more at full scale: white, yellow, cyan, magenta),
    drawn on the image, not measured, or is within 5 pixels of one (JPEG rings around it).

    Drawn: thin (no pixel more than 1.5 pixels from the shape's edge: text, a line, an
    outline, on the sample, which is at most 256 x 256) or long (its area at least 12 times
    its depth squared: a bar three or more times as long as wide); a stain's saturated
    cells are round blobs, and stay. Colours are taken rarest first while together, with
    their surroundings, they cover at most :data:`ANNOTATION_SHARE` of the image.
    """
    from scipy import ndimage as ndi

    top = float(np.iinfo(sample.dtype).max) if sample.dtype.kind in "ui" else 1.0
    values = sample.astype(np.float32)
    low, high = values <= 0.1 * top, values >= 0.9 * top  # JPEG blurs a pure colour
    # two or more channels high (white, yellow, cyan, magenta): one high is a single
    # stain's saturated cells as often as a drawn red, green or blue
    pure = (low | high).all(axis=0) & (high.sum(axis=0) >= 2)
    drawn = np.zeros_like(pure)
    if not pure.any():
        return drawn
    colour = np.tensordot(np.array([1, 2, 4][: sample.shape[0]]), high, 1)  # which are high
    areas = []
    for c in np.unique(colour[pure]):
        shapes, n = ndi.label(pure & (colour == c), np.ones((3, 3), bool))
        index = np.arange(1, n + 1)
        depth = np.asarray(ndi.maximum(ndi.distance_transform_edt(shapes > 0), shapes, index))
        area = np.bincount(shapes.ravel(), minlength=n + 1)[1:]
        # thin (text, a line) or long (a bar: 4 x length / width; a round blob's is ~3)
        drawn_like = (depth <= 1.5) | (area >= 12 * depth**2)
        marks = np.isin(shapes, index[drawn_like])
        if marks.any():
            areas.append(ndi.binary_dilation(marks, np.ones((11, 11), bool)))
    for area in sorted(areas, key=np.count_nonzero):
        if (drawn | area).mean() > ANNOTATION_SHARE:
            break
        drawn |= area
    return drawn


def _monotone_colour_table(pixels: np.ndarray) -> bool:
    """Whether integer colours ``(3, N)`` are one stain under a monotone colour table.

    True when, but for :data:`OFF_TABLE_SHARE` of the pixels, each sum of the channels
    has one colour and the channels never fall as that sum rises ("hot": red, then green,
    then blue rise with the stain; their mean is the stain). A composite has many colours
    per sum; "fire" has a blue that rises and falls; a JPEG's noise breaks the table.
    """
    if pixels.shape[1] == 0:
        return False
    values = pixels.astype(np.int64)
    table, counts = np.unique(values.T, axis=0, return_counts=True)
    table = table.T
    total = table.sum(axis=0)
    order = np.lexsort((-counts, total))  # by sum, the commonest colour of each sum first
    table, total, counts = table[:, order], total[order], counts[order]
    main = np.r_[True, total[1:] != total[:-1]]  # the commonest colour of each sum
    off = int(counts[~main].sum())
    rising = table[:, main]
    # the highest each channel reached so far, set by colours of 3 pixels or more: one
    # stray pixel (a blend at an annotation's edge) does not make all that follow fall
    common = np.where(counts[main] >= 3, rising, 0)
    reached = np.maximum.accumulate(common, axis=1)
    falls = (rising < np.concatenate([reached[:, :1] * 0, reached[:, :-1]], axis=1)).any(axis=0)
    off += int(counts[main][falls].sum())
    return off <= OFF_TABLE_SHARE * pixels.shape[1]


def read_image(
    path: str | os.PathLike[str], *, channel: int | None = None, default_channel: int | None = None
) -> np.ndarray:
    """Read one 2-D image from a TIFF (incl. OME-TIFF), PNG or JPEG file.

    Parameters
    ----------
    path : str or Path
        Image file. Its suffix (case-insensitive) selects the decoder: ``.tif``/``.tiff``
        via tifffile, ``.png``/``.jpg``/``.jpeg`` via Pillow.
    channel : int, optional
        For multi-channel images, the 0-based channel to return. For a single-channel
        image only ``0`` is accepted.
    default_channel : int, optional
        Without ``channel``: the channel a multi-channel image gives when it has
        one of that number (a model's training channel); a single-channel image
        is read as it is.

    Returns
    -------
    numpy.ndarray
        A new 2-D array in the file's own dtype (uint8, uint16, float32, ...). Boolean
        images become uint8 0/255; 16-bit PNGs come back as uint16. Multi-channel images
        (colour ``(H, W, 3|4)``, two stains ``(H, W, 2)``, or for TIFF ``(C, H, W)``
        planes with ``C <= MAX_CHANNELS`` (16) and ``C`` smaller than both sides) give
        the selected ``channel``. Without one: a single channel if all channels are
        equal; for a colour image ``(H, W, 3|4)`` of one stain the mean of its colour
        channels, rounded to the file's integer dtype (a 4th is alpha and ignored); a
        colour image of several stains is an error (see :data:`SAME_STAIN_CORRELATION`);
        a palette PNG whose 256 colours form a colour table gives its indices;
        ``(H, W, 2)`` or ``(C, H, W)`` planes that differ are an error (they are
        separate stains: choose one), and a TIFF of 5 or more planes always needs
        ``channel`` (it may as well be a z-stack or time series). Size-1 axes (e.g.
        ``(1, H, W)``) are dropped.

        Values are read as stored: 16-bit PNGs of any colour type keep their 16
        bits; a TIFF saved under a ``.png`` or ``.jpg`` name is read as a TIFF;
        a TIFF's colour samples stored apart (planar) with more than 8 bits each
        are stain planes (as tifffile saves a ``(3|4, H, W)`` array), not
        colours; a MINISWHITE TIFF is not inverted (ImageJ stores measured
        values so under an inverting lookup table).

    Raises
    ------
    ImageReadError
        If the file is missing, a folder, empty, of an unsupported type, cannot be
        decoded, has a zero-size side, is a stack (z/time series) rather than a 2-D
        image, has differing ``(C, H, W)`` channels, or colours of several stains, and
        no ``channel``, ``channel`` is out of range, or it contains NaN or infinite
        values.
    """
    arr, is_tiff = _load_raw(path, on=255)
    out = _to_2d(
        arr,
        path,
        is_tiff=is_tiff,
        channel=channel,
        colour_mean=True,
        default_channel=default_channel,
    )
    try:
        return check_pixels(out)
    except InputError as err:
        raise ImageReadError(path, str(err)) from None


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def figure_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``.png`` added when it has no suffix: the file matplotlib would write."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".png")


#: What celltally writes into the metadata of its figures (:func:`save_figure`).
FIGURE_MARK = "celltally"


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure to ``path`` (:func:`figure_path`), marked as celltally's.

    The mark (PNG/PDF/SVG metadata, the TIFF Software tag, a JPEG comment) is
    what :func:`is_own_figure` looks for before a figure replaces a file.
    """
    out = figure_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    options: dict[str, Any] = {}
    if suffix == ".png":
        options["metadata"] = {"Software": FIGURE_MARK}
    elif suffix in (".pdf", ".svg"):
        options["metadata"] = {"Creator": FIGURE_MARK}
    elif suffix in _TIFF_SUFFIXES:
        options["pil_kwargs"] = {"tiffinfo": {305: FIGURE_MARK}}  # 305: Software
    elif suffix in (".jpg", ".jpeg"):
        options["pil_kwargs"] = {"comment": FIGURE_MARK}
    fig.savefig(out, **options)
    return out


def is_own_figure(path: str | os.PathLike[str]) -> bool:
    """Whether an existing TIFF/PNG/JPEG, PDF or SVG file is a figure celltally wrote (its
    mark).

    A figure may be written over; any other image file may be a user's image,
    including a PNG that matplotlib wrote (``plt.imsave`` marks an image as
    ``savefig`` marks a figure, so the matplotlib mark alone says nothing), and
    any other PDF or SVG a user's figure.
    """
    from PIL import Image

    if Path(path).suffix.lower() in (".pdf", ".svg"):
        written = (f"/Creator ({FIGURE_MARK})", f"<dc:title>{FIGURE_MARK}</dc:title>")
        try:
            with open(path, "rb") as handle:  # the mark is in the first few KB (SVG) or
                data = handle.read()  # the info dictionary near the end (PDF)
        except OSError:
            return False
        return any(mark.encode() in data for mark in written)

    try:
        with _pillow_header_only():
            opened = Image.open(path)
        with opened as img:
            tag = getattr(img, "tag_v2", {}).get(305) if img.format == "TIFF" else None
            marks = [img.info.get("Software"), img.info.get("comment"), tag]
    except Exception:  # unreadable: not a figure we wrote
        return False
    text = " ".join(m.decode("latin-1") if isinstance(m, bytes) else str(m) for m in marks if m)
    return FIGURE_MARK in text


def _countable_type(array: np.ndarray, *, on: int = 1) -> np.ndarray:
    """``array`` with booleans as uint8 0 and ``on``; InputError unless integers or floats."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(on)
    if array.dtype.kind not in "uif":
        raise InputError(f"unsupported pixel type {array.dtype}; give integer or float pixels")
    return array


def check_pixels(image: Any) -> np.ndarray:
    """``image`` as an array of pixel values celltally can count, or InputError saying why.

    Integers and floats pass (booleans become uint8 0/255, as 1-bit files do: on is the
    full range, not a frame too faint to hold cells); masked
    arrays, complex, text, object and date types, NaN or infinite values and
    floats beyond the float32 range (the network's arithmetic) are refused.
    The input is not modified.
    """
    if isinstance(image, np.ma.MaskedArray):
        raise InputError("a masked array: fill its masked pixels first (numpy.ma.filled)")
    array = _countable_type(np.asarray(image), on=255)
    if array.dtype.kind == "f" and array.size:
        if not np.all(np.isfinite(array)):
            raise InputError("contains NaN or infinite values")
        largest = float(np.max(np.abs(array)))
        if largest > _FLOAT32_MAX:
            raise InputError(f"values beyond the float32 range (largest magnitude {largest:.3g})")
    return array


def image_plane(
    array: np.ndarray, *, channel: int | None = None, default_channel: int | None = None
) -> np.ndarray:
    """A 2-D image from an array, reduced as :func:`read_image` reduces a file's pixels.

    Size-1 axes are dropped ((1, H, W), (H, W, 1)), and a (H, W, 3|4) colour
    array is taken as one grey image (identical channels once, else the
    colours averaged, alpha ignored; a composite of stains raises InputError, as
    a file's does). ``channel`` (and ``default_channel``)
    pick a plane as :func:`read_image`'s do, of a (C, H, W) stack too. Any
    other shape raises InputError naming it and how to pick a plane. A 2-D
    array is a plane already (e.g. one a file was read into): returned as it is.
    """
    if array.ndim == 2:
        return array
    work = _squeeze_singletons(array)
    if channel is not None or (default_channel is not None and work.ndim == 3):
        try:  # as a TIFF's planes: (C, H, W) stacks are taken
            return _to_2d(
                work,
                "array",
                is_tiff=True,
                channel=channel,
                colour_mean=True,
                default_channel=default_channel,
            )
        except ImageReadError as err:
            problem = err.problem.replace(
                "with --channel ", "with CellCounter.from_pretrained(channel=N), N "
            )
            raise InputError(f"an array of shape {tuple(array.shape)}: {problem}") from None
    if work.ndim == 2:
        return work
    if work.ndim == 3 and work.shape[-1] in (3, 4) and min(work.shape[:2]) > 4:
        try:
            return _to_2d(work, "array", is_tiff=False, channel=None, colour_mean=True)
        except ImageReadError as err:  # a composite of stains: the caller picks one
            problem = err.problem.split(" Choose the stain")[0]
            raise InputError(
                f"an array of shape {tuple(array.shape)}: {problem} Pass one plane "
                "(e.g. image[..., 2] for blue) or CellCounter.from_pretrained(channel=N)"
            ) from None
    raise InputError(
        f"expected a 2-D image, got an array of shape {tuple(array.shape)}: pass one plane "
        "(e.g. image[0] or image[..., 0])"
    )


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _empty_folder(folder: Path, text: str, recursive: bool) -> InputError:
    """The error for a folder without images; names a sub-folder that has some, if any."""
    message = f"{text}: folder contains no TIFF/PNG/JPEG images"
    if not recursive:
        first = next(_scan_folder(folder, True), None)
        if first is not None:
            sub = first.parent.relative_to(folder).parts[0]
            shown = os.path.join(text, sub)
            message += (
                f" of its own, but its sub-folder '{sub}' has: count {shown}, or use --recursive"
            )
    return InputError(message, text)


def _any_case(pattern: str) -> str:
    """``pattern`` with each letter outside a ``[...]`` class matching either case."""
    out = []
    in_class = False
    for ch in pattern:
        if in_class:
            in_class = ch != "]"
            out.append(ch)
        elif ch == "[":
            in_class = True
            out.append(ch)
        elif ch.isalpha() and ch.lower() != ch.upper():
            out.append(f"[{ch.lower()}{ch.upper()}]")
        else:
            out.append(ch)
    return "".join(out)


def _no_match(text: str, recursive: bool) -> InputError:
    """The error for a pattern that matches nothing, with a hint when only its case is off.

    Shells and :mod:`glob` match case-sensitively on Linux, so ``*.tif`` misses
    BBBC's ``.TIF`` files; the message names a file the pattern would match in
    another case.
    """

    def first(pattern: str) -> str | None:  # in any case
        return next(iter(glob.iglob(_any_case(pattern), recursive=recursive)), None)

    other = first(text)
    head, tail = os.path.split(text)
    if other is None and not any(ch in head for ch in _GLOB_CHARS):
        # a training folder's layout (simulate --out writes it): the images are in images/
        if (hit := first(os.path.join(head, "images", tail))) is not None:
            folder = os.path.dirname(hit)  # as spelt on disk ('Images')
            return InputError(
                f"no files match the pattern '{text}', but its folder's images/ holds "
                f"images: count {folder}",
                text,
            )
    if other is None:
        return InputError(f"no files match the pattern '{text}'", text)
    return InputError(
        f"no files match the pattern '{text}' (matching is case-sensitive; "
        f"it matches '{other}' in another case)",
        text,
    )


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    return sorted(_scan_folder(folder, recursive), key=str)


def list_images(paths: Sequence[str | os.PathLike[str]], *, recursive: bool = False) -> list[Path]:
    """Expand files, folders and glob patterns into a list of image files.

    Parameters
    ----------
    paths : sequence of str or Path
        Image files, folders (their image files, sorted by path) and glob patterns
        (containing ``*``, ``?`` or ``[``; non-image matches are skipped, matched folders
        are expanded like folder arguments).
    recursive : bool, default False
        Descend into sub-folders of folder arguments; in patterns, ``**`` matches any
        number of folders.

    Returns
    -------
    list of Path
        Image files in argument order, duplicates (same :func:`file_identity`) removed. Files and
        folders whose name starts with ``.`` are skipped inside folders. An empty
        ``paths`` gives an empty list.

    Raises
    ------
    InputError
        For a path that does not exist (and is not a matching pattern), a folder without
        images, a pattern matching no images, or a file with an unsupported suffix.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result: list[Path] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = file_identity(p)
        if key not in seen:
            seen.add(key)
            result.append(p)

    for arg in paths:
        text = os.fspath(arg)
        _check_not_empty(text)
        p = Path(text)
        if p.is_dir():
            images = _folder_images(p, recursive)
            if not images:
                raise _empty_folder(p, text, recursive)
            for image in images:
                add(image)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                shown = p.suffix or "(none)"
                raise InputError(
                    f"{text}: unsupported file type '{shown}'; {_SUPPORTED_TEXT}", text
                )
            add(p)
        elif any(ch in text for ch in _GLOB_CHARS):
            matches = sorted(glob.glob(text, recursive=recursive))
            if not matches:
                raise _no_match(text, recursive)
            matched: list[Path] = []
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    matched.extend(_folder_images(m, recursive))
                elif _is_image_file(m):
                    matched.append(m)
            if not matched:
                raise InputError(f"pattern '{text}' matches no TIFF/PNG/JPEG images", text)
            for image in matched:
                add(image)
        else:
            raise InputError(f"no such file or folder: {text}", text)
    return result


@dataclasses.dataclass(frozen=True)
class _LeftOut:
    """Where a folder scan (:func:`_scan_folder`) puts what it leaves out; a field that
    is None is not collected.

    ``unread``: the absolute paths of files in :data:`UNREAD_IMAGE_SUFFIXES`.
    ``unlisted``: sub-folders that cannot be listed (e.g. no permission), as
    "folder: reason" (None: they raise :class:`InputError`). ``passed``: without
    ``recursive``, the sub-folders not descended into (not hidden, not links, not
    excluded).
    """

    unread: set[str] | None = None
    unlisted: list[str] | None = None
    passed: list[str] | None = None


def _scan_folder(
    folder: Path,
    recursive: bool,
    exclude: frozenset[str] = frozenset(),
    left: _LeftOut = _LeftOut(),
) -> Iterator[Path]:
    """Image files in ``folder`` in directory order, streamed with :func:`os.scandir`.

    Holds one open directory handle per level of nesting, never the whole listing.
    Entries whose name starts with ``.`` are skipped (and not descended into). A
    folder laid out for training (``images/`` beside ``masks/`` or ``labels/``)
    gives only its ``images/``. A broken link with an image suffix is produced
    (reading it then fails with its own error) rather than skipped unseen. A
    folder reached twice (a link back up the tree, or to a folder already listed)
    is listed once. Sub-folders whose real path is in ``exclude`` (a run's own
    output folders) are not descended into. What is left out goes into ``left``
    (:class:`_LeftOut`); a sub-folder that cannot be listed raises
    :class:`InputError` unless ``left.unlisted`` collects it.
    """
    top = os.fspath(folder)
    stack = [top]
    seen: set[tuple[int, int]] = set()
    while stack:
        current = stack.pop()
        try:
            info = os.stat(current)
        except OSError:
            info = None
        if info is not None:
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(current) as entries:
                subdirs: list[str] = []
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    suffix = os.path.splitext(entry.name)[1].lower()
                    image = suffix in IMAGE_SUFFIXES
                    if left.unread is not None and suffix in UNREAD_IMAGE_SUFFIXES:
                        left.unread.add(os.path.abspath(entry.path))  # realpath: a stat a level
                    try:
                        # passed over: not a link (``up -> ..`` leads back to what was counted)
                        passing = left.passed is not None and not image and not entry.is_symlink()
                        if (recursive or passing) and entry.is_dir():
                            if not exclude or os.path.realpath(entry.path) not in exclude:
                                if recursive:
                                    subdirs.append(entry.path)
                                elif left.passed is not None:
                                    left.passed.append(entry.path)
                        elif image and (
                            entry.is_file() or (entry.is_symlink() and not entry.is_dir())
                        ):
                            yield Path(entry.path)
                    except OSError:  # e.g. a link to itself: reading it says what is wrong
                        if image:
                            yield Path(entry.path)
        except OSError as exc:
            reason = _short_reason(exc)
            if left.unlisted is not None and current != top:
                left.unlisted.append(f"{current}: {reason}")
                continue
            raise InputError(f"{current}: cannot list folder: {reason}", current) from None
        names = {os.path.basename(d) for d in subdirs}
        if "images" in names and names & set(ANNOTATION_FOLDERS):
            subdirs = [d for d in subdirs if os.path.basename(d) not in ANNOTATION_FOLDERS]
        stack.extend(reversed(subdirs))


def output_root(paths: Sequence[str | os.PathLike[str]]) -> Path:
    """The folder whose layout per-image outputs (masks, labels) mirror.

    The deepest folder holding every input: a folder argument itself, a file's
    folder, a pattern's folder (the part before its first wildcard). One folder
    of images gives its files' own names; ``plate1/ plate2/`` gives
    ``plate1/A01`` and ``plate2/A01``, so same-named files never share an output.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    folders = []
    for arg in paths:
        text = os.fspath(arg)
        _check_not_empty(text)
        p = Path(text)
        if p.is_dir():
            folders.append(p)
        elif any(ch in text for ch in _GLOB_CHARS) and not p.exists():
            cut = min(text.index(ch) for ch in _GLOB_CHARS if ch in text)
            folders.append(Path(text[:cut] + "x").parent)
        else:
            folders.append(p.parent)
    if not folders:
        return Path.cwd()
    return Path(os.path.commonpath([os.path.abspath(f) for f in folders]))


def _folder_in(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path | None:
    """The folder among ``path``'s ancestors that is ``root``: as spelt, or, when ``root``
    is spelt through a linked folder, the one that is the same folder (links below kept);
    None when ``path`` lies outside it."""
    full = Path(os.path.abspath(path))
    base = Path(os.path.abspath(root))
    if full.is_relative_to(base):
        return base
    real = os.path.realpath(base)
    return next((p for p in full.parents if os.path.realpath(p) == real), None)


def is_under(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in folder ``root`` (or a sub-folder), as :func:`output_stem`
    sees it (``root`` may be spelt through a linked folder)."""
    return _folder_in(path, root) is not None


def output_stem(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """``path`` relative to ``root`` without its suffix, '/'-separated ('plate1/A01').

    The name an image's outputs take (``<stem>_mask.png``, ...); a file outside
    ``root`` (or with no ``root``) keeps only its own name.
    """
    full = Path(os.path.abspath(path))
    base = _folder_in(full, full.parent if root is None else root)
    rel = full.relative_to(base) if base is not None else Path(full.name)
    return rel.with_name(rel.stem).as_posix()


def _arg_images(
    text: str,
    recursive: bool,
    exclude: frozenset[str] = frozenset(),
    left: _LeftOut = _LeftOut(),
) -> Iterator[Path]:
    """Stream the image files one command-line argument stands for (no validation); what
    is left out goes into ``left`` (:func:`_scan_folder`; a pattern's folders pass over
    no sub-folders, and files of unread formats it matches count as unread)."""
    p = Path(text)
    if p.is_dir():
        yield from _scan_folder(p, recursive, exclude, left)
    elif p.is_file():
        yield p
    else:
        parents: dict[str, str] = {}  # one realpath per folder, not per file
        for match in glob.iglob(text, recursive=recursive):
            m = Path(match)
            if exclude:
                parent = os.path.dirname(match) or "."
                if parent not in parents:
                    parents[parent] = os.path.realpath(parent)
                real = parents[parent]
                if any(real == e or real.startswith(e + os.sep) for e in exclude):
                    continue
                if m.is_dir() and os.path.realpath(match) in exclude:
                    continue
            if m.is_dir():
                yield from _scan_folder(
                    m, recursive, exclude, dataclasses.replace(left, passed=None)
                )
            elif _is_image_file(m):
                yield m
            elif left.unread is not None and m.suffix.lower() in UNREAD_IMAGE_SUFFIXES:
                left.unread.add(os.path.abspath(m))


#: Ends of the image files celltally writes per counted image (masks, labels, overlay).
OUTPUT_ENDINGS = ("_mask.png", "_mask_std.tif", "_labels.tif", "_overlay.png")


def _check_output_folders(texts: Sequence[str], skip: frozenset[str]) -> None:
    """InputError if an output folder inside a searched folder holds images of its own.

    Such a folder is not searched (its masks would be counted as images), so
    images of the user's there would silently go uncounted.
    """
    roots = [os.path.realpath(t) for t in texts if os.path.isdir(t)]
    for folder in sorted(skip):
        inside = any(folder.startswith(root + os.sep) for root in roots)
        if not inside or not os.path.isdir(folder):
            continue
        for path in _scan_folder(Path(folder), True):
            if not path.name.endswith(OUTPUT_ENDINGS):
                raise InputError(
                    f"{folder}: this run writes its masks or labels there, inside the "
                    f"folders it counts, but it holds images of its own (e.g. {path.name}), "
                    "which would not be counted; write the outputs to another folder",
                    folder,
                )


#: Sub-folders :func:`iter_images` looks into for images it did not search (``unsearched``).
UNSEARCHED_CHECKED = 20


def iter_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    recursive: bool = False,
    exclude: Sequence[str | os.PathLike[str]] = (),
    unread: collections.Counter[str] | None = None,
    unlisted: list[str] | None = None,
    unsearched: list[str] | None = None,
) -> Iterator[Path]:
    """Like :func:`list_images`, but streamed: bounded memory whatever the folder size.

    Every argument is checked before this returns (the same one-line
    :class:`InputError` as :func:`list_images`); the files are then produced lazily,
    folders read with :func:`os.scandir` in directory order (**not sorted**), so a
    folder of a million images is never held in memory. With several arguments, a file
    named twice (same absolute path) is produced once; the memory for that is a 16-byte
    digest per file.

    Parameters
    ----------
    paths : sequence of str or Path
        Image files, folders and glob patterns, as for :func:`list_images`.
    recursive : bool, default False
        Descend into sub-folders; in patterns, ``**`` matches any number of folders.
    exclude : sequence of str or Path
        Folders never searched (a run's own output folders, such as ``--save-masks``:
        its masks are images too), whether they exist yet or not.
    unread : collections.Counter, optional
        Filled, once the last file has been produced, with the suffixes of the files
        of formats celltally does not read (:data:`UNREAD_IMAGE_SUFFIXES`) that the
        folders and patterns held, each file once however often it was reached.
    unlisted : list, optional
        With ``recursive``: sub-folders that cannot be listed (e.g. no permission) are
        left out and appended here as "folder: reason" (a folder reached twice, twice);
        without it they raise :class:`InputError` when reached.
    unsearched : list, optional
        Without ``recursive``: filled, once the last file has been produced, with the
        sub-folders of folder arguments that hold images directly (not searched; the
        first :data:`UNSEARCHED_CHECKED` sub-folders are looked into, links and folders
        of celltally's own outputs left out).

    Returns
    -------
    iterator of Path
        The image files.

    Raises
    ------
    InputError
        Raised by this call (not later) for a path that does not exist, a folder without
        images, a pattern matching no images, a file with an unsupported suffix, or a
        folder argument that is one of ``exclude``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    texts = [os.fspath(arg) for arg in paths]
    skip = frozenset(os.path.realpath(e) for e in exclude)
    if recursive and skip:
        _check_output_folders(texts, skip)
    for text in texts:
        _check_not_empty(text)
        p = Path(text)
        if p.is_dir() and os.path.realpath(p) in skip:
            raise InputError(
                f"{text}: is also where this run writes its masks or labels, which would "
                "be counted as images on the next run; write them to another folder",
                text,
            )
        if p.is_dir():
            closed: list[str] | None = None if unlisted is None else []
            if next(_scan_folder(p, recursive, skip, _LeftOut(unlisted=closed)), None) is None:
                if closed:
                    raise InputError(f"{text}: no images found; cannot list {closed[0]}", text)
                raise _empty_folder(p, text, recursive)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                shown = p.suffix or "(none)"
                raise InputError(
                    f"{text}: unsupported file type '{shown}'; {_SUPPORTED_TEXT}", text
                )
        elif any(ch in text for ch in _GLOB_CHARS):
            if next(iter(glob.iglob(text, recursive=recursive)), None) is None:
                raise _no_match(text, recursive)
            if next(_arg_images(text, recursive, skip), None) is None:
                raise InputError(f"pattern '{text}' matches no TIFF/PNG/JPEG images", text)
        else:
            raise InputError(f"no such file or folder: {text}", text)

    def generate() -> Iterator[Path]:
        # several arguments, or a pattern (a folder and a link to it may both match),
        # can reach a file twice; one folder lists each file once (its sub-folders by inode)
        patterns = any(not Path(t).exists() for t in texts)
        seen: set[bytes] | None = set() if len(texts) > 1 or patterns else None
        left = _LeftOut(
            unread=None if unread is None else set(),
            unlisted=unlisted,
            passed=None if unsearched is None or recursive else [],
        )
        for text in texts:
            for path in _arg_images(text, recursive, skip, left):
                if seen is not None:
                    key = hashlib.blake2b(os.fsencode(file_identity(path)), digest_size=16).digest()
                    if key in seen:
                        continue
                    seen.add(key)
                yield path
        if unread is not None and left.unread:
            unread.update(os.path.splitext(p)[1].lower() for p in left.unread)
        if unsearched is not None and left.passed:
            for sub in list(dict.fromkeys(left.passed))[:UNSEARCHED_CHECKED]:
                if os.path.basename(sub) in ANNOTATION_FOLDERS:  # a training layout's
                    continue
                try:  # its own images only: one listing each, however deep it goes;
                    # an earlier run's masks or labels are not images to count
                    own = itertools.islice(_scan_folder(Path(sub), False, skip), 1000)
                    if any(not f.name.endswith(OUTPUT_ENDINGS) for f in own):
                        unsearched.append(sub)
                except InputError:  # cannot be listed: not said here
                    continue

    return generate()


def _check_not_empty(text: str) -> None:
    """InputError for an empty path argument: ``Path("")`` is the working folder."""
    if not text.strip():  # e.g. "$DIR" with DIR unset
        raise InputError("an empty path was given (an unset variable?); name a file or folder")


def file_identity(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute with its folders' links resolved, but not a link of its own.

    How celltally tells whether two paths are the same image, within a run and
    on resume: ``plate/a.tif``, ``./plate/a.tif``, an absolute path and a path
    through a linked folder are one file; a file linked under another name is
    another (it may be meant as another image, e.g. a copy to count again).
    """
    # not os.path.abspath: it folds "link/../a.tif" by text, before the link is followed
    full = os.path.join(os.getcwd(), os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))


def _mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind in "iu":
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError("integer masks must contain only 0 and 1; pass floats in [0, 1]")
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError("mask contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"float mask values must lie in [0, 1], got [{lo:g}, {hi:g}]")
        scaled = np.rint(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0)
        return scaled.astype(np.uint8)
    raise ValueError(f"unsupported mask dtype {arr.dtype}")


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> Path:
    """Write a probability or binary mask as an 8-bit PNG or TIFF.

    Parameters
    ----------
    path : str or Path
        Output file; ``.png`` writes PNG, ``.tif``/``.tiff`` writes TIFF. Parent folders
        are created.
    mask : numpy.ndarray
        2-D float array in [0, 1], boolean array, or integer array of 0/1. Values are
        scaled to 0..255 and rounded. Not modified.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        For an unsupported suffix, a non-2-D mask, or values outside [0, 1].
    """
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in _PNG_SUFFIXES + _TIFF_SUFFIXES:
        raise ValueError(f"{out}: masks are written as .png or .tif, not '{out.suffix}'")
    data = _mask_to_uint8(mask)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix in _PNG_SUFFIXES:
        from PIL import Image

        Image.fromarray(data).save(out)
    else:
        import tifffile

        tifffile.imwrite(out, data, compression="zlib")
    return out


def write_float_image(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write an array as a zlib-compressed float32 TIFF (e.g. an uncertainty map).

    Parameters
    ----------
    path : str or Path
        Output ``.tif``/``.tiff`` file. Parent folders are created.
    array : numpy.ndarray
        Non-empty array of at least 2 dimensions; converted to float32 (a copy).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        For a non-TIFF suffix or an array with fewer than 2 dimensions or no elements.
    """
    out = Path(path)
    if out.suffix.lower() not in _TIFF_SUFFIXES:
        raise ValueError(f"{out}: float images are written as .tif, not '{out.suffix}'")
    data = np.asarray(array)
    if data.ndim < 2 or data.size == 0:
        raise ValueError(f"expected a non-empty array of 2 or more dimensions, got {data.shape}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    import tifffile

    tifffile.imwrite(out, data, compression="zlib")
    return out


_IMAGE_COLUMNS = ("image", "file", "filename")


def _sniff_delimiter(header: str) -> str:
    for delim in (",", "\t", ";"):
        if delim in header:
            return delim
    return ","


def read_counts_csv(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read ground-truth counts from a CSV file.

    Parameters
    ----------
    path : str or Path
        CSV file with a header row containing an image column (``image``, ``file`` or
        ``filename``, case-insensitive) and a ``count`` column. Comma, tab or semicolon
        delimited; blank lines are skipped.

    Returns
    -------
    dict of str to float
        ``{image name: count}`` in file order (names stripped of surrounding spaces).

    Raises
    ------
    InputError
        If the file is missing or empty, a column is missing, an image name is empty or
        repeated, or a count is missing, non-numeric, NaN/infinite or negative. Messages
        name the file and, for row problems, the line number.
    """
    p = Path(path)
    name = os.fspath(path)
    if not p.is_file():
        problem = "is a folder, not a CSV file" if p.is_dir() else "file not found"
        raise InputError(f"{name}: {problem}", name)
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        raise InputError(
            f"{name}: is not UTF-8 text (save it as CSV UTF-8, e.g. Excel's 'CSV UTF-8')", name
        ) from None
    except OSError as exc:
        raise InputError(f"{name}: cannot be read: {_short_reason(exc)}", name) from None
    lines = text.splitlines(keepends=True)
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise InputError(f"{name}: file is empty", name)
    reader = csv.reader(lines, delimiter=_sniff_delimiter(first))
    header: list[str] | None = None
    image_col = count_col = -1
    counts: dict[str, float] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            image_col = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), -1)
            count_col = header.index("count") if "count" in header else -1
            found = ", ".join(h for h in header if h) or "none"
            if image_col < 0:
                raise InputError(
                    f"{name}: missing an 'image' (or 'file'/'filename') column "
                    f"(found columns: {found})",
                    name,
                )
            if count_col < 0:
                raise InputError(f"{name}: missing a 'count' column (found columns: {found})", name)
            continue
        where = f"{name}, line {line}"
        image = row[image_col].strip() if image_col < len(row) else ""
        raw = row[count_col].strip() if count_col < len(row) else ""
        if not image:
            raise InputError(f"{where}: missing image name", name)
        if not raw:
            raise InputError(f"{where}: missing count for '{image}'", name)
        try:
            value = float(raw)
        except ValueError:
            raise InputError(f"{where}: count '{raw}' is not a number", name) from None
        if math.isnan(value) or math.isinf(value):
            raise InputError(f"{where}: count '{raw}' is not a finite number", name)
        if value < 0:
            raise InputError(f"{where}: count {raw} is negative", name)
        listed, image = image, os.path.normpath(image)  # ./a.tif and a.tif: one image
        if image in counts:
            raise InputError(
                f"{where}: duplicate image '{listed}' (first on line {first_line[image]})", name
            )
        counts[image] = value
        first_line[image] = line
    return counts


def counts_csv(data: str | os.PathLike[str]) -> Path:
    """A folder's ``counts.csv``: beside ``images/``, or else inside it (either is taken)."""
    data = Path(data)
    beside = data / "counts.csv"
    inside = images_folder(data) / "counts.csv"
    return inside if not beside.exists() and inside.exists() else beside


def images_folder(data: str | os.PathLike[str]) -> Path:
    """``data/images`` when there is one (a folder laid out for training), else ``data``."""
    data = Path(data)
    return data / "images" if (data / "images").is_dir() else data


def colour_labels(colour: np.ndarray) -> np.ndarray:
    """A colour-coded instance label image ``(Y, X, 3)`` -> integer labels (0 = black).

    Each object is a 4-connected region of one colour (BBBC039's masks, and most
    annotation tools' exports, colour objects; a colour may be reused for objects
    that do not touch).
    """
    from scipy import ndimage as ndi

    code = (
        colour[..., 0].astype(np.int64) << 16
        | colour[..., 1].astype(np.int64) << 8
        | colour[..., 2].astype(np.int64)
    )
    labels = np.zeros(code.shape, dtype=np.int64)
    four = ndi.generate_binary_structure(2, 1)
    found = 0  # labels given so far
    for value in np.unique(code[code > 0]):
        lab, n = ndi.label(code == value, structure=four)
        labels[lab > 0] = lab[lab > 0] + found
        found += n
    return labels


def read_mask(path: str | os.PathLike[str], *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label or binary mask image (PNG/TIFF) as a 2-D integer array.

    Parameters
    ----------
    path : str or Path
        Mask file, PNG or TIFF (a JPEG's lossy compression blurs a mask's edges and
        changes label values). An 8-bit colour file whose channels differ is a
        colour-coded instance label image (:func:`colour_labels`).
    shape : tuple of int, optional
        Expected ``(height, width)`` (that of the image the mask belongs to).

    Returns
    -------
    numpy.ndarray
        2-D int64 array. A binary mask stored as 0/max of an unsigned dtype (e.g. 0/255
        in 8-bit) becomes 0/1; other values (labels) are kept.

    Raises
    ------
    ImageReadError
        If the file is a JPEG, cannot be read as a 2-D image, has colour (other than an
        8-bit colour label image), non-integer, negative or non-finite values, or is a
        soft (blurred or anti-aliased) binary mask: several values, most of which are
        only thin bands along other values' edges (:func:`_soft_mask_problem`).
    InputError
        If ``shape`` is given and differs from the mask's shape.
    """
    out = _mask_values(path)
    if shape is not None:
        check_mask_shape(path, mask_shape=out.shape, image_shape=shape)
    return out


def check_mask_shape(
    path: str | os.PathLike[str],
    *,
    mask_shape: tuple[int, ...],
    image_shape: tuple[int, ...],
) -> None:
    """Raise :class:`InputError` naming ``path`` if a mask's (h, w) is not its image's."""
    mask_hw = (int(mask_shape[0]), int(mask_shape[1]))
    image_hw = (int(image_shape[0]), int(image_shape[1]))
    if mask_hw != image_hw:
        raise InputError(
            f"{os.fspath(path)}: mask is {mask_hw[1]}x{mask_hw[0]} "
            f"but its image is {image_hw[1]}x{image_hw[0]}",
            path,
        )


def _mask_values(path: str | os.PathLike[str]) -> np.ndarray:
    """:func:`read_mask`'s labels (int64) before the shape check."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        raise ImageReadError(
            path,
            "masks and label images cannot be JPEG (its lossy compression blurs edges "
            "and changes label values); save them as PNG or TIFF",
        )
    arr, is_tiff = _load_raw(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8:
        colour = arr[..., :3]
        if not (
            np.array_equal(colour[..., 0], colour[..., 1])
            and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            # no soft-mask check: each colour_labels object is one piece, never a ring
            return colour_labels(colour)
    mask = _to_2d(arr, path, is_tiff=is_tiff, channel=None, colour_mean=False)
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)):
            raise ImageReadError(path, "contains NaN or infinite values")
        if not np.array_equal(mask, np.round(mask)):
            raise ImageReadError(
                path, "mask has non-integer values; expected a label or binary mask"
            )
    if mask.dtype.kind in "if" and mask.min() < 0:
        raise ImageReadError(path, "mask has negative values")
    if mask.dtype.kind == "u":
        top = np.iinfo(mask.dtype).max
        if top > 1:
            values = np.unique(mask)
            if values[-1] == top and np.all((values == 0) | (values == top)):
                mask = mask == top
    return _not_soft(mask.astype(np.int64), path)


def _not_soft(labels: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """``labels``, unless :func:`_soft_mask_problem` finds a soft mask (ImageReadError)."""
    if problem := _soft_mask_problem(labels):
        raise ImageReadError(path, problem)
    return labels


def _soft_mask_problem(labels: np.ndarray) -> str | None:
    """Why ``labels`` is a soft (blurred, anti-aliased) binary mask, not instance labels.

    Read as labels, a soft mask's grey levels are "objects" that are thin bands
    (or single pixels) on a ramp from the background up to the bright level:
    no pixel of theirs has all 4 neighbours of their own value (an interior),
    and they touch both a lower value (or 0) and a higher one. And each grey
    level is a ring around every cell, so a value is several separate pieces;
    an object of a label image is one (touching thin objects, 2 px rods, are
    bands too, but one piece each). A soft mask: at least half of its values
    are bands, and its values average 1.5 pieces or more (BBBC039's colour
    labels: at most 1 band in 132, one piece each; a blur of radius 0.5-3 of a
    0/255 mask of several cells: all but the brightest levels, in pieces).
    """
    from skimage.measure import label as pieces_of

    padded = np.pad(labels, 1)  # 0 beyond the border: an object there has no interior at it
    centre = padded[1:-1, 1:-1]
    around = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    ids = np.unique(centre[centre > 0])
    if ids.size < 2:
        return None
    inside = np.logical_and.reduce([n == centre for n in around]) & (centre > 0)
    lower = np.logical_or.reduce([n < centre for n in around])  # 0 is lower than any label
    higher = np.logical_or.reduce([n > centre for n in around]) & (centre > 0)
    on_ramp = np.intersect1d(np.unique(centre[lower]), np.unique(centre[higher]))
    bands = np.setdiff1d(on_ramp, np.unique(centre[inside])).size
    if 2 * bands < ids.size:
        return None
    # regions of one value, 4-connected (skimage labels equal values apart)
    if int(pieces_of(labels, background=0, connectivity=1).max()) < 1.5 * ids.size:
        return None
    return (
        f"looks like a soft (blurred or anti-aliased) binary mask, not a label image: "
        f"{bands} of its {ids.size} values are only thin bands between lower and higher "
        "values; save masks as 0/1 or 0/255 and label images as integer object ids "
        "(0 = background)"
    )
