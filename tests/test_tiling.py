"""Counting at the model's scale: tile plans, tiled vs whole-image counts, scale and input options.

Tolerance: tiled and whole-image counts of the same image agree within 0.1%
(the only difference is the context a density cell sees beyond its window's
margin); images here are generated, never ../shared.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from conftest import blob_image, tiny_config

from celltally import io
from celltally.counter import CellCounter
from celltally.models.pipeline import CountingPipeline
from celltally.scale import ModelScale, model_scale, model_shape, rescale_factor
from celltally.tiling import count_density, merge_normalization, plan_tiles
from celltally.transforms import prepare_image

TOLERANCE = 1e-3


def disc_image(count: int, *, shape, seed: int = 0, radius: int = 6) -> np.ndarray:
    """Noisy uint16 background with ``count`` bright discs, stamped locally (fast at any size)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(200, 20, shape).clip(0, None)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = (yy**2 + xx**2 <= radius**2) * 2000.0
    for y, x in zip(
        rng.integers(0, shape[0] - 2 * radius, count),
        rng.integers(0, shape[1] - 2 * radius, count),
        strict=True,
    ):
        image[y : y + 2 * radius + 1, x : x + 2 * radius + 1] += disc
    return image.astype(np.uint16)


def density_config() -> dict:
    config = tiny_config()
    config["counter"] = {
        "width": 0.0625,
        "fc": [8, 8],
        "pool_size": [3, 4],
        "count_scale": 1.0,
        "head": "density",
    }
    config["name"] = "tiny-density"
    return config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a busy 2-core machine, two spin-waiting threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def density_counter() -> CellCounter:
    torch.manual_seed(1)
    config = density_config()
    return CellCounter(CountingPipeline(config), config, device="cpu", tile=96, margin=32)


@pytest.mark.parametrize("shape", [(32, 32), (96, 160), (352, 480), (640, 224)])
@pytest.mark.parametrize(("tile", "margin"), [(96, 32), (128, 32), (256, 64), ((96, 160), 32)])
def test_cores_cover_the_canvas_exactly_once(shape, tile, margin):
    cover = np.zeros(shape, dtype=int)
    for t in plan_tiles(shape, tile=tile, margin=margin, stride=32):
        wy0, wy1, wx0, wx1 = t.window
        cy0, cy1, cx0, cx1 = t.core
        assert 0 <= wy0 <= cy0 < cy1 <= wy1 <= shape[0]
        assert 0 <= wx0 <= cx0 < cx1 <= wx1 <= shape[1]
        ty, tx = (tile, tile) if isinstance(tile, int) else tile
        assert (wy1 - wy0, wx1 - wx0) == (min(ty, shape[0]), min(tx, shape[1]))
        assert all(v % 32 == 0 for v in (*t.window, *t.core))
        cover[cy0:cy1, cx0:cx1] += 1
    assert (cover == 1).all()


def test_bad_tile_plans_are_refused():
    with pytest.raises(ValueError, match="multiples of 32"):
        plan_tiles((128, 128), tile=100, margin=32)
    with pytest.raises(ValueError, match=r"above 2 x margin \(at least 96 here\)"):
        plan_tiles((128, 128), tile=64, margin=32)
    with pytest.raises(ValueError, match="not a multiple"):
        plan_tiles((100, 128), tile=64, margin=0)


def test_density_maps_sum_to_the_whole_frame_count():
    torch.manual_seed(0)
    model = CountingPipeline(density_config()).eval()
    x = torch.from_numpy(prepare_image(blob_image(12, shape=(130, 174)), size=(64, 96)))
    with torch.inference_mode():
        whole = model(x[None, None])
        dens = model.density(x[None, None])
    assert dens.count.shape == (1, 2, 3)
    assert dens.count.sum().item() == pytest.approx(whole.count.item(), rel=1e-5)
    var = torch.exp(dens.count_logvar).sum().item()
    assert var == pytest.approx(torch.exp(whole.count_logvar).item(), rel=1e-5)
    result = count_density(model, x.numpy(), tile=None)
    assert result.tiles == 1
    assert result.count == pytest.approx(whole.count.item(), rel=1e-5)
    # counting runs in eval mode but leaves each part of the caller's model as it was
    model.train()
    model.segmenter.eval()  # as train_counter holds it: frozen
    assert count_density(model, x.numpy(), tile=None).count == pytest.approx(result.count)
    assert all(m.training for m in model.counter.modules())
    assert not any(m.training for m in model.segmenter.modules())


