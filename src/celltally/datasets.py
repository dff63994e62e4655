"""Training and evaluation sets: real BBBC005, a generic folder, and the simulator.

Every source goes through the same ``transforms.prepare_image`` as counting
does, so the network never sees a differently prepared image at test time.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from skimage.filters import threshold_otsu

from celltally import io, naming
from celltally.pools import process_map
from celltally.transforms import dense_strides, prepare_image, resize_area

#: Instance labels (full-size int32) -> one array per simulated scene.
LabelMap = Callable[[np.ndarray], np.ndarray]


@dataclass
class LabeledSet:
    """Prepared images with their counts and (where known) foreground masks.

    Attributes
    ----------
    images : (N, 1, H, W) float32 tensor at the model's input size.
    masks : (N, 1, H, W) float32 tensor of foreground fractions in [0, 1];
        rows without a mask are NaN.
    counts : (N,) float32 tensor.
    meta : one dict per image: ``name``, ``scene``, ``blur``, ``stain``, ``source``.
    """

    images: torch.Tensor
    masks: torch.Tensor
    counts: torch.Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = int(self.images.shape[0]) if self.images.dim() else -1
        if self.images.dim() != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must be (N, 1, H, W), got shape {tuple(self.images.shape)}")
        if tuple(self.masks.shape) != tuple(self.images.shape):
            raise ValueError(
                f"masks must have the images' shape {tuple(self.images.shape)} (NaN where "
                f"an image has none), got {tuple(self.masks.shape)}"
            )
        if tuple(self.counts.shape) != (n,):
            raise ValueError(
                f"counts must be ({n},), one per image, got {tuple(self.counts.shape)}"
            )
        if self.meta and len(self.meta) != n:
            raise ValueError(f"meta must have one dict per image ({n}), got {len(self.meta)}")
        # No zero strides (a NumPy ``[:, None]`` axis): cuDNN misreads them on GPU.
        self.images = dense_strides(self.images)
        self.masks = dense_strides(self.masks)

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    @property
    def has_mask(self) -> torch.Tensor:
        return ~torch.isnan(self.masks.flatten(1)[:, 0])

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> LabeledSet:
        """The images at ``index`` (positions, or a boolean mask of ``len(self)``)."""
        chosen = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        if chosen.dtype == bool:  # a mask such as ``has_mask``, not positions 0 / 1
            if chosen.shape != (len(self),):
                raise ValueError(
                    f"a boolean index needs {len(self)} values (one per image), got "
                    f"shape {chosen.shape}"
                )
            chosen = np.flatnonzero(chosen)
        idx = torch.as_tensor(chosen.astype(np.int64))
        # copies of the rows: a subset's edits must not reach the set it came from
        meta = [dict(self.meta[i]) for i in idx.tolist()] if self.meta else []
        return LabeledSet(self.images[idx], self.masks[idx], self.counts[idx], meta)

    @staticmethod
    def concat(sets: Sequence[LabeledSet]) -> LabeledSet:
        sets = [s for s in sets if len(s)]
        return LabeledSet(
            torch.cat([s.images for s in sets]),
            torch.cat([s.masks for s in sets]),
            torch.cat([s.counts for s in sets]),
            [m for s in sets for m in s.meta],
        )


def _stack(images, masks, counts, meta) -> LabeledSet:
    return LabeledSet(
        torch.from_numpy(np.stack(images)).unsqueeze(1),
        torch.from_numpy(np.stack(masks)).unsqueeze(1),
        torch.tensor(counts, dtype=torch.float32),
        meta,
    )


def otsu_mask(image: np.ndarray) -> np.ndarray:
    """Foreground of an in-focus image by Otsu's threshold (bool, same shape)."""
    array = np.asarray(image, dtype=np.float32)
    if array.max() == array.min():
        return np.zeros(array.shape, dtype=bool)
    return array > threshold_otsu(array)


