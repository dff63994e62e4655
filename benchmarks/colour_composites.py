"""Colour images: which are read as one stain, which are refused as composites.

    python benchmarks/colour_composites.py [--data ../shared/data]

An RGB file is counted as the mean of its colours only when it holds one
stain (``celltally.io._colour_channels_differ``); a composite of stains must
be refused, since its mean is a mixture no model was trained on. This builds
the cases from grey frames (16 BBBC005 sites, both stains, and 8 BBBC039
images from ``--data``, percentile-stretched to 8 bits, plus 8 simulated
frames at blur 1-48) and saves each as PNG or JPEG (quality 50, 75 or 95, in turn):

- one stain under a colour table: grey, green, cyan, magenta, yellow, "hot"
  and Fiji's "Fire"; a colour camera's planes of one dye (gains per channel
  plus noise), bright and dim (peak 100 of 255, gains 0.1/1/0.3, noise std
  3); grey, green and "hot" images with a scale bar and its label drawn on
  them in yellow, white or cyan;
- two stains of different cells in two channels, every order, and magenta +
  green;
- one stain under green, cyan, yellow or magenta, dim (peak 50 or 100 of
  255) and saved as JPEG;
- a sparse stain that saturates, shown in two colours (magenta, cyan,
  yellow, white), beside a dense one in the third;
- two stains of the same cells: BBBC005's w1 (nuclei) and w2 (cell bodies)
  of one site, in three channel pairs. Their mean is counted with the
  default model beside the site's true count.

Prints, per case and format, how many were refused and the range of the
lowest channel correlation; writes benchmarks/results/colour_composites.json.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from celltally.io import SAME_STAIN_CORRELATION, _colour_channels_differ
from celltally.simulate import simulate_scene

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import stamp  # noqa: E402

FORMATS = ("png", "q50", "q75", "q95")
_FIRE = (  # Fiji's "Fire", its 32 control points per channel
    [0, 0, 1, 25, 49, 73, 98, 122, 146, 162, 173, 184, 195, 207, 217, 229, 240, 252] + [255] * 14,
    [0] * 13
    + [14, 35, 57, 79, 101, 117, 133, 147, 161, 175, 190, 205, 219, 234, 248, 255]
    + [255] * 3,
    [0, 61, 96, 130, 165, 192, 220, 227, 210, 181, 151, 122, 93, 64, 35, 5]
    + [0] * 11
    + [35, 98, 160, 223, 255],
)


def _tables() -> dict[str, np.ndarray]:
    s = np.arange(256.0)
    zero = 0 * s
    x = np.linspace(0, 255, 32)
    tables = {
        "grey": (s, s, s),
        "green": (zero, s, zero),
        "cyan": (zero, s, s),
        "magenta": (s, zero, s),
        "yellow": (s, s, zero),
        "hot": tuple(np.clip(3 * s - k, 0, 255) for k in (0, 255, 510)),
        "fire": tuple(np.interp(s, x, c) for c in _FIRE),
    }
    return {k: np.stack(v).round().astype(np.uint8) for k, v in tables.items()}


def _stretch(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image.astype(np.float64), [0.1, 99.9])
    scaled = (image.astype(np.float64) - low) / max(high - low, 1e-9) * 255
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _saved(rgb: np.ndarray, fmt: str) -> np.ndarray:
    """``rgb`` (Y, X, 3) after a round trip through a PNG or a JPEG of quality ``fmt``."""
    buffer = io.BytesIO()
    image = Image.fromarray(rgb.astype(np.uint8))
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=int(fmt[1:]))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _stack(planes: list[np.ndarray | None]) -> np.ndarray:
    shape = min((p.shape for p in planes if p is not None), key=lambda s: s[0] * s[1])
    return np.dstack(
        [np.zeros(shape, np.uint8) if p is None else p[: shape[0], : shape[1]] for p in planes]
    )


def _annotated(rgb: np.ndarray, seed: int) -> np.ndarray:
    """``rgb`` with a 100 x 6 px scale bar and "50 um" above it, in yellow, white or cyan."""
    from PIL import ImageDraw

    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colour = ((255, 255, 0), (255, 255, 255), (0, 255, 255))[seed % 3]
    h, w = rgb.shape[:2]
    draw.rectangle([w - 130, h - 30, w - 30, h - 24], fill=colour)
    draw.text((w - 110, h - 48), "50 um", fill=colour)
    return np.asarray(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/colour_composites.json")
    )
    args = parser.parse_args()
    rng = random.Random(0)
    w1 = sorted((args.data / "bbbc005" / "images").glob("*_w1.TIF"))
    if not w1:
        sys.exit(f"error: no BBBC005 images under {args.data / 'bbbc005' / 'images'}")
    sites = rng.sample(w1, 16)
    pairs = [
        (tifffile.imread(p), tifffile.imread(p.with_name(p.name.replace("_w1.", "_w2."))))
        for p in sites
    ]
    greys = [_stretch(a) for a, _ in pairs] + [_stretch(b) for _, b in pairs]
    greys += [
        _stretch(tifffile.imread(p))
        for p in rng.sample(sorted((args.data / "bbbc039" / "images").glob("*.tif")), 8)
    ]
    greys += [
        simulate_scene(
            10 + 12 * i, blur=(1, 10, 23, 48)[i % 4], stain=1 + i % 2, seed=900 + i
        ).image
        for i in range(8)
    ]
    cases: list[tuple[str, str, str, np.ndarray]] = []
    for i, grey in enumerate(greys):
        for j, (name, table) in enumerate(_tables().items()):
            fmt = FORMATS[(i + j) % 4]
            cases.append(("one stain", name, fmt, _saved(np.moveaxis(table[:, grey], 0, -1), fmt)))
    noise = np.random.default_rng(0)
    for i, grey in enumerate(greys[:20]):
        gains = [(0.25, 1, 0.4), (1, 0.35, 0.1), (0.1, 0.5, 1), (0.6, 1, 0.8)][i % 4]
        planes = [np.clip(g * grey + noise.normal(0, 2 + 0.03 * g * grey), 0, 255) for g in gains]
        cases.append(("one stain", "colour camera", "png", _saved(np.dstack(planes), "png")))
    for grey in greys[:20]:  # dim: a weak channel's noise is a large share
        gains = (0.1, 1, 0.3)
        dim = grey.astype(np.float64) * 100 / 255
        planes = [np.clip(g * dim + noise.normal(0, 3, grey.shape), 0, 255) for g in gains]
        cases.append(("one stain", "dim camera", "png", _saved(np.dstack(planes), "png")))
    tables = _tables()
    for i, grey in enumerate(greys):  # dim: peak 50 or 100 of 255, where JPEG noise weighs
        name = ("green", "cyan", "yellow", "magenta")[i % 4]
        dim = (grey.astype(np.float64) * (50, 100)[i % 2] / 255).round().astype(np.uint8)
        fmt = FORMATS[1 + i % 3]
        rgb = np.moveaxis(tables[name][:, dim], 0, -1)
        cases.append(("one stain, dim", name, fmt, _saved(rgb, fmt)))
    for i, grey in enumerate(greys):  # a scale bar and its label drawn in a pure colour
        name = ("grey", "green", "hot")[i % 3]
        rgb = np.moveaxis(tables[name][:, grey], 0, -1)
        fmt = FORMATS[i % 4]
        cases.append(("one stain, annotated", name, fmt, _saved(_annotated(rgb, i), fmt)))
    orders = {"RG": (0, 1), "GR": (1, 0), "GB": (1, 2), "BG": (2, 1), "RB": (0, 2), "BR": (2, 0)}
    others = [
        (i, j) for i in range(len(greys)) for j in range(len(greys)) if i != j and i % 16 != j % 16
    ]  # not w1 and w2 of one site
    rng.shuffle(others)
    for k, (i, j) in enumerate(others[:60]):
        order, (a, b) = list(orders.items())[k % 6]
        planes: list[np.ndarray | None] = [None, None, None]
        planes[a], planes[b] = greys[i], greys[j]
        fmt = FORMATS[k % 4]
        cases.append(("two stains, other cells", order, fmt, _saved(_stack(planes), fmt)))
    for k, (i, j) in enumerate(others[60:72]):
        fmt = FORMATS[k % 4]
        rgb = _stack([greys[i], greys[j], greys[i]])
        cases.append(("two stains, other cells", "magenta+green", fmt, _saved(rgb, fmt)))
    from scipy import ndimage as ndi

    for k in range(24):  # a sparse stain saturating, shown in two colours, beside another
        n, gain = (3, 5, 10)[k % 3], (1.5, 3)[k % 2]
        sparse = simulate_scene(n, blur=1, stain=1, seed=1200 + k).image.astype(np.float64)
        sparse = np.clip(sparse * gain, 0, 255).astype(np.uint8)
        dense = simulate_scene(120, blur=1, stain=2, seed=1300 + k).image
        dense = np.where(ndi.binary_dilation(sparse > 20, iterations=4), 0, dense)
        order = ("magenta+green", "cyan+red", "yellow+blue", "white+green")[k % 4]
        planes = {
            "magenta+green": [sparse, dense, sparse],
            "cyan+red": [dense, sparse, sparse],
            "yellow+blue": [sparse, sparse, dense],
            "white+green": [sparse, np.maximum(sparse, dense), sparse],
        }[order]
        fmt = FORMATS[(k // 4) % 4]
        cases.append(("two stains, one saturated", order, fmt, _saved(np.dstack(planes), fmt)))
    same_counts = []
    for k, (path, (a, b)) in enumerate(zip(sites[:10], pairs[:10], strict=True)):
        for order in ("BG", "GR", "RB"):
            planes = [None, None, None]
            planes[orders[order][0]], planes[orders[order][1]] = _stretch(a), _stretch(b)
            fmt = FORMATS[k % 4]
            rgb = _saved(_stack(planes), fmt)
            cases.append(("two stains, same cells", order, fmt, rgb))
        same_counts.append(
            (
                path.name,
                int(re.search(r"_C(\d+)_", path.name)[1]),
                np.rint(_stack([a, b]).astype(np.float32).mean(axis=2)).astype(a.dtype),
            )
        )
    rows: dict[tuple[str, str, str], list[float | None]] = {}
    for kind, name, fmt, rgb in cases:
        key = (kind, name, "png" if fmt == "png" else "jpeg")
        rows.setdefault(key, []).append(_colour_channels_differ(np.moveaxis(rgb, -1, 0)))
    from celltally.counter import CellCounter

    counter = CellCounter.from_pretrained()
    mixed = [
        (name, truth, round(counter.count(mean).count, 1)) for name, truth, mean in same_counts
    ]
    table = []
    print(f"{'case':<26}{'table/order':<15}{'format':<8}{'n':>4}{'refused':>9}  lowest correlation")
    for (kind, name, fmt), values in sorted(rows.items()):
        refused = [v for v in values if v is not None]
        span = f"{min(refused):.3f} to {max(refused):.3f}" if refused else "-"
        print(f"{kind:<26}{name:<15}{fmt:<8}{len(values):>4}{len(refused):>9}  {span}")
        table.append(
            {
                "case": kind,
                "table": name,
                "format": fmt,
                "n": len(values),
                "refused": len(refused),
                "correlations_of_refused": [round(v, 4) for v in refused],
            }
        )
    print("\nthe mean of w1 and w2 of one BBBC005 site, counted with the default model:")
    for name, truth, count in mixed:
        print(f"  {name}: {count} for {truth} cells")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "threshold": SAME_STAIN_CORRELATION,
        "rows": table,
        "same_cells_mean_counted": [{"file": n, "true": t, "counted": c} for n, t, c in mixed],
    }
    args.out.write_text(json.dumps(stamp(payload, models=["bbbc005"]), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