def test_fc_head_has_no_density_map():
    model = CountingPipeline(tiny_config())
    with pytest.raises(ValueError, match="'fc' counter head"):
        model.density(torch.zeros(1, 1, 64, 96))


@pytest.mark.parametrize(("tile", "margin"), [(96, 32), (160, 64)])
def test_tiled_count_equals_whole_image_count(density_counter, tile, margin):
    image = disc_image(300, shape=(1500, 1900), seed=4)
    prepared = prepare_image(image, size=(185, 262), norm=None)
    whole = count_density(density_counter.model, prepared, tile=None)
    tiled = count_density(density_counter.model, prepared, tile=tile, margin=margin)
    assert tiled.tiles > 4
    assert tiled.count == pytest.approx(whole.count, rel=TOLERANCE)
    assert tiled.variance == pytest.approx(whole.variance, rel=TOLERANCE)
    assert tiled.mask.shape == whole.mask.shape == (93, 131)
    np.testing.assert_allclose(tiled.mask, whole.mask, atol=1e-3)
    np.testing.assert_allclose(tiled.density, whole.density, rtol=1e-2, atol=1e-4)


def test_tiled_count_equals_whole_image_count_with_planes_at_the_input():
    # the counter reads the upsampled mask and the image at full model scale
    torch.manual_seed(2)
    config = density_config()
    config["counter"]["planes_at"] = "input"
    model = CountingPipeline(config).eval()
    prepared = prepare_image(disc_image(120, shape=(900, 1100), seed=5), size=(230, 290), norm=None)
    whole = count_density(model, prepared, tile=None)
    tiled = count_density(model, prepared, tile=160, margin=64)
    assert tiled.tiles > 4
    assert tiled.count == pytest.approx(whole.count, rel=TOLERANCE)
    assert tiled.variance == pytest.approx(whole.variance, rel=TOLERANCE)


def test_window_geometry_comes_from_the_model_folder_unless_given():
    config = {**density_config(), "tiling": {"tile": [64, 96], "margin": 0}}
    model = CountingPipeline(config)
    assert (CellCounter(model, config).tile, CellCounter(model, config).margin) == ((64, 96), 0)
    assert CellCounter(model, config, tile=128, margin=32).tile == (128, 128)
    assert CellCounter(model, density_config()).tile == (512, 512)
    # a window the model cannot tile with is refused when the counter is made,
    # before any image (a batch would otherwise stop at its first large image)
    for tile, margin in ((100, 0), (128, 64), (256, 48)):
        with pytest.raises(io.InputError, match="does not fit model"):
            CellCounter(model, config, tile=tile, margin=margin)


