"""Resumable, exactly-once batch counting, in one process or on a Dask cluster.

A screen is 100,000+ images, so a run must stream (bounded memory whatever the
folder size), keep every finished row when it dies, and pick up where it
stopped when the same command is run again.

The mechanism, and why
----------------------
Results go straight to the CSV the user asked for, **append-only**: rows are
written a batch at a time with one ``write`` followed by ``flush`` and
``fsync``. Because nothing is ever rewritten, the only damage a kill (SIGKILL,
OOM, a node lost mid-write) can do is one *torn* record at the very end of the
file. On restart the file is read back record by record; a record is complete
when it ends with its newline and has every column. A torn tail is truncated
(its images are counted again), every complete row is kept, and the images
named in them are skipped: each image ends up in exactly one row.

A SQLite (or Parquet) journal would give the same guarantee, but the results
would then live twice, the CSV would only exist once a run had finished (a
killed run would show the user nothing) and there would be an export step to
get wrong. With a single writer, an append-only CSV with an end-of-record check
is enough, and it is what users and their tools read anyway. The single writer
is enforced with an exclusive ``flock`` on the CSV, so a second run on the same
``--out`` fails at once instead of interleaving rows.

Files written for ``--out results.csv``:

``results.csv``
    One row per counted image (:data:`COUNT_COLUMNS`), in processing order.
``results.errors.csv``
    ``file,error`` for the images that could not be read in the latest run.
    They are retried on every rerun, so this file describes the latest run only
    (it is removed when a run has no errors).
``results.manifest.json``
    The model (name, folder, sha256 of its config and its weights), the
    celltally version, the settings (level, batch size, ...) and one entry per
    run with its start and finish times and totals. Resuming with another model,
    level or counter option (calibration, channel, normalization, scale, tile)
    is refused: the rows would mix two settings. A results CSV that holds no
    counted row yet (a run stopped before its first image, e.g. on a bad
    option) starts afresh with the new settings.

Memory is bounded: files are listed with :func:`celltally.io.iter_images`
(``os.scandir``, streamed), read and prepared a bounded window ahead of the
network, and each row is written and forgotten. What grows with the number of
images is the set of already-counted files when resuming, 16-byte digests
of each file's name as written and its real path (about 10 MB per 100,000
images run from one working folder).

With ``dask=...`` the same job runs on a dask.distributed cluster: files are
sharded by path into chunks, each worker loads the model once (a cached
per-process counter) and returns the chunk's rows, and the client appends them
to the same resumable CSV as each chunk finishes, keeping a bounded number of
chunks in flight.
"""

from __future__ import annotations

import bisect
import codecs
import collections
import contextlib
import csv
import hashlib
import importlib.util
import io as _stdio
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from celltally import __version__, io
from celltally.model_folder import is_shipped, resolve_model

if TYPE_CHECKING:  # the counter imports PyTorch: only runs that count need it
    from celltally.counter import CellCounter, CountResult

__all__ = [
    "COUNT_COLUMNS",
    "BatchSummary",
    "count_chunk",
    "model_identity",
    "output_paths",
    "read_results",
    "result_row",
    "run_batch",
]

#: Columns of the results CSV, in order. ``warning`` is filled from
#: ``CountResult.warning`` where the counter sets one (out-of-distribution images).
COUNT_COLUMNS: list[str] = [
    "file",
    "count",
    "std",
    "low",
    "high",
    "level",
    "model",
    "plate",
    "well",
    "site",
    "blur",
    "stain",
    "true_count",
    "error",
    "warning",
]

ERROR_COLUMNS = ["file", "error"]
MANIFEST_FORMAT = "celltally-count-manifest/1"
#: Set in each local Dask worker's environment before it starts (see ``_connect``);
#: workers started by hand want ``MALLOC_MMAP_THRESHOLD_=33554432`` too (docs/cluster.md).
MMAP_THRESHOLD_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = 32 * 2**20

#: How long ``--dask ADDRESS`` tries to reach the scheduler.
CONNECT_TIMEOUT = "30s"
#: How many error messages a summary keeps in memory (all of them are in the errors file).
MAX_LISTED_ERRORS = 100
_ENCODING = "utf-8"
_ENC_ERRORS = "surrogateescape"  # file names that are not valid UTF-8 round-trip exactly

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


# -- rows --------------------------------------------------------------------


def result_row(path: str | os.PathLike[str], result: CountResult, *, model_name: str) -> dict:
    """One results-CSV row (all values as strings) for a counted image.

    Parameters
    ----------
    path : str or Path
        The image file, written as given into the ``file`` column.
    result : CountResult
        Its count.
    model_name : str
        The model's name, for the ``model`` column.

    Returns
    -------
    dict of str to str
        Keys are :data:`COUNT_COLUMNS`; missing metadata are empty strings.
    """
    meta = result.metadata or {}
    true = meta.get("count")

    def text(value: Any) -> str:
        return "" if value is None else str(value)

    return {
        "file": os.fspath(path),
        "count": f"{result.count:.2f}",
        "std": f"{result.std:.3f}",
        "low": f"{result.low:.2f}",
        "high": f"{result.high:.2f}",
        "level": repr(float(result.level)),  # 0.9999999 must not read as 1
        "model": model_name,
        **{k: text(meta.get(k)) for k in ("plate", "well", "site", "blur", "stain")},
        "true_count": text(true),
        "error": "" if true is None else f"{result.count - float(true):.2f}",
        "warning": text(getattr(result, "warning", None)),
    }


def describe_options(options: Mapping[str, Any]) -> str:
    """Counter options as the command-line flags that set them ('no counter options' if none)."""
    if not options:
        return "no counter options"
    parts = []
    for key, value in sorted(options.items()):
        flag = "--" + key.replace("_", "-")
        if key == "norm" and isinstance(value, Mapping):
            method = value.get("method")
            text = (
                "--no-norm"
                if method == "none"
                else f"normalization {method} {value.get('low')}-{value.get('high')}"
            )
            if "background" in value:  # given: 'none' may undo the model's own
                text += f", --background {value['background']}"
            parts.append(text)
        elif value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {value}")
    return ", ".join(parts)


def _digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode(_ENCODING, _ENC_ERRORS), digest_size=16).digest()


def _keys(name: str, bases: Iterable[str] = (), *, recorded: bool = False) -> set[bytes]:
    """How a counted file is recognised on resume: its path, and maybe its name as written.

    The path (a relative name taken from each of ``bases``, the working folders
    the results were written from; default this one; folder links resolved)
    matches the same file however it is spelt (``plate/a.tif``, ``./plate/a.tif``,
    an absolute path, a linked folder, another working folder). A file linked
    under another name is another file, as in a run that is not resumed. The name
    as written matches a relative name rerun from elsewhere, e.g. the same
    project mounted at another place on another node; for a ``recorded`` row
    only when no file is left where the row was written, else an image of the
    same relative name in another folder would be taken for it.
    """
    places = [os.path.join(base, name) for base in (list(bases) or [os.getcwd()])]
    keys = {_digest(io.file_identity(place)) for place in places}
    if not recorded or not any(os.path.lexists(place) for place in places):
        keys.add(_digest(name))
    return keys


def _csv_text(rows: Iterable[Sequence[str]]) -> bytes:
    buffer = _stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue().encode(_ENCODING, _ENC_ERRORS)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# -- output files --------------------------------------------------------------


@dataclass(frozen=True)
class OutputPaths:
    """The files one run writes: results CSV, errors CSV and manifest."""

    results: Path
    errors: Path
    manifest: Path


