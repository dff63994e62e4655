"""Saliency maps and the Figure 4 panel (celltally.explain)."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import blob_image, tiny_config
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from celltally import io
from celltally.cli import app
from celltally.counter import CellCounter, CountResult
from celltally.explain import explain_image, explanation_figure, explanation_png, panel_title
from celltally.models.pipeline import CountingPipeline


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine: 2 threads spin on each other (~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LeftStripCounter(nn.Module):
    """A counter that sums only the first ``columns`` columns of its mask plane."""

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.columns = columns

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = x[:, 0, :, : self.columns].sum((-2, -1))
        return count, torch.zeros_like(count)


def strip_counter(columns: int = 8) -> CellCounter:
    torch.manual_seed(0)
    config = copy.deepcopy(tiny_config())
    config["input_size"] = [32, 448]
    model = CountingPipeline(config)
    model.counter = LeftStripCounter(columns)
    return CellCounter(model, config, device="cpu")


def test_saliency_shapes_and_values(tiny_model):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    expl = explain_image(counter, blob_image(12, seed=3))
    h, w = counter.input_size
    assert expl.image.shape == (h, w)
    assert expl.image_saliency.shape == (h, w)
    assert expl.mask.shape == expl.mask_std.shape == expl.mask_saliency.shape == (h // 2, w // 2)
    for array in (expl.mask_saliency, expl.image_saliency):
        assert np.isfinite(array).all() and (array >= 0).all() and array.max() > 0
    assert expl.loss == "count" and expl.true_count is None
    np.testing.assert_allclose(expl.result.count, counter.count(blob_image(12, seed=3)).count)


def test_saliency_is_zero_where_the_count_does_not_depend_on_the_input():
    counter = strip_counter(columns=8)
    image = blob_image(12, shape=(32, 448), seed=1)
    expl = explain_image(counter, image)
    # d(sum of mask[:, :8]) / d mask is exactly 1 there and 0 elsewhere.
    np.testing.assert_array_equal(expl.mask_saliency[:, :8], 1.0)
    np.testing.assert_array_equal(expl.mask_saliency[:, 8:], 0.0)
    # The first 8 mask columns see input columns 0..15 plus the FPN's receptive
    # field (~130 px); beyond that the count cannot depend on the image.
    assert expl.image_saliency[:, :16].max() > 0
    np.testing.assert_array_equal(expl.image_saliency[:, 200:], 0.0)


def test_saliency_with_truth_is_the_nll_gradient():
    counter = strip_counter(columns=8)
    image = blob_image(12, shape=(32, 448), seed=1)
    predicted = counter.count(image).count
    expl = explain_image(counter, image, true_count=predicted + 5.0)
    # NLL with log-variance 0: d/d mu of 0.5 (y - mu)^2 = mu - y = -5 in every counted pixel.
    np.testing.assert_allclose(expl.mask_saliency[:, :8], 5.0, rtol=1e-4)
    assert expl.loss == "nll" and expl.true_count == pytest.approx(predicted + 5.0)


def test_explain_does_not_touch_the_model_or_input(tiny_model):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    image = blob_image(5, seed=2)
    before = image.copy()
    explain_image(counter, image, true_count=5)
    np.testing.assert_array_equal(image, before)
    assert all(p.grad is None for p in counter.model.parameters())
    assert not counter.model.training


def test_figure_png(tiny_model, image_folder, tmp_path):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    path = sorted(image_folder.iterdir())[1]
    expl = explain_image(counter, path, true_count=8)
    assert expl.result.source == str(path) and expl.result.metadata["count"] == 8
    out = explanation_figure(expl, tmp_path / "sub" / "fig.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 2 * img.size[1]
    data = explanation_png(expl, image_saliency=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    title = panel_title(expl.result, 8)
    first, *rest = title.split("\n")
    assert first.endswith("cells (95%), truth 8") and " ± " in first
    # a flagged image says so in the figure too (the tiny test model flags most)
    assert bool(rest) == bool(expl.result.warning)
    lines = [
        "⚠ low contrast: the frame may hold no cells",
        "⚠ unlike the model's calibration images: the interval may not hold",
    ]
    assert all(line in lines for line in rest)
    both = CountResult(  # a warning with both reasons shows both
        count=0.01, std=0.02, low=0.0, high=0.05, level=0.95, mask=None, mask_std=None,
        warning="low contrast (range 0.4 of the empty-frame floor): the frame may hold no "
        "cells; unlike the calibration images (distance 9 > 5; calibration 99th pct limit)",
    )  # fmt: skip
    assert panel_title(both).split("\n") == ["0.01 ± 0.04 cells (95%)", *lines]
    sized = CountResult(  # a warning that names the objects' size gives the factor
        count=180.0, std=3.0, low=174.0, high=186.0, level=0.95, mask=None, mask_std=None,
        warning="unlike the calibration images (distance 9 > 5; calibration 99th pct limit); "
        "its objects look 1.6x as wide as the calibration images': another magnification? "
        "rescale by about 0.62", ood={"size_ratio": 1.62},
    )  # fmt: skip
    assert panel_title(sized).split("\n")[1:] == [
        lines[1],
        "⚠ objects 1.6x as wide as theirs: another magnification? rescale by about 0.62",
    ]
    # counted at 2 already: the width as counted, the factor the whole one to count at
    twice = dataclasses.replace(sized, warning=sized.warning.replace("0.62", "1.2 (counted at 2)"))
    assert panel_title(twice).split("\n")[-1] == (
        "⚠ objects 1.6x as wide as theirs: another magnification? rescale by about 1.2"
    )


def test_explain_corrupt_file_fails_cleanly(tiny_model, tmp_path):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(io.ImageReadError) as info:
        explain_image(counter, bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


def test_cli_explain(tiny_model, image_folder, tmp_path):
    image = sorted(image_folder.iterdir())[0]
    out = tmp_path / "panel.png"
    args = ["explain", str(image), "--out", str(out), "--model", str(tiny_model), "--true", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "cells (95%) (truth 3)" in result.output
    with Image.open(out) as img:
        assert img.format == "PNG"


def test_cli_explain_corrupt_file_is_one_line_error(tiny_model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "panel.png"
    result = CliRunner().invoke(
        app, ["explain", str(bad), "--out", str(out), "--model", str(tiny_model)]
    )
    assert result.exit_code != 0 and not out.exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert "Traceback" not in result.output


def test_explain_an_image_counted_in_tiles():
    """A density-head model counts a non-native image at model scale in tiles; the
    explanation covers the whole model-scale image, with matching shapes."""
    torch.manual_seed(0)
    config = copy.deepcopy(tiny_config())
    config["counter"] = {**config["counter"], "head": "density", "count_scale": 1.0}
    counter = CellCounter(CountingPipeline(config), config, device="cpu")
    image = blob_image(40, shape=(400, 600), seed=4)
    expl = explain_image(counter, image)
    assert expl.image.shape != counter.input_size  # not resized into one frame
    assert expl.image_saliency.shape == expl.image.shape
    h, w = expl.image.shape
    half = (-(-h // 2), -(-w // 2))  # the half-size masks cover every image pixel
    assert expl.mask.shape == expl.mask_std.shape == expl.mask_saliency.shape == half
    assert expl.result.count == pytest.approx(counter.count(image).count)


@pytest.mark.parametrize("shape", [(8, 8), (40, 40), (40, 696), (8, 300)])
def test_explain_a_small_image_or_thin_strip(shape):
    """Explained on the zero-padded canvas counting uses, then cropped back (it crashed)."""
    counter = CellCounter.from_pretrained("bbbc005")
    image = blob_image(1 if min(shape) >= 20 else 0, shape=shape, seed=5)
    expl = explain_image(counter, image)
    assert expl.image.shape == expl.image_saliency.shape
    h, w = expl.image.shape
    half = (-(-h // 2), -(-w // 2))
    assert expl.mask.shape == expl.mask_std.shape == expl.mask_saliency.shape == half
    assert expl.result.count == pytest.approx(counter.count(image).count)
    assert np.isfinite(expl.image_saliency).all()


def test_count_with_input_returns_the_count_and_what_the_model_read(tiny_model):
    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    image = blob_image(12, seed=4)
    original = image.copy()
    result, prepared = counter.count_with_input(image)
    assert prepared.shape == tuple(counter.input_size)
    np.testing.assert_array_equal(prepared, counter.prepare(image))
    np.testing.assert_allclose(result.count, counter.count(image).count)
    np.testing.assert_array_equal(image, original)  # the input is not modified


def test_display_max_shows_a_few_cells_on_an_even_background():
    from celltally.explain import display_max

    sparse = np.full((96, 128), 0.0025)
    sparse[40:44, 60:64] = 0.46  # one cell: 0.13% of the pixels
    assert display_max(sparse) == pytest.approx(0.46)  # not the floor: no all-yellow map
    rng = np.random.default_rng(0)
    varied = rng.uniform(0, 0.2, (96, 128))
    varied[0, 0] = 50.0  # one hot pixel does not wash out a varied map
    assert display_max(varied) < 0.25
    assert display_max(np.zeros((4, 4))) == 1.0


@pytest.mark.parametrize("truth", [float("nan"), 1e39, -1.0])
def test_explain_refuses_a_truth_that_is_no_count(tiny_model, truth):
    from celltally.io import InputError

    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    with pytest.raises(InputError, match="true_count must be a count from 0 to 1e7"):
        explain_image(counter, blob_image(3), true_count=truth)


def test_cli_explain_takes_the_scale_and_normalization_options_of_count(tmp_path):
    """A panel explains the count `count` gave with the same options (here --rescale)."""
    import tifffile
    from skimage.transform import rescale

    from celltally.simulate import simulate_scene

    full = simulate_scene(40, stain=2, seed=8).image.astype(np.float32)
    binned = np.round(rescale(full, 0.5, anti_aliasing=True, preserve_range=True))
    image = tmp_path / "binned.tif"
    tifffile.imwrite(image, binned.astype(np.uint8))
    expected = CellCounter.from_pretrained("bbbc005", rescale=2.0, norm={"high": 99.5})
    shown = str(expected.count(image))  # "40.1 ± 1.9 cells (95%)"
    out = tmp_path / "panel.png"
    args = ["explain", str(image), "-o", str(out), "--rescale", "2", "--norm-high", "99.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{image}: {shown}" in result.output
    refused = CliRunner().invoke(app, [*args[:2], "-o", str(out), "--rescale", "-1"])
    assert refused.exit_code != 0 and refused.output.count("\n") == 1
    assert "--rescale must be a positive number" in refused.output


def test_the_panels_say_what_the_saliency_differentiates_and_show_dim_inputs(tiny_model):
    import dataclasses

    from celltally.explain import _draw

    counter = CellCounter.from_pretrained(tiny_model, device="cpu")
    image = blob_image(6, seed=4)
    image[3, 3] = 255  # one hot pixel
    for truth, of in ((None, "count"), (6.0, "NLL")):
        fig = _draw(
            explain_image(counter, image, true_count=truth),
            title=None,
            true_count=None,
            image_saliency=True,
        )
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles[3:] == [f"saliency |d {of} / d mask|", f"saliency |d {of} / d image|"]
    assert fig.dpi == 100  # a frame's size; a larger image gets more pixels
    large = dataclasses.replace(explain_image(counter, image), image=np.zeros((900, 1200)))
    assert _draw(large, title=None, true_count=None, image_saliency=False).dpi == 400
    # the input's grey scale spans its 0.5-99.5th percentiles, not its hot pixel
    expl = explain_image(counter, image)
    low, high = fig.axes[0].images[0].get_clim()
    assert high < float(expl.image.max())
    assert (low, high) == pytest.approx(tuple(np.percentile(expl.image, [0.5, 99.5])), rel=1e-5)


def test_an_image_too_large_to_explain_and_truths_of_zero(tiny_model, tmp_path, monkeypatch):
    from celltally import explain

    image = tmp_path / "plate_C0_s1.tif"  # _C0_: a true count of 0, from the name
    import tifffile

    tifffile.imwrite(image, blob_image(3, seed=2))
    args = ["explain", str(image), "--model", str(tiny_model)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert "(truth 0, from the file name)" in result.output  # "(truth 0)": a count of 0 is falsy
    negative_zero = CliRunner().invoke(app, [*args, "--true", "-0", "-o", str(tmp_path / "b")])
    assert "(truth 0)" in negative_zero.output  # was "truth -0"
    monkeypatch.setattr(explain, "EXPLAIN_MAX_PIXELS", 100)  # one pass needs ~1 KB per pixel:
    # a whole-well mosaic ran out of memory with a traceback
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c.png")])
    assert refused.exit_code == 2 and "too large to explain in one pass" in refused.output
    assert str(image) in refused.output and "Traceback" not in refused.output


def test_explain_epistemic_explains_the_ensembles_count(tmp_path, monkeypatch):
    """`explain --epistemic` titles and differentiates the count `count --epistemic` gives."""
    import tifffile

    from celltally.simulate import simulate_scene

    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, simulate_scene(40, stain=2, blur=23, seed=9).image)
    plain = CellCounter.from_pretrained("bbbc005")
    ensemble = CellCounter.from_pretrained("bbbc005", epistemic=True)
    one, mixed = explain_image(plain, image), explain_image(ensemble, image)
    assert mixed.result.count == pytest.approx(ensemble.count(image).count)
    assert not np.allclose(one.mask_saliency, mixed.mask_saliency)  # its members' too
    shown = str(ensemble.count(image, level=0.9))
    args = ["explain", str(image), "-o", str(tmp_path / "p.png"), "--epistemic", "--level", "0.9"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{image}: {shown}" in result.output
    # each member keeps its own activations for the backward pass: a lower size limit
    from celltally import explain

    monkeypatch.setattr(explain, "EXPLAIN_MAX_PIXELS", 60_000)  # the frame: 192 x 256
    explain_image(plain, image)
    with pytest.raises(io.InputError, match="too large to explain in one pass with 2 ensemble"):
        explain_image(ensemble, image)


def test_panels_keep_near_their_images_shape():
    from celltally.explain import _layout

    assert _layout((520, 696), 4) == (1, 4, (12.8, 3.0))  # BBBC005's frame: as before
    rows, columns, (width, height) = _layout((130, 1392), 5)  # a strip: stacked
    assert (rows, columns) == (5, 1) and height < 10
    rows, columns, (width, height) = _layout((1560, 174), 4)  # a column: side by side
    assert (rows, columns) == (1, 4) and height <= 9 and width < 12.8


def test_cli_explain_never_writes_over_a_pdf_or_svg_it_did_not_write(
    tiny_model, image_folder, tmp_path
):
    image = sorted(image_folder.iterdir())[0]
    for suffix in (".pdf", ".svg"):
        mine = tmp_path / f"figure{suffix}"
        mine.write_text("a figure of the user's")
        args = ["explain", str(image), "--model", tiny_model, "--out", str(mine)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0, result.output  # was written over, "-> figure.pdf"
        assert "exists and is not a figure celltally wrote" in result.output
        assert mine.read_text() == "a figure of the user's"
        mine.unlink()  # celltally's own figure there is written over on a rerun
        for _ in range(2):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
        assert io.is_own_figure(mine)
