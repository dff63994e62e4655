"""Streaming multipart upload reader with hard limits (never trusts client file names).

Each uploaded file is streamed into a numbered file (``0000.tif``, ``0001.png``...)
inside a folder the caller owns (a per-request temporary folder), so a client's
file name is only ever a display name. Limits are enforced while the body
streams in: a request with too many files, or a body larger than the total
limit, is rejected as soon as that is known; a single file over the per-file
limit stops being stored and is reported as that file's error.
"""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

import anyio
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from celltally.io import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["RequestRejected", "Upload", "UploadLimits", "receive_uploads", "sanitize_name"]

#: Longest upload name kept whole: a file system's (255), so a real name's metadata
#: (plate, well, site, stain at its end) is never cut off.
MAX_NAME_CHARS = 255
MAX_FIELD_BYTES = 1024
#: A 'files' part sent as a plain form field (no file name), e.g. curl -F files=x.tif.
FILES_WITHOUT_NAME = (
    "form field 'files' has no file name: send each image as a file (e.g. curl -F files=@image.tif)"
)
MAX_FIELDS = 16
#: Room for multipart headers and boundaries on top of the files themselves.
BODY_OVERHEAD_BYTES = 1 << 20


#: Seconds an upload may go without sending data before it is given up (408).
UPLOAD_IDLE_SECONDS = 60.0


class RequestRejected(Exception):
    """The whole request is unusable; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    """Upload limits of one request.

    Attributes
    ----------
    max_files : int
        Most files in one request.
    max_bytes : int
        Largest single file, in bytes.
    """

    max_files: int = 32
    max_bytes: int = 32 * 2**20

    def __post_init__(self) -> None:
        if self.max_files < 1:
            raise ValueError(f"max_files must be at least 1, got {self.max_files}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted: all files at their limit plus headers."""
        return self.max_files * self.max_bytes + BODY_OVERHEAD_BYTES

    @property
    def max_mb(self) -> float:
        """``max_bytes`` in MiB."""
        return self.max_bytes / 2**20


@dataclass
class Upload:
    """One uploaded file.

    Attributes
    ----------
    index : int
        Position in the request (0-based).
    name : str
        Sanitized display name (never used as a path).
    path : Path or None
        Where the bytes were stored; None when the file was not kept (an error).
    size : int
        Bytes received.
    status : int
        200 when usable, else the HTTP-style status of the problem
        (400 empty, 413 too large, 415 unsupported type).
    error : str or None
        One-line problem, naming the file.
    """

    index: int
    name: str
    path: Path | None = None
    size: int = 0
    status: int = 200
    error: str | None = None

    def fail(self, status: int, problem: str) -> None:
        """Mark this file unusable; its stored bytes (if any) are deleted."""
        self.status = status
        self.error = f"{self.name}: {problem}"
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def human_size(nbytes: int) -> str:
    """``'32 MB'``, ``'391 KB'``, ``'1000 bytes'`` (binary units)."""
    for unit, size in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{nbytes} bytes"


def _extended_filename(disposition: bytes) -> str | None:
    """The RFC 2231 ``filename*=UTF-8''...`` of a Content-Disposition, decoded; else None.

    RFC 7578 asks form clients for a plain ``filename``, but some HTTP libraries
    send only the extended form for non-ASCII names, which python-multipart drops.
    """
    if b"filename*" not in disposition.lower():
        return None
    from email.message import Message

    header = Message()
    header["content-disposition"] = disposition.decode("latin-1")
    return header.get_filename() or None


def sanitize_name(raw: str | bytes | None, index: int) -> str:
    """A safe display name for a client-supplied file name.

    ``%22`` becomes ``"`` (browsers escape it so), folders (``/`` or ``\\``),
    control and format characters are removed, the name is shortened to
    ``MAX_NAME_CHARS`` (keeping its suffix), and an empty result becomes
    ``upload-<n>``.

    Parameters
    ----------
    raw : str or bytes or None
        The file name as the client sent it.
    index : int
        Position of the file in the request (for the fallback name).

    Returns
    -------
    str
    """
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    # Browsers send '"' as %22 in multipart file names (the HTML standard's encoding)
    text = (raw or "").replace("%22", '"').replace("\\", "/").split("/")[-1]
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C").strip()
    if text in ("", ".", ".."):
        return f"upload-{index + 1}"
    if len(text) > MAX_NAME_CHARS:
        suffix = PurePosixPath(text).suffix[:10]
        text = text[: MAX_NAME_CHARS - len(suffix) - 3] + "..." + suffix
    return text


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


