"""Training loops: short schedules and what they leave behind."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from celltally.datasets import LabeledSet
from celltally.models.pipeline import CountingPipeline
from celltally.train import train_counter, train_segmenter


def random_set(config: dict, n: int) -> LabeledSet:
    """``n`` random images at the config's input size, random masks, counts 0 .. n - 1."""
    h, w = config["input_size"]
    return LabeledSet(
        images=torch.rand(n, 1, h, w),
        masks=(torch.rand(n, 1, h, w) > 0.5).float(),
        counts=torch.arange(n, dtype=torch.float32),
    )


@pytest.mark.parametrize("n_images", [2, 4, 8, 10, 12])
def test_a_few_steps_train_without_a_broken_schedule(n_images):
    # one epoch of n / 2 steps: at 5 steps a one-cycle warm-up of 20% has zero
    # length (OneCycleLR divided by it); below, it was negative
    torch.manual_seed(0)
    config = tiny_config()
    model = CountingPipeline(config)
    data = random_set(config, n_images)
    quiet = dict(epochs=1, batch_size=2, lr=1e-3, device=torch.device("cpu"), progress=False)
    seg = train_segmenter(model, data, log=lambda _: None, **quiet)
    cnt = train_counter(model, data, log=lambda _: None, **quiet)
    assert len(seg) == len(cnt) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fit_trains_the_segmenter_on_segmenter_train_when_given(tmp_path):
    from celltally.train import fit

    torch.manual_seed(0)
    config = tiny_config()
    config["train"]["segmenter"]["epochs"] = 1
    config["train"]["counter"]["epochs"] = 1
    train = random_set(config, 8)
    lines: list[str] = []
    fit(
        train=train,
        calibration=random_set(config, 4),
        test=None,
        config=config,
        out=tmp_path / "m",
        segmenter_train=train.subset(torch.arange(3).numpy()),
        progress=False,
        device=torch.device("cpu"),
        log=lines.append,
    )
    assert any("on the 3 training images with a mask" in line for line in lines), lines


@pytest.mark.parametrize("schedule", ["constant", "one_cycle"])
def test_the_paper_presets_constant_rate_and_the_default_one_cycle(schedule):
    from celltally.models.presets import get_preset

    assert {s["schedule"] for s in get_preset("paper")["train"].values()} == {"constant"}
    torch.manual_seed(0)
    config = tiny_config()
    model = CountingPipeline(config)
    data = random_set(config, 8)
    history = train_counter(
        model,
        data,
        epochs=3,
        batch_size=2,
        lr=1e-3,
        schedule=schedule,
        device=torch.device("cpu"),
        progress=False,
        log=lambda _: None,
    )
    rates = [record["lr"] for record in history]
    if schedule == "constant":
        assert rates == [1e-3] * 3
    else:  # warm-up, then annealing
        assert rates[0] < max(rates) and rates[-1] < max(rates)


def test_resuming_with_other_settings_is_refused(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    model = CountingPipeline(config)
    data = random_set(config, 8)
    quiet = dict(device=torch.device("cpu"), progress=False, log=lambda _: None)
    checkpoint = tmp_path / "counter.pt"
    train_counter(model, data, epochs=2, batch_size=2, checkpoint=checkpoint, **quiet)
    again = train_counter(
        model, data, epochs=2, batch_size=2, checkpoint=checkpoint, resume=True, **quiet
    )
    assert len(again) == 2  # nothing left to do: the saved history
    with pytest.raises(ValueError, match="saved by a run with"):
        train_counter(
            model, data, epochs=2, batch_size=4, checkpoint=checkpoint, resume=True, **quiet
        )
    with pytest.raises(ValueError, match="saved by a run with"):
        train_counter(
            model,
            data,
            epochs=2,
            batch_size=2,
            schedule="constant",
            checkpoint=checkpoint,
            resume=True,
            **quiet,
        )
    other = random_set(config, 8)
    other.counts[0] += 5  # other training counts: another data set
    same = dict(data=data, epochs=2, batch_size=2, checkpoint=checkpoint, resume=True, **quiet)
    for changed in ({"seed": 1}, {"lr": 0.01}, {"data": other}):
        with pytest.raises(ValueError, match="saved by a run with"):
            train_counter(model, **{**same, **changed})
