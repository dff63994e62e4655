"""Parse plate/well/site/channel metadata out of microscopy image file names.

Canonical BBBC005 names (``SIMCEPImages_A10_C40_F1_s01_w1.TIF``) are parsed fully; other
high-content screening names (e.g. BBBC039 ``IXMtest_A02_s1_w1051DAA7C-....tif``) are
parsed with generic well / site / channel patterns. Parsing never raises: unparseable
names give an all-``None`` :class:`ImageName`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "BBBC005_COLUMN_COUNTS",
    "BBBC005_PATTERN",
    "ImageName",
    "field_stem",
    "parse_name",
    "plate_label",
    "scene_id",
]

#: Canonical BBBC005 file name: well, cell count, focus blur, site and stain.
BBBC005_PATTERN = re.compile(
    r"^SIMCEPImages_(?P<well>(?P<row>[A-Z]+)(?P<column>\d+))_C(?P<count>\d+)"
    r"_F(?P<blur>\d+)_s(?P<site>\d+)_w(?P<stain>\d+)",
    re.IGNORECASE,
)

#: BBBC005's design: the cell count of each well column 1-24 (the same in every row A-P).
#: The simulator writes names of the same form with any count, so a name alone does not
#: say it is one of the real images.
BBBC005_COLUMN_COUNTS = (1, 5, 10, 14, 18, 23, 27, 31, 35, 40, 44, 48,
                         53, 57, 61, 66, 70, 74, 78, 83, 87, 91, 96, 100)  # fmt: skip

# Generic patterns. A well is 1-2 upper-case row letters + 2 digits, delimited by '_' (or
# the start of the name / a '.' / the end), on a real plate (_plate_well). Unpadded wells
# ('B3') are not read: beside BBBC's '_C4_' count and '_F1_' focus tags, Incucyte's
# time stamps and '_T01' / '_Z01' tags, no rule tried kept every name's meaning
# (2026-11-27); `celltally wells` names such files when it leaves them out.
_WELL = re.compile(r"(?:^|_)(?P<row>[A-Z]{1,2})(?P<column>\d{2})(?=[_.]|$)")
#: Plate formats read: up to 1536 wells (rows A-AF, columns 1-48).
_MAX_ROW, _MAX_COLUMN = 32, 48
_SITE = re.compile(r"_s(?P<site>\d+)(?=[_.\-]|$)", re.IGNORECASE)
# A channel is '_w' + its number ('_w1', '_w01', '_w10'); ImageXpress runs a GUID on after
# one digit ('_w1051DAA7C-...', '_w129545707-4CD3-...': its 8 hex digits may all be
# decimal), so a number of more than 2 digits or undelimited gives its first digit only.
_STAIN = re.compile(r"_w(?P<stain>\d{1,2})(?=[_.\-]|$)", re.IGNORECASE)
_STAIN_GUID = re.compile(r"_w(?P<stain>\d)", re.IGNORECASE)
_COUNT = re.compile(r"_C(?P<count>\d+)(?=_)")
_TIME = re.compile(r"_[tT](?P<time>\d+)(?=[_.\-]|$)")


@dataclass(frozen=True)
class ImageName:
    """Metadata parsed from an image file name; fields not found are ``None``.

    Attributes
    ----------
    well : str or None
        Well label as written, e.g. ``"A10"`` (a BBBC005 name's column zero-padded).
    row : str or None
        Well row letters (upper case), e.g. ``"A"``.
    column : int or None
        Well column number, e.g. ``10``.
    site : int or None
        Field of view within the well.
    blur : int or None
        BBBC005 focus-blur level (``F`` field).
    stain : int or None
        Channel / stain number (``w`` field).
    count : int or None
        Ground-truth cell count encoded in the name (``C`` field).
    plate : str or None
        Plate name: all the text before the well (``Screen_P1`` in
        ``Screen_P1_B03_s1_w1.tif``).
    time : int or None
        Time point of a time lapse (``_t<digits>``, after the well).
    """

    well: str | None = None
    row: str | None = None
    column: int | None = None
    site: int | None = None
    blur: int | None = None
    stain: int | None = None
    count: int | None = None
    plate: str | None = None
    time: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a new ``{name: value}`` dict.

        Returns
        -------
        dict
            Field names mapped to their values (``None`` where not parsed).
        """
        return asdict(self)


def _basename(name: str | os.PathLike[str]) -> str:
    """File name without folders (handles both '/' and '\\' separators)."""
    try:
        text = os.fspath(name)
    except TypeError:
        text = str(name)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return re.split(r"[\\/]", text)[-1]


def _row_number(letters: str) -> int:
    """1-based plate row of row letters: 'A' -> 1, 'P' -> 16, 'Z' -> 26, 'AF' -> 32."""
    number = 0
    for letter in letters:
        number = number * 26 + ord(letter) - ord("A") + 1
    return number


def _plate_well(row: str, column: str) -> str | None:
    """The well ``row`` + ``column`` spell ('B03'), or None when it lies on no plate of up
    to 1536 wells ('Z99', 'A00')."""
    number = int(column)
    if not (1 <= number <= _MAX_COLUMN and _row_number(row) <= _MAX_ROW):
        return None
    return f"{row}{number:02d}"


def _parse_generic(base: str) -> ImageName:
    """The generic reading of ``base`` (see :func:`parse_name`)."""
    counts = list(_COUNT.finditer(base))
    # (match, well) of each well-like token that lies on a real plate
    wells = [(m, s) for m in _WELL.finditer(base) if (s := _plate_well(m["row"], m["column"]))]
    # "_C10_" fits both a well (row C, column 10) and a count: it is a count only if
    # another well is present (BBBC005's 'A05_C18'), otherwise it is the well ('_C99_',
    # on no plate, is a count).
    well_spans = {m.span("row")[0] for m, _ in wells}
    ambiguous = {m.start("count") - 1 for m in counts} & well_spans
    if ambiguous:
        if len(wells) > len(ambiguous):
            wells = [(m, w) for m, w in wells if m.start("row") not in ambiguous]
        else:
            counts = [m for m in counts if m.start("count") - 1 not in ambiguous]

    well = row = plate = None
    column = site = stain = count = time = None
    site_match = _SITE.search(base)
    if site_match:
        site = int(site_match.group("site"))
    stain_match = _STAIN.search(base) or _STAIN_GUID.search(base)
    if stain_match:
        stain = int(stain_match.group("stain"))
    if wells:
        # the first well-like token: later ones are as often a time point, field, plane or
        # channel ('_T01', '_F01', '_Z01', '_C01'); a plate named like a well ('P01_B02')
        # is read as the well, so plates are best named otherwise ('Plate01')
        w, well = wells[0]
        row = w.group("row")
        column = int(w.group("column"))
        if w.start() > 0:
            plate = base[: w.start()]  # all before the well: 'Screen_P1', 'MFGTMP_230101'
        if t := _TIME.search(base, w.end()):  # a time point after the well
            time = int(t.group("time"))
    if counts:
        count = int(counts[0].group("count"))
    return ImageName(
        well=well,
        row=row,
        column=column,
        site=site,
        stain=stain,
        count=count,
        plate=plate,
        time=time,
    )


def plate_label(plate: str | None, time: int | None) -> str:
    """The plate as per-well totals group it: its name, and its time point if any.

    A time lapse's frames of one well are summed per time point, not over time
    (``Plate1_B03_s1_t02_w1.tif``: ``"Plate1 t02"``). The web page builds the same label.
    """
    return " ".join(p for p in (plate, None if time is None else f"t{time:02d}") if p)


def parse_name(name: str | os.PathLike[str]) -> ImageName:
    """Parse metadata from an image file name (the folder part is ignored).

    Parameters
    ----------
    name : str or Path
        File name or path.

    Returns
    -------
    ImageName
        For a canonical BBBC005 name, well, row, column, count, blur, site and stain (plate
        ``None``). Otherwise whatever the generic patterns find: a well ``_A02_``
        (upper-case row letters + 2 digits, on a plate of up to 1536 wells: rows A-AF,
        columns 01-48; the first such token; an unpadded ``_A2_`` is not read), a site
        ``_s<digits>``, a channel ``_w<1-2 digits>`` (one digit when a GUID follows, as in
        ImageXpress names), a count ``_C<digits>_`` and a plate (all the text before the
        well).
        An unparseable name gives an all-``None`` result; this function never raises.

    Examples
    --------
    >>> parse_name("SIMCEPImages_A10_C40_F1_s01_w1.TIF").well
    'A10'
    >>> parse_name("IXMtest_A02_s1_w1051DAA7C.tif").plate
    'IXMtest'
    """
    base = _basename(name)
    m = BBBC005_PATTERN.match(base)
    if m:
        return ImageName(
            well=f"{m.group('row').upper()}{int(m.group('column')):02d}",
            row=m.group("row").upper(),
            column=int(m.group("column")),
            site=int(m.group("site")),
            blur=int(m.group("blur")),
            stain=int(m.group("stain")),
            count=int(m.group("count")),
        )
    return _parse_generic(base)


def scene_id(name: str | os.PathLike[str]) -> str | None:
    """Identify the imaged scene (same cells) that an image shows.

    For BBBC005 the scene is the well column plus the site, e.g. ``"C10_s01"``: all blur
    levels (well rows) and stains of one scene share it. For other names with both a
    well and a site it is ``"[plate_]well_sNN"`` (all channels of a field share it).

    Parameters
    ----------
    name : str or Path
        File name or path.

    Returns
    -------
    str or None
        The scene identifier, or ``None`` if the name is not parseable.

    Examples
    --------
    >>> scene_id("SIMCEPImages_A10_C40_F1_s01_w1.TIF")
    'C10_s01'
    >>> scene_id("SIMCEPImages_P10_C40_F48_s01_w2.TIF")
    'C10_s01'
    """
    base = _basename(name)
    parsed = parse_name(base)
    if BBBC005_PATTERN.match(base):
        return f"C{parsed.column:02d}_s{parsed.site:02d}"
    if parsed.well is not None and parsed.site is not None:
        prefix = f"{parsed.plate}_" if parsed.plate else ""
        return f"{prefix}{parsed.well}_s{parsed.site:02d}"
    return None


#: A time point, focal plane or channel in a name: '_t01', '-T003', '.z2', '_w1', '_ch2'
#: (delimited on both sides): frames of one field differ in these.
_FRAME = re.compile(r"(?:^|[_\-. ])(?:[tTzZwW]|[cC][hH])\d+(?=$|[_\-. ])")


def field_stem(name: str | os.PathLike[str]) -> str:
    """``name`` without its suffix and without time-point / focal-plane / channel tokens.

    The field a frame of a time lapse, z-stack or channel set shows, for names
    that carry no well and site: ``field1_t01_w1.tif`` and ``field1_t02_w2.tif``
    give ``field1``, so frames of one field are one scene (:func:`scene_id`
    covers named wells and sites). A name left empty is its folder's field
    (``field1/t01.tif``: ``field1``), or keeps its stem without a folder.

    Examples
    --------
    >>> field_stem("field1_t01.tif")
    'field1'
    >>> field_stem("run2/img_T003_z1.png")
    'run2/img'
    """
    text = os.fspath(name)
    stem = text[: len(text) - len(os.path.splitext(text)[1])]
    folder, _, base = stem.rpartition("/")
    kept = _FRAME.sub("", base)
    if not kept:  # 'field1/t01': the folder is the field
        return folder or base
    return f"{folder}/{kept}" if folder else kept