def output_paths(out: str | os.PathLike[str]) -> OutputPaths:
    """The errors file and manifest that go with results CSV ``out``.

    ``results.csv`` -> ``results.errors.csv`` and ``results.manifest.json``.
    """
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return OutputPaths(
        results=out,
        errors=out.with_name(f"{stem}.errors.csv"),
        manifest=out.with_name(f"{stem}.manifest.json"),
    )


def run_files(out: str | os.PathLike[str]) -> set[Path]:
    """The resolved paths of the files a run writing ``out`` owns (results, errors, manifest)."""
    named = output_paths(out)
    return {p.resolve() for p in (named.results, named.errors, named.manifest)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _naming(path), open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. ``path`` is a folder: no stray temporary file
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Name, folder and sha256 of the config and weights of a model folder.

    Two runs used the same model exactly when both hashes agree (the folder may
    have moved); ``files_sha256`` covers the folder's other weights (ensemble
    members, the out-of-distribution reference), which set ``--epistemic``
    counts and the ``warning`` column.
    """
    from celltally.model_folder import read_model_config

    folder = Path(folder)
    config_path = folder / "config.json"
    config = read_model_config(folder)
    if not (weights := folder / "model.safetensors").is_file():
        raise io.InputError(f"{weights}: missing (a model folder holds its weights here)")
    return {
        "name": str(config.get("name", folder.name)),
        "folder": str(folder.resolve()),
        "config_sha256": _sha256(config_path),
        "weights_sha256": _sha256(folder / "model.safetensors"),
        "files_sha256": _files_sha256(folder),
    }


def _files_sha256(folder: Path) -> str:
    """One sha256 of the names and contents of a model folder's ensemble members and
    out-of-distribution reference (other files, e.g. a backup, do not count)."""
    from celltally.counter import OOD_REFERENCE_FILE
    from celltally.model_folder import ensemble_files

    digest = hashlib.sha256()
    for path in [*ensemble_files(folder), folder / OOD_REFERENCE_FILE]:
        if path.is_file():
            digest.update(f"{path.name}\0{_sha256(path)}\0".encode())
    return digest.hexdigest()


@dataclass
class _Recovered:
    done: set[bytes] = field(default_factory=set)
    rows: int = 0
    torn_bytes: int = 0


def _scan_results(
    path: Path,
    columns: Sequence[str],
    size: int,
    *,
    bases: Sequence[str] | Callable[[int], Sequence[str]] = (),
    on_row: Callable[[str, Sequence[str]], None] | None = None,
) -> tuple[_Recovered, int, bool]:
    """Read a results CSV back; return what it holds, where its last complete record ends,
    and whether it has a complete header. Each file is recognised by its name and its
    real path from ``bases`` (the working folders the rows were written from; :func:`_keys`),
    or ``bases(i)`` for the i-th row (the folder of the run that wrote it). ``on_row``
    receives each complete row's file name and its bases.

    Raises
    ------
    InputError
        If the header names other columns, or a malformed record is followed by more
        data (damage that is not a torn tail).
    """
    state = {"offset": 0, "newline": True}
    found = _Recovered()

    def lines(handle) -> Iterator[str]:
        for raw in handle:
            state["offset"] += len(raw)
            state["newline"] = raw.endswith(b"\n")
            yield raw.decode(_ENCODING, _ENC_ERRORS)

    good_end = 0
    header_ok = False
    with open(path, "rb") as handle:
        reader = csv.reader(lines(handle), strict=True)
        line = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error:
                record = None
            line += 1
            at_end = state["offset"] >= size
            complete = record is not None and state["newline"]
            if not header_ok:
                if not complete:
                    break  # torn header: nothing was counted yet
                if record and record[0].startswith("\ufeff"):  # re-saved by Excel: a BOM
                    record = [record[0][1:], *record[1:]]
                if record != list(columns):
                    shown = ",".join(record or [])[:200]
                    raise io.InputError(
                        f"{path}: has columns '{shown}', not those this version writes; "
                        "pick a new --out or pass --overwrite",
                        path,
                    )
                header_ok = True
                good_end = state["offset"]
                continue
            if complete and not record:
                good_end = state["offset"]  # a blank line: harmless
                continue
            if complete and record is not None and len(record) == len(columns) and record[0]:
                where = bases(found.rows) if callable(bases) else bases
                found.done.update(_keys(record[0], where, recorded=True))
                if on_row is not None:
                    on_row(record[0], where)
                found.rows += 1
                good_end = state["offset"]
                continue
            if at_end:
                break  # the torn tail of an interrupted write
            raise io.InputError(
                f"{path}, record {line}: malformed row in the middle of the file; "
                "pick a new --out or pass --overwrite",
                path,
            )
    found.torn_bytes = size - good_end
    return found, good_end, header_ok


def read_results(out: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The complete rows of a results CSV (a torn last record, if any, is left out).

    A last line without a line end is a row being written, or one a killed
    run tore (its numbers may be cut short), so it is left out, as a resumed
    run leaves it out and counts the image again (:func:`torn_tail` says
    whether there is one). A byte-order mark (a spreadsheet's UTF-8) is skipped.

    Parameters
    ----------
    out : str or Path
        A CSV written by :func:`run_batch`.

    Returns
    -------
    list of dict
        One dict per complete row, keyed by the header's column names.

    Raises
    ------
    InputError
        For a row that repeats the header (two results CSVs joined end to end).
    """
    path = Path(out)
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    end = data.rfind(b"\n") + 1
    text = data[:end].decode(_ENCODING, _ENC_ERRORS)
    reader = csv.DictReader(_stdio.StringIO(text, newline=""))
    rows = []
    for row in reader:
        # (a joined file's header may open with its byte-order mark)
        if reader.fieldnames and all(
            (row.get(k) or "").removeprefix("\ufeff") == k for k in reader.fieldnames
        ):
            raise io.InputError(
                f"{path}: line {reader.line_num} repeats the header (results CSVs joined "
                "with cat?): keep the first header only, or total each file apart",
                path,
            )
        rows.append(row)
    return rows


def _last_cwd(manifest: Path) -> str | None:
    """The folder the last run recorded in ``manifest`` worked in; None if unknown."""
    try:
        runs = json.loads(manifest.read_text())["runs"]
        return str(runs[-1]["cwd"]) if runs and runs[-1].get("cwd") else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def absolute_files(
    out: str | os.PathLike[str], names: Sequence[str], *, last: bool = False
) -> list[str] | None:
    """``names`` (the ``file`` column of results CSV ``out``, in row order) made absolute.

    Each row's relative name is joined to the folder the run that wrote it
    worked in (the manifest records it); with ``last``, to the last run's (for
    the errors CSV, which the last run rewrote; joined as the file system reads
    it, ``link/../a.tif`` not folded by text). None without a readable
    manifest (a CSV not written by ``count``), or with one of a version that
    did not record which run wrote which row and whose runs worked in several
    folders: the names say no more than they do as written.
    """
    try:
        manifest = json.loads(output_paths(Path(out)).manifest.read_text())
        runs = manifest["runs"]
        bases = _row_bases(manifest)
        final = (runs[-1].get("cwd") if runs else None) or os.getcwd()
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    if names and not last and len(bases(0)) > 1:  # an older manifest: which run wrote a
        return None  # row is not known (the last run's folder is)
    return [
        (os.path.join(final, name) if last else os.path.abspath(os.path.join(bases(i)[0], name)))
        if name
        else name
        for i, name in enumerate(names)
    ]


