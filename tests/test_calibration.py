"""Interval calibration, the epistemic ensemble and out-of-distribution flags."""

import json
import math
import shutil

import numpy as np
import pytest
import tifffile
import torch
from conftest import blob_image, tiny_config

from celltally import io
from celltally.calibration import (
    OOD_FEATURES,
    beyond_calibration,
    calibrate,
    conformal_quantile,
    coverage,
    coverage_tolerance,
    feature_distance,
    feature_reference,
    gaussian_quantile,
    interval_multiplier,
    ood_features,
    ood_thresholds,
    ood_warning,
    reliability,
    suggested_rescale,
    temperature_scale,
)
from celltally.counter import CellCounter
from celltally.datasets import LabeledSet
from celltally.models.pipeline import CountingPipeline
from celltally.train import save_model_folder, train_counter, train_segmenter
from celltally.transforms import prepare_image, resize_area
from celltally.uncertainty import calibrate_model, ensemble_files, load_members, train_ensemble

LEVELS = (0.8, 0.9, 0.95)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine: 2 threads spin on each other (~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noisy_counts(n, seed, *, scale=1.0, df=3):
    """Counts with a known noise model: y = mu + scale * sigma * t_df (heavy-tailed)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(1, 100, n)
    sigma = 0.5 + 0.03 * mu
    y = mu + scale * sigma * rng.standard_t(df, n)
    return y, mu, sigma


@pytest.mark.parametrize("level", LEVELS)
def test_conformal_reaches_nominal_coverage(level):
    n_cal, n_test = 2000, 50000
    block = calibrate(*noisy_counts(n_cal, seed=1))
    y, mu, sigma = noisy_counts(n_test, seed=2)
    observed = coverage(y, mu, sigma, interval_multiplier(block, level))
    # Split-conformal coverage given the calibration set is Beta-distributed with
    # variance ~ level (1 - level) / n_cal; the test set adds a binomial term.
    tolerance = coverage_tolerance(level, n_cal) + coverage_tolerance(level, n_test) + 1 / n_cal
    assert abs(observed - level) <= tolerance
    # The raw Gaussian interval is wrong for this heavy-tailed noise: the test has power.
    gaussian = coverage(y, mu, sigma, interval_multiplier(block, level, "gaussian"))
    t_truth = 2 * __import__("scipy").stats.t.cdf(gaussian_quantile(level), 3) - 1
    assert gaussian == pytest.approx(t_truth, abs=coverage_tolerance(level, n_test))
    assert abs(gaussian - level) > tolerance


def test_conformal_rank_is_exact_where_the_float_product_is_not():
    from fractions import Fraction

    from celltally.calibration import conformal_quantile, conformal_rank

    assert conformal_quantile(np.arange(1, 75.0), 0.68) == 51.0  # 75 * 0.68 = 51, not 52
    for level in (0.5, 0.68, 0.8, 0.9, 0.95, 0.99):
        for n in range(1, 3000):
            exact = -((-(n + 1) * Fraction(str(level))) // 1)  # ceil in exact arithmetic
            assert conformal_rank(n, level) == exact, (n, level)


def test_a_temperature_from_few_images_never_narrows_the_interval():
    from celltally.calibration import MIN_TEMPERATURE_IMAGES

    z = gaussian_quantile(0.95)
    few = {"temperature": 0.315, "n": 1, "scores": [0.315]}
    assert interval_multiplier(few, 0.95, "temperature") == pytest.approx(z)
    many = {"temperature": 0.8, "n": MIN_TEMPERATURE_IMAGES}
    assert interval_multiplier(many, 0.95, "temperature") == pytest.approx(0.8 * z)
    wide = {"temperature": 1.4, "n": 3}
    assert interval_multiplier(wide, 0.95, "temperature") == pytest.approx(1.4 * z)


def test_temperature_scaling_recovers_a_known_scale():
    n = 20000
    rng = np.random.default_rng(5)
    mu = rng.uniform(1, 100, n)
    sigma = 0.5 + 0.03 * mu
    y = mu + 2.5 * sigma * rng.standard_normal(n)  # the model's sigma is 2.5x too small
    t = temperature_scale(y, mu, sigma)
    # T^2 is a mean of n chi-square(1) variables * 6.25: relative sd of T = 1 / sqrt(2 n).
    assert t == pytest.approx(2.5, abs=4 * 2.5 / math.sqrt(2 * n))
    block = calibrate(y, mu, sigma)
    assert block["nll_temperature"] < block["nll_raw"]
    for level in LEVELS:
        cover = coverage(y, mu, sigma, interval_multiplier(block, level, "temperature"))
        assert abs(cover - level) <= coverage_tolerance(level, n)
    json.dumps(block)  # storable in a config


def test_multiplier_methods_and_fallbacks():
    y, mu, sigma = noisy_counts(500, seed=3)
    block = calibrate(y, mu, sigma)
    assert block["default"] == "conformal" and block["n"] == 500
    assert block["scores"] == sorted(block["scores"])
    assert interval_multiplier(block, 0.9) == conformal_quantile(block["scores"], 0.9)
    assert interval_multiplier(block, 0.9, "temperature") == pytest.approx(
        block["temperature"] * gaussian_quantile(0.9)
    )
    assert interval_multiplier({}, 0.95) == pytest.approx(1.959964, abs=1e-5)
    assert interval_multiplier(None, 0.95, "temperature") == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError, match="unknown calibration method"):
        interval_multiplier(block, 0.9, "isotonic")
    with pytest.raises(ValueError, match="level"):
        interval_multiplier(block, 1.5)
    curve = reliability(y, mu, sigma, block, levels=(0.5, 0.9))
    assert set(curve) == {"level", "conformal", "temperature", "gaussian"}
    assert all(len(v) == 2 for v in curve.values())


def test_ood_thresholds_and_warning():
    rng = np.random.default_rng(0)
    features = [
        ood_features(c, np.full((4, 4), rng.uniform(0.01, 0.05)), spread=0.1, feature_distance=d)
        for c, d in zip(rng.integers(1, 100, 200), rng.uniform(1, 3, 200), strict=True)
    ]
    limits = ood_thresholds(features)
    assert limits["n"] == 200 and 0.04 < limits["mask_std"] <= 0.05
    assert 2.9 < limits["feature_distance"] <= 3.0 and "spread" not in limits
    assert ood_warning(features[0], limits) == ""
    strange = ood_features(10, np.full((4, 4), 0.3), feature_distance=7.0)
    message = ood_warning(strange, limits)
    assert "mask uncertainty" in message and "deep features" in message and "\n" not in message
    # Without fitted thresholds the loose fallback (mask std only) applies.
    assert ood_warning(strange, None).startswith("unlike")
    assert ood_warning(features[0], None) == ""
    # A frame whose range the empty-frame guard set is called possibly empty, alone
    # or before the other reasons; contrast is never given a fitted threshold.
    dim = ood_features(3, np.full((4, 4), 0.02), feature_distance=1.5, contrast=0.43)
    assert ood_warning(dim, limits) == (
        "low contrast (range 0.43 of the empty-frame floor): the frame may hold no cells"
    )
    both = ood_warning({**strange, "contrast": 0.5}, limits)
    assert both.startswith("low contrast (range 0.50") and "; unlike the calibration" in both
    assert ood_warning({**features[0], "contrast": 1.0}, limits) == ""
    assert "contrast" not in ood_thresholds([{**f, "contrast": 0.5} for f in features])


def test_a_threshold_on_held_out_distances_flags_about_its_share_of_new_images():
    from celltally.calibration import feature_distance, feature_reference, held_out_distances

    rng = np.random.default_rng(0)
    scale = 1.0 / np.arange(1, 97)  # 96 features, a falling spectrum as deep features have

    def draw(n):
        return rng.normal(size=(n, 96)) * scale

    new = draw(20000)
    for n in (20, 100):
        alarms_in, alarms_out = [], []
        for _ in range(6):
            x = draw(n)
            reference = feature_reference(x)
            d_new = feature_distance(new, reference)
            in_sample = np.quantile(feature_distance(x, reference), 0.9)
            held = held_out_distances(x, groups=np.arange(n) // 2)  # pairs stay together
            alarms_in.append(np.mean(d_new > in_sample))
            alarms_out.append(np.mean(d_new > np.quantile(held, 0.9)))
        # nominal 10%: the in-sample threshold flags far more, the held-out one about that
        assert np.mean(alarms_in) > 0.2, n
        assert 0.03 < np.mean(alarms_out) < 0.16, (n, alarms_out)
    one_field = draw(20)  # a time-lapse of one field: one group, so single-image folds
    assert np.allclose(
        held_out_distances(one_field, groups=["a"] * 20), held_out_distances(one_field)
    )
    # one field and one image of another: holding the field out would leave 1 image
    assert np.allclose(
        held_out_distances(one_field, groups=["a"] * 19 + ["b"]), held_out_distances(one_field)
    )
    with pytest.raises(ValueError, match="2 or more images"):
        held_out_distances(draw(1))


def test_feature_distance_is_mahalanobis():
    rng = np.random.default_rng(1)
    d, n = 6, 4000
    scales = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 0.2])
    x = rng.standard_normal((n, d)) * scales + 10.0
    reference = feature_reference(x, shrinkage=1e-6)  # ~ no shrinkage: the sample covariance
    fresh = rng.standard_normal((n, d)) * scales + 10.0
    # Squared Mahalanobis distances of Gaussian points are chi-square with d degrees.
    assert np.mean(feature_distance(fresh, reference) ** 2) == pytest.approx(d, rel=0.05)
    far = 10.0 + np.array([0, 0, 0, 0, 0, 2.0])  # 10 sd along the narrowest axis
    assert feature_distance(far, reference)[0] == pytest.approx(10.0, rel=0.05)
    with pytest.raises(ValueError, match="shrinkage"):
        feature_reference(x, shrinkage=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        feature_reference(x[:1])


def test_one_gaussian_per_class_flags_what_lies_between_the_classes():
    from celltally.calibration import feature_classes, held_out_distances

    rng = np.random.default_rng(2)
    d, n = 8, 200
    offset = np.zeros(d)
    offset[0] = 12.0  # two stains, far apart along one axis
    x = np.concatenate([rng.standard_normal((n, d)), rng.standard_normal((n, d)) + offset])
    stains = [1] * n + [2] * n
    between = rng.standard_normal((50, d)) + offset / 2  # e.g. a stain-2 frame shrunk
    same = np.concatenate([rng.standard_normal((25, d)), rng.standard_normal((25, d)) + offset])
    classes = feature_classes(stains, min_images=20)
    assert classes == ["1"] * n + ["2"] * n
    flagged = {}
    for name, labels in (("one", None), ("per class", classes)):
        reference = feature_reference(x, classes=labels)
        assert reference["mean"].shape == (1 if labels is None else 2, d)
        limit = np.quantile(held_out_distances(x, classes=labels), 0.99)
        flagged[name] = (
            np.mean(feature_distance(between, reference) > limit),
            np.mean(feature_distance(same, reference) > limit),
        )
    assert flagged["one"][0] < 0.1 and flagged["per class"][0] > 0.9, flagged
    assert flagged["per class"][1] < 0.1, flagged  # images like the classes' still pass
    # no classes where a label is missing, there is one class, or a class is small
    assert feature_classes([1, None] * 30, min_images=20) is None
    assert feature_classes([1] * 60, min_images=20) is None
    assert feature_classes([1] * 50 + [2] * 10, min_images=20) is None
    with pytest.raises(ValueError, match="class '2' has 1 embedding"):
        feature_reference(x[:3], classes=["1", "1", "2"])
    # a fold that leaves each class one image: one Gaussian of the rest, no crash
    labels = ["1"] * 20 + ["2"] * 20 + ["1", "2"]
    scenes = ["A"] * 40 + ["B"] * 2
    lone = held_out_distances(x[:42], groups=scenes, classes=labels)
    assert lone.shape == (42,) and np.isfinite(lone).all()
    one = feature_reference(x[40:42])
    assert np.allclose(lone[:40], feature_distance(x[:40], one))


def test_a_reference_saved_before_classes_reads_as_one_class():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 5))
    reference = feature_reference(x)
    flat = {"mean": reference["mean"][0], "precision": reference["precision"][0]}  # (d,), (d, d)
    assert np.allclose(feature_distance(x, flat), feature_distance(x, reference))


# -- a tiny model trained on blob images -------------------------------------


def blob_set(n, seed, config):
    rng = np.random.default_rng(seed)
    images, masks, counts = [], [], []
    for i in range(n):
        c = int(rng.integers(1, 25))
        raw = blob_image(c, seed=seed * 1000 + i)
        images.append(prepare_image(raw, size=config["input_size"], norm=config["normalization"]))
        masks.append(resize_area((raw > 60).astype(np.float32), config["input_size"]))
        counts.append(c)
    return LabeledSet(
        torch.from_numpy(np.stack(images)[:, None]),
        torch.from_numpy(np.stack(masks)[:, None]),
        torch.tensor(counts, dtype=torch.float32),
        # 4 sites per well, so the calibration can measure the within-well correlation
        [{"name": f"blob{seed}_B{i // 4 + 1:02d}_s{i % 4 + 1}_w1.tif"} for i in range(n)],
    )


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory):
    """A tiny model briefly trained on blob images, calibrated, with a 2-member ensemble."""
    torch.manual_seed(0)
    config = tiny_config()
    train, cal = blob_set(48, 1, config), blob_set(60, 2, config)
    model = CountingPipeline(config)
    quiet = {"progress": False, "log": lambda s: None, "device": torch.device("cpu")}
    train_segmenter(model, train, epochs=6, batch_size=8, lr=3e-3, **quiet)
    train_counter(model, train, epochs=8, batch_size=8, lr=3e-3, **quiet)
    folder = save_model_folder(model, config, tmp_path_factory.mktemp("blob") / "model")
    # the same device as the ensemble, whose refit of member 0 must match this exactly
    calibrate_model(folder, cal, log=lambda s: None, device="cpu")
    before = json.loads((folder / "config.json").read_text())["calibration"]
    train_ensemble(folder, train, cal, members=2, epochs=8, **quiet)
    return folder, before


def test_new_ensemble_members_leave_the_plain_calibration_alone(blob_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(blob_model[0], folder)
    before = json.loads((folder / "config.json").read_text())["calibration"]
    reference = (folder / "ood.safetensors").read_bytes()
    config = tiny_config()
    quiet = {"progress": False, "log": lambda s: None, "device": torch.device("cpu")}
    other = blob_set(24, 3, config)  # another, smaller calibration split
    train_ensemble(folder, blob_set(16, 4, config), other, members=2, epochs=1, **quiet)
    block = json.loads((folder / "config.json").read_text())["calibration"]
    assert {k: v for k, v in block.items() if k != "epistemic"} == {
        k: v for k, v in before.items() if k != "epistemic"
    }
    assert block["epistemic"]["n"] == 24 and block["epistemic"]["ood"] == before["ood"]
    assert (folder / "ood.safetensors").read_bytes() == reference
    said: list[str] = []  # too few to guarantee 95%: said, as calibrate says it
    few = {**quiet, "log": said.append}
    train_ensemble(
        folder, blob_set(16, 4, config), blob_set(8, 5, config), members=2, epochs=1, **few
    )
    assert any(
        line.startswith("only 8 calibration image(s): they guarantee --epistemic intervals up to")
        for line in said
    ), said
    assert "replaced the model's 1 earlier ensemble member(s) by 1 new one(s)" in said


def test_calibrate_model_stores_both_methods_and_thresholds(blob_model):
    folder, before = blob_model
    block = json.loads((folder / "config.json").read_text())["calibration"]
    assert block["n"] == 60 and len(block["scores"]) == 60 and block["temperature"] > 0
    assert {"mask_std", "feature_distance"} <= set(block["ood"])
    assert (folder / "ood.safetensors").is_file()
    wells = block["well_correlation"]  # 60 images = 15 wells x 4 sites
    assert wells["groups"] == 15 and wells["pairs"] == 15 * 6 and 0 <= wells["value"] <= 1
    assert block["scores"] == before["scores"]  # the ensemble leaves member 0's block alone
    ens = block["epistemic"]
    assert ens["members"] == 2 and len(ens["scores"]) == 60
    assert {"mask_std", "feature_distance"} <= set(ens["ood"])


def test_calibration_names_with_two_stains_fit_one_reference_per_stain(blob_model, tmp_path):
    from safetensors.numpy import load_file

    folder = tmp_path / "model"
    shutil.copytree(blob_model[0], folder)
    cal = blob_set(60, 2, tiny_config())
    quiet = {"log": lambda s: None, "device": "cpu"}
    for stains, rows in (([1, 2] * 30, 2), ([1] * 60, 1)):
        meta = [{**m, "stain": s} for m, s in zip(cal.meta, stains, strict=True)]
        labelled = LabeledSet(cal.images, cal.masks, cal.counts, meta)
        block = calibrate_model(folder, labelled, **quiet)
        reference = load_file(str(folder / "ood.safetensors"))
        assert reference["mean"].shape[0] == rows
        assert reference["precision"].shape[:2] == (rows, reference["mean"].shape[1])
        classes = {"by": "stain", "images": {"1": 30, "2": 30}} if rows == 2 else None
        assert block["ood"].get("feature_classes") == classes
        assert block["epistemic"]["ood"].get("feature_classes") == classes
        counted = CellCounter.from_pretrained(folder, device="cpu").count_prepared(
            list(cal.images[:4, 0].numpy())
        )
        assert all(np.isfinite(r.ood["feature_distance"]) for r in counted)


def test_count_scale_corrects_a_known_bias_and_a_refit_removes_it(blob_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(blob_model[0], folder)
    cal = blob_set(60, 2, tiny_config())
    images = list(cal.images[:, 0].numpy())
    raw = CellCounter.from_pretrained(folder, device="cpu").count_prepared(images)
    mu = np.array([r.count for r in raw])
    # truths 25% above what the model counts: a bias the factor must take out
    biased = LabeledSet(cal.images, cal.masks, cal.counts * 1.25, cal.meta)
    quiet = {"log": lambda s: None, "device": "cpu"}
    block = calibrate_model(folder, biased, count_scale=("plain", "epistemic"), **quiet)
    scale = block["count_scale"]
    assert scale == pytest.approx(1.25 * float(cal.counts.sum()) / mu.sum(), rel=1e-4)
    assert block["epistemic"]["count_scale"] > 1.0
    # the intervals' scores are out of sample: each image corrected without itself
    y, sd = 1.25 * cal.counts.numpy(), np.array([r.std for r in raw])
    loo = (y.sum() - y) / (mu.sum() - mu)
    expected = np.sort(np.abs(y - mu * loo) / (sd * loo))
    assert block["scores"] == pytest.approx(expected, abs=1e-4)
    fixed = CellCounter.from_pretrained(folder, device="cpu").count_prepared(images)
    assert [r.count for r in fixed] == pytest.approx(mu * scale, rel=1e-5)
    assert [r.std for r in fixed] == pytest.approx([r.std * scale for r in raw], rel=1e-5)
    # a refit without it starts from the raw counts again, not the corrected ones
    said = []
    block = calibrate_model(folder, cal, log=said.append, device="cpu")
    assert any(line.startswith("dropped the epistemic counts' earlier correction") for line in said)
    assert "count_scale" not in block and "count_scale" not in block["epistemic"]
    again = CellCounter.from_pretrained(folder, device="cpu").count_prepared(images)
    assert [r.count for r in again] == pytest.approx(mu, rel=1e-5)
    with pytest.raises(ValueError, match="count_scale"):
        calibrate_model(folder, cal, count_scale=("total",), **quiet)
    # truths that are all 0 (empty wells) give no factor: 0 would count every image as 0 +- 0
    empty = LabeledSet(cal.images, cal.masks, cal.counts * 0, cal.meta)
    with pytest.raises(ValueError, match="true counts are above zero"):
        calibrate_model(folder, empty, count_scale=("plain",), **quiet)
    for member in folder.glob("ensemble_*.safetensors"):  # without members: nothing to correct
        member.unlink()
    with pytest.raises(ValueError, match="no ensemble members"):
        calibrate_model(folder, cal, count_scale=("epistemic",), **quiet)


def test_out_of_distribution_images_are_flagged(blob_model):
    counter = CellCounter.from_pretrained(blob_model[0], device="cpu")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (130, 174)).astype(np.uint8)
    checker = ((np.indices((130, 174)) // 8).sum(0) % 2 * 200).astype(np.uint8)
    for strange in (noise, checker):
        result = counter.count(strange)
        assert "unlike the calibration images (" in result.warning
        assert result.ood["feature_distance"] > counter.calibration["ood"]["feature_distance"]
        assert "deep features" in result.warning
    # pure noise, all its range within 20 noise stds, is also said to be possibly empty
    assert counter.count(noise).warning.startswith("low contrast (range ")
    assert counter.count(checker).ood["contrast"] == 1.0
    fresh = [counter.count(blob_image(int(c), seed=5000 + i)) for i, c in enumerate(range(2, 22))]
    # Each of the 2 features is flagged above the 99th percentile of 60 calibration
    # images: ~2.5% of fresh in-distribution images each, so ~1 of these 20 expected.
    assert sum(bool(r.warning) for r in fresh) <= 3


def test_epistemic_counter_adds_the_ensemble_spread(blob_model):
    folder = blob_model[0]
    assert [p.name for p in ensemble_files(folder)] == ["ensemble_1.safetensors"]
    plain = CellCounter.from_pretrained(folder, device="cpu")
    ens = CellCounter.from_pretrained(folder, device="cpu", epistemic=True)
    assert ens.epistemic and not plain.epistemic
    image = blob_image(12, seed=77)
    a, b = plain.count(image), ens.count(image)
    assert a.epistemic_std is None and b.epistemic_std > 0
    assert "spread" in b.ood and "spread" not in a.ood  # reported, not warned on
    # Two members: count = their mean, total var = mean aleatoric var + spread^2.
    second = CellCounter(CountingPipeline(tiny_config()), plain.config, device="cpu")
    second.model.load_state_dict(plain.model.state_dict())
    second.model.counter.load_state_dict(ens.members[0].state_dict())
    c = second.count(image)
    assert b.count == pytest.approx((a.count + c.count) / 2, rel=1e-5)
    assert b.epistemic_std == pytest.approx(abs(a.count - c.count) / 2, rel=1e-4)
    assert b.std**2 == pytest.approx((a.std**2 + c.std**2) / 2 + b.epistemic_std**2, rel=1e-4)
    assert ens.calibration["members"] == 2  # the ensemble's own calibration block


def test_a_member_may_carry_its_own_counter_shape(tmp_path):
    """A member whose U-Net part is wider than the model's own loads from its file's metadata."""
    from safetensors.torch import save_file

    config = tiny_config()
    unet = {"head": "unet", "width": 4, "levels": 2, "count_scale": 0.05, "tta": "flip"}
    config["counter"] = {**config["counter"], "head": "density", "average_with": [unet]}
    wide = {**config["counter"], "average_with": [{**unet, "width": 8}]}
    torch.manual_seed(1)
    member = CountingPipeline({**config, "counter": wide}).counter
    state = {k: v.contiguous() for k, v in member.state_dict().items()}
    save_file(state, str(tmp_path / "ensemble_1.safetensors"))
    with pytest.raises(io.InputError, match="ensemble_1.safetensors: not a counter of this model"):
        load_members(tmp_path, config)  # without its shape it does not fit
    metadata = {"counter": json.dumps(wide)}
    save_file(state, str(tmp_path / "ensemble_1.safetensors"), metadata=metadata)
    (loaded,) = load_members(tmp_path, config)
    narrow = CountingPipeline(config).counter
    assert sum(v.numel() for v in state.values()) > sum(
        v.numel() for v in narrow.state_dict().values()
    )
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key])
    (tmp_path / "ensemble_1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(io.InputError, match="not a counter of this model"):
        load_members(tmp_path, config)


def test_epistemic_without_members_fails_cleanly(tiny_model):
    with pytest.raises(io.InputError, match="no ensemble members"):
        CellCounter.from_pretrained(tiny_model, epistemic=True)


def test_cli_count_epistemic_and_warning_column(blob_model, tiny_model, tmp_path):
    import csv

    import tifffile
    from typer.testing import CliRunner

    from celltally.cli import app

    folder = tmp_path / "images"
    folder.mkdir()
    noise = np.random.default_rng(3).integers(0, 256, (130, 174)).astype(np.uint8)
    tifffile.imwrite(folder / "noise.tif", noise)
    tifffile.imwrite(folder / "blobs.tif", blob_image(9, seed=123))
    runner = CliRunner()
    rows = {}
    for flag in ("--no-epistemic", "--epistemic"):
        out = tmp_path / f"counts{flag}.csv"
        args = ["count", str(folder), "-o", str(out), "--model", str(blob_model[0]), flag]
        result = runner.invoke(app, [*args, "--no-progress"])
        assert result.exit_code == 0, result.output
        assert f"1 of 2 images in {out} with so little contrast that they may hold no cells" in (
            result.output
        )
        assert f"1 of 2 images in {out} flagged as unlike the model's" in result.output
        with open(out, newline="") as handle:
            rows[flag] = {r["file"].split("/")[-1]: r for r in csv.DictReader(handle)}
    for table in rows.values():
        assert "unlike the calibration images (" in table["noise.tif"]["warning"]
        assert table["blobs.tif"]["warning"] == ""
    # The ensemble's total std includes the members' spread.
    plain, ens = rows["--no-epistemic"]["blobs.tif"], rows["--epistemic"]["blobs.tif"]
    assert float(ens["std"]) != float(plain["std"])
    bad = runner.invoke(
        app,
        [
            "count",
            str(folder),
            "-o",
            str(tmp_path / "x.csv"),
            "--model",
            str(tiny_model),
            "--epistemic",
            "--no-progress",
        ],
    )
    assert bad.exit_code != 0 and "no ensemble members" in bad.output
    assert "Traceback" not in bad.output


def test_cli_calibrate_and_ensemble_on_a_folder(tiny_model, tmp_path):
    import shutil

    import tifffile
    from typer.testing import CliRunner

    from celltally.cli import app
    from celltally.datasets import load_folder
    from celltally.training_data import split_by_scene_hash

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = tmp_path / "plate"
    data.mkdir()
    for i in range(24):
        n = 2 + i
        name = f"SIMCEPImages_A{i + 1:02d}_C{n}_F1_s01_w1.TIF"
        tifffile.imwrite(data / name, blob_image(n, seed=300 + i))
    cal_size = split_by_scene_hash(load_folder(data, size=(64, 96)))["calibration"].size
    assert cal_size >= 2  # the scene-hash split leaves some scenes for calibration
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(data)])
    assert result.exit_code == 0, result.output
    # the model never trained on this folder: all of its images calibrate
    assert "all 24 images calibrate" in result.output
    block = json.loads((model / "config.json").read_text())["calibration"]
    assert block["n"] == 24 and "temperature" in block and "ood" in block
    # a folder the model's config records as trained on gives only its held-out part
    config = json.loads((model / "config.json").read_text())
    config.setdefault("training", {})["split"] = {str(data): {"path": str(data.resolve())}}
    (model / "config.json").write_text(json.dumps(config))
    assert (model / "ood.safetensors").is_file()  # 24 images: thresholds and reference fitted
    result = runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(data)])
    assert result.exit_code == 0, result.output
    block = json.loads((model / "config.json").read_text())["calibration"]
    assert block["n"] == cal_size < 20
    # too few images for out-of-distribution thresholds: the loose defaults, no reference
    assert f"only {cal_size} calibration image(s)" in result.output
    assert block["ood"] == {} and not (model / "ood.safetensors").exists()
    # a shipped model is never rewritten; --out writes a calibrated copy
    shipped = runner.invoke(app, ["calibrate", "--model", "bbbc005", "--data", str(data)])
    assert shipped.exit_code != 0 and "is shipped inside celltally" in shipped.output
    copy = tmp_path / "copy"
    result = runner.invoke(
        app, ["calibrate", "--model", str(model), "--data", str(data), "--out", str(copy)]
    )
    assert result.exit_code == 0, result.output
    copied = json.loads((copy / "config.json").read_text())
    assert copied["calibration"]["n"] == cal_size
    assert copied["training"]["calibrated"]["n"] == cal_size  # what it was calibrated on
    assert copied["training"]["calibrated"]["data"] == [str(data.resolve())]
    # the copy is a model of its own: its CSV rows and per-well totals name it
    assert (
        copied["name"] == "copy"
        and copied["copied_from"] == json.loads((model / "config.json").read_text())["name"]
    )
    again = runner.invoke(
        app, ["calibrate", "--model", str(model), "--data", str(data), "--out", str(copy)]
    )
    assert again.exit_code != 0 and "already exists" in again.output
    args = ["ensemble", "--model", str(model), "--data", str(data), "--members", "2"]
    top = runner.invoke(app, [*args, "--seed", str(2**32 - 1)])  # member 1: seed + 1
    assert top.exit_code == 2 and "--seed must be at most 4294967294 with 2 members" in top.output
    result = runner.invoke(app, [*args, "--epochs", "1", "--no-progress", "--simulated", "2"])
    assert result.exit_code == 0, result.output
    assert (model / "ensemble_1.safetensors").is_file()
    config = json.loads((model / "config.json").read_text())
    assert config["calibration"]["epistemic"]["n"] == cal_size
    # the config says how its members were made: seeds, epochs, training images
    made = config["training"]["ensemble"]
    assert made["members"] == ["ensemble_1.safetensors"] and made["seeds"] == [1]
    assert made["counter_epochs"] == 1 and sum(made["training_images"].values()) == 26 - cal_size
    assert made["simulated_scenes"] == {"n": 2, "seed": 2**33}  # to draw them again
    assert made["command"].startswith("celltally ")  # as calibrate records its own
    missing = runner.invoke(app, ["calibrate", "--model", str(model)])
    assert missing.exit_code != 0 and "error: no data" in missing.output
    # rewritten in place, a run that fails half-way leaves the folder as it was
    before = {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()}
    for member in model.glob("ensemble_*.safetensors"):
        before.pop(member.name)
        member.unlink()
    stopped = runner.invoke(
        app, ["calibrate", "--model", str(model), "--data", str(data), "--count-scale", "epistemic"]
    )
    assert stopped.exit_code != 0 and "no ensemble members" in stopped.output
    assert {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()} == before
    assert not list(model.parent.glob(".*.partial"))
    scaled = ["calibrate", "--model", str(model), "--data", str(data), "--count-scale", "plain"]
    result = runner.invoke(app, scaled)
    assert result.exit_code == 0, result.output
    assert json.loads((model / "config.json").read_text())["calibration"]["count_scale"] > 0
    bogus = runner.invoke(app, [*scaled[:-1], "total"])
    assert bogus.exit_code != 0 and "--count-scale 'total': choose plain or" in bogus.output
    assert "Traceback" not in bogus.output
    # bad settings are refused before a copy is made; a copy whose run failed is removed
    copy = model.parent / "refused_copy"
    for bad in (["--quantile", "2"], ["--count-scale", "total"]):
        refused = runner.invoke(app, [*scaled[:5], *bad, "--out", str(copy)])
        assert refused.exit_code == 2 and not copy.exists(), refused.output
    empty = model.parent / "empty"
    empty.mkdir()
    failed = runner.invoke(app, [*scaled[:4], str(empty), "--out", str(copy)])
    assert failed.exit_code != 0 and not copy.exists(), failed.output


def test_cli_calibrate_writes_a_copy_with_background_subtraction(tiny_model, tmp_path):
    import tifffile
    from typer.testing import CliRunner

    from celltally.cli import app

    data = tmp_path / "plate"
    data.mkdir()
    ramp = np.mgrid[:130, :174][1] * 0.3  # uneven light: 52 grey levels across
    for i in range(12):
        image = np.clip(blob_image(2 + i, seed=400 + i) + ramp, 0, 255).astype(np.uint8)
        tifffile.imwrite(data / f"SIMCEPImages_A{i + 1:02d}_C{2 + i}_F1_s01_w1.TIF", image)
    runner = CliRunner()
    args = ["calibrate", "--model", str(tiny_model), "--data", str(data)]
    in_place = runner.invoke(app, [*args, "--background", "quadratic"])
    assert in_place.exit_code != 0 and "give --out for the new copy" in in_place.output
    copy = tmp_path / "flat"
    # the copy is built beside --out and renamed when done: what a killed run left
    # there is cleared, and never passes for a finished model
    stale = tmp_path / ".flat.partial"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    result = runner.invoke(app, [*args, "--background", "quadratic", "--out", str(copy)])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and f"calibrated copy -> {copy}" in result.output
    config = json.loads((copy / "config.json").read_text())
    assert config["normalization"]["background"] == "quadratic"
    assert config["calibration"]["n"] == 12
    assert "calibrate --background quadratic" in config["training"]["background"]["what"]
    original = json.loads((tiny_model / "config.json").read_text())
    assert original["normalization"].get("background", "none") == "none"  # untouched
    # the copy counts with the background removed, as it was calibrated
    counter = CellCounter.from_pretrained(copy, device="cpu")
    image = tifffile.imread(next(data.iterdir()))
    ramp_only = counter.prepare(image)
    plain = CellCounter.from_pretrained(tiny_model, device="cpu").prepare(image)
    assert not np.allclose(ramp_only, plain)


def test_calibration_leaves_out_images_named_as_the_models_training_images(tiny_model, tmp_path):
    """A model trained apart records its training images by name; a folder holding
    copies of them must not calibrate on them (its intervals would be too narrow)."""
    import tifffile

    from celltally.uncertainty import held_out_sets

    data = tmp_path / "plate"
    data.mkdir()
    names = [f"SIMCEPImages_A{i + 1:02d}_C{3 + i}_F1_s01_w1.TIF" for i in range(6)]
    for i, name in enumerate(names):
        tifffile.imwrite(data / name, blob_image(3 + i, seed=500 + i))
    config = json.loads((tiny_model / "config.json").read_text())
    config.setdefault("training", {})["split"] = {"train": names[:2], "n_train": 2}
    said = []
    _, cal = held_out_sets(config, folders=[data], unseen_folders_calibrate=True, log=said.append)
    assert sorted(m["name"] for m in cal.meta) == sorted(names[2:])
    assert any("2 image(s) have the names of this model's training images" in s for s in said)
    assert any("the other 4 images calibrate" in s for s in said)


def test_beyond_calibration_names_the_supported_level():
    block = {"scores": list(np.linspace(0.1, 2.0, 20)), "default": "conformal"}
    assert beyond_calibration(block, 0.95) is None  # 20 scores support up to 20/21
    note = beyond_calibration(block, 0.99)
    assert "0.952" in note and "20 calibration" in note and "99 or more" in note
    assert beyond_calibration(block, 0.99, "temperature") is None  # not a conformal interval
    assert beyond_calibration({}, 0.99) is None


def test_a_folder_trained_on_whole_is_not_used_to_calibrate(tmp_path):
    from celltally.simulate import simulate_plate
    from celltally.uncertainty import held_out_sets

    folder = simulate_plate(tmp_path / "p", images=3, size=(130, 174), blurs=(1,), stains=(1,))
    config = tiny_config()
    config["training"] = {"split": {str(folder): {"path": str(folder.resolve()), "calibration": 0}}}
    train, cal = held_out_sets(config, folders=[folder], log=lambda _: None)
    assert cal is None and len(train) == 3
    config["training"]["split"][str(folder)]["calibration"] = 1  # one scene was held out
    train, cal = held_out_sets(config, folders=[folder], log=lambda _: None)
    assert len(cal) >= 1 and len(train) + len(cal) == 3


def test_level_text_keeps_the_digits():
    from celltally.calibration import level_text

    assert [level_text(v) for v in (0.95, 0.9995, 0.9999999, 0.5)] == [
        "95%",
        "99.95%",
        "99.99999%",
        "50%",
    ]


def test_the_folders_a_model_was_fine_tuned_from_count_as_seen(tmp_path):
    from celltally.uncertainty import _training_folders

    first, second = tmp_path / "A", tmp_path / "B"
    parent = tmp_path / "M1"
    parent.mkdir()
    config = tiny_config()
    config["training"] = {"split": {str(first): {"path": str(first)}}}
    (parent / "config.json").write_text(json.dumps(config))
    child = {**tiny_config(), "training": {"from": str(parent), "split": {str(second): {}}}}
    assert _training_folders(child) == {first.resolve(), second.resolve()}
    child["training"]["from"] = str(tmp_path / "gone")  # moved since: its own record only
    assert _training_folders(child) == {second.resolve()}


def test_a_level_below_the_first_rank_takes_the_smallest_score_not_the_largest():
    scores = [0.5, 1.0, 2.0, 3.0]  # 4 scores: ranks of (n + 1) level, 5 level
    assert conformal_quantile(scores, 1e-11) == 0.5  # rank 0: was s[-1], the widest
    assert conformal_quantile(scores, 0.2) == 0.5
    assert conformal_quantile(scores, 0.5) == 2.0
    assert conformal_quantile(scores, 0.8) == 3.0
    assert "level 0.99999999999 is above" in str(beyond_calibration({"scores": scores}, 1 - 1e-11))


def test_a_level_too_near_1_is_refused_not_a_crash():
    from celltally.calibration import MAX_LEVEL, valid_level

    assert valid_level(0.95) and valid_level(MAX_LEVEL) and valid_level(1e-11)
    for bad in (0.9999999999999999, 1.0, 0.0, -0.1, float("nan"), "x", None):
        assert not valid_level(bad)
    assert math.isfinite(gaussian_quantile(MAX_LEVEL))


def disc_mask(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape)
    for cy, cx in centres:
        mask = np.maximum(mask, ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(float))
    return mask


def test_object_size_follows_magnification_and_ignores_the_image_border():
    from skimage.transform import rescale

    from celltally.calibration import object_size

    rng = np.random.default_rng(0)
    centres = rng.uniform(10, (86, 118), size=(25, 2))
    mask = disc_mask((96, 128), centres, 4.0)
    fraction, width = object_size(mask)
    assert fraction == pytest.approx(mask.mean())
    for factor in (0.7, 1.5, 2.0):
        _, w = object_size(rescale(mask, factor, order=1))
        assert math.exp(w - width) == pytest.approx(factor, rel=0.08), factor
    # a crop cuts discs at its edge without adding boundary there: the width stays
    _, cropped = object_size(mask[24:72, 32:96])
    assert math.exp(cropped - width) == pytest.approx(1.0, abs=0.12)
    # too little foreground (or none) to measure, and NaN, give None
    assert object_size(disc_mask((96, 128), [(40, 40)], 3.0)) is None
    assert object_size(np.zeros((96, 128))) is None
    assert object_size(np.full((96, 128), np.nan)) is None
    assert object_size(np.ones((96, 128))) is None  # foreground without a boundary
    with pytest.raises(ValueError, match="2-D"):
        object_size(np.ones(5))


def test_size_ratio_uses_the_images_class_or_else_only_an_unambiguous_nearest_one():
    from celltally.calibration import size_ratio, size_reference

    f = np.linspace(0.05, 0.4, 30)
    small, large = 1.0 + 2.0 * f, 3.0 + 3.0 * f**2  # log widths of two stains
    reference = size_reference(np.r_[f, f], np.r_[small, large], classes=["1"] * 30 + ["2"] * 30)
    assert reference["classes"] == ["1", "2"]
    assert np.allclose(reference["coef"], [[0, 2, 1], [3, 0, 3]], atol=1e-5)
    assert reference["fraction"] == [[0.05, 0.4], [0.05, 0.4]]
    # at f = 0.2 the curves are at 1.4 (class 1) and 3.12 (class 2)
    assert size_ratio(0.2, 1.4, reference, label=1) == pytest.approx(1.0)
    assert size_ratio(0.2, 1.4 + math.log(1.5), reference, label="1") == pytest.approx(1.5)
    assert size_ratio(0.2, 1.4, reference, label=2) == pytest.approx(math.exp(1.4 - 3.12))
    # no class given (or one the reference lacks): the nearest curve when the image is
    # wider (or narrower) than both, none between them
    assert size_ratio(0.2, 3.12 + math.log(1.5), reference) == pytest.approx(1.5)
    assert size_ratio(0.2, 1.4 - math.log(1.5), reference, label=3) == pytest.approx(1 / 1.5)
    assert size_ratio(0.2, 1.4 + math.log(1.5), reference) is None  # 1.5x class 1, 0.3x class 2
    # beyond the fitted fractions the curve is held at its end value
    assert size_ratio(0.9, 1.8, reference, label=1) == pytest.approx(1.0)
    one = size_reference([0.1, 0.2], [1.0, 1.2])  # 2 images: a line
    assert one["classes"] is None and size_ratio(0.15, 1.1, one) == pytest.approx(1.0)
    assert size_ratio(0.15, 1.1 + math.log(0.7), one, label=1) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="each class needs 2"):
        size_reference([0.1, 0.2, 0.3], [1.0, 1.1, 1.2], classes=["a", "a", "b"])


def test_held_out_size_ratios_do_not_hide_an_image_in_its_own_curve():
    from celltally.calibration import held_out_size_ratios, size_ratio, size_reference

    rng = np.random.default_rng(3)
    n = 40
    f = rng.uniform(0.05, 0.4, n)
    noise = rng.normal(0, 0.05, n)
    width = 1.0 + 2.0 * f + noise
    width[0] += math.log(1.5)  # one image at 1.5x the magnification
    held = held_out_size_ratios(f, width, groups=np.arange(n) // 2)
    in_sample = size_reference(f, width)
    assert held[0] > size_ratio(f[0], width[0], in_sample) > 1.3
    assert held[0] == pytest.approx(1.5 * math.exp(noise[0]), rel=0.04)
    spread = np.log(held[1:])
    assert 0.035 < spread.std() < 0.075  # the noise, 0.05, measured out of sample
    # classes: each image against its own class's curve, fitted without its fold
    classes = ["a"] * 20 + ["b"] * 20
    shifted = np.where(np.arange(n) < 20, width, width + 1.0)  # class b's objects e x wider
    by_class = held_out_size_ratios(f, shifted, groups=np.arange(n) // 2, classes=classes)
    assert np.abs(np.log(by_class[1:])).max() < 0.2
    one_curve = held_out_size_ratios(f, shifted, groups=np.arange(n) // 2)
    assert np.median(np.abs(np.log(one_curve))) > 0.4
    with pytest.raises(ValueError, match="3 or more"):
        held_out_size_ratios([0.1, 0.2], [1.0, 1.1])
    with pytest.raises(ValueError, match="2 classes for 3 sizes"):
        held_out_size_ratios([0.1, 0.2, 0.3], [1.0, 1.1, 1.2], classes=["a", "b"])
    # one group holding all but one image: held out, it would leave 1 image to fit on,
    # so the folds are single images, as with no groups
    lone = held_out_size_ratios(f[:20], width[:20], groups=["a"] * 19 + ["b"])
    assert np.allclose(lone, held_out_size_ratios(f[:20], width[:20]))


def test_a_warning_names_an_object_size_off_the_calibration_as_its_likely_cause():
    limits = {"quantile": 0.99, "mask_std": 0.5, "size_shift": 1.25}
    flagged = np.full((4, 4), 0.6)  # mask std above its limit: a warning either way
    large = ood_features(10.0, flagged, size_ratio=1.6)
    assert large["size_shift"] == pytest.approx(1.6)
    text = ood_warning(large, limits)
    assert text.startswith("unlike the calibration images (mean per-pixel mask uncertainty")
    assert text.endswith(
        "; its objects look 1.6x as wide as the calibration images': another "
        "magnification? rescale by about 0.62"
    )
    small = ood_features(10.0, flagged, size_ratio=0.7)
    assert small["size_shift"] == pytest.approx(1 / 0.7)
    assert ood_warning(small, limits).endswith(
        "look 0.7x as wide as the calibration images': another magnification? rescale by about 1.4"
    )
    # within the calibration's range the size is not named
    assert "rescale" not in ood_warning(ood_features(10.0, flagged, size_ratio=1.2), limits)
    # and alone it raises no warning (not adopted: it flagged true-scale crops)
    assert ood_warning(ood_features(10.0, np.full((4, 4), 0.01), size_ratio=1.6), limits) == ""
    assert "size" not in " ".join(OOD_FEATURES)
    no_sizes = {"quantile": 0.99, "mask_std": 0.5}  # a model calibrated before sizes
    assert "rescale" not in ood_warning(large, no_sizes)
    # counted at a factor already: the factor to count at is the whole one
    twice = ood_warning(large, limits, rescale=2.0)
    assert twice.endswith("rescale by about 1.2 (counted at 2)")
    assert suggested_rescale(twice) == 1.2 and suggested_rescale(text) == 0.62
    assert suggested_rescale("") is None and suggested_rescale("rescale by about") is None
    for broken in ("about  ", "about\n", "about nan", "about -2", "about inf", "about x"):
        assert suggested_rescale(f"another magnification? rescale by {broken}") is None
    # a factor celltally would refuse (beyond 1000x either way) is not suggested
    far = ood_warning(ood_features(10.0, flagged, size_ratio=0.004), limits, rescale=1000.0)
    assert far.endswith("its objects look 0.004x as wide as the calibration images'")
    # a counter that cannot rescale (the paper's fixed frame): the size without a factor
    fixed = ood_warning(large, limits, rescale=None)
    assert fixed.endswith("its objects look 1.6x as wide as the calibration images'")
    assert suggested_rescale(fixed) is None


@pytest.fixture(scope="module")
def body_scenes():
    """Simulated BBBC005-style frames: 20 of nuclei (w1), 20 of cell bodies (w2)."""
    from celltally.simulate import simulate_scene

    return [
        (stain, simulate_scene(5 + 5 * (i % 20), stain=stain, seed=100 + i))
        for i, stain in enumerate([1, 2] * 20)
    ]


def test_calibrate_model_fits_the_object_size_check_per_stain(body_scenes, tmp_path):
    from celltally.model_folder import resolve_model

    folder = tmp_path / "model"
    shutil.copytree(resolve_model("bbbc005"), folder)
    counter = CellCounter.from_pretrained(folder, device="cpu")
    cal = LabeledSet(
        torch.from_numpy(np.stack([counter.prepare(s.image) for _, s in body_scenes])[:, None]),
        torch.from_numpy(
            np.stack(
                [resize_area(s.mask.astype(np.float32), counter.input_size) for _, s in body_scenes]
            )[:, None]
        ),
        torch.tensor([s.count for _, s in body_scenes], dtype=torch.float32),
        [
            {
                "name": f"SIMCEPImages_A{i:02d}_C{s.count}_F1_s1_w{w}.TIF",
                "stain": w,
                "scene": i // 2,
            }
            for i, (w, s) in enumerate(body_scenes)
        ],
    )
    block = calibrate_model(folder, cal, log=lambda s: None, device="cpu")
    size = block["ood"]["size"]
    assert size["classes"] == ["1", "2"] and len(size["coef"]) == len(size["fraction"]) == 2
    assert block["ood"]["size_shift"] >= 1.25
    # the mask is the segmenter's: the ensemble's block holds the same check
    assert block["epistemic"]["ood"]["size"] == size
    assert block["epistemic"]["ood"]["size_shift"] == block["ood"]["size_shift"]
    # w2 cell bodies are wider than w1 nuclei at any fraction
    middle = np.mean([max(lo for lo, _ in size["fraction"]), min(hi for _, hi in size["fraction"])])
    assert np.polyval(size["coef"][1], middle) > np.polyval(size["coef"][0], middle)


def test_the_shipped_model_measures_the_object_size_of_another_magnification(body_scenes, tmp_path):
    from skimage.transform import rescale

    counter = CellCounter.from_pretrained("bbbc005")
    for stain, index in ((1, 10), (2, 11)):  # 55 nuclei, 60 cell bodies
        image = body_scenes[index][1].image
        assert 0.85 < counter.count(image).ood["size_ratio"] < 1.2, stain
        for factor in (0.7, 1.5):
            other = rescale(image.astype(np.float32), factor, anti_aliasing=factor < 1)
            # named as BBBC005 names its files, the stain is known: its own curve
            path = tmp_path / f"SIMCEPImages_A01_C{index}_F1_s1_w{stain}.tif"
            tifffile.imwrite(path, np.clip(other, 0, 255).astype(np.uint8))
            ratio = counter.count(path).ood["size_ratio"]
            assert ratio == pytest.approx(factor, rel=0.2), (stain, factor)
            # with the factor given, the image is at the model's scale again
            back = counter.with_rescale(1 / factor).count(path)
            assert 0.85 < back.ood["size_ratio"] < 1.2, (stain, factor)
    # as an array (no name, so no stain) a w2 frame enlarged 1.5x is wider than both
    # stains' objects: measured against the nearer, w2
    enlarged = rescale(body_scenes[11][1].image.astype(np.float32), 1.5)
    assert counter.count(enlarged).ood["size_ratio"] == pytest.approx(1.5, rel=0.2)


def test_calibrate_reads_the_channel_a_tiled_model_was_trained_on(tmp_path):
    from typer.testing import CliRunner

    from celltally.cli import app
    from celltally.counter import WEIGHTS_DIR
    from celltally.simulate import simulate_scene

    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    rows = ["image,count"]
    for i in range(3):  # off the model's frame: counted in tiles, read again from the file
        image = simulate_scene(20 + i, seed=i, size=(300, 400), bit_depth=16).image
        planes = np.stack([np.zeros_like(image), image])
        tifffile.imwrite(data / "images" / f"im{i}.tif", planes, photometric="minisblack")
        rows.append(f"im{i}.tif,{20 + i}")
    (data / "counts.csv").write_text("\n".join(rows) + "\n")
    model = tmp_path / "m"
    shutil.copytree(WEIGHTS_DIR / "nuclei", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "channel": 1}))
    args = ["calibrate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "c")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output  # was "choose the one ... --channel 0-1"
    # a stack of 5+ planes may be a z-stack: still refused, whatever the model recorded
    five = np.stack([np.zeros((40, 50), np.uint16)] * 5)
    with pytest.raises(
        io.InputError, match=r"stack of 5 planes.*CellCounter\.from_pretrained\(channel=N\)"
    ):
        io.image_plane(five, default_channel=1)
    for bad in (-1, "x", [1], float("inf")):  # a damaged config: one line, not a traceback
        (model / "config.json").write_text(json.dumps({**config, "channel": bad}))
        with pytest.raises(io.InputError, match="config.json's channel"):
            CellCounter.from_pretrained(model)
        shutil.rmtree(tmp_path / "c", ignore_errors=True)
        result = CliRunner().invoke(app, args)  # calibrate read it before any counter
        assert result.exit_code == 2 and "config.json's channel" in result.output


def test_calibrate_refuses_the_current_folder_and_an_unfinished_model(
    tiny_model, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from celltally.cli import app
    from celltally.model_folder import UNFINISHED

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for command in ("calibrate", "ensemble"):
        for out in (".", ""):  # was a ValueError traceback: PosixPath('.') has an empty name
            result = CliRunner().invoke(
                app, [command, "--model", str(tiny_model), "--data", str(tmp_path), "--out", out]
            )
            assert result.exit_code == 2 and "is the folder you are in" in result.output
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_model, unfinished)
    (unfinished / UNFINISHED).touch()
    args = ["calibrate", "--model", str(unfinished), "--data", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "copy")])
    # it said "calibrated copy", and the copy could not count ("--resume")
    assert result.exit_code == 2 and "stopped before this model was finished" in result.output
    assert not (tmp_path / "copy").exists()


def test_images_calibrate_recalibrated_on_are_known_to_evaluate(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from celltally.cli import app
    from celltally.simulate import simulate_plate
    from celltally.uncertainty import seen_by_model

    plate = simulate_plate(
        tmp_path / "cal", images=3, counts=(2, 20), blurs=(1,), stains=(1,), seed=4
    )
    out = tmp_path / "m2"
    args = ["calibrate", "--model", str(tiny_model), "--data", str(plate), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    names = sorted(p.name for p in (plate / "images").iterdir())
    # they were evaluated as held out (coverage 1.000) without a word
    seen = seen_by_model(config, names, folder=plate / "images")
    assert seen == dict.fromkeys(names, "calibration")
    # evaluate names an image in a sub-folder, or given by a full path, by that path:
    # matched by its file name all the same (the model was calibrated on it)
    keys = [f"sub/{names[0]}", str(tmp_path / "elsewhere" / names[1])]
    assert seen_by_model(config, keys, folder=tmp_path / "other") == dict.fromkeys(
        keys, "calibration"
    )


def test_two_folders_same_named_wells_are_two_wells_for_the_correlation():
    from celltally.uncertainty import _add_well_correlation

    names = ["P_A01_s1.tif", "P_A01_s2.tif"]
    meta = [{"name": n, "source": folder} for folder in ("one", "two") for n in names]
    data = LabeledSet(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), torch.zeros(4), meta)
    block: dict = {}
    y = np.array([10.0, 10.0, 10.0, 10.0])
    _add_well_correlation(block, data, y, y + [1, 1, -1, -1], np.ones(4))
    # one A01 of 4 images pooled unrelated plates: their pairs across folders counted too
    assert block["well_correlation"]["groups"] == 2
    assert block["well_correlation"]["pairs"] == 2  # one within each folder


def test_ensemble_scenes_are_not_the_ones_train_drew_at_the_same_seed(tmp_path, monkeypatch):
    import celltally.datasets as datasets
    from celltally.simulate import simulate_plate
    from celltally.uncertainty import held_out_sets

    seeds = []
    real = datasets.simulate_set

    def spy(scenes, **kw):
        seeds.append(kw["seed"])
        return real(scenes, **kw)

    monkeypatch.setattr(datasets, "simulate_set", spy)
    folder = simulate_plate(tmp_path / "p", images=3, size=(130, 174), blurs=(1,), stains=(1,))
    config = tiny_config()
    config["training"] = {"split": {str(folder): {"path": str(folder.resolve()), "calibration": 1}}}
    held_out_sets(config, folders=[folder], simulated=2, seed=0, log=lambda _: None)
    # `celltally train --seed S` draws its training scenes with S + 1000, calibration
    # S + 2000, S < 2**32 (training_data.build_and_fit): members learn from new scenes
    assert seeds and min(seeds) > 2**32 + 1999


def test_a_bright_background_is_named_instead_of_a_magnification(tmp_path):
    """An inverted frame (dark nuclei on bright) looked like larger objects: the warning
    sent the user to rescale by 0.22, then 0.099; its cause is the bright background."""
    from celltally.calibration import BRIGHT_HINT
    from celltally.counter import CellCounter
    from celltally.simulate import simulate_scene

    limits = {"quantile": 0.99, "mask_std": 0.5, "size_shift": 1.25}
    flagged = np.full((4, 4), 0.6)
    inverted = {**ood_features(10.0, flagged, size_ratio=4.6), "background": 0.9}
    text = ood_warning(inverted, limits)
    assert text.endswith(BRIGHT_HINT) and "rescale" not in text
    assert suggested_rescale(text) is None
    # the shipped model on a real-like frame and its inverse
    counter = CellCounter.from_pretrained("bbbc005")
    image = simulate_scene(18, blur=1, stain=1, seed=4).image
    assert "bright" not in counter.count(image).warning
    flipped = counter.count(255 - image)
    assert flipped.warning.endswith(BRIGHT_HINT), flipped.warning
