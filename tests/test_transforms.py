import numpy as np
import pytest
import torch

from celltally.calibration import conformal_quantile, conformal_scores, gaussian_quantile
from celltally.datasets import LabeledSet
from celltally.transforms import (
    background_surface,
    contrast,
    dense_strides,
    flip_rotate,
    noise_std,
    normalize_percentile,
    prepare_image,
    resize_area,
)


def test_resize_area_preserves_mean_and_input():
    image = np.random.default_rng(0).integers(0, 255, (520, 696)).astype(np.uint8)
    before = image.copy()
    out = resize_area(image, (192, 256))
    assert out.shape == (192, 256) and out.dtype == np.float32
    assert abs(out.mean() - image.mean()) < 0.5
    assert np.array_equal(image, before)


def test_resize_area_averages_a_shrinking_axis_while_the_other_grows():
    lines = np.zeros((150, 696), dtype=np.float32)
    lines[:, ::8] = 1.0  # one pixel in 8: area averaging gives about 1/8 to 1/3
    out = resize_area(lines, (192, 256))  # rows grow, columns shrink
    assert out.shape == (192, 256)
    assert out.mean() == pytest.approx(0.125, abs=0.005) and out.max() < 0.4
    assert np.allclose(out, resize_area(resize_area(lines, (150, 256)), (192, 256)))


def test_normalize_percentile_maps_range():
    image = np.linspace(0, 100, 10001, dtype=np.float32)
    out = normalize_percentile(image, low=1, high=99)
    assert abs(np.percentile(out, 1)) < 1e-5 and abs(np.percentile(out, 99) - 1) < 1e-5


def test_empty_frame_is_not_stretched():
    rng = np.random.default_rng(0)
    empty = rng.integers(0, 3, (520, 696)).astype(np.uint8)
    out = prepare_image(empty, size=(192, 256))
    assert out.max() < 0.5  # noise of 2 grey levels stays small


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint16", "uint8"])
def test_empty_frame_is_not_stretched_in_any_dtype(dtype):
    # a background-only frame: 1% noise of the dtype's typical full scale
    full = {"float32": 1.0, "int16": 4095, "uint16": 4095, "uint8": 255}[dtype]
    rng = np.random.default_rng(0)
    empty = (rng.random((520, 696)) * 0.01 * full).astype(dtype)
    out = prepare_image(empty, size=(192, 256))
    assert out.max() < 0.6


def test_contrast_says_when_the_empty_frame_guard_set_the_scale():
    rng = np.random.default_rng(3)
    empty = np.clip(rng.normal(300, 20, (520, 696)), 0, None).astype(np.uint16)
    cells = empty.copy()
    cells[100:140, 200:240] += 3000  # one bright object: its own range sets the scale
    for norm in ({}, {"background": "quadratic"}):
        dim = contrast(prepare_image(empty, size=(192, 256), norm=norm), norm=norm)
        assert 0.0 < dim < 0.99, norm
        bright = contrast(prepare_image(cells, size=(192, 256), norm=norm), norm=norm)
        assert bright == pytest.approx(1.0, abs=1e-4), norm
    # np.percentile's range of the prepared image, capped at 1
    smooth = prepare_image(np.add.outer(np.arange(192.0), np.arange(256.0)), size=(192, 256))
    dimmed = smooth * np.float32(0.37) + np.float32(5.0)
    lo, hi = np.percentile(dimmed, [0.5, 99.95])
    assert contrast(dimmed) == pytest.approx(hi - lo, abs=1e-5) and contrast(smooth) == 1.0
    fixed = {"method": "fixed"}
    assert contrast(prepare_image(empty, size=(192, 256), norm=fixed), norm=fixed) is None


@pytest.mark.parametrize("dtype, level, noise", [("uint8", 20, 4), ("uint16", 300, 60)])
def test_a_noise_only_frame_is_not_stretched(dtype, level, noise):
    # noise far above the dtype guard: the noise-std guard keeps it dim
    rng = np.random.default_rng(2)
    empty = np.clip(rng.normal(level, noise, (520, 696)), 0, None).astype(dtype)
    out = prepare_image(empty, size=(192, 256))
    assert out.max() < 0.6
    stretched = prepare_image(empty, size=(192, 256), norm={"noise_range": 0})
    assert stretched.max() > 0.95  # what it was without the guard


