"""Per-object and per-image outputs beyond the count: instance labels, object tables, overlays,
and CellProfiler-style per-image tables.

The network predicts a foreground mask and a count, not instances. The
instances written here are derived from both: the mask (upsampled to the
image and thresholded) is split by a watershed of its distance transform
seeded at ``round(count)`` points, so the number of labelled objects is the
model's count whenever the foreground has room for them: at most one object
per pixel of the model's mask grid, so a near-empty mask's specks are not cut
into one-pixel objects to make up a count.
Seeds are shared among the connected foreground regions in proportion to
their areas (each region gets at least one); within a region they go to its
distance-transform peaks, topped up by k-means centres when touching nuclei
have merged into fewer peaks. The labels are a view of the count for
checking and downstream measurement, not a trained instance segmentation.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
from scipy import ndimage as ndi

from celltally.tiling import resize_to

__all__ = [
    "CELLPROFILER_COLUMNS",
    "OBJECT_COLUMNS",
    "cellprofiler_rows",
    "label_objects",
    "object_table",
    "overlay_image",
    "save_objects",
    "save_objects_for_rows",
    "write_cellprofiler_csv",
]

OBJECT_COLUMNS = ["label", "centroid_y", "centroid_x", "area"]
CELLPROFILER_COLUMNS = [
    "ImageNumber",
    "FileName",
    "PathName",
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Channel",
    "Count",
    "Count_Low",
    "Count_High",
    "Count_Std",
    "Warning",
]


def _allocate(areas: np.ndarray, n: int) -> np.ndarray:
    """Seeds per component: ``n`` split in proportion to area (largest remainder), each >= 1.

    With fewer seeds than components, the ``n`` largest components get one each.
    """
    k = np.zeros(areas.size, dtype=int)
    order = np.argsort(-areas, kind="stable")
    if n <= areas.size:
        k[order[:n]] = 1
        return k
    share = areas / areas.sum() * n
    k = np.maximum(1, np.floor(share).astype(int))
    while k.sum() > n:  # the floors of 1 can overshoot: take back from the most crowded
        k[np.argmax(np.where(k > 1, k - share, -np.inf))] -= 1
    while k.sum() < n:
        k[np.argmax(share - k)] += 1
    return k


def _capped(areas: np.ndarray, n: int, room: np.ndarray) -> np.ndarray:
    """:func:`_allocate` with at most ``room`` seeds per component (``n`` cut to the total
    room); what a full component cannot hold goes to those with room, by area share."""
    n = int(min(n, room.sum()))
    k = np.zeros(areas.size, dtype=int)
    fits = room > 0
    if n == 0:
        return k
    k[fits] = _allocate(areas[fits], n)
    k = np.minimum(k, room)
    share = areas / areas[fits].sum() * n
    while k.sum() < n:
        k[np.argmax(np.where(k < room, share - k, -np.inf))] += 1
    return k


def _seeds(
    dist: np.ndarray,
    components: np.ndarray,
    n_comp: int,
    n: int,
    spacing: float,
    cell_area: float = 1.0,
):
    """``n`` seed points (fewer where the foreground has no room for more).

    Each component gets seeds in proportion to its area, at most one per
    ``cell_area`` pixels (rounded; the area of one pixel of the model's mask: an
    object smaller than that is not resolved): its distance-transform peaks
    (highest first, at least ``spacing`` apart), topped up, when a merged blob has
    fewer peaks than seeds, by k-means centres of its pixels.
    """
    from skimage.feature import peak_local_max

    index = np.arange(1, n_comp + 1)
    areas = ndi.sum_labels(np.ones_like(dist), components, index)
    room = np.floor(areas / max(cell_area, 1.0) + 0.5).astype(int)
    if areas.size:  # the largest region holds one, even under half a mask pixel
        room[np.argmax(areas)] = max(1, room.max())
    quota = _capped(areas, n, room)
    boxes = ndi.find_objects(components)
    seeds: list[tuple[int, int]] = []
    for label, (k, box) in enumerate(zip(quota, boxes, strict=True), start=1):
        if k == 0 or box is None:
            continue
        inside = components[box] == label
        local = np.where(inside, dist[box], 0.0)
        offset = np.array([box[0].start, box[1].start])
        if k == 1:
            peak = np.unravel_index(np.argmax(local), local.shape) + offset
            seeds.append(cast("tuple[int, int]", tuple(int(v) for v in peak)))
            continue
        peaks = peak_local_max(
            local, min_distance=max(1, int(round(spacing))), exclude_border=False, num_peaks=k
        )
        if len(peaks) < k:
            peaks = _spread_seeds(np.argwhere(inside), peaks.reshape(-1, 2), k, seed=label)
        seeds.extend(cast("tuple[int, int]", tuple(int(v) for v in p + offset)) for p in peaks)
    return seeds


def _spread_seeds(pixels: np.ndarray, peaks: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """``min(k, len(pixels))`` distinct pixels of one component, spread by k-means.

    Starts from ``peaks`` plus random other pixels of the component; each
    centre is snapped to its nearest pixel, and a centre that lands on a pixel
    already taken (an empty cluster, or two centres by one pixel) moves to the
    pixel farthest from those taken, so the seeds stay distinct.
    """
    from scipy.cluster.vq import kmeans2

    k = min(k, len(pixels))
    if k <= len(peaks):
        return peaks[:k]
    points = pixels.astype(float)
    taken = {tuple(p) for p in peaks.tolist()}
    others = [i for i, p in enumerate(pixels.tolist()) if tuple(p) not in taken]
    rng = np.random.default_rng(seed)
    extra = points[rng.choice(others, size=k - len(peaks), replace=False)]
    start = np.vstack([peaks.astype(float), extra])
    with warnings.catch_warnings():  # an empty cluster is handled below
        warnings.simplefilter("ignore", UserWarning)
        centres, _ = kmeans2(points, start, minit="matrix", iter=20)
    nearest = np.argmin(((points[None] - centres[:, None]) ** 2).sum(-1), axis=1)
    chosen: list[int] = []
    for index in nearest.tolist():
        if index in chosen:
            gap = ((points[:, None] - points[chosen][None]) ** 2).sum(-1).min(1)
            index = int(np.argmax(gap))
        chosen.append(index)
    return pixels[chosen]


def label_objects(
    mask: np.ndarray,
    count: float,
    *,
    shape: Sequence[int],
    threshold: float = 0.5,
) -> np.ndarray:
    """Instance labels at ``shape`` from a foreground probability ``mask`` and a ``count``.

    Parameters
    ----------
    mask : 2-D array
        Foreground probability (``CountResult.mask``, any resolution covering the image).
    count : float
        The predicted count; ``round(count)`` seeds are placed, fewer where the
        foreground has no room for them: at most one per pixel of ``mask``'s own
        grid (its area at ``shape``), so specks of a near-empty mask are not cut
        into one-pixel "objects" to make up a count.
    shape : (height, width)
        Size of the label image (the raw image's).
    threshold : float
        Foreground threshold on the upsampled probability.

    Returns
    -------
    numpy.ndarray
        int32 labels ``0`` (background), ``1..m`` in decreasing size order of seeding.
    """
    from skimage.segmentation import watershed

    shape = (int(shape[0]), int(shape[1]))
    if not math.isfinite(float(count)):
        raise ValueError(f"count must be a finite number, got {count}")
    n = int(round(max(float(count), 0.0)))
    grid = np.shape(mask)
    cell_area = (shape[0] / grid[0]) * (shape[1] / grid[1])  # one mask pixel at ``shape``
    prob = resize_to(np.asarray(mask, dtype=np.float32), shape)
    foreground = prob > threshold
    if n == 0 or not foreground.any():
        return np.zeros(shape, dtype=np.int32)
    dist = ndi.distance_transform_edt(foreground)
    # Spacing of seeds: the radius the foreground would give n equal discs, halved.
    radius = math.sqrt(float(foreground.sum()) / (math.pi * n))
    spacing = max(2.0, 0.5 * radius)
    dist = ndi.gaussian_filter(dist, sigma=max(0.5, 0.15 * radius))
    components, n_comp = ndi.label(foreground)
    seeds = _seeds(dist, components, n_comp, n, spacing, cell_area)
    markers = np.zeros(shape, dtype=np.int32)
    for i, (y, x) in enumerate(seeds, start=1):
        markers[y, x] = i
    labels = watershed(-dist, markers, mask=foreground)
    return labels.astype(np.int32)


def object_table(labels: np.ndarray) -> list[dict[str, Any]]:
    """One row per label > 0: ``label``, ``centroid_y``, ``centroid_x`` (px), ``area`` (px)."""
    labels = np.asarray(labels)
    present = np.unique(labels[labels > 0])
    if present.size == 0:
        return []
    areas = ndi.sum_labels(np.ones(labels.shape), labels, present)
    centres = ndi.center_of_mass(np.ones(labels.shape), labels, present)
    return [
        {
            "label": int(lab),
            "centroid_y": round(float(cy), 2),
            "centroid_x": round(float(cx), 2),
            "area": int(area),
        }
        for lab, (cy, cx), area in zip(present, centres, areas, strict=True)
    ]


def overlay_image(image: np.ndarray, points: Iterable[tuple[float, float]]) -> np.ndarray:
    """RGB uint8: the image (0.5-99.8 percentile stretch) with a red dot on every point."""
    array = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(array, [0.5, 99.8])
    grey = np.clip((array - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    radius = max(2, round(min(array.shape) / 250))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = yy**2 + xx**2 <= radius**2
    for cy, cx in points:
        y, x = int(round(cy)), int(round(cx))
        y0, y1 = max(0, y - radius), min(array.shape[0], y + radius + 1)
        x0, x1 = max(0, x - radius), min(array.shape[1], x + radius + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        sub = disc[y0 - y + radius : y1 - y + radius, x0 - x + radius : x1 - x + radius]
        rgb[y0:y1, x0:x1][sub] = (255, 40, 40)
    return rgb


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed to it when the block completes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_objects(
    folder: str | os.PathLike[str],
    stem: str,
    image: np.ndarray,
    mask: np.ndarray,
    count: float,
) -> dict[str, Any]:
    """Write ``<stem>_labels.tif``, ``<stem>_objects.csv`` and ``<stem>_overlay.png``.

    ``stem`` may name a sub-folder of ``folder`` ('plate1/A01'), made as needed.

    ``image`` is the raw 2-D image (its size is the label image's), ``mask``
    and ``count`` come from the ``CountResult``. Returns the paths and the
    number of objects written.
    """
    import tifffile
    from PIL import Image

    if np.ndim(image) != 2:  # before anything is written
        raise ValueError(f"image must be 2-D (the raw image), got shape {np.shape(image)}")
    out = Path(folder)
    labels = label_objects(mask, count, shape=np.shape(image))
    (out / stem).parent.mkdir(parents=True, exist_ok=True)
    rows = object_table(labels)
    labels_path = out / f"{stem}_labels.tif"
    dtype = np.uint16 if len(rows) < 65535 else np.uint32
    table_path = out / f"{stem}_objects.csv"
    overlay_path = out / f"{stem}_overlay.png"
    points = [(r["centroid_y"], r["centroid_x"]) for r in rows]
    # Each file whole or not at all (written beside, then renamed), the labels last: a
    # resumed run skips an image whose labels exist, so a run killed part-way through
    # an image's files must leave no labels behind (it left the table and overlay missing).
    with _replacing(table_path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=OBJECT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with _replacing(overlay_path) as tmp:
        Image.fromarray(overlay_image(image, points)).save(tmp, format="PNG")
    with _replacing(labels_path) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")
    return {"labels": labels_path, "objects": table_path, "overlay": overlay_path, "n": len(rows)}


def save_objects_for_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    masks_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    channel: int | None = None,
    default_channel: int | None = None,
) -> int:
    """Per-object output for results-CSV rows whose mask PNG is in ``masks_dir``.

    Reads each row's image (``file``, with ``channel``, or ``default_channel`` for a
    multi-channel file: :func:`celltally.io.read_image`), its ``<stem>_mask.png``
    and its ``count``; writes :func:`save_objects`' files into ``out_dir``.
    ``<stem>`` is the file's path under ``root`` without its suffix (the names
    ``celltally.batch.run_batch`` gives the masks; default: each file's own
    folder, i.e. its name). Images whose ``<stem>_labels.tif`` is newer than
    their mask are skipped (a resumed run); an older one (the mask was written
    again) is replaced. Returns the number of images written.
    """

    from celltally import io
    from celltally.batch import mask_file

    written = 0
    for row in rows:
        path = Path(str(row["file"]))
        stem = io.output_stem(path, root)
        mask_path = mask_file(masks_dir, path, root)
        if not mask_path.exists():
            raise io.InputError(f"{mask_path}: mask not found for {path}", mask_path)
        labels_path = Path(out_dir) / f"{stem}_labels.tif"
        complete = all(
            (Path(out_dir) / f"{stem}{end}").exists() for end in ("_objects.csv", "_overlay.png")
        )
        if (
            complete
            and labels_path.exists()
            and labels_path.stat().st_mtime_ns >= mask_path.stat().st_mtime_ns
        ):
            continue
        # read as images are (celltally's size limit, not Pillow's 179 M pixel one)
        mask = io.read_image(mask_path).astype(np.float32) / 255.0
        image = io.read_image(path, channel=channel, default_channel=default_channel)
        save_objects(out_dir, stem, image, mask, float(row["count"]))
        written += 1
    return written


def cellprofiler_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """CellProfiler-style per-image rows from results-CSV rows (``file``, ``count``, ...).

    ``ImageNumber`` counts from 1 in the given order; ``FileName``/``PathName``
    split ``file``; ``Metadata_Plate/Well/Site/Channel`` are the parsed ``plate``,
    ``well``, ``site``, ``stain`` (empty when the name carries none); ``Warning`` is the
    out-of-distribution warning (empty when the image resembles the calibration set).
    """
    out = []
    for number, row in enumerate(rows, start=1):
        path = Path(str(row["file"]))
        out.append(
            {
                "ImageNumber": str(number),
                "FileName": path.name,
                "PathName": str(path.parent),
                "Metadata_Plate": str(row.get("plate") or ""),
                "Metadata_Well": str(row.get("well") or ""),
                "Metadata_Site": str(row.get("site") or ""),
                # the stain (BBBC's _w1/_w2): a well's site has a row per channel
                "Metadata_Channel": str(row.get("stain") or ""),
                "Count": str(row["count"]),
                "Count_Low": str(row["low"]),
                "Count_High": str(row["high"]),
                "Count_Std": str(row.get("std") or ""),
                "Warning": str(row.get("warning") or ""),
            }
        )
    return out


def write_cellprofiler_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write :func:`cellprofiler_rows` of ``rows`` to ``path`` (CellProfiler's Image.csv shape)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.DictWriter(handle, fieldnames=CELLPROFILER_COLUMNS)
        writer.writeheader()
        writer.writerows(cellprofiler_rows(rows))
    return out