def test_the_frames_of_a_large_image_widen_its_sigma_as_a_wells_sites_do(density_counter):
    from celltally.calibration import FRAME_CORRELATION, parts_variance_factor

    assert parts_variance_factor(1.0, 0.1) == parts_variance_factor(0.3, 0.1) == 1.0
    assert parts_variance_factor(4.0, 0.1) == pytest.approx(1.3)
    assert parts_variance_factor(48.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        parts_variance_factor(4.0, 1.5)
    # a 2 x 3-frame mosaic counted in tiles: sigma is the cells' independent sum widened
    # for 6 frames whose errors correlate
    assert density_counter.frame_correlation == FRAME_CORRELATION == 0.1
    image = disc_image(120, shape=(2 * 520, 3 * 696), seed=5)
    result, prepared = density_counter.count_with_input(image)
    frames = prepared.prepared.size / np.prod(density_counter.input_size)
    assert frames == pytest.approx(6.0, rel=0.02)
    cells = count_density(density_counter.model, prepared.prepared, tile=96, margin=32)
    widened = cells.variance * (1 + FRAME_CORRELATION * (frames - 1))
    assert result.std == pytest.approx(np.sqrt(widened), rel=1e-4)
    assert result.std > 1.2 * np.sqrt(cells.variance)
    # a frame of the model's own size keeps its calibrated sigma
    frame_image = disc_image(20, shape=(520, 696), seed=6)
    frame = density_counter.count(frame_image)
    one = count_density(density_counter.model, density_counter.prepare(frame_image), tile=None)
    assert frame.std == pytest.approx(np.sqrt(one.variance), rel=1e-3)


def test_large_image_counts_in_bounded_windows(density_counter):
    """A 4096 x 4096 image: the network never sees more than one tile-sized window."""
    seen: list[tuple[int, ...]] = []
    hook = density_counter.model.segmenter.register_forward_pre_hook(
        lambda _m, args: seen.append(tuple(args[0].shape))
    )
    try:
        result = density_counter.count(disc_image(2000, shape=(4096, 4096)))
    finally:
        hook.remove()
    assert np.isfinite(result.count) and result.count > 0
    assert np.isfinite(result.std) and result.std > 0
    assert len(seen) > 1
    assert max(s[-1] for s in seen) <= 96 and max(s[-2] for s in seen) <= 96
    scale = model_scale(density_counter.config)
    expected = model_shape((4096, 4096), scale)
    assert result.mask.shape == ((expected[0] + 1) // 2, (expected[1] + 1) // 2)


def test_native_frames_keep_the_batched_path(density_counter):
    image = blob_image(20, shape=(520, 696))
    assert isinstance(density_counter.prepare_any(image), np.ndarray)
    other = density_counter.prepare_any(disc_image(20, shape=(700, 700)))
    assert not isinstance(other, np.ndarray)
    assert other.prepared.shape == model_shape((700, 700), density_counter.scale)


def test_count_paths_mixes_frames_and_large_images(density_counter, tmp_path):
    paths = []
    for i, shape in enumerate([(520, 696), (1600, 1200), (520, 696)]):
        path = tmp_path / f"img{i}.tif"
        tifffile.imwrite(path, disc_image(30, shape=shape, seed=i))
        paths.append(path)
    results = dict(density_counter.count_paths(paths, batch_size=2))
    assert set(results) == set(paths)
    for path in paths:
        assert results[path].count == pytest.approx(density_counter.count(path).count, rel=1e-4)


def test_fc_head_refuses_images_larger_than_its_frame(tiny_model):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    with pytest.raises(io.InputError, match="larger than the 696x520 frame"):
        counter.count(disc_image(5, shape=(1040, 1392)))
    assert np.isfinite(counter.count(disc_image(5, shape=(540, 700))).count)


def test_model_scale_defaults_to_the_bbbc_frame():
    scale = model_scale({"input_size": [192, 256]})
    assert scale.native_size == (520, 696)
    assert scale.raw_per_model == pytest.approx((520 / 192, 696 / 256))
    assert model_shape((520, 696), scale) == (192, 256)
    assert model_shape((2048, 2048), scale) == (756, 753)


def test_diameter_and_pixel_size_rescale():
    scale = ModelScale((520, 696), (192, 256), object_diameter_px=28.0, pixel_size_um=0.65)
    assert rescale_factor(scale) == 1.0
    assert rescale_factor(scale, diameter=56.0) == pytest.approx(0.5)
    assert rescale_factor(scale, pixel_size=0.325) == pytest.approx(0.5)
    assert model_shape((1040, 1392), scale, 0.5) == (192, 256)
    with pytest.raises(io.InputError, match="^--pixel-size and --diameter: give only one of"):
        rescale_factor(scale, diameter=10, pixel_size=1)
    with pytest.raises(io.InputError, match="^--diameter and --rescale: give only one of"):
        rescale_factor(scale, diameter=10, rescale=2)
    with pytest.raises(io.InputError, match="positive"):
        rescale_factor(scale, diameter=-3)
    bare = ModelScale((520, 696), (192, 256))
    with pytest.raises(io.InputError, match="does not record the pixel size") as err:
        rescale_factor(bare, pixel_size=0.5)
    assert "--diameter" not in str(err.value)  # it would fail too: no circular advice
    assert "--rescale 2 for 2 x 2-binned images" in str(err.value)  # what works instead
    assert rescale_factor(bare, rescale=2.0) == 2.0  # any model takes the factor itself
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(io.InputError, match="--rescale must be a positive number"):
            rescale_factor(bare, rescale=bad)
    with pytest.raises(io.InputError) as err:
        rescale_factor(bare, rescale=5000.0)
    assert str(err.value) == (  # the factor was given: no unit to check
        "--rescale 5000.0 would rescale the images by 5e+03; celltally rescales by at "
        "most 1000x either way: check the value"
    )
    diameter_only = ModelScale((520, 696), (192, 256), object_diameter_px=28.0)
    with pytest.raises(io.InputError, match="use --diameter"):
        rescale_factor(diameter_only, pixel_size=0.5)
    with pytest.raises(io.InputError, match="does not record the object diameter"):
        rescale_factor(bare, diameter=20)


def test_diameter_brings_a_magnified_image_to_the_model_scale():
    torch.manual_seed(2)
    config = density_config()
    config["scale"] = {"native_size": [520, 696], "object_diameter_px": 10.0}
    small = disc_image(40, shape=(520, 696), seed=5)
    big = np.kron(small, np.ones((2, 2), dtype=small.dtype))  # 2x magnification
    plain = CellCounter(CountingPipeline(config), config, device="cpu")
    torch.manual_seed(2)
    zoomed = CellCounter(CountingPipeline(config), config, device="cpu", diameter=20.0)
    assert zoomed.factor == pytest.approx(0.5)
    assert zoomed.count(big).count == pytest.approx(plain.count(small).count, rel=1e-3)
    torch.manual_seed(2)
    factor = CellCounter(CountingPipeline(config), config, device="cpu", rescale=0.5)
    assert factor.count(big).count == pytest.approx(zoomed.count(big).count, rel=1e-6)
    fc_config = {**tiny_config(), "scale": config["scale"]}
    with pytest.raises(io.InputError, match="'fc' head"):
        CellCounter(CountingPipeline(fc_config), fc_config, diameter=20.0)


def test_normalization_overrides():
    base = {"method": "fixed"}
    assert merge_normalization(base)["method"] == "fixed"
    assert merge_normalization(base, disable=True)["method"] == "none"
    norm = merge_normalization(base, low=1.0, high=99.0)
    assert (norm["method"], norm["low"], norm["high"]) == ("percentile", 1.0, 99.0)
    with pytest.raises(io.InputError, match="low < high"):
        merge_normalization(base, low=50.0, high=10.0)
    with pytest.raises(io.InputError, match="--no-norm"):
        merge_normalization(base, low=1.0, disable=True)


@pytest.mark.parametrize(
    ("name", "array", "channel"),
    [
        ("u8.tif", blob_image(10), None),
        ("u16.tif", blob_image(10, dtype=np.uint16), None),
        ("f32.tif", blob_image(10).astype(np.float32) / 255.0, None),
        ("rgb.png", np.repeat(blob_image(10)[..., None], 3, axis=2), None),
        (
            "multi.tif",
            np.stack([np.zeros((130, 174), np.uint16), blob_image(10, dtype=np.uint16)]),
            1,
        ),
    ],
)
def test_input_types_count(density_counter, tmp_path, name, array, channel):
    path = tmp_path / name
    if name.endswith(".png"):
        from PIL import Image

        Image.fromarray(array).save(path)
    else:
        tifffile.imwrite(path, array)
    counter = CellCounter(
        density_counter.model, density_counter.config, device="cpu", channel=channel
    )
    result = counter.count(path)
    assert np.isfinite(result.count) and result.count >= 0


def test_ome_tiff_channel_selection(density_counter, tmp_path):
    planes = np.stack([blob_image(3, dtype=np.uint16), blob_image(40, dtype=np.uint16, seed=9)])
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, planes, ome=True, metadata={"axes": "CYX"})
    both = [
        CellCounter(density_counter.model, density_counter.config, device="cpu", channel=c)
        for c in (0, 1)
    ]
    counts = [c.count(path).count for c in both]
    direct = [density_counter.count(planes[c]).count for c in (0, 1)]
    assert counts == pytest.approx(direct, rel=1e-5)
    with pytest.raises(io.ImageReadError, match="channel 2 out of range"):
        CellCounter(density_counter.model, density_counter.config, device="cpu", channel=2).count(
            path
        )


def test_cli_reading_and_normalization_options(tiny_model, tmp_path):
    import csv
    import json

    from typer.testing import CliRunner

    from celltally.cli import app

    planes = np.stack([np.zeros((130, 174), np.uint16), blob_image(12, dtype=np.uint16)])
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "two.tif", planes)

    def count(*extra):
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.csv"
        args = ["count", folder, "--out", out, "--model", tiny_model, "--no-progress", *extra]
        result = CliRunner().invoke(app, [str(a) for a in args])
        if result.exit_code:
            return result
        with out.open() as handle:
            return float(next(csv.DictReader(handle))["count"])

    expected = CellCounter.from_pretrained(tiny_model, device="cpu").count(planes[1]).count
    assert count("--channel", "1") == pytest.approx(expected, abs=0.01)
    # --no-norm takes images already scaled to 0-1: raw 16-bit values are refused per image
    refused = count("--channel", "1", "--no-norm")
    assert (
        refused.exit_code == 1
        and "(--no-norm, method 'none') expects intensities scaled to 0-1" in (refused.output)
    )
    tifffile.imwrite(folder / "two.tif", (planes / 4095.0).astype(np.float32))
    plain = count("--channel", "1", "--no-norm")
    assert isinstance(plain, float)  # counted as it is
    tifffile.imwrite(folder / "two.tif", planes)
    count("--channel", "1", "--norm-low", "5", "--norm-high", "99")
    newest = max(tmp_path.glob("r*.manifest.json"), key=lambda p: p.stat().st_mtime_ns)
    options = json.loads(newest.read_text())["settings"]["counter_options"]
    norm = {"method": "percentile", "low": 5.0, "high": 99.0}
    assert options == {"channel": 1, "norm": norm}
    custom = CellCounter.from_pretrained(tiny_model, device="cpu", norm=norm)
    default = CellCounter.from_pretrained(tiny_model, device="cpu")
    assert not np.allclose(custom.prepare(planes[1]), default.prepare(planes[1]))
    # --background subtracts a smooth background first, recorded like the other settings
    count("--channel", "1", "--background", "quadratic")
    newest = max(tmp_path.glob("r*.manifest.json"), key=lambda p: p.stat().st_mtime_ns)
    options = json.loads(newest.read_text())["settings"]["counter_options"]
    assert options["norm"]["background"] == "quadratic"
    # repeating the model's own setting is no new setting: the run resumes, not refused
    again = tmp_path / "again.csv"
    first = CliRunner().invoke(
        app,
        [str(a) for a in ["count", folder, "-o", again, "--model", tiny_model, "--channel", "1"]],
    )
    assert first.exit_code == 0, first.output
    same = [
        "count",
        folder,
        "-o",
        again,
        "--model",
        tiny_model,
        "--channel",
        "1",
        "--background",
        "none",
    ]
    resumed = CliRunner().invoke(app, [str(a) for a in same])
    assert resumed.exit_code == 0 and "note: --background" not in resumed.output, resumed.output
    for extra, message in [
        (("--channel", "1", "--background", "plane"), "--background 'plane': choose quadratic"),
        (("--no-norm", "--background", "quadratic"), "--no-norm cannot be combined"),
        (("--norm-low", "90", "--norm-high", "10"), "low < high"),
        (("--channel", "1", "--diameter", "20"), "does not record the object diameter"),
        (("--channel", "1", "--tile", "100"), "--tile must be a positive multiple of 32"),
        (("--channel", "3"), "channel 3 out of range"),
    ]:
        result = count(*extra)
        assert result.exit_code != 0, extra
        assert message in result.output, result.output