def test_noise_std_estimates_white_noise_and_ignores_smooth_signal():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:200, :300]
    smooth = 100 + 0.5 * xx + 40 * np.exp(-((yy - 100) ** 2 + (xx - 150) ** 2) / 2000)
    noisy = smooth + rng.normal(0, 3, smooth.shape)
    assert noise_std(noisy) == pytest.approx(3, rel=0.05)
    assert noise_std(smooth) < 0.1
    assert noise_std(np.zeros((2, 5))) == 0.0


def test_background_surface_follows_uneven_light_not_the_cells():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:192, :256] / 100.0
    light = 200 + 30 * xx - 20 * yy + 15 * (xx - 1.2) ** 2  # ramp + curvature, grey levels
    cells = np.zeros_like(light)
    for cy, cx in rng.uniform([10, 10], [182, 246], (40, 2)):  # 40 bright discs, ~25% cover
        cells[(np.mgrid[:192, :256][0] - cy) ** 2 + (np.mgrid[:192, :256][1] - cx) ** 2 < 80] = 120
    image = (light + cells + rng.normal(0, 2, light.shape)).astype(np.float32)
    before = image.copy()
    surface = background_surface(image)
    assert np.array_equal(image, before)  # the input is not modified
    assert surface.shape == image.shape and surface.dtype == np.float32
    assert np.abs(surface - light).max() < 2.0  # within one noise std, cells ignored
    assert np.abs(background_surface(np.full((50, 60), 7.0)) - 7.0).max() < 1e-4
    assert not background_surface(np.ones((2, 9))).any()


def test_background_surface_on_quantized_empty_and_crowded_frames():
    from celltally.simulate import simulate_scene

    # a blurred 8-bit empty frame: its noise estimate is far below one grey level,
    # which once made the fit shed pixels round after round and bend away
    empty = resize_area(simulate_scene(0, blur=23, stain=2, seed=2).image, (192, 256))
    surface = background_surface(empty, step=1.0)
    assert surface.min() >= empty.min() and np.ptp(empty - surface) <= np.ptp(empty) + 0.2
    # a dark speck or dead-pixel cluster (here 0.25% of the frame, 25 noise stds dark)
    # must not drag the surface down: it once made 18 "cells" of an empty frame
    rng = np.random.default_rng(7)
    specked = rng.normal(1000, 4, (192, 256)).astype(np.float32)
    specked[:10, :12] -= 100
    assert np.ptp(background_surface(specked, step=1.0)) < 4  # one noise std
    # 100 blurred cell bodies leave little background: the surface must stay flat
    crowded = resize_area(simulate_scene(100, blur=48, stain=2, seed=1).image, (192, 256))
    assert np.ptp(background_surface(crowded, step=1.0)) < 0.02 * np.ptp(crowded)


def test_background_option_keeps_an_unevenly_lit_empty_frame_dim():
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:520, :696]
    ramp = 500 + 0.2 * xx + 0.1 * yy  # 180 grey levels across: 12 noise stds
    empty = np.clip(ramp + rng.normal(0, 15, ramp.shape), 0, None).astype(np.uint16)
    stretched = prepare_image(empty, size=(192, 256))
    assert stretched.max() > 0.95  # the ramp spans the whole range
    flat = prepare_image(empty, size=(192, 256), norm={"background": "quadratic"})
    assert np.ptp(flat) < 0.6  # the noise floor keeps it dim once the ramp is gone
    with pytest.raises(ValueError, match="unknown background 'plane'"):
        prepare_image(empty, size=(192, 256), norm={"background": "plane"})


def test_16bit_and_8bit_same_scene_agree_percentile():
    rng = np.random.default_rng(1)
    scene = rng.random((96, 128)).astype(np.float32)
    a = prepare_image((scene * 255).astype(np.uint8), size=(48, 64))
    b = prepare_image((scene * 4095).astype(np.uint16), size=(48, 64))
    assert np.abs(a - b).max() < 0.02