def with_absolute_files(
    out: str | os.PathLike[str], rows: Sequence[Mapping[str, str]]
) -> list[dict[str, str]]:
    """Copies of results rows whose ``file`` is made absolute by :func:`absolute_files`
    (as written where the manifest cannot say)."""
    names = [str(r.get("file") or "") for r in rows]
    where = absolute_files(out, names) or names
    return [{**r, "file": f} for r, f in zip(rows, where, strict=True)]


def torn_tail(out: str | os.PathLike[str]) -> bool:
    """Whether a results CSV ends in a line without a line end (:func:`read_results` drops it)."""
    with open(out, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError of writing to an open file (disk full, file too large) names ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None


class _ResultsFile:
    """The append-only results CSV, held open and locked for one run."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        self.fd: int | None = None

    def open(self) -> int:
        """Open (creating if needed) and lock; return the current size in bytes."""
        if self.path.is_dir():
            raise io.InputError(f"{self.path}: is a folder; --out must be a CSV file", self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise io.InputError(f"{self.path}: cannot open for writing: {exc.strerror}") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX: no lock
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.close()
                raise io.InputError(
                    f"{self.path}: another celltally run is writing this file; "
                    "wait for it to finish or pick a new --out",
                    self.path,
                ) from None
        return os.fstat(self.fd).st_size

    def size(self) -> int:
        assert self.fd is not None
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        assert self.fd is not None
        with _naming(self.path):
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)

    def write_header(self) -> None:
        self.append_rows([self.columns])

    def append_rows(self, rows: Sequence[Sequence[str]]) -> None:
        """Append ``rows`` with one write, then flush them to disk (fsync).

        A write that fails part-way (disk full, file too large) is cut back to
        where it began, so other readers of the CSV never meet a torn row.
        """
        if not rows:
            return
        assert self.fd is not None
        with _naming(self.path):
            start = os.lseek(self.fd, 0, os.SEEK_END)  # appends begin at the end
            try:
                _write_all(self.fd, _csv_text(rows))
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, start)
                raise
            os.fsync(self.fd)

    def append(self, rows: Sequence[dict]) -> None:
        self.append_rows([[row.get(c, "") for c in self.columns] for row in rows])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also releases the lock
            self.fd = None


class _ErrorLog:
    """The errors CSV: this run's failures, and an earlier run's not tried again yet.

    A resumed run starts from the errors file it finds (:meth:`carry`): each
    entry stays listed until this run has tried its file again, so a run
    stopped part-way never loses the record of images that failed before it
    (``celltally wells`` counts them as missing from their wells). When the run
    finishes (:meth:`finish`), entries of files it never tried are dropped only
    if the file is gone: one still there is still missing from the results (a
    later run over other inputs dropped them all, and ``wells`` then totalled
    such a well without saying it lacked a site). The file is rewritten whole
    and atomically on each change; none when nothing failed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0  # this run's failures
        self.listed: list[str] = []
        self.rows: list[tuple[str, str]] = []
        self.carried: dict[str, str] = {}
        self._where: dict[str, str] = {}  # each carried name's file (io.file_identity)

    def carry(self, results: Path) -> None:
        """Keep the failures the errors file lists (a resumed run).

        Its names are relative to the folder the last run worked in (``results``'
        manifest says which, before this run is added to it): an entry of a run
        that worked elsewhere is kept by its absolute path, so this run's errors
        file, relative to this run's folder, still names the same file.
        """
        if not self.path.is_file():
            return
        # utf-8-sig: a file re-saved by a spreadsheet starts with a byte-order mark
        with self.path.open(newline="", encoding="utf-8-sig", errors=_ENC_ERRORS) as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("file")]
        there = _last_cwd(output_paths(results).manifest) or os.getcwd()
        moved = False
        for row in rows:
            name = row["file"]
            # joined, not folded: "link/../a.tif" is resolved as the file system does
            full = name if os.path.isabs(name) else os.path.join(there, name)
            here = os.path.isabs(name) or _same_folder(there, os.getcwd())
            if not here and not os.path.isdir(there) and os.path.lexists(name):
                # that folder is gone (a moved project, another mount): read from here,
                # as results rows are (_keys)
                here, full = True, name
            moved |= not here
            key = name if here else full
            self.carried[key] = row.get("error") or ""
            self._where[key] = io.file_identity(full)
        if moved:  # the file is this run's now: its names must read from here
            self._write()

    def add(self, items: Sequence[tuple[str, str]]) -> None:
        """Record failures (``(file, message)``) of this run."""
        self.record(tried=[name for name, _ in items], failed=items)

    def record(self, *, tried: Iterable[str], failed: Sequence[tuple[str, str]]) -> None:
        """Files this run has tried (counted or not), and the failures among them.

        An earlier failure is the same file however either run spelt it (relative,
        absolute, through a linked folder: :func:`celltally.io.file_identity`).
        """
        dropped: list[str] = []
        if self.carried:
            where = {io.file_identity(name) for name in tried}
            dropped = [name for name in self.carried if self._where[name] in where]
            for name in dropped:
                del self.carried[name]
        for name, message in failed:
            self.rows.append((name, message))
            self.count += 1
            if len(self.listed) < MAX_LISTED_ERRORS:
                self.listed.append(message)
        if dropped or failed:
            self._write()

    def finish(self) -> int:
        """The run is complete: earlier failures of files now gone are dropped.

        Returns how many earlier failures stay listed (files not tried by this
        run that are still there).
        """
        gone = [name for name in self.carried if not os.path.lexists(self._where[name])]
        for name in gone:
            del self.carried[name]
        if gone:
            self._write()
        return len(self.carried)

    def _write(self) -> None:
        rows = [*self.carried.items(), *self.rows]
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with _naming(self.path):
                with open(tmp, "w", encoding=_ENCODING, errors=_ENC_ERRORS, newline="") as out:
                    writer = csv.writer(out, lineterminator="\n")
                    writer.writerow(ERROR_COLUMNS)
                    writer.writerows(rows)
                os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


# -- the run -----------------------------------------------------------------


@dataclass
class BatchSummary:
    """What a :func:`run_batch` call did.

    Attributes
    ----------
    out, errors_file, manifest : Path
        The results CSV, the errors CSV (``None`` if no image failed) and the manifest.
    counted : int
        Images counted (rows appended) by this run.
    skipped : int
        Images skipped because the results already held them.
    masks_only : int
        Of those, images counted again only to write a missing mask (no new row).
    failed : int
        Images that could not be read (all in ``errors_file``).
    earlier_failed : int
        Images an earlier run could not read that this run did not try again
        (not among its inputs) and that are still there: also in ``errors_file``.
    errors : list of str
        One-line messages of the first :data:`MAX_LISTED_ERRORS` failures.
    seconds : float
        Wall time of the run.
    output_root : Path or None
        The folder the per-image outputs' names mirror (with ``save_masks``).
    unread : dict of str to int
        Files left out because celltally does not read their format, by suffix.
    unlisted : list of str
        Sub-folders that could not be listed (``recursive``), as "folder: reason": their
        images were not counted.
    unsearched : list of str
        Without ``recursive``: sub-folders of the folders given that hold images, not
        searched (:func:`celltally.io.iter_images`).
    """

    out: Path
    errors_file: Path | None
    manifest: Path
    counted: int = 0
    skipped: int = 0
    masks_only: int = 0
    failed: int = 0
    earlier_failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    output_root: Path | None = None
    unread: dict[str, int] = field(default_factory=dict)
    unlisted: list[str] = field(default_factory=list)
    unsearched: list[str] = field(default_factory=list)