def test_shipped_nuclei_model_counts_16bit_nuclei_beyond_100():
    """The shipped 'nuclei' model on simulated 16-bit nuclei: no saturation above 100."""
    from typer.testing import CliRunner

    from celltally.cli import app
    from celltally.simulate import simulate_scene

    counter = CellCounter.from_pretrained("nuclei", device="cpu")
    assert counter.scale.object_diameter_px == pytest.approx(28.3)
    for n in (20, 160):
        scene = simulate_scene(n, blur=1, stain=1, bit_depth=16, seed=n)
        result = counter.count(scene.image)
        assert result.low <= n <= result.high, (n, result)
    # its ensemble (counters sharing one segmenter) loads and counts too
    ensemble = CellCounter.from_pretrained("nuclei", device="cpu", epistemic=True)
    assert len(ensemble.members) >= 2
    result = ensemble.count(simulate_scene(160, blur=1, stain=1, bit_depth=16, seed=160).image)
    assert result.epistemic_std is not None and result.low <= 160 <= result.high, result
    listing = CliRunner().invoke(app, ["models"])
    assert listing.exit_code == 0
    block = listing.output.split("\nnuclei: ", 1)[1].split("\n\n", 1)[0]
    assert "BBBC039" in block and "held-out test" in block and "counters with --epistemic" in block
    assert "counter head density averaged with unet" in block