class _Reader:
    """python-multipart callbacks that store file parts under ``folder``."""

    def __init__(self, folder: Path, limits: UploadLimits) -> None:
        self.folder = folder
        self.limits = limits
        self.uploads: list[Upload] = []
        self.fields: dict[str, str] = {}
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._skip = False  # the current part is an empty file input (no file)
        self._current: Upload | None = None
        self._field_name: str | None = None
        self._field_data = bytearray()
        self._handle: BinaryIO | None = None

    # -- callbacks -------------------------------------------------------
    def on_part_begin(self) -> None:
        self._disposition = b""
        self._skip = False
        self._current = None
        self._field_name = None
        self._field_data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"filename" not in options and (extended := _extended_filename(self._disposition)):
            options[b"filename"] = extended.encode("utf-8")
        if b"name" not in options:
            raise RequestRejected(400, "malformed multipart body: a part has no field name")
        if b"filename" not in options:
            if len(self.fields) >= MAX_FIELDS:
                raise RequestRejected(400, f"too many form fields (limit {MAX_FIELDS})")
            self._field_name = options[b"name"].decode("utf-8", errors="replace")
            return
        if options[b"filename"] == b"":  # an HTML form's file input left empty: no file
            self._skip = True
            return
        index = len(self.uploads)
        if index >= self.limits.max_files:
            raise RequestRejected(
                413, f"too many files: at most {self.limits.max_files} per request"
            )
        upload = Upload(index=index, name=sanitize_name(options[b"filename"], index))
        self.uploads.append(upload)
        self._current = upload
        suffix = _suffix(upload.name)
        if suffix not in IMAGE_SUFFIXES:
            shown = suffix or "(none)"
            upload.fail(415, f"unsupported file type '{shown}'; use TIFF, PNG or JPEG")
            return
        # The stored name is ours: a number and a whitelisted suffix.
        upload.path = self.folder / f"{index:04d}{suffix}"
        self._handle = upload.path.open("xb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        if self._skip:
            return
        if self._current is None:
            if len(self._field_data) + size > MAX_FIELD_BYTES:
                if self._field_name == "files":  # e.g. curl -F 'files=<img.png'
                    raise RequestRejected(400, FILES_WITHOUT_NAME)
                raise RequestRejected(413, f"form field '{self._field_name}' is too long")
            self._field_data += data[start:end]
            return
        upload = self._current
        upload.size += size
        if self._handle is None:
            return  # an unusable file: count its bytes, drop them
        if upload.size > self.limits.max_bytes:
            self._close()
            upload.fail(
                413, f"file is larger than the limit of {human_size(self.limits.max_bytes)}"
            )
            return
        self._handle.write(data[start:end])

    def on_part_end(self) -> None:
        if self._skip:
            return
        if self._current is None:
            if self._field_name is not None:
                self.fields[self._field_name] = self._field_data.decode("utf-8", "replace")
            return
        self._close()
        upload = self._current
        if upload.error is None and upload.size == 0:
            upload.fail(400, "file is empty (0 bytes)")
        self._current = None

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }


async def receive_uploads(
    content_type: str | None,
    content_length: str | None,
    stream: AsyncIterator[bytes],
    folder: Path,
    limits: UploadLimits,
) -> tuple[list[Upload], dict[str, str]]:
    """Read a ``multipart/form-data`` body: files into ``folder``, small fields in memory.

    Parameters
    ----------
    content_type, content_length : str or None
        The request's headers.
    stream : async iterator of bytes
        The request body.
    folder : Path
        An existing, empty folder owned by the caller (it deletes it afterwards).
    limits : UploadLimits
        File count and size limits.

    Returns
    -------
    uploads : list of Upload
        Every file part, in order, each either stored or marked with its error.
    fields : dict of str to str
        The non-file form fields.

    Raises
    ------
    RequestRejected
        415 if the body is not multipart/form-data, 413 for too many files or a
        body over ``limits.max_body_bytes``, 400 for a malformed body.
    """
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise RequestRejected(415, f"expected a multipart/form-data upload, got '{shown}'")
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestRejected(400, "malformed multipart body: no boundary in Content-Type")
    limit = limits.max_body_bytes
    too_big = f"request body is larger than the limit of {human_size(limit)}"
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestRejected(400, "invalid Content-Length header") from None
        if declared > limit:
            raise RequestRejected(413, too_big)
    reader = _Reader(folder, limits)
    parser = MultipartParser(boundary, reader.callbacks())
    received = 0
    chunks = stream.__aiter__()
    try:
        while True:
            try:
                # a client that stops sending mid-body (and never closes) held its
                # request and temp folder until it went away, however long
                with anyio.fail_after(UPLOAD_IDLE_SECONDS):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise RequestRejected(
                    408, f"upload stalled: no data for {UPLOAD_IDLE_SECONDS:g} s"
                ) from None
            received += len(chunk)
            if received > limit:
                raise RequestRejected(413, too_big)
            parser.write(chunk)
        parser.finalize()
        if parser.state != MultipartState.END:  # the body stopped before its last boundary
            raise RequestRejected(400, "malformed multipart body: it ends before its last part")
    except RequestRejected:
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise RequestRejected(400, f"malformed multipart body: {exc}") from None
    finally:
        reader._close()
    return reader.uploads, reader.fields
