"""Training loops: short schedules and what they leave behind."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from celltally.datasets import LabeledSet
from celltally.models.pipeline import CountingPipeline
from celltally.train import train_counter, train_segmenter


@pytest.mark.parametrize("n_images", [2, 4, 8, 10, 12])
def test_a_few_steps_train_without_a_broken_schedule(n_images):
    # one epoch of n / 2 steps: at 5 steps a one-cycle warm-up of 20% has zero
    # length (OneCycleLR divided by it); below, it was negative
    torch.manual_seed(0)
    config = tiny_config()
    model = CountingPipeline(config)
    h, w = config["input_size"]
    data = LabeledSet(
        images=torch.rand(n_images, 1, h, w),
        masks=(torch.rand(n_images, 1, h, w) > 0.5).float(),
        counts=torch.arange(n_images, dtype=torch.float32),
    )
    quiet = dict(epochs=1, batch_size=2, lr=1e-3, device=torch.device("cpu"), progress=False)
    seg = train_segmenter(model, data, log=lambda _: None, **quiet)
    cnt = train_counter(model, data, log=lambda _: None, **quiet)
    assert len(seg) == len(cnt) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