def test_images_counted_in_tiles_get_the_deep_feature_check():
    """A frame shrunk 0.4x (cells far smaller than the model knows) is flagged; a 2 x 2
    mosaic of the frame at its true scale is counted in tiles too and is not."""
    from skimage.transform import rescale

    from celltally.simulate import simulate_scene

    counter = CellCounter.from_pretrained("bbbc005", device="cpu")
    limit = counter.calibration["ood"]["feature_distance"]
    frame = simulate_scene(60, blur=1, stain=1, seed=2).image
    shrunk = counter.count(rescale(frame.astype(float), 0.4, preserve_range=True))
    assert shrunk.ood["feature_distance"] > limit
    assert "deep features" in shrunk.warning
    mosaic = counter.count(np.block([[frame, frame], [frame, frame]]))
    assert mosaic.ood["feature_distance"] < limit and not mosaic.warning
    assert mosaic.count == pytest.approx(4 * counter.count(frame).count, rel=0.05)


@pytest.mark.parametrize("averaged", [True, False])
def test_tiled_count_equals_whole_image_count_with_a_unet_counter(averaged):
    # the nuclei model's design: the grid counter averaged with a per-pixel U-Net;
    # and a U-Net alone (density stride 2: the canvas is still padded to 32 px)
    torch.manual_seed(3)
    config = density_config()
    unet = {"head": "unet", "width": 4, "levels": 2, "count_scale": 0.05}
    if averaged:
        config["counter"]["average_with"] = [unet]
    else:
        config["counter"] = unet
    model = CountingPipeline(config).eval()
    assert model.density_stride == (32 if averaged else 2)
    image = disc_image(200, shape=(1200, 1500), seed=6)
    prepared = prepare_image(image, size=(185, 262), norm=None)
    whole = count_density(model, prepared, tile=None)
    tiled = count_density(model, prepared, tile=160, margin=64)
    assert tiled.tiles > 4
    assert tiled.count == pytest.approx(whole.count, rel=TOLERANCE)
    assert tiled.variance == pytest.approx(whole.variance, rel=TOLERANCE)
    # the canvas (density grid x stride) is a multiple of 32 model px either way
    assert all(n * model.density_stride % 32 == 0 for n in whole.density.shape)