def _mismatch(manifest: dict, identity: dict, level: float, options: dict, out: Path) -> str | None:
    old = manifest.get("model", {})
    old_level = manifest.get("settings", {}).get("level")
    old_options = manifest.get("settings", {}).get("counter_options", {})
    if old_options != options:
        return (
            f"{out} holds counts made with {describe_options(old_options)}; this run uses "
            f"{describe_options(options)}. Pick a new --out, or pass --overwrite to start it "
            "again"
        )
    same_model = (old.get("config_sha256"), old.get("weights_sha256")) == (
        identity["config_sha256"],
        identity["weights_sha256"],
    )
    if same_model and old_level == level:
        files = old.get("files_sha256")  # manifests before 2026-11-27 lack it
        if files is None or files == identity["files_sha256"]:
            return None
        return (
            f"{out} holds counts from model '{old.get('name')}' with other ensemble or "
            "out-of-distribution files (ensemble_*.safetensors, ood.safetensors) than this "
            "run's, so its --epistemic counts and warnings differ. Pick a new --out, or pass "
            "--overwrite to start it again"
        )
    if (
        old_level == level
        and old.get("weights_sha256") == identity["weights_sha256"]
        and old.get("config_sha256") != identity["config_sha256"]
    ):
        return (
            f"{out} holds counts from model '{old.get('name')}' with another config.json "
            "(same weights: recalibrated since?), so its intervals differ from this run's. "
            "Pick a new --out, or pass --overwrite to start it again"
        )
    return (
        f"{out} holds counts from model '{old.get('name')}' "
        f"(weights {str(old.get('weights_sha256'))[:12]}) at level {old_level}; this run uses "
        f"model '{identity['name']}' (weights {identity['weights_sha256'][:12]}) at level "
        f"{level}. Pick a new --out, or pass --overwrite to start it again"
    )


def _row_bases(manifest: Mapping[str, Any]) -> Callable[[int], Sequence[str]]:
    """The working folder(s) the i-th row of the results was written from.

    Relative names are resolved (to know an image however it is spelt) from the
    folder of the run that wrote the row (each run records its ``cwd`` and the
    rows there were before it, ``rows_before``). Runs of older versions, which
    did not record both, leave every folder a run wrote from (or this one).
    """
    runs = [r for r in manifest.get("runs", []) if r.get("rows_before") is not None]
    known = [(int(r["rows_before"]), r.get("cwd")) for r in runs]
    if not known or len(runs) != len(manifest.get("runs", [])) or not all(c for _, c in known):
        every = sorted({r.get("cwd") or os.getcwd() for r in manifest.get("runs", [])})
        return lambda i: every or [os.getcwd()]
    starts = [start for start, _ in known]

    def bases(i: int) -> Sequence[str]:
        k = max(bisect.bisect_right(starts, i) - 1, 0)
        return [known[k][1]]

    return bases


def _written_elsewhere(manifest: Mapping[str, Any] | None, results: Path) -> str | None:
    """The folder the results CSV was last written in, if it was moved or copied from one
    that still exists (recorded since 2026-11-27); else None.

    Rows name images from where they were written, so in a copy of a project the
    copy's images are other files (a copy may hold new images under the old names,
    so same-named is not taken as same): the resume says so instead of guessing.
    """
    dirs = [r.get("results_dir") for r in (manifest or {}).get("runs", [])]
    then = next((d for d in reversed(dirs) if isinstance(d, str)), None)
    if then is None or not os.path.isdir(then) or _same_folder(then, results.parent):
        return None
    return then


def _prepare_output(
    paths: OutputPaths,
    results: _ResultsFile,
    *,
    identity: dict,
    level: float,
    options: dict,
    overwrite: bool,
    on_row: Callable[[str, Sequence[str]], None] | None = None,
) -> tuple[_Recovered, dict | None]:
    """Lock the results CSV, check it against the manifest, repair a torn tail."""
    existed = paths.results.exists()
    size = results.open()
    manifest = None
    if paths.manifest.exists():
        try:
            manifest = json.loads(paths.manifest.read_text())
        except (OSError, ValueError):
            manifest = None
    if overwrite or size == 0:  # (a run whose every image failed leaves a header: below)
        results.truncate(0)
        if overwrite or not existed:  # deleted to start afresh: its failures go with it
            paths.errors.unlink(missing_ok=True)
        return _Recovered(), None
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        raise io.InputError(
            f"{paths.results} already exists and has no celltally manifest "
            f"({paths.manifest.name}); pick a new --out or pass --overwrite",
            paths.results,
        )
    found, good_end, header_ok = _scan_results(
        paths.results, results.columns, size, bases=_row_bases(manifest), on_row=on_row
    )
    if not header_ok or (found.rows == 0 and not found.torn_bytes):
        # nothing counted yet (e.g. the last run stopped on a bad option): start afresh,
        # whatever settings that run had; images it could not read stay listed
        results.truncate(0)
        return _Recovered(), None
    problem = _mismatch(manifest, identity, level, options, paths.results)
    if problem:
        raise io.InputError(problem, paths.results)
    if good_end < size:
        results.truncate(good_end)
    return found, manifest


def _start_manifest(
    paths: OutputPaths,
    old: dict | None,
    *,
    identity: dict,
    settings: dict,
    run: dict,
) -> dict:
    manifest = old or {
        "format": MANIFEST_FORMAT,
        "results": paths.results.name,
        "errors": paths.errors.name,
        "columns": COUNT_COLUMNS,
        "model": identity,
        "settings": {"level": settings["level"]},
        "started": run["started"],
        "finished": None,
        "runs": [],
    }
    for previous in manifest["runs"]:
        if previous.get("status") == "running":
            previous["status"] = "interrupted"
    manifest["model"] = identity
    manifest["celltally_version"] = __version__
    manifest["settings"] = {**manifest.get("settings", {}), **settings}
    manifest["finished"] = None
    manifest["runs"].append(run)
    _write_json_atomic(paths.manifest, manifest)
    return manifest


def _shown_inputs(paths: Sequence[str], limit: int = 20) -> list[str]:
    shown = list(paths[:limit])
    if len(paths) > limit:
        shown.append(f"... and {len(paths) - limit} more")
    return shown


#: Error of an image whose name differs from another's only in its suffix (with masks).
SAME_OUTPUT_NAME = (
    "another image of this run has the same name but for its suffix (A01.png, A01.tif): "
    "its masks and labels would overwrite that one's; rename one of them"
)