def test_flip_rotate_group():
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(flip_rotate([x], 0)[0], x)
    assert torch.equal(flip_rotate([x], 3)[0], torch.rot90(x, 2, (-2, -1)))


def test_dense_strides_replaces_numpy_zero_strides():
    # NumPy's [:, None] axis has stride 0, which cuDNN misreads on GPU (see test_gpu.py)
    stack = np.random.default_rng(0).random((3, 8, 10), dtype=np.float32)
    weird = torch.from_numpy(stack[:, None])
    assert weird.stride() == (80, 0, 10, 1) and weird.is_contiguous()  # .contiguous() won't fix it
    fixed = dense_strides(weird)
    assert fixed.stride() == (80, 80, 10, 1) and torch.equal(fixed, weird)
    assert dense_strides(fixed) is fixed  # no copy when the strides are already right
    data = LabeledSet(weird, weird.clone(), torch.zeros(3), [{}] * 3)
    assert data.images.stride() == (80, 80, 10, 1) and data.masks.stride() == (80, 80, 10, 1)
    assert weird.stride() == (80, 0, 10, 1)  # the caller's tensor is left alone


def test_conformal_quantile_rank():
    scores = conformal_scores(np.arange(1, 20), np.zeros(19), np.ones(19))
    # n=19: ceil(20*0.95)=19 -> the largest score
    assert conformal_quantile(scores, 0.95) == 19
    assert conformal_quantile(scores, 0.5) == 10
    assert conformal_quantile([], 0.95) == gaussian_quantile(0.95)
    # beyond n / (n + 1) (0.75 for 3 scores): the largest score, extrapolated with a
    # Gaussian tail from the level it belongs to, or T z if wider; growing with the level
    few = [0.5, 1.0, 4.0]
    t = np.sqrt(np.mean(np.square(few)))
    tail = 4.0 * gaussian_quantile(0.9) / gaussian_quantile(0.75)
    assert conformal_quantile(few, 0.9) == pytest.approx(max(tail, t * gaussian_quantile(0.9)))
    assert conformal_quantile(few, 0.75) == 4.0  # the last level the scores support
    levels = np.linspace(0.05, 0.9999, 200)
    multipliers = [conformal_quantile(few, level) for level in levels]
    assert all(b >= a for a, b in zip(multipliers, multipliers[1:], strict=False))
    above = [m for m, level in zip(multipliers, levels, strict=True) if level > 0.75]
    assert all(b > a for a, b in zip(above, above[1:], strict=False))  # never flat
    assert conformal_quantile(scores, 0.999) > 19
    assert abs(gaussian_quantile(0.95) - 1.959964) < 1e-5
    # one or two small scores (a small fine-tuning folder) never narrow an interval
    # beyond what they can promise below the model's own Gaussian one
    assert conformal_quantile([0.212], 0.95) == pytest.approx(gaussian_quantile(0.95))
    assert conformal_quantile([0.1, 0.3], 0.8) == pytest.approx(gaussian_quantile(0.8))
    assert conformal_quantile([0.212], 0.5) == pytest.approx(0.212)  # what 1 score promises


def test_the_shipped_model_counts_no_cells_in_a_noise_only_frame():
    from celltally.counter import CellCounter

    rng = np.random.default_rng(4)
    empty = np.clip(rng.normal(20, 2, (520, 696)), 0, 255).astype(np.uint8)
    result = CellCounter.from_pretrained("bbbc005").count(empty)
    assert result.count < 1.0  # was ~157 before the noise guard
    assert result.warning  # and it is flagged: no calibration image was empty