def test_a_half_resolution_mask_of_an_odd_side_spans_the_image_exactly():
    from celltally.tiling import fit_extent, resize_to

    height, width, raw = 9, 8, 90  # 9 model rows: 5 mask rows cover 10
    rows = np.arange(5, dtype=np.float32) * 2 + 1  # each cell's centre, in model px
    half = np.repeat(rows[:, None], 4, axis=1)
    expected = (np.arange(raw) + 0.5) * height / raw  # model position of each raw row
    inner = slice(25, 81)  # bilinear resizing clamps within a cell of the edges
    before = resize_to(half, (raw, 40))[:, 0]
    assert np.abs(before - expected)[inner].max() > 0.5  # stretched by 10 / 9
    fitted = fit_extent(half, (height, width))
    assert fitted.shape == half.shape
    after = resize_to(fitted, (raw, 40))[:, 0]
    assert np.abs(after - expected)[inner].max() < 0.05
    even = fit_extent(half[:4], (8, 8))
    np.testing.assert_array_equal(even, half[:4])  # an even side is left as it is


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"diameter": 1e-310}, "--diameter 1e-310 would rescale the images by inf"),
        ({"diameter": 1e9}, "--diameter 1000000000.0 would rescale the images by 2.8e-08"),
        ({"pixel_size": 1e-300}, "--pixel-size 1e-300 would rescale the images by 1.54e-300"),
    ],
)
def test_an_extreme_diameter_or_pixel_size_is_refused_in_one_line(options, shown):
    scale = ModelScale((520, 696), (192, 256), object_diameter_px=28.0, pixel_size_um=0.65)
    with pytest.raises(io.InputError, match="rescales by at most 1000x") as err:
        rescale_factor(scale, **options)
    assert str(err.value).startswith(shown)