def mask_file(
    folder: str | os.PathLike[str],
    path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Where ``--save-masks`` puts the mask of ``path`` (see :func:`celltally.io.output_root`)."""
    return Path(folder) / f"{io.output_stem(path, root)}_mask.png"


#: Recorded in a run of the manifest once every output of the runs before it (in its
#: ``save_masks`` and other output folders) mirrors its ``output_root``.
ALL_MOVED = "all_outputs_mirror_root"


def _earlier_roots(manifest: Path, masks: Path) -> tuple[list[Path], list[Path]]:
    """The folders earlier runs' outputs in ``masks`` mirror, latest first, and the other
    output folders (labels) those runs wrote alike (recorded since 2026-11-27).

    The roots end at the latest run that moved every output before it to its own
    (:data:`ALL_MOVED`): the older ones hold nothing of this results CSV's any more.
    """
    roots: list[Path] = []
    others: list[Path] = []
    settled = False  # a later run moved every output to its root
    try:
        runs = json.loads(manifest.read_text()).get("runs", [])
        for run in reversed(runs):
            if run.get("save_masks") and run.get("output_root"):
                cwd = run.get("cwd") or os.getcwd()
                root = Path(run["output_root"])
                if not _same_folder(os.path.join(cwd, run["save_masks"]), masks):
                    continue
                if not settled and root.is_absolute() and root not in roots:
                    roots.append(root)
                settled = settled or run.get(ALL_MOVED) is True
                for folder in run.get("other_outputs") or []:
                    if (path := Path(cwd, folder)) not in others:
                        others.append(path)
    except (OSError, ValueError, AttributeError, TypeError):
        return [], []
    return roots, others


def _spelt_as(folder: Path, root: Path) -> Path:
    """``folder`` (an earlier run's root) as spelt from ``root`` (this run's), when only links
    tell them apart: ``/link/p1`` is ``/real/p1`` for a run under ``/real``. Else as it is.

    The folder of ``root`` (or above it) that is the same folder, or holds it, takes its
    place; links below it are kept as they are written, so the names under them stay.
    """
    if folder == root or folder in root.parents or root in folder.parents:
        return folder
    real = os.path.realpath(folder)
    for candidate in (root, *root.parents):
        held = os.path.realpath(candidate)
        if real == held:
            return candidate
        if real.startswith(held.rstrip(os.sep) + os.sep):
            return candidate / os.path.relpath(real, held)
    return folder


#: What per-image outputs in a masks folder end in (io's image outputs and the objects
#: table): the mask last, since a mask on disk says its image's outputs are all there.
_MOVED_ENDINGS = (
    *(e for e in io.OUTPUT_ENDINGS if e != "_mask.png"),
    "_objects.csv",
    "_mask.png",
)


def _same_folder(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _move_outputs(
    masks: Path, path: str | os.PathLike[str], old: Path, new: Path, *, mask: bool = True
) -> bool:
    """Move ``path``'s outputs in ``masks`` from their names under ``old`` to those under ``new``.

    True when its mask is then where ``new`` puts it (nothing to count again).
    An output already at its new name is left as it is. ``mask`` False: a folder
    of other outputs (labels), moved whether or not it holds a mask.
    """
    before, after = io.output_stem(path, old), io.output_stem(path, new)
    if before == after or (mask and not (masks / f"{before}_mask.png").exists()):
        return False
    for ending in _MOVED_ENDINGS:
        source, target = masks / f"{before}{ending}", masks / f"{after}{ending}"
        if source.exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    return (masks / f"{after}_mask.png").exists()


def _move_image(
    masks: Path,
    others: Sequence[Path],
    path: str | os.PathLike[str],
    earlier: Sequence[Path],
    root: Path,
) -> bool:
    """Move the outputs of ``path`` (counted before) from the layout of the first of the
    ``earlier`` roots whose mask is there to that of ``root``: its other outputs (labels)
    first, its mask last, so a kill in between leaves the mask at its old name and the
    next run finishes the move. True when its mask is then at its new name."""
    after = io.output_stem(path, root)
    for old in earlier:
        if not io.is_under(path, old):  # never its layout: the file name alone there may
            continue  # be another image's (each run's inputs all lie under its root)
        before = io.output_stem(path, old)
        if before == after or not (masks / f"{before}_mask.png").exists():
            continue
        for folder in others:  # laid out as the masks are
            _move_outputs(folder, path, old, root, mask=False)
        return _move_outputs(masks, path, old, root)
    return False


def _save_masks(folder: Path, path: Path, result: CountResult, root: Path | None) -> None:
    mask = mask_file(folder, path, root)
    mask.parent.mkdir(parents=True, exist_ok=True)
    io.write_float_image(mask.with_name(f"{mask.stem}_std.tif"), result.mask_std)
    io.write_mask(mask, result.mask)  # last: a mask on disk means both files are


def _outcome(
    path: Path,
    result: CountResult | Exception,
    model_name: str,
    save_masks: Path | None,
    root: Path | None = None,
) -> tuple[str, dict | None, str | None]:
    """``(file, row, None)`` for a counted image, ``(file, None, message)`` for a failure."""
    if isinstance(result, Exception):
        return str(path), None, str(result)
    if save_masks is not None:
        _save_masks(save_masks, path, result, root)
    return str(path), result_row(path, result, model_name=model_name), None


def _chunks(items: Iterable[Path], size: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_batch(
    paths: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str],
    model: str | os.PathLike[str] = "bbbc005",
    level: float = 0.95,
    batch_size: int = 16,
    save_masks: str | os.PathLike[str] | None = None,
    recursive: bool = False,
    overwrite: bool = False,
    dask: str | None = None,
    chunk_size: int | None = None,
    read_threads: int = 2,
    threads: int | None = None,
    progress: bool = False,
    log: Log = _quiet,
    on_commit: Callable[[int], None] | None = None,
    counter_options: dict[str, Any] | None = None,
    exclude: Sequence[str | os.PathLike[str]] = (),
) -> BatchSummary:
    """Count every image under ``paths`` into the resumable CSV ``out``.

    Run the same call again (after a crash, a kill or Ctrl-C) and it counts only
    the images that are not in ``out`` yet: each image ends up in exactly one
    row. Images that cannot be read are recorded in the errors file and retried
    by the next run; the run itself goes on.

    Parameters
    ----------
    paths : sequence of str or Path
        Image files, folders and glob patterns (streamed, see
        :func:`celltally.io.iter_images`).
    out : str or Path
        Results CSV; its errors file and manifest go beside it (:func:`output_paths`).
    model : str or Path, default 'bbbc005'
        Shipped model name or model folder.
    level : float, default 0.95
        Interval level, in (0, 1).
    batch_size : int, default 16
        Images per network batch; also rows per flushed write.
    save_masks : str or Path, optional
        Folder for ``<stem>_mask.png`` and ``<stem>_mask_std.tif`` per image, where
        ``<stem>`` is the file's path under :func:`celltally.io.output_root` of
        ``paths`` without its suffix (same-named files of two folders go to two
        sub-folders). On a resumed run, images already counted whose mask is
        missing are counted again for the mask only (their rows are kept). A run
        whose inputs widen that folder first moves the outputs of every image in
        ``out`` (and of the ``exclude`` folders) to the new layout, never over
        another file; a kill part-way is finished by the next run.
    recursive : bool, default False
        Descend into sub-folders.
    overwrite : bool, default False
        Discard an existing ``out`` (and its manifest) and start again.
    dask : str, optional
        Run on a dask.distributed cluster: a scheduler address
        (``tcp://host:8786``) or ``local:N`` for a LocalCluster of N one-thread
        worker processes on this machine.
    chunk_size : int, optional
        Images per Dask task (default ``2 * batch_size``).
    read_threads : int, default 2
        Threads reading and preparing images ahead of the network (per worker);
        0 reads in the counting thread itself (a strictly one-core job).
    threads : int, optional
        torch threads for the network in this process (default: torch's, one per
        core). On a busy machine 1 can be many times faster: torch's threads wait
        for each other at every layer. Dask workers always use one per worker.
    progress : bool, default False
        Show a progress bar (only when stderr is a terminal).
    log : callable, optional
        Receives one-line notes (resuming, cluster address).
    on_commit : callable, optional
        Called after each batch of rows is on disk with the number of images this run
        has handled so far (counted + failed).
    counter_options : dict, optional
        Keyword arguments for :meth:`CellCounter.from_pretrained` (e.g. interval
        options), JSON-serializable; recorded in the manifest, and like the model and
        level they must not change when resuming.
    exclude : sequence of str or Path
        More folders of this run's outputs (e.g. per-object labels) that are never
        searched for images; ``save_masks`` always is not.

    Returns
    -------
    BatchSummary
        Counts of images counted, skipped and failed, and the files written. Check
        ``failed`` and also ``unlisted``: a sub-folder that cannot be listed (``recursive``)
        does not stop the run; its images are left uncounted and named there.

    Raises
    ------
    InputError
        Before anything is counted or written, for bad paths, an unknown model or
        counter option, a bad level or batch size; before anything is counted, for
        an output that holds another model's or level's counts (or is
        not celltally's), an output another run is writing, or an unreachable Dask
        scheduler.
    """
    t0 = time.perf_counter()
    if not 0.0 < level < 1.0:
        raise io.InputError(
            f"--level must be between 0 and 1 (0.95 for a 95% interval), got {level}"
        )
    if batch_size < 1:
        raise io.InputError(f"--batch-size must be at least 1, got {batch_size}")
    if chunk_size is not None and chunk_size < 1:
        raise io.InputError(f"--chunk-size must be at least 1, got {chunk_size}")
    if threads is not None and threads < 1:
        raise io.InputError(f"--threads must be at least 1, got {threads}")
    if read_threads < 0:
        raise io.InputError(f"--read-threads must be 0 or more, got {read_threads}")
    if dask is not None:
        _local_workers(dask)  # a malformed local:N fails before anything is written
    if not Path(out).suffix and not Path(out).is_dir():  # -o results/ would be a file
        raise io.InputError(
            f"--out {out}: has no suffix; give a CSV file name, such as {Path(out) / 'results.csv'}"
        )
    if Path(out).suffix.lower() in io.IMAGE_SUFFIXES:  # e.g. -o plate/a.tif --overwrite
        raise io.InputError(
            f"{out}: --out names an image file; it must be a CSV file (e.g. results.csv)"
        )
    if save_masks is not None and Path(save_masks).resolve() in run_files(out):
        raise io.InputError(f"--save-masks {save_masks}: is one of this run's output files")
    inputs = [os.fspath(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]
    outputs = [d for d in (save_masks, *exclude) if d is not None]
    unread: collections.Counter[str] = collections.Counter()  # .czi, .nd2, ... left out
    unlisted: list[str] = []  # sub-folders that could not be listed (said, not fatal)
    unsearched: list[str] = []  # without --recursive: sub-folders with images of their own
    files = io.iter_images(
        inputs,
        recursive=recursive,
        exclude=outputs,
        unread=unread,
        unlisted=unlisted,
        unsearched=unsearched,
    )
    folder = resolve_model(model)
    identity = model_identity(folder)
    options = json.loads(json.dumps(counter_options or {}))  # as the manifest will hold them
    # The model with these options, made before any output exists: a bad option (e.g.
    # --diameter for a model without a scale, a tile it cannot use) leaves no file behind.
    # It counts here unless a Dask cluster does (its workers load their own: this one is
    # then only a check, on the CPU, and dropped).
    from celltally.counter import CellCounter

    local_counter: CellCounter | None
    try:
        local_counter = CellCounter.from_pretrained(
            folder, **({**options, "device": "cpu"} if dask else options)
        )
    except (TypeError, ValueError) as err:  # the options named when there are some and
        named = str(err).startswith("--")  # the message does not name its own already
        raise io.InputError(
            f"{describe_options(options)}: {err}" if options and not named else str(err)
        ) from None
    if (level_note := local_counter.level_note(level)) is not None:
        log(f"note: {level_note}")
    if dask:
        local_counter = None
    masks = Path(save_masks) if save_masks is not None else None
    root = io.output_root(inputs)
    out_paths = output_paths(out)
    # an earlier run into these masks laid them out under its inputs' folder: keep to it,
    # or to the folder holding both, so adding inputs does not move every output's name
    earlier, earlier_others = (
        ([], []) if masks is None or overwrite else _earlier_roots(out_paths.manifest, masks)
    )
    if earlier:
        root = Path(os.path.commonpath([_spelt_as(e, root) for e in earlier] + [root]))
    moved = 0  # earlier runs' outputs moved to this layout
    others: list[Path] = []  # this run's and earlier runs' label folders: moved alike
    for other in (*map(Path, exclude), *earlier_others):  # not `folder`: the model's
        if masks is not None and other.is_dir() and not _same_folder(other, masks):
            if not any(_same_folder(other, o) for o in others):
                others.append(other)
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    mask_only: set[str] = set()  # counted before, recounted for a missing mask
    results = _ResultsFile(out_paths.results, COUNT_COLUMNS)
    errors = _ErrorLog(out_paths.errors)
    summary = BatchSummary(out=out_paths.results, errors_file=None, manifest=out_paths.manifest)
    run: dict[str, Any] = {
        "started": _now(),
        "finished": None,
        "status": "running",
        "inputs": _shown_inputs(inputs),
        "executor": dask or "local",
        "cwd": os.getcwd(),  # where relative file names in the results are relative to
        "results_dir": os.path.abspath(out_paths.results.parent),  # see _written_elsewhere
        "batch_size": batch_size,
        "save_masks": None if masks is None else str(masks),
        "output_root": None if masks is None else str(root),
        "other_outputs": [str(d) for d in exclude],
    }
    summary.output_root = root if masks is not None else None
    manifest: dict | None = None
    # Output names (masks, labels) taken, 16 bytes per image, when there are outputs:
    # first those of the images already counted, which keep theirs, then as listed.
    claimed: set[bytes] = set()

    def output_key(path: str) -> bytes:
        assert masks is not None  # called only when there are masks to save
        return _digest(os.path.abspath(mask_file(masks, path, root)))

    def claim_recorded(name: str, bases: Sequence[str]) -> None:
        claimed.add(output_key(os.path.join(bases[0], name)))

    try:
        found, old = _prepare_output(
            out_paths,
            results,
            identity=identity,
            level=level,
            options=options,
            overwrite=overwrite,
            on_row=None if masks is None else claim_recorded,
        )
        if found.rows or found.torn_bytes:
            torn = f", a torn last row ({found.torn_bytes} B) dropped" if found.torn_bytes else ""
            log(f"resuming {out_paths.results}: {found.rows} image(s) already counted{torn}")
        if found.rows and (elsewhere := _written_elsewhere(old, out_paths.results)):
            log(
                f"note: {out_paths.results} was written in {elsewhere}, where its rows' "
                "images still are; images here are other files and get rows of their own "
                "(to count a copy of a project afresh, give it a new --out)"
            )
        errors.carry(out_paths.results)  # failures before this run stay until tried again
        run["rows_before"] = found.rows
        # the root changed since outputs were saved: they all move to this layout first
        relayout = masks is not None and found.rows > 0 and any(e != root for e in earlier)
        if masks is not None and not relayout:
            run[ALL_MOVED] = True
        # the manifest first: a CSV that has a header always has its manifest
        manifest = _start_manifest(
            out_paths,
            old,
            identity=identity,
            settings={
                "level": level,
                "counter_options": options,
                "batch_size": batch_size,
                "recursive": recursive,
            },
            run=run,
        )
        if results.size() == 0:
            results.write_header()
        if relayout:
            # Every image in the results moves, not only those this run names: the others
            # would stay in the old layout, where a new image could take their names. Done
            # before counting, so an output at an old name is always an earlier image's; a
            # kill leaves ALL_MOVED unrecorded and the next run goes on (moved ones pass).
            unplaced = 0

            def move_recorded(name: str, bases: Sequence[str]) -> None:
                nonlocal moved, unplaced
                assert masks is not None  # called only when there are masks to move
                if len(bases) != 1:  # an older manifest: which folder the name is from is
                    unplaced += 1  # not known (todo() still moves this run's images)
                    return
                path = os.path.join(bases[0], name)
                if not mask_file(masks, path, root).exists():
                    if _move_image(masks, others, path, earlier, root):
                        moved += 1

            _scan_results(
                out_paths.results,
                COUNT_COLUMNS,
                results.size(),
                bases=_row_bases(manifest),
                on_row=move_recorded,
            )
            if not unplaced:  # else later runs must still look in the older layouts
                run[ALL_MOVED] = True
                _write_json_atomic(out_paths.manifest, manifest)

        def todo() -> Iterator[Path]:
            for path in files:
                done = bool(found.done) and not found.done.isdisjoint(_keys(str(path)))
                if masks is not None and not done:
                    # A01.png and A01.tif would write one A01_mask.png (and labels): one
                    # not counted yet whose name is taken is said, not let mix the outputs
                    key = output_key(str(path))
                    if key in claimed:
                        errors.add([(str(path), f"{path}: {SAME_OUTPUT_NAME}")])
                        bar.update(1)
                        continue
                    claimed.add(key)
                if done:
                    summary.skipped += 1
                    if masks is not None and not mask_file(masks, path, root).exists():
                        # rows the pass above could not place (an older manifest)
                        if _move_image(masks, others, path, earlier, root):
                            nonlocal moved
                            moved += 1
                            continue
                        mask_only.add(str(path))
                        yield path
                    continue
                yield path

        from tqdm.auto import tqdm

        bar = tqdm(disable=None if progress else True, unit="img", desc="counting")

        def commit(outcomes: Sequence[tuple[str, dict | None, str | None]]) -> None:
            rows = [row for name, row, _ in outcomes if row is not None and name not in mask_only]
            results.append(rows)
            errors.record(
                tried=[name for name, _, _ in outcomes],
                # a failure's message is never None (_outcome, count_chunk, _run_dask)
                failed=[(name, cast(str, msg)) for name, row, msg in outcomes if row is None],
            )
            summary.counted += len(rows)
            summary.masks_only += sum(
                row is not None and name in mask_only for name, row, _ in outcomes
            )
            bar.update(len(outcomes))
            if on_commit is not None:
                on_commit(summary.counted + errors.count)

        remaining = todo()
        threads_before: int | None = None
        first = next(remaining, None)  # nothing left: no cluster started
        remaining = itertools.chain([first], remaining) if first is not None else iter(())
        try:
            if first is None:
                pass
            elif dask:
                _run_dask(
                    dask,
                    remaining,
                    commit,
                    model=_worker_model_ref(folder),
                    weights_sha256=identity["weights_sha256"],
                    files_sha256=identity["files_sha256"],
                    options=options,
                    level=level,
                    batch_size=batch_size,
                    chunk_size=chunk_size or 2 * batch_size,
                    read_threads=read_threads,
                    save_masks=masks,
                    masks_root=root,
                    log=log,
                )
            else:
                if threads is not None:
                    import torch

                    threads_before = torch.get_num_threads()
                    torch.set_num_threads(threads)  # set back when the run ends (finally)
                assert local_counter is not None
                counter = local_counter
                pending: list[tuple[str, dict | None, str | None]] = []
                stream = counter.count_paths(
                    remaining, level=level, batch_size=batch_size, read_threads=read_threads
                )
                for path, result in stream:
                    pending.append(_outcome(path, result, counter.name, masks, root))
                    if len(pending) >= batch_size:
                        commit(pending)
                        pending = []
                commit(pending)
        finally:
            bar.close()
            if threads_before is not None:
                import torch

                torch.set_num_threads(threads_before)
        summary.earlier_failed = errors.finish()
        if moved:
            log(
                f"moved the outputs of {moved} image(s) counted before in {masks} to mirror "
                f"{root}, the folder holding this run's inputs and theirs"
            )
        run["status"] = "finished"
    except BaseException:
        if manifest is not None:
            run["status"] = "interrupted"
        raise
    finally:
        try:  # the manifest is written while this run still holds the results' lock: a
            # run waiting for it would otherwise write its own entry and have it overwritten
            if manifest is not None:
                run.update(
                    finished=_now(),
                    counted=summary.counted,
                    skipped=summary.skipped,
                    failed=errors.count,
                )
                if run["status"] == "finished":
                    manifest["finished"] = run["finished"]
                _write_json_atomic(out_paths.manifest, manifest)
        finally:
            results.close()
    summary.failed = errors.count
    summary.errors = errors.listed
    summary.errors_file = out_paths.errors if errors.count or summary.earlier_failed else None
    summary.seconds = time.perf_counter() - t0
    summary.unread = dict(sorted(unread.items()))
    summary.unlisted = list(dict.fromkeys(unlisted))
    summary.unsearched = unsearched
    return summary


# -- Dask ----------------------------------------------------------------------

_WORKER_COUNTERS: dict[tuple[str, str, str, str], CellCounter] = {}
_WORKER_LOCK = threading.Lock()
_WORKER_LOADS = 0  # models loaded by this process (one per worker is the point)


def _worker_model_ref(folder: Path) -> str:
    """A shipped model by name (each worker loads its installed copy), else the folder."""
    return folder.name if is_shipped(folder) else str(folder.resolve())


def _worker_counter(
    model: str, weights_sha256: str, options: dict, files_sha256: str | None = None
) -> CellCounter:
    """This process's counter for ``model``: loaded once, then reused by every chunk.

    Known by the client's hashes: a model whose other files changed since a warm
    worker loaded it is loaded (and checked) again.
    """
    key = (model, weights_sha256, files_sha256 or "", json.dumps(options, sort_keys=True))
    with _WORKER_LOCK:
        counter = _WORKER_COUNTERS.get(key)
        if counter is None:
            folder = resolve_model(model)
            found = _sha256(folder / "model.safetensors")
            if found != weights_sha256:
                raise io.InputError(
                    f"model {model} on worker {os.uname().nodename} has other weights "
                    f"({found[:12]}) than on the client ({weights_sha256[:12]}); "
                    "install the same model on every worker"
                )
            if files_sha256 is not None and _files_sha256(folder) != files_sha256:
                raise io.InputError(
                    f"model {model} on worker {os.uname().nodename} has other ensemble or "
                    "out-of-distribution files (ensemble_*.safetensors, ood.safetensors) than "
                    "on the client; install the same model on every worker"
                )
            import torch

            from celltally.counter import CellCounter

            torch.set_num_threads(1)  # one torch thread per one-thread worker
            global _WORKER_LOADS
            counter = CellCounter.from_pretrained(folder, **options)
            _WORKER_LOADS += 1
            _WORKER_COUNTERS.clear()  # one model per worker process
            _WORKER_COUNTERS[key] = counter
    return counter


def count_chunk(
    paths: Sequence[str],
    *,
    model: str,
    weights_sha256: str,
    level: float,
    batch_size: int,
    read_threads: int = 2,
    save_masks: str | None = None,
    masks_root: str | None = None,
    options: dict | None = None,
    files_sha256: str | None = None,
) -> list[tuple[str, dict | None, str | None]]:
    """Count one chunk of files on a worker (the Dask task).

    Parameters
    ----------
    paths : sequence of str
        Image files, readable from the worker.
    model : str
        Shipped model name or model folder, as the worker sees it.
    weights_sha256 : str
        The client's model weights hash; a worker with other weights refuses.
    level, batch_size, read_threads :
        As for :func:`run_batch`.
    save_masks : str, optional
        Mask folder, writable from the worker.
    masks_root : str, optional
        The folder the masks' names mirror (:func:`celltally.io.output_root`);
        default: each file's own folder.
    options : dict, optional
        Keyword arguments for :meth:`CellCounter.from_pretrained`.
    files_sha256 : str, optional
        The client's hash of the model's other weights (:func:`model_identity`);
        a worker with others refuses.

    Returns
    -------
    list of tuple
        ``(file, row, None)`` per counted image, ``(file, None, message)`` per failure.
    """
    counter = _worker_counter(model, weights_sha256, options or {}, files_sha256)
    masks = Path(save_masks) if save_masks else None
    root = Path(masks_root) if masks_root else None
    stream = counter.count_paths(
        paths, level=level, batch_size=batch_size, read_threads=read_threads
    )
    return [_outcome(path, result, counter.name, masks, root) for path, result in stream]


#: Times an image may be on a dying Dask worker, alone in its task, before it is an error.
DASK_TRIES = 3


def _as_given(
    outcome: tuple[str, dict | None, str | None], names: Mapping[str, str]
) -> tuple[str, dict | None, str | None]:
    """A worker's outcome for an absolute path, under the file's name as the user gave it."""
    path, row, message = outcome
    name = names.get(path, path)
    if row is not None:
        row = {**row, "file": name}
    if message is not None and name != path:  # the error names the file as given, as locally
        message = message.replace(path, name)
    return name, row, message


def _local_workers(spec: str) -> int | None:
    """N for ``local:N`` (``local`` alone: one per core), None for a scheduler address."""
    if spec != "local" and not spec.startswith("local:"):
        if not spec.strip():
            raise io.InputError("--dask needs a scheduler address or local:N")
        return None
    text = spec.partition(":")[2] or str(os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise io.InputError(f"--dask {spec}: expected local:N with N >= 1 workers")
    return n


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """SIGINT ignored while worker processes start, so they inherit that (across exec too).

    Ctrl-C reaches the whole process group: the workers then each printed a
    KeyboardInterrupt traceback, while this process, which owns them, shuts
    the cluster down and says what was kept.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _connect(spec: str, log: Log):
    """A dask.distributed Client for ``spec`` (and the LocalCluster it started, if any)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise io.InputError(
            "--dask needs dask.distributed: pip install 'celltally[dask]'"
        ) from None
    n = _local_workers(spec)
    if n is not None:
        import logging

        import dask

        # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also
        # freezes glibc's adaptive mmap threshold: every large tensor is then mmapped
        # and page-faulted anew and a worker counts ~1.4x slower than a plain process
        # (measured: 10-11 vs 15-16 img/s). Pinning the mmap threshold at glibc's own
        # adaptive maximum (32 MiB) restores the speed and keeps Dask's trimming.
        with dask.config.set({MMAP_THRESHOLD_KEY: MMAP_THRESHOLD}), _workers_ignore_ctrl_c():
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                # a free port on this machine only: the scheduler's HTTP server starts
                # either way, and on the default 8787 a second run warned that it was taken
                dashboard_address="127.0.0.1:0",
                # not ERROR: at every close a worker's heartbeat could still reach for the
                # closing scheduler and print a traceback; a task's own failure reaches
                # this process as its exception, and a lost worker as KilledWorker
                silence_logs=logging.CRITICAL,
            )
        board = ""
        if importlib.util.find_spec("bokeh") is not None:  # else the page only asks for it
            board = f"; dashboard {cluster.dashboard_link}"
        log(f"started a local Dask cluster of {n} one-thread worker(s){board}")
        return Client(cluster), cluster
    try:
        client = Client(spec, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise io.InputError(f"--dask {spec}: cannot reach the scheduler: {reason}") from None
    log(f"connected to the Dask scheduler at {spec}")
    return client, None


def _run_dask(
    spec: str,
    files: Iterator[Path],
    commit: Callable[[Sequence[tuple[str, dict | None, str | None]]], None],
    *,
    model: str,
    weights_sha256: str,
    files_sha256: str,
    options: dict,
    level: float,
    batch_size: int,
    chunk_size: int,
    read_threads: int,
    save_masks: Path | None,
    masks_root: Path,
    log: Log,
) -> None:
    """Shard ``files`` into chunks, count them on the cluster, commit each as it finishes.

    The workers get absolute paths (they may run in another folder than this
    client), and their outcomes are given back under the names as the user
    wrote them. A chunk whose worker died (``KilledWorker``: out of memory, a
    crash) is sent again one image per task, one such task at a time (tasks
    queued on a worker die with it); an image whose own task dies
    :data:`DASK_TRIES` times is an error. So the image that kills workers is
    found and recorded, and the rest of the screen is counted.
    """
    from dask.distributed import as_completed
    from distributed import KilledWorker

    client, cluster = _connect(spec, log)
    try:
        threads = sum(client.nthreads().values())
        in_flight = max(4, 2 * threads)
        chunks = _chunks(files, chunk_size)
        running = as_completed()
        sent: dict[Any, dict[str, str]] = {}  # future -> {absolute path: name as given}
        again: collections.deque[str] = collections.deque()  # images of dead workers' tasks
        alone: list[Any] = []  # the task of one such image in flight (one at a time)
        deaths: collections.Counter[str] = collections.Counter()  # deaths of each, alone
        masks_folder = None if save_masks is None else os.path.abspath(save_masks)
        root = os.path.abspath(masks_root)

        def submit(names: Sequence[str]) -> Any:
            absolute = {os.path.abspath(name): name for name in names}
            future = client.submit(
                count_chunk,
                list(absolute),
                model=model,
                weights_sha256=weights_sha256,
                files_sha256=files_sha256,
                options=options,
                level=level,
                batch_size=batch_size,
                read_threads=read_threads,
                save_masks=masks_folder,
                masks_root=root,
                pure=False,
            )
            sent[future] = absolute
            running.add(future)
            return future

        def submit_next() -> bool:
            if again and not alone:
                alone.append(submit([again.popleft()]))
                return True
            chunk = next(chunks, None)
            if chunk is None:
                return False
            submit([str(p) for p in chunk])
            return True

        for _ in range(in_flight):
            if not submit_next():
                break
        for future in running:
            names = sent.pop(future)
            was_alone = future in alone
            if was_alone:
                alone.remove(future)
            try:
                outcomes = future.result()
            except KilledWorker as err:
                future.release()
                if was_alone:  # tasks queued on a worker die with it: only alone is telling
                    (name,) = names.values()
                    deaths[name] += 1
                    if deaths[name] >= DASK_TRIES:
                        commit([(name, None, f"{name}: the Dask worker counting it died ({err})")])
                        submit_next()
                        continue
                again.extend(names.values())
                submit_next()
                continue
            future.release()
            commit([_as_given(outcome, names) for outcome in outcomes])
            submit_next()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
