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
    # the setting that differs is named, not two whole dicts
    with pytest.raises(ValueError, match=r"other settings \(schedule 'one_cycle' then, 'const"):
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


def test_a_rebuilt_one_cycle_schedule_starts_where_the_run_is():
    from celltally.train import one_cycle

    def rates(scheduler, optimizer, steps):
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-3)
    fresh = rates(one_cycle(opt, lr=1e-2, total_steps=50), opt, 50)
    opt2 = torch.optim.Adam([param], lr=1e-3)
    rates(one_cycle(opt2, lr=1e-2, total_steps=50), opt2, 7)  # leaves initial_lr
    later = rates(one_cycle(opt2, lr=1e-2, total_steps=50, done_steps=20), opt2, 30)
    assert later == pytest.approx(fresh[20:])


@pytest.mark.parametrize(
    ("spent", "pace", "expected"),
    [(10.0, 1.0, 40), (10.0, 10.0, 14), (100.0, 10.0, 6), (0.0, 0.5, 40)],
)
def test_epochs_that_fit_a_budget(spent, pace, expected):
    from celltally.train import _epochs_within

    # 5 epochs done in `spent` seconds of a 100-second budget, 40 planned
    assert _epochs_within(100.0, epochs=40, done=5, spent=spent, pace=pace) == expected


def test_a_time_budget_cuts_the_epochs_still_anneals_and_survives_resume(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    data = random_set(config, 4)
    kw = dict(batch_size=2, lr=1e-2, device=torch.device("cpu"), progress=False)
    ckpt = tmp_path / "counter.pt"
    lines: list[str] = []
    # a budget too small for anything: cut at the first check (after epoch 5) to 6 epochs
    model = CountingPipeline(config)
    history = train_counter(
        model, data, epochs=20, budget=1e-6, checkpoint=ckpt, log=lines.append, **kw
    )
    assert len(history) == 6
    assert history[-1]["epochs_planned"] == 6
    assert any("6 epochs fit the budget" in line for line in lines), lines
    # the schedule was rebuilt for 6 epochs: the last epoch starts low on the cosine
    # (about 0.1 x the peak), where the 20-epoch schedule would be near its peak
    assert history[-1]["lr"] < 0.2 * 1e-2
    # a resumed run of the same plan sees the cut: nothing is left to train
    again = CountingPipeline(config)
    resumed = train_counter(
        again, data, epochs=20, checkpoint=ckpt, resume=True, log=lambda _: None, **kw
    )
    assert len(resumed) == 6
    with pytest.raises(ValueError, match="budget must be a positive"):
        train_counter(model, data, epochs=1, budget=0.0, log=lines.append, **kw)


def test_a_budget_cut_run_resumed_twice_without_the_budget_finishes_its_cut_plan(tmp_path):
    import time

    from celltally.train import _run_epochs

    layer = torch.nn.Linear(2, 1)
    ckpt = tmp_path / "c.pt"

    def train_epoch(optimizer, scheduler, generator) -> float:
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        time.sleep(0.05)
        return 0.0

    def run(budget, stop_at=None):
        def log(line: str) -> None:
            if stop_at is not None and line.startswith(f"counter epoch={stop_at} "):
                raise KeyboardInterrupt

        return _run_epochs(
            stage="counter", module=layer, params=list(layer.parameters()), epochs=100,
            lr=1e-3, steps_per_epoch=3, train_epoch=train_epoch, validate=dict,
            checkpoint=ckpt, resume=True, seed=0, log=log, budget=budget,
        )  # fmt: skip

    with pytest.raises(KeyboardInterrupt):
        run(1.0, stop_at=8)  # cut at epoch 5 to about 20 epochs, stopped after the cut
    with pytest.raises(KeyboardInterrupt):
        run(None, stop_at=9)
    history = run(None)  # the schedule of the cut plan: it ran past its end before
    planned = history[-1]["epochs_planned"]
    assert 9 < planned < 100 and len(history) == planned


def test_sets_that_cannot_train_are_refused_before_any_step():
    config = tiny_config()
    model = CountingPipeline(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quiet = dict(epochs=1, batch_size=2, device=torch.device("cpu"), progress=False)
    quiet["log"] = lambda _: None
    data = random_set(config, 4)
    nan_count = LabeledSet(data.images, data.masks, data.counts.clone())
    nan_count.counts[1] = float("nan")
    with pytest.raises(ValueError, match="1 training count"):
        train_counter(model, nan_count, **quiet)
    nan_pixel = LabeledSet(data.images.clone(), data.masks, data.counts)
    nan_pixel.images[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="1 training image"):
        train_segmenter(model, nan_pixel, **quiet)
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        train_segmenter(model, data, **{**quiet, "batch_size": 0})
    for bad_value, row in ((255.0, 1), (-0.5, 0), (float("nan"), 3)):  # 0/255, partly NaN
        bad_mask = LabeledSet(data.images, data.masks.clone(), data.counts)
        bad_mask.masks[row, 0, 0, 0] = bad_value
        with pytest.raises(ValueError, match=r"1 training mask\(s\) have values outside"):
            train_segmenter(model, bad_mask, **quiet)
    no_mask = LabeledSet(data.images, data.masks.clone(), data.counts)
    no_mask.masks[1] = float("nan")  # a whole NaN mask: an image without one, not an error
    assert len(train_segmenter(model, no_mask, **{**quiet, "epochs": 0})) == 0
    with pytest.raises(ValueError, match="no images"):
        train_counter(model, data.subset([]), **quiet)
    with pytest.raises(ValueError, match="needs 2 or more training images, got 1"):
        train_counter(model, data.subset([0]), **quiet)  # the tiny config's head: 'fc'
    for k, v in model.state_dict().items():  # nothing trained
        assert torch.equal(v, before[k]), k
    # an empty validation set is no validation set (was a torch.cat error)
    history = train_counter(model, data, val=data.subset([]), **quiet)
    assert len(history) == 1
    # a density counter trains on a single image, as before
    density = CountingPipeline({**config, "counter": {**config["counter"], "head": "density"}})
    assert len(train_counter(density, data.subset([0]), **quiet)) == 1


def test_a_checkpoint_that_cannot_be_written_is_an_oserror_naming_it(tmp_path):
    from celltally.train import _save_checkpoint

    (tmp_path / "segmenter.tmp").mkdir()  # torch.save raises RuntimeError for this
    with pytest.raises(OSError, match=r"segmenter\.tmp: cannot write the checkpoint: Is a dir"):
        _save_checkpoint(tmp_path / "segmenter.pt", {"epoch": 0})
