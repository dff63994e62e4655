"""CPU and GPU give the same counts (runs only where CUDA is available; CI has none).

Found on a lent H200: batches built with NumPy's ``[:, None]`` (a zero
stride) were convolved wrongly by cuDNN for every image but the first, so
the shipped model counted 108 instead of 88 cells. ``dense_strides`` fixes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from celltally import io
from celltally.counter import CellCounter, resolve_model
from celltally.datasets import LabeledSet
from celltally.models.pipeline import load_model_folder
from celltally.simulate import simulate_plate
from celltally.train import predict_counts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    plate = simulate_plate(tmp_path_factory.mktemp("gpu") / "plate", images=2, seed=11)
    return sorted((plate / "images").glob("*.TIF"))


@pytest.mark.parametrize(
    ("model", "epistemic"), [("bbbc005", False), ("nuclei", False), ("nuclei", True)]
)
def test_shipped_models_count_the_same_on_cpu_and_gpu(files, model, epistemic):
    counts = {}
    for device in ("cpu", "cuda"):
        counter = CellCounter.from_pretrained(model, device=device, epistemic=epistemic)
        counts[device] = [(r.count, r.std) for _, r in counter.count_paths(files)]
    cpu, gpu = np.array(counts["cpu"]), np.array(counts["cuda"])
    assert len(cpu) == len(gpu) == len(files) > 1
    # TF32 convolutions (PyTorch's default on GPU) differ from float32 by ~1e-4
    np.testing.assert_allclose(gpu, cpu, rtol=2e-3, atol=0.02)


def test_training_predictions_agree_on_numpy_built_batches(files):
    counter = CellCounter.from_pretrained(device="cpu")
    stack = np.stack([counter.prepare(io.read_image(f)) for f in files])
    images = torch.from_numpy(stack[:, None])  # NumPy's zero-stride axis, as users build them
    data = LabeledSet(images, images.clone(), torch.zeros(len(files)), [{}] * len(files))
    # the model as training holds it (counter.model is a folded inference copy)
    model = load_model_folder(resolve_model("bbbc005"))[0].eval()
    cpu, _ = predict_counts(model, data.images, device=torch.device("cpu"))
    gpu, _ = predict_counts(model, images, device=torch.device("cuda"), batch_size=4)
    np.testing.assert_allclose(gpu, cpu, rtol=2e-3, atol=0.02)


def test_a_gpu_index_beyond_the_machines_is_one_line():
    beyond = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(io.InputError, match=r"CUDA GPU\(s\)"):  # was a traceback, later
        CellCounter.from_pretrained(device=beyond)