@pytest.mark.parametrize("illumination", ["ramp", "vignette"])
def test_the_shipped_model_counts_no_cells_in_an_unevenly_lit_empty_frame(illumination):
    from celltally.counter import CellCounter
    from celltally.simulate import empty_frame

    counter = CellCounter.from_pretrained("bbbc005")
    assert counter.norm["background"] == "quadratic"
    frame = empty_frame(bit_depth=16, seed=3, illumination=illumination)
    assert counter.count(frame).count < 1.0
    # without the background subtraction the stretched light is counted as cells
    plain = {**counter.norm, "background": "none"}
    assert CellCounter.from_pretrained("bbbc005", norm=plain).count(frame).count > 20


def test_a_float_image_near_the_float32_limit_prepares_as_its_scaled_copy():
    rng = np.random.default_rng(3)
    image = rng.normal(10.0, 1.0, (130, 174)).astype(np.float32)
    image[40:60, 50:70] += 30.0
    norm = {"method": "percentile", "low": 0.5, "high": 99.5, "background": "quadratic"}
    small = prepare_image(image, size=(48, 64), norm=norm)
    huge = prepare_image(image * np.float32(2.0**120), size=(48, 64), norm=norm)  # ~1.3e37
    assert np.isfinite(huge).all()
    np.testing.assert_allclose(huge, small, atol=1e-5)
    ordinary = image * np.float32(2.0**30)  # below 2**40: prepared as it is, untouched
    kept = ordinary.copy()
    prepare_image(ordinary, size=(48, 64), norm=norm)
    assert np.array_equal(ordinary, kept)


def test_a_16bit_image_divided_by_65535_keeps_its_integers_floor():
    from celltally.transforms import min_range_for, prepare_image

    rng = np.random.default_rng(0)
    dim = (rng.integers(100, 350, (120, 160))).astype(np.uint16)  # range 250 of a 12-bit camera
    as_float = dim.astype(np.float32) / 65535  # as skimage.img_as_float gives it
    assert min_range_for(as_float.dtype, image=as_float) == pytest.approx(
        min_range_for(dim.dtype) / 65535
    )
    np.testing.assert_allclose(
        prepare_image(as_float, size=(60, 80)), prepare_image(dim, size=(60, 80)), atol=1e-4
    )
    eight = (rng.integers(0, 256, (120, 160)) / 255).astype(np.float32)  # from 8 bits: as before
    assert min_range_for(eight.dtype, image=eight) == min_range_for(np.float32)
    smooth = rng.random((120, 160)).astype(np.float32)  # any other float: taken as 0..1
    assert min_range_for(smooth.dtype, image=smooth) == min_range_for(np.float32)


def test_scaled_up_integer_data_keep_their_empty_frame_floor():
    from celltally.simulate import simulate_scene
    from celltally.transforms import grey_step, prepare_image

    empty = simulate_scene(0, stain=1, blur=48, seed=42).image  # grey levels 0 and 1 only
    cells = simulate_scene(40, stain=2, blur=23, seed=3).image
    assert grey_step(empty.astype(np.uint16) * 257) == 257 and grey_step(cells) == 1
    for image in (empty, cells):
        eight = prepare_image(image, size=(192, 256))
        for scaled in (image.astype(np.uint16) * 257, image.astype(np.uint16) << 8):
            # 8-bit data x 257 (skimage.img_as_uint) was stretched as a 12-bit frame:
            # a blurred empty frame's two grey levels became 85 "cells"
            np.testing.assert_allclose(prepare_image(scaled, size=(192, 256)), eight, atol=1e-4)


def test_only_the_usual_scalings_count_as_scaled_data():
    from celltally.transforms import grey_step, min_range_for

    rng = np.random.default_rng(0)
    dim = rng.integers(100, 131, size=(64, 96)).astype(np.uint16)  # a dim 16-bit frame
    for image in (dim * 2, np.where(dim > 115, 255, 0).astype(np.uint16), dim * 65535 // 130):
        # an even-valued frame or a 0 / 255 mask is not 8-bit data scaled up: its floor
        # stays the 12-bit one (x 2 lowered it, and an empty frame counted 65 cells)
        assert grey_step(image) == 1
        assert min_range_for(image.dtype, image=image) == min_range_for(np.dtype(np.uint16))
    assert grey_step(dim * 16) == 16 and grey_step(dim * 256) == 256
