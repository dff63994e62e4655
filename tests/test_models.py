import pytest
import torch

from celltally.models.average import AverageCounter, sum_to_grid
from celltally.models.fpn import FPN
from celltally.models.pipeline import CountingPipeline, add_counter_inputs, counter_input
from celltally.models.presets import PRESETS, get_preset
from celltally.models.unet import UNetCounter
from celltally.models.vgg import VGG11, VGGCounter, make_layers


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pipeline_output_shapes(preset):
    config = get_preset(preset)
    h, w = config["input_size"]
    model = CountingPipeline(config).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 1, h, w))
    assert out.mask.shape == (2, 1, h // 2, w // 2)
    assert out.mask_logvar.shape == (2, 1, h // 2, w // 2)
    assert out.count.shape == (2,)
    assert out.count_logvar.shape == (2,)
    assert bool((out.count >= 0).all())
    assert bool(((out.mask >= 0) & (out.mask <= 1)).all())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fpn_levels_halve_each_time(preset):
    seg = get_preset(preset)["segmenter"]
    fpn = FPN(encoder=seg["encoder"], lateral=seg["lateral"], head=seg["head"]).eval()
    with torch.inference_mode():
        outs = fpn(torch.rand(1, 1, 192, 256))
    assert [m.shape[-2:] for m, _ in outs] == [(96, 128), (48, 64), (24, 32), (12, 16)]
    assert all(lv.shape == m.shape for m, lv in outs)


def test_paper_preset_matches_the_paper():
    config = get_preset("paper")
    model = CountingPipeline(config)
    assert config["input_size"] == [192, 256]
    assert all(conv.out_channels == 128 for conv in model.segmenter.lateral)
    assert all(conv.kernel_size == (3, 3) for conv in model.segmenter.lateral)
    head = model.segmenter.heads[0]
    widths = [m.out_channels for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [256, 256, 2]  # 2 = the mask and its twin log-variance
    convs = [m for m in model.counter.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [c for c in VGG11 if c != "M"]
    linear = [m for m in model.counter.count_head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [1024, 512, 1]
    assert config["counter_inputs"] == ["mask"]


def test_vgg_builder_counts_layers():
    layers = make_layers(VGG11, in_channels=1, width=0.25)
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in layers if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == 8 and len(pools) == 5
    assert convs[0].out_channels == 16


def test_counter_accepts_other_sizes():
    model = VGGCounter(in_channels=1, width=0.125, fc=(16, 8)).eval()
    with torch.inference_mode():
        count, log_var = model(torch.rand(3, 1, 64, 200))
    assert count.shape == (3,) and log_var.shape == (3,)


def test_counter_input_planes():
    mask = torch.rand(2, 1, 4, 6)
    logvar = torch.zeros(2, 1, 4, 6)
    image = torch.ones(2, 1, 8, 12)
    x = counter_input(mask, logvar, image, ["mask", "image"])
    assert x.shape == (2, 2, 4, 6)
    assert torch.equal(x[:, 0], mask[:, 0])
    assert torch.allclose(x[:, 1], torch.ones(2, 4, 6))
    with pytest.raises(ValueError, match="unknown counter input"):
        counter_input(mask, logvar, image, ["nope"])


def test_counter_planes_at_the_input():
    mask = torch.rand(2, 1, 4, 6)
    image = torch.rand(2, 1, 8, 12)
    x = counter_input(mask, mask.log(), image, ["mask", "image", "mask_logvar"], at="input")
    assert x.shape == (2, 3, 8, 12)
    assert torch.equal(x[:, 1:2], image)  # the image is read as it is, not averaged
    # the mask is interpolated, never extrapolated; a flat mask stays flat
    assert x[:, 0].min() >= mask.min() and x[:, 0].max() <= mask.max()
    flat = counter_input(torch.full_like(mask, 0.3), mask, image, ["mask"], at="input")
    assert torch.allclose(flat, torch.full((2, 1, 8, 12), 0.3))
    with pytest.raises(ValueError, match="not defined with planes at the input"):
        counter_input(mask, mask, image, ["image_max"], at="input")
    with pytest.raises(ValueError, match="planes_at must be one of"):
        counter_input(mask, mask, image, ["mask"], at="full")


def test_pipeline_with_planes_at_the_input_keeps_the_density_grid():
    config = get_preset("small")
    at_input = {**config, "counter": {**config["counter"], "planes_at": "input"}}
    h, w = config["input_size"]
    x = torch.rand(2, 1, h, w)
    a, b = CountingPipeline(config).eval(), CountingPipeline(at_input).eval()
    assert a.density_stride == b.density_stride == 32
    assert b.counter.features[0].in_channels == a.counter.features[0].in_channels
    with torch.inference_mode():
        out, dens = b(x), b.density(x)
    assert out.count.shape == (2,) and out.mask.shape == (2, 1, h // 2, w // 2)
    assert dens.count.shape == (2, h // 32, w // 32)
    assert torch.allclose(dens.count.sum((1, 2)), out.count, rtol=1e-5)
    with pytest.raises(ValueError, match="planes_at must be one of"):
        CountingPipeline({**config, "counter": {**config["counter"], "planes_at": "full"}})


def test_block_extremes_keep_what_averaging_blurs():
    # one bright pixel per 2x2 block: the average dims it, the max keeps it
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, 1] = 4.0
    image[0, 0, 3, 3] = -2.0
    mask = torch.zeros(1, 1, 2, 2)
    x = counter_input(mask, mask, image, ["image", "image_max", "image_min"])
    assert torch.equal(x[0, 0], torch.tensor([[1.0, 0.0], [0.0, -0.5]]))
    assert torch.equal(x[0, 1], torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(x[0, 2], torch.tensor([[0.0, 0.0], [0.0, -2.0]]))


@pytest.mark.parametrize("dims", [(-1,), (-2,), (-2, -1)])
@pytest.mark.parametrize("transpose", [False, True])
def test_counter_planes_commute_with_the_plane_symmetries(dims, transpose):
    # what training augmentation and test-time averaging rely on
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 8, 8, generator=gen)
    mask, logvar = torch.rand(2, 1, 4, 4, generator=gen), torch.rand(2, 1, 4, 4, generator=gen)
    names = ["mask", "image", "mask_logvar", "image_max", "image_min"]

    def sym(t):
        t = t.flip(dims)
        return t.transpose(-1, -2) if transpose else t

    planes = counter_input(sym(mask), sym(logvar), sym(image), names)
    # (allclose: the 2x2 average sums its pixels in another order once flipped)
    assert torch.allclose(planes, sym(counter_input(mask, logvar, image, names)), atol=1e-6)


def test_add_counter_inputs_keeps_the_counts():
    config = get_preset("small")
    model = CountingPipeline(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wider, wider_config = add_counter_inputs(model, config, ["image_max", "image_min"])
    wider.eval()
    assert wider_config["counter_inputs"] == ["mask", "image", "image_max", "image_min"]
    assert config["counter_inputs"] == ["mask", "image"]  # the input config is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.rand(2, 1, *config["input_size"])
    with torch.inference_mode():
        assert torch.allclose(wider(x).count, model(x).count)
    # the new planes do reach the counter: its first layer has two more inputs
    assert wider.counter.features[0].in_channels == model.counter.features[0].in_channels + 2
    with pytest.raises(ValueError, match="unknown counter input"):
        add_counter_inputs(model, config, ["image_median"])


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def _settle_batch_norm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Running BN statistics of ``x`` (fresh ones make every output nearly the same), then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model(x)
    model.eval()


@pytest.mark.parametrize("head", ["density", "fc"])
def test_counter_tta_is_symmetric_and_train_mode_untouched(head):
    torch.manual_seed(0)
    model = VGGCounter(in_channels=2, width=0.125, fc=(16, 8), head=head, tta="d8")
    x = torch.rand(2, 2, 64, 96)
    _settle_batch_norm(model, x)
    with torch.inference_mode():
        count, log_var = model(x)
        for flipped in (torch.flip(x, (-1,)), torch.flip(x, (-2, -1)), x.transpose(-1, -2)):
            c, lv = model(flipped)  # the average over all 8 symmetries cannot tell them apart
            assert torch.allclose(c, count, rtol=1e-4) and torch.allclose(lv, log_var, atol=1e-4)
        model.tta = "none"
        plain, _ = model(x)
    assert (plain - count).abs().max() > 1e-2  # an untrained net is far from symmetric
    model.train()  # training sees one orientation per step (augmentation does the rest)
    with torch.no_grad():
        train_plain, _ = model(x)
        model.tta = "d8"
        train_count, _ = model(x)
    assert train_count.shape == (2,)
    assert torch.equal(train_count, train_plain)


def test_density_tta_maps_sum_to_the_count():
    torch.manual_seed(1)
    model = VGGCounter(in_channels=1, width=0.125, fc=(16, 8), head="density", tta="flip")
    x = torch.rand(1, 1, 64, 96)
    _settle_batch_norm(model, x)
    with torch.inference_mode():
        dens, log_var = model.density(x)
        count, total_lv = model(x)
        # the averaged map is equivariant: the map of a mirrored image is the mirrored map
        mirrored, _ = model.density(torch.flip(x, (-1,)))
    assert dens.shape == (1, 4, 6)
    assert torch.allclose(dens.sum((-2, -1)), count, rtol=1e-5)
    assert torch.allclose(torch.logsumexp(log_var.flatten(1), 1), total_lv, atol=1e-5)
    assert torch.allclose(mirrored, torch.flip(dens, (-1,)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dens, torch.flip(dens, (-1,)), rtol=1e-2)  # not trivially so


def test_unknown_tta():
    with pytest.raises(ValueError, match="tta must be one of"):
        VGGCounter(tta="d16")


def _shipped(name: str) -> CountingPipeline:
    from celltally.counter import resolve_model
    from celltally.models.pipeline import load_model_folder

    return load_model_folder(resolve_model(name))[0].eval()


@pytest.mark.parametrize("name", ["bbbc005", "nuclei"])
def test_inference_copy_folds_batchnorm_computes_the_same_and_leaves_the_model(name):
    import numpy as np

    from celltally.models.inference import inference_copy
    from celltally.simulate import simulate_scene
    from celltally.transforms import prepare_image

    model = _shipped(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model, torch.device("cpu"))
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    assert any(isinstance(m, norms) for m in model.modules())
    assert not any(isinstance(m, norms) for m in fast.modules())
    size = {"bbbc005": (192, 256), "nuclei": (384, 512)}[name]
    images = [
        prepare_image(simulate_scene(n, blur=b, stain=s, seed=n).image, size=size)
        for n, b, s in ((5, 1, 1), (60, 23, 2), (95, 48, 1))
    ]
    x = torch.from_numpy(np.stack(images)).unsqueeze(1)
    with torch.inference_mode():
        slow_out, fast_out = model(x), fast(x)
    assert (slow_out.count - fast_out.count).abs().max() < 1e-3  # counts of 5 to 95 cells
    torch.testing.assert_close(fast_out.count_logvar, slow_out.count_logvar, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast_out.mask, slow_out.mask, rtol=0, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and len(model.state_dict()) == len(before)


def test_fold_batchnorm_refuses_a_training_module():
    from celltally.models.inference import fold_batchnorm

    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(make_layers([4], in_channels=1))


def test_inference_copy_folds_the_paper_fc_head_exactly():
    """The paper's FC head (Linear + BatchNorm1d) folds too, with non-trivial statistics."""
    from conftest import tiny_config

    from celltally.models.inference import inference_copy

    torch.manual_seed(3)
    model = CountingPipeline(tiny_config())
    assert model.counter.head == "fc"
    for m in model.modules():  # statistics and affine terms far from the defaults
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    fast = inference_copy(model, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fast.modules())
    x = torch.rand(4, 1, 64, 96)
    with torch.inference_mode():
        slow_out, fast_out = model(x), fast(x)
    torch.testing.assert_close(fast_out.count, slow_out.count, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_out.count_logvar, slow_out.count_logvar, rtol=1e-4, atol=1e-4)


def test_unet_counter_density_sums_to_its_count_at_any_size():
    torch.manual_seed(3)
    model = UNetCounter(in_channels=2, width=4, levels=2, tta="flip")
    x = torch.rand(2, 2, 37, 53)  # not a multiple of the pooling: the decoder resizes
    _settle_batch_norm(model, x)
    with torch.inference_mode():
        dens, log_var = model.density(x)
        count, total_lv = model(x)
        mirrored, _ = model.density(torch.flip(x, (-2,)))
    assert dens.shape == log_var.shape == (2, 37, 53)
    assert (dens >= 0).all()
    assert torch.allclose(dens.sum((-2, -1)), count, rtol=1e-5)
    assert torch.allclose(torch.logsumexp(log_var.flatten(1), 1), total_lv, atol=1e-5)
    assert torch.allclose(mirrored, torch.flip(dens, (-2,)), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="tta must be one of"):
        UNetCounter(tta="d16")


def test_sum_to_grid_keeps_totals():
    values = torch.rand(3, 32, 48)
    grid = sum_to_grid(values, (2, 3), 16)
    assert grid.shape == (3, 2, 3)
    assert torch.allclose(grid.sum((-2, -1)), values.sum((-2, -1)))
    assert grid[0, 1, 2] == pytest.approx(values[0, 16:, 32:].sum().item(), rel=1e-6)
    # sides that are not whole blocks (the coarser counter floors them): the rest goes to
    # the last row / column, so the grid still sums to the whole map
    odd = torch.rand(2, 200, 300)
    folded = sum_to_grid(odd, (6, 9), 32)
    assert folded.shape == (2, 6, 9)
    assert torch.allclose(folded.sum((-2, -1)), odd.sum((-2, -1)), rtol=1e-5)
    assert folded[0, 5, 8] == pytest.approx(odd[0, 160:, 256:].sum().item(), rel=1e-5)
    assert folded[0, 0, 0] == pytest.approx(odd[0, :32, :32].sum().item(), rel=1e-5)


def test_the_nuclei_models_density_sums_to_its_count_at_any_size():
    from celltally.model_folder import resolve_model
    from celltally.models.pipeline import load_model_folder

    model, _ = load_model_folder(resolve_model("nuclei"))
    model.eval()
    torch.manual_seed(0)
    with torch.inference_mode():
        for shape in ((200, 300), (130, 190)):  # not multiples of its 32-px grid
            x = torch.rand(1, 1, *shape)
            count = model(x).count
            assert model.density(x).count.sum().item() == pytest.approx(count.item(), rel=1e-4)


def test_average_counter_is_the_mean_of_its_counters():
    torch.manual_seed(4)
    config = get_preset("small")
    unet = {"head": "unet", "width": 4, "levels": 2, "count_scale": 0.05, "tta": "flip"}
    config["counter"] = {**config["counter"], "tta": "flip", "average_with": [unet]}
    model = CountingPipeline(config)
    assert isinstance(model.counter, AverageCounter)
    assert model.density_stride == CountingPipeline(get_preset("small")).density_stride
    x = torch.rand(2, len(config["counter_inputs"]), 64, 96)
    _settle_batch_norm(model.counter, x)
    grid_counter, unet_counter = model.counter.counters
    with torch.inference_mode():
        count, log_var = model.counter(x)
        (c1, lv1), (c2, lv2) = grid_counter(x), unet_counter(x)
        dens, dens_lv = model.counter.density(x)
    assert torch.allclose(count, (c1 + c2) / 2, rtol=1e-5)
    assert torch.allclose(log_var.exp(), (lv1.exp() + lv2.exp()) / 2, rtol=1e-4)
    assert dens.shape == grid_counter.density(x)[0].shape  # the grid counter's cells
    assert torch.allclose(dens.sum((-2, -1)), count, rtol=1e-5)
    assert torch.allclose(dens_lv.exp().sum((-2, -1)), log_var.exp(), rtol=1e-4)
    with pytest.raises(ValueError, match="at least 2 counters"):
        AverageCounter([grid_counter])
    # a density's sum counts any size; the paper's fixed-size FC head does not
    assert model.counter.counts_any_size and unet_counter.counts_any_size
    assert grid_counter.counts_any_size
    assert not CountingPipeline(get_preset("paper")).counter.counts_any_size