def preparation_digest() -> str:
    """A digest of the code that reads and prepares images, for cache keys.

    A cache of prepared images is only valid for the code that prepared them: a
    change to reading (``celltally.io``), resizing or normalization
    (``celltally.transforms``) or the masks made here must not be met by stale arrays.
    """
    import celltally.io
    import celltally.transforms

    digest = hashlib.sha1()
    for module in (celltally.io, celltally.transforms, sys.modules[__name__]):
        digest.update(Path(cast(str, module.__file__)).read_bytes())
    return digest.hexdigest()[:12]


def load_bbbc005(
    root: str | Path,
    *,
    size: Sequence[int],
    norm: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> LabeledSet:
    """Load a BBBC005 folder (``images/`` or the folder itself) with counts from the names.

    Masks: BBBC005's official masks cover in-focus images only, and this copy
    ships none, so each scene's mask is Otsu's threshold of its in-focus (F1)
    image of the same stain; its F23/F48 copies reuse it, as the paper did with
    the official F1 masks. The mask is area-resized to the input size, so
    border pixels hold the fraction of foreground they cover.
    """
    root = Path(root)
    folder = io.images_folder(root)
    paths = io.list_images([folder])
    # the files themselves (where, how large, when written), not only their names: two
    # folders of the same names (a simulated plate, another copy) shared one cache entry
    stats = [(p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]
    spec = (str(folder.resolve()), sorted(stats), tuple(size), sorted((norm or {}).items()))
    key = hashlib.sha1(repr((spec, preparation_digest())).encode()).hexdigest()[:12]
    cache = Path(cache_dir) / f"bbbc005_{key}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        return LabeledSet(**torch.load(cache, weights_only=False))
    parsed = [(p, naming.parse_name(p.name)) for p in paths]
    parsed = [(p, n) for p, n in parsed if n.count is not None and n.blur is not None]
    if not parsed:
        raise io.InputError(
            f"{folder}: no BBBC005 images (SIMCEPImages_<well>_C<n>_F<n>_s<n>_w<n>.TIF)", folder
        )
    in_focus = {(naming.scene_id(p.name), n.stain): p for p, n in parsed if n.blur == 1}
    mask_cache: dict[Path, np.ndarray] = {}
    images, masks, counts, meta = [], [], [], []
    for path, name in parsed:
        raw = io.read_image(path)
        images.append(prepare_image(raw, size=size, norm=norm))
        f1 = in_focus.get((naming.scene_id(path.name), name.stain))
        if f1 is None:
            masks.append(np.full(tuple(size), np.nan, dtype=np.float32))
        else:
            if f1 not in mask_cache:
                mask_cache[f1] = resize_area(otsu_mask(io.read_image(f1)), size)
            masks.append(mask_cache[f1])
        counts.append(float(cast(int, name.count)))  # not None: filtered above
        meta.append(
            {
                "name": path.name,
                "scene": naming.scene_id(path.name),
                "site": name.site,
                "blur": name.blur,
                "stain": name.stain,
                "source": "bbbc005",
            }
        )
    data = _stack(images, masks, counts, meta)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        torch.save(data.__dict__, tmp)
        os.replace(tmp, cache)  # atomic: torchrun's ranks may all write it at once
    return data


def _same_stem(image: Path, folder: Path) -> Path | None:
    """The one file in ``folder`` with ``image``'s stem and an image suffix (:func:`mask_for`)."""
    found = [
        p
        for p in sorted(folder.glob(glob.escape(image.stem) + ".*"))
        if p.stem == image.stem and p.suffix.lower() in io.IMAGE_SUFFIXES
    ]  # A1.png is A1.tif's mask; A1.s2.png belongs to A1.s2.tif
    if len(found) > 1:
        raise io.InputError(
            f"{folder}: {found[0].name} and {found[1].name} are both masks of {image.name}; "
            "keep one"
        )
    return found[0] if found else None


def mask_for(
    image: Path,
    folder: Path,
    *,
    key: str | None = None,
    shared: bool = False,
    flat_taken: bool = False,
) -> Path | None:
    """The mask or label image of ``image`` in ``folder``: same stem, an image suffix.

    Parameters
    ----------
    image : Path
        The image file.
    folder : Path
        The masks' (or labels') folder.
    key : str, optional
        ``image``'s path under the images' folder (``p1/img1.tif``): its mirror in
        ``folder`` (``p1/img1.png``) is looked for first, then ``img1.*`` in
        ``folder`` itself.
    shared : bool, default False
        Other images have ``image``'s stem: a mask in ``folder`` itself, found by
        the stem alone for an image in a sub-folder, is refused (it would be the
        mask of all of them).
    flat_taken : bool, default False
        An image directly in the images' folder has ``image``'s stem: a mask in
        ``folder`` itself is that image's, so an image in a sub-folder has only
        its mirrored one.

    Returns
    -------
    Path or None
        The file, or None when there is none.

    Raises
    ------
    InputError
        Two files with the stem (``a.tif`` and ``a.png``) in one folder, or a mask
        found by a ``shared`` stem. Other files with that stem (notes, a ``.txt``
        export) are not masks.
    """
    sub = Path(key).parent if key is not None else Path()
    if sub.is_absolute() or ".." in sub.parts:  # listed outside the images' folder
        sub = Path()
    if sub != Path() and (mirrored := _same_stem(image, folder / sub)):
        return mirrored
    if flat_taken and sub != Path():
        return None  # masks/a.png is the mask of images/a.tif, not of images/p1/a.tif
    flat = _same_stem(image, folder)
    if flat is not None and shared and sub != Path():
        raise io.InputError(
            f"{flat}: several images are named {image.stem} (one is {key}), so this mask "
            f"could be any one's; put each image's mask at its path under images/ "
            f"({folder / sub / flat.name})",
            flat,
        )
    return flat


def _masks_in(folder: Path, paths: Sequence[Path], keys: Sequence[str]) -> list[Path | None]:
    """Each image's file in ``folder`` (:func:`mask_for`), None where it has none.

    InputError for a file that several images would share (``a.tif`` and
    ``a.png`` beside each other, or a stem shared across sub-folders).
    """
    stems = Counter(p.stem for p in paths)
    top = {p.stem for p, key in zip(paths, keys, strict=True) if Path(key).parent == Path()}
    found = [
        mask_for(path, folder, key=key, shared=stems[path.stem] > 1, flat_taken=path.stem in top)
        for path, key in zip(paths, keys, strict=True)
    ]
    owner: dict[Path, str] = {}
    for mask, key in zip(found, keys, strict=True):
        if mask is not None and owner.setdefault(mask, key) != key:
            raise io.InputError(
                f"{mask}: is the mask of both {owner[mask]} and {key}; give each its own",
                mask,
            )
    return found


def _listed_images(root: Path) -> tuple[list[Path], list[str], dict[str, float] | None]:
    """A training folder's images, their keys (paths under the images' folder), its counts.

    With ``counts.csv``: the images it lists, keyed as listed, and its counts
    (InputError for a listed image that is missing, or no rows). Without: the
    images' folder's files, keyed by name, and None.
    """
    folder = io.images_folder(root)
    counts_csv = io.counts_csv(root)
    if not counts_csv.exists():
        paths = io.list_images([folder])
        return paths, [p.name for p in paths], None
    table = io.read_counts_csv(counts_csv)
    if not table:
        raise io.InputError(f"{counts_csv}: lists no images (a header and no rows)")
    paths = []
    for listed in table:
        path = folder / listed
        if not path.exists():
            raise io.InputError(f"{counts_csv}: lists {listed!r}, which is not in {folder}")
        paths.append(path)
    return paths, list(table), table  # keys as listed: sub-folders' files may share a name


def unused_files(root: str | Path) -> list[str]:
    """One note per kind of file in a training folder that :func:`load_folder` leaves out.

    Images not in ``counts.csv``; without one, images in sub-folders of the
    images' folder (only ``counts.csv`` names those); files in ``masks/`` or
    ``labels/`` that are no image's mask (their names must be the image's).
    Each was left out without a word, e.g. 16 masks named ``A01_mask.png``.
    """
    root = Path(root)
    folder = io.images_folder(root)
    paths, keys, listed = _listed_images(root)
    mask_dirs = [d for d in (root / "masks", root / "labels") if d.is_dir()]
    used = {p.resolve() for p in paths}
    notes = []
    on_disk = [
        p
        for p in io.list_images([folder], recursive=True)
        if p.resolve() not in used and not any(io.is_under(p, d) for d in mask_dirs)
    ]
    if on_disk:
        example = on_disk[0].relative_to(folder).as_posix()
        why = (
            "not in counts.csv"
            if listed is not None
            else "in sub-folders, which only counts.csv can name (relative to the images' folder)"
        )
        notes.append(f"{folder}: {len(on_disk)} image(s) not used, {why} (e.g. {example})")
    # masks of the images left out above are not orphans: matched against all of them
    every = [*paths, *on_disk]
    every_keys = [*keys, *(p.relative_to(folder).as_posix() for p in on_disk)]
    for d in mask_dirs:
        try:
            found = _masks_in(d, every, every_keys)
        except io.InputError:  # stems shared with the unused images: as load_folder sees it
            found = _masks_in(d, paths, keys)
        matched = {p.resolve() for p in found if p is not None}
        extra = [p for p in io.list_images([d], recursive=True) if p.resolve() not in matched]
        if extra and paths:
            notes.append(
                f"{d}: {len(extra)} file(s) are no image's mask (e.g. {extra[0].name}); a "
                f"mask takes its image's name with an image suffix, e.g. {paths[0].stem}.png"
            )
    return notes


def counts_from_label_masks(
    root: str | Path, paths: Sequence[Path], *, wanted: Iterable[int] | None = None
) -> dict[int, int | None]:
    """Counts from label images (``root/labels``, else ``root/masks``), by index in ``paths``.

    As :func:`load_folder` counts an image that has no count of its own: the
    number of labels of its label image, None where it has none (or only a
    binary mask, which cannot be told from a one-object label image). ``paths``
    are images directly in the folder's images folder; ``wanted`` the indices
    to count (default all: only their label images are read).
    """
    root = Path(root)
    keys = [p.name for p in paths]
    dirs = [d for d in (root / "masks", root / "labels") if d.is_dir()]
    found = {d: _masks_in(d, paths, keys) for d in dirs}
    return _label_counts(found, range(len(paths)) if wanted is None else wanted)


def _label_counts(
    found: Mapping[Path, Sequence[Path | None]], wanted: Iterable[int]
) -> dict[int, int | None]:
    """:func:`_count_from_labels` of the images ``wanted``, from each folder's files
    (``found``: folder -> each image's file or None), ``labels/`` first."""
    dirs = sorted(found, key=lambda d: d.name != "labels")
    return {i: _count_from_labels([found[d][i] for d in dirs]) for i in wanted}


def _count_from_labels(files: Sequence[Path | None]) -> int | None:
    """Number of labels of an image's label mask; None without one.

    ``files`` are the image's mask files, ``labels/``'s first. An empty mask or
    label image (all 0) counts 0. One with a single value says nothing (a
    binary mask cannot be told from a one-object label image): the next file is
    tried. Its shape is checked by the caller, once it has read the image.
    """
    for found in files:
        if found is not None:
            labels = io.read_mask(found)
            values = np.unique(labels[labels > 0])
            if values.size != 1:
                return int(values.size)
    return None


def labels_diameter(root: str | Path, *, limit: int = 100) -> float | None:
    """Median equivalent diameter (raw px) of the objects in a folder's label images.

    Reads the label images (``root/labels`` or ``root/masks``, the ones with
    more than one label: binary masks do not separate objects) of up to
    ``limit`` of the folder's images (those of ``counts.csv`` if it has one),
    found as :func:`load_folder` finds them, and returns the median of
    ``2 sqrt(area / pi)`` over their objects; None when there are none.
    InputError for a mask whose size is not its image's.
    """
    root = Path(root)
    mask_dirs = [d for d in (root / "labels", root / "masks") if d.is_dir()]
    if not mask_dirs:
        return None
    paths, keys, _ = _listed_images(root)
    found = [_masks_in(d, paths, keys) for d in mask_dirs]
    areas: list[np.ndarray] = []
    for i, path in enumerate(paths[:limit]):
        files = [f for masks in found if (f := masks[i]) is not None]
        if not files:
            continue
        # a label image of another size would measure objects at another scale;
        # channel 0: the shape alone is needed, whatever the image's planes
        shape = io.read_image(path, channel=0).shape
        for file in files:
            labels = io.read_mask(file, shape=(int(shape[0]), int(shape[1])))
            sizes = np.bincount(labels.ravel())[1:]
            sizes = sizes[sizes > 0]
            if sizes.size > 1:
                areas.append(sizes)
                break
    if not areas:
        return None
    return float(np.median(2.0 * np.sqrt(np.concatenate(areas) / np.pi)))


def source_file(meta: Mapping[str, Any]) -> Path | None:
    """The image file a :func:`load_folder` row was read from (its ``source`` and ``name``).

    None for rows without one (simulated scenes, BBBC005's prepared cache).
    """
    if not (meta.get("shape") and meta.get("source") and meta.get("name")):
        return None
    return io.images_folder(Path(meta["source"])) / str(meta["name"])


def load_folder(
    root: str | Path,
    *,
    size: Sequence[int],
    norm: Mapping[str, Any] | None = None,
    channel: int | None = None,
    default_channel: int | None = None,
) -> LabeledSet:
    """Load a folder of images with ``counts.csv`` (columns image, count).

    Images may sit in ``root`` or ``root/images``. Optional masks (binary or
    label images, PNG/TIFF) in ``root/masks`` or ``root/labels`` become
    training masks (label > 0 = foreground): an image's mask has its path under
    the images' folder (``masks/p1/img1.png`` for ``p1/img1.tif``), or just its
    stem (``masks/img1.png``) where no other image has that stem
    (:func:`mask_for`). Without counts.csv, counts come from BBBC-style names
    (``_C<n>_``), else from the number of labels of the image's label mask (a
    binary mask gives no count). Errors are raised before any training: a
    counts.csv row naming a missing image or a negative count, a mask (in any
    of the folders) whose size differs from its image, a mask several images
    would share, a JPEG or soft (blurred, anti-aliased) mask
    (:func:`celltally.io.read_mask`), an image with no count.
    ``channel`` picks the plane of multi-channel images, ``default_channel``
    the plane of those that have one without it (``io.read_image``).
    """
    root = Path(root)
    if root.is_file():  # e.g. --data my_training/counts.csv
        raise io.InputError(
            f"{root}: a file; give the folder of images (with counts.csv, masks/ or labels/)"
        )
    mask_dirs = [d for d in (root / "masks", root / "labels") if d.is_dir()]
    paths, keys, listed = _listed_images(root)
    found = {d: _masks_in(d, paths, keys) for d in mask_dirs}
    if listed is not None:
        table = listed
    else:
        named: dict[str, float | None] = {p.name: naming.parse_name(p.name).count for p in paths}
        unnamed = [i for i, path in enumerate(paths) if named[path.name] is None]
        for i, count in _label_counts(found, unnamed).items():
            named[paths[i].name] = count
        missing = [n for n, c in named.items() if c is None]
        if missing:
            raise io.InputError(
                f"{root}: no counts.csv, and {len(missing)} image(s) have neither _C<count>_ "
                f"in the name nor a label image to count (first: {missing[0]}; a binary "
                "mask, or a label image of one value, does not say how many objects); "
                "list them in counts.csv (columns image,count)"
            )
        table = cast("dict[str, float]", named)  # no None left: checked above
    images, masks, counts, meta = [], [], [], []
    for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
        raw = io.read_image(path, channel=channel, default_channel=default_channel)
        images.append(prepare_image(raw, size=size, norm=norm))
        mask: np.ndarray | None = None
        for d in mask_dirs:  # each is size-checked, not only the one trained on
            if (file := found[d][i]) is not None:
                labels = io.read_mask(file, shape=raw.shape)
                mask = resize_area(labels > 0, size) if mask is None else mask
        masks.append(np.full(tuple(size), np.nan, dtype=np.float32) if mask is None else mask)
        counts.append(float(table[key]))
        name = naming.parse_name(path.name)
        meta.append(
            {
                "name": key,  # the path under the images' folder (source_file)
                # else its field: frames of one time lapse (field1_t01, _t02) are one scene
                "scene": naming.scene_id(path.name) or naming.field_stem(Path(key).as_posix()),
                "site": name.site,
                "blur": name.blur,
                "stain": name.stain,
                "source": str(root),
                "shape": [int(raw.shape[0]), int(raw.shape[1])],
                "channel": channel,
                "default_channel": default_channel,  # read again as it was (calibration)
            }
        )
    return _stack(images, masks, counts, meta)


def _simulate_one(args: tuple, label_map: LabelMap | None = None) -> tuple:
    """(image, mask, count, meta) of one simulated scene, + ``label_map(labels)`` if given."""
    from celltally.simulate import SimulationParams, simulate_scene

    count, blur, stain, seed, size, norm, clustering = args
    params = SimulationParams(cluster_probability=clustering)
    sim = simulate_scene(count, blur=blur, stain=stain, seed=seed, params=params)
    image = prepare_image(sim.image, size=size, norm=norm)
    mask = resize_area(sim.mask, size)
    meta = {
        "name": f"sim_{seed}_C{count}_F{blur}_w{stain}",
        "scene": f"sim{seed}",
        "site": None,
        "blur": blur,
        "stain": stain,
        "source": "simulated",
    }
    if label_map is not None:
        return image, mask, float(count), meta, label_map(np.asarray(sim.labels))
    return image, mask, float(count), meta


def simulated_specs(
    scenes: int,
    *,
    counts: tuple[int, int] = (1, 100),
    blurs: Sequence[int] = (1, 23, 48),
    stains: Sequence[int] = (1, 2),
    clustering: Sequence[float] = (0.25,),
    seed: int = 0,
) -> list[tuple[int, int, int, int, float]]:
    """(count, blur, stain, scene_seed, cluster_probability) for ``scenes`` scenes.

    Counts are uniform over the whole range (not BBBC005's 24 levels), so the
    counter learns a continuous count; blur, stain and clustering are drawn
    uniformly from their lists (repeat an entry to weight it).
    """
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(scenes):
        count = int(rng.integers(counts[0], counts[1] + 1))
        blur = int(rng.choice(list(blurs)))
        stain = int(rng.choice(list(stains)))
        cluster = float(rng.choice(list(clustering)))
        specs.append((count, blur, stain, seed * 1_000_003 + i, cluster))
    return specs


def simulate_set(
    scenes: int,
    *,
    size: Sequence[int],
    counts: tuple[int, int] = (1, 100),
    blurs: Sequence[int] = (1, 23, 48),
    stains: Sequence[int] = (1, 2),
    clustering: Sequence[float] = (0.25,),
    seed: int = 0,
    norm: Mapping[str, Any] | None = None,
    workers: int = 1,
) -> LabeledSet:
    """Simulate full-size (696 x 520) scenes and prepare them exactly like real files."""
    results = _simulate_scenes(
        scenes, size, counts, blurs, stains, clustering, seed, norm, workers, label_map=None
    )
    return _stack(*map(list, zip(*results, strict=True)))


def simulate_set_with_maps(
    scenes: int,
    *,
    label_map: LabelMap,
    size: Sequence[int],
    counts: tuple[int, int] = (1, 100),
    blurs: Sequence[int] = (1, 23, 48),
    stains: Sequence[int] = (1, 2),
    clustering: Sequence[float] = (0.25,),
    seed: int = 0,
    norm: Mapping[str, Any] | None = None,
    workers: int = 1,
) -> tuple[LabeledSet, torch.Tensor]:
    """:func:`simulate_set` (same scenes) plus ``label_map`` of each scene's instance labels.

    ``label_map`` turns the full-size ``int32`` instance labels into one array per
    scene (e.g. a count density); it runs in the simulating worker, so it must be
    picklable (a module-level function or a ``functools.partial`` of one). The maps
    are stacked as an ``(N, 1, ...)`` float tensor.
    """
    results = _simulate_scenes(
        scenes, size, counts, blurs, stains, clustering, seed, norm, workers, label_map=label_map
    )
    *columns, maps = map(list, zip(*results, strict=True))
    return _stack(*columns), torch.from_numpy(np.stack(maps)).float().unsqueeze(1)


def _simulate_scenes(
    scenes, size, counts, blurs, stains, clustering, seed, norm, workers, *, label_map
) -> list[tuple]:
    if isinstance(scenes, bool) or not isinstance(scenes, (int, np.integer)) or scenes < 1:
        raise ValueError(f"scenes must be a whole number >= 1, got {scenes!r}")
    specs = simulated_specs(
        int(scenes), counts=counts, blurs=blurs, stains=stains, clustering=clustering, seed=seed
    )
    jobs = [(c, b, s, sd, tuple(size), norm, cl) for c, b, s, sd, cl in specs]
    one = _simulate_one if label_map is None else partial(_simulate_one, label_map=label_map)
    if workers > 1:
        return list(process_map(one, jobs, workers=workers, chunksize=16))
    return [one(j) for j in jobs]


class SimulatedStream(torch.utils.data.IterableDataset):
    """Endless stream of freshly simulated ``(image, mask, count)`` tensors.

    Each worker draws its own seeds, so a DataLoader with several workers
    never repeats a scene within ``base_seed``'s stream.
    """

    def __init__(
        self,
        *,
        size: Sequence[int],
        counts: tuple[int, int] = (1, 100),
        blurs: Sequence[int] = (1, 23, 48),
        stains: Sequence[int] = (1, 2),
        base_seed: int = 0,
        norm: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.norm = dict(norm or {})
        self.size = tuple(size)
        self.counts = counts
        self.blurs = tuple(blurs)
        self.stains = tuple(stains)
        self.base_seed = base_seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.base_seed, worker])
        i = worker
        while True:
            count = int(rng.integers(self.counts[0], self.counts[1] + 1))
            blur = int(rng.choice(self.blurs))
            stain = int(rng.choice(self.stains))
            image, mask, c, _ = _simulate_one(
                (count, blur, stain, self.base_seed * 1_000_003 + i, self.size, self.norm, 0.25)
            )
            i += n_workers
            yield (
                torch.from_numpy(image)[None],
                torch.from_numpy(mask)[None],
                torch.tensor(c, dtype=torch.float32),
            )


def calibration_sites(config: dict[str, Any]) -> list[int]:
    """The BBBC005 sites a model was calibrated on, from its config (default: site 8)."""
    sites = config.get("training", {}).get("split", {}).get("calibration_sites", [8])
    return [int(v) for v in sites]


def split_bbbc005(
    meta: Sequence[dict[str, Any]],
    *,
    calibration_sites: Sequence[int] = (8,),
    test_sites: Sequence[int] = (9, 10),
) -> dict[str, np.ndarray]:
    """Split BBBC005 by scene via its site: all blurs and stains of a scene stay together.

    Default: sites 1-7 train, 8 calibration, 9-10 test, so every one of the 24
    count levels appears in every split. Non-BBBC005 rows go to train.
    """
    split: dict[str, list[int]] = {"train": [], "calibration": [], "test": []}
    for i, m in enumerate(meta):
        site = m.get("site") if m.get("source") == "bbbc005" else None
        if site in calibration_sites:
            split["calibration"].append(i)
        elif site in test_sites:
            split["test"].append(i)
        else:
            split["train"].append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in split.items()}


def write_counts_csv(path: str | Path, rows: Sequence[tuple[str, float]]) -> Path:
    """Write ``image,count`` rows (the format ``load_folder`` reads)."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "count"])
        writer.writerows(rows)
    return path
