"""Data-parallel training under torchrun (celltally.distributed), on CPU with gloo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from celltally import distributed
from celltally.models.pipeline import load_model_folder
from celltally.simulate import simulate_plate
from celltally.training_data import split_by_scene_hash


def digest_of(folder: Path) -> str:
    return distributed.weights_digest(load_model_folder(folder)[0])


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Two CPU processes under torchrun (gloo even where a GPU is visible: two NCCL ranks
    cannot share one GPU); `python -m torch.distributed.run` is the `torchrun` script,
    found without PATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def test_helpers_are_no_ops_outside_torchrun():
    assert not distributed.is_distributed() and distributed.world_size() == 1
    assert distributed.rank() == 0 and distributed.is_main()
    order = torch.randperm(10)
    assert distributed.shard(order) is order and distributed.shard_size(10) == 10
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap(module) is module
    assert distributed.mean(1.5) == 1.5
    assert distributed.check_in_sync(module) == [distributed.weights_digest(module)]
    x = torch.ones(2)
    assert distributed.to_float([x, (x,)])[1][0] is x  # float32 stays the same tensor


def test_a_user_error_names_the_rank_that_says_it(tmp_path):
    """Under torchrun each process reports the error; all but rank 0 say which they are."""
    from typer.testing import CliRunner

    from celltally.cli import app

    args = ["train", "--out", str(tmp_path / "m"), "--no-progress"]  # no data given
    plain = CliRunner().invoke(app, args, env={"RANK": "0"})
    other = CliRunner().invoke(app, args, env={"RANK": "1"})
    assert plain.exit_code == other.exit_code == 2
    assert plain.output.startswith("error: no training data")
    assert other.output.startswith("rank 1: error: no training data")


def test_torchrun_two_cpu_processes_train_and_end_with_the_same_weights(tiny_model, tmp_path):
    plate = simulate_plate(
        tmp_path / "plate", images=8, blurs=(1, 23), stains=(1,), size=(130, 174), seed=5
    )
    # the folder must give a calibration scene, or training would simulate 60 full-size ones
    from celltally.datasets import load_folder

    assert split_by_scene_hash(load_folder(plate, size=(64, 96)))["calibration"].size > 0
    out = tmp_path / "model"
    proc = torchrun(
        ["-m", "celltally.cli", "train", "--out", str(out), "--data", str(plate)]
        + ["--from", str(tiny_model), "--seg-epochs", "1", "--count-epochs", "1"]
        + ["--workers", "1", "--no-progress"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pattern = r"weights identical on all (\d+) ranks \(sha256 ([0-9a-f]{64})\)"
    found = re.findall(pattern, proc.stdout)
    assert found == [("2", found[0][1])], proc.stdout  # logged once, by rank 0 only
    assert proc.stdout.count("saved model folder") == 1
    agreed = found[0][1]
    assert digest_of(out) == agreed  # what rank 0 saved is what every rank holds
    assert digest_of(tiny_model) != agreed  # and it trained
    config = json.loads((out / "config.json").read_text())
    command = config["training"]["environment"]["command"]  # rerunnable as recorded
    assert command.startswith("torchrun --nnodes 1 --nproc_per_node 2 -m celltally.cli train")
    # under 16 training images, fewer than a batch of 8 per rank: one step per stage
    assert [len(config["history"][s]) for s in ("segmenter", "counter")] == [1, 1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["counter.pt", "segmenter.pt"]


AGREE_SCRIPT = """
import sys
from celltally import distributed
distributed.setup()
distributed.agree(("same", 3), what="same values")  # passes on every rank
try:
    distributed.agree(distributed.rank(), what="checkpoints differ", hint="share --out")
except ValueError as err:
    print(f"rank {distributed.rank()}: {err}", flush=True)
distributed.barrier()
distributed.teardown()
"""


def test_ranks_that_start_from_different_checkpoints_or_data_are_stopped_not_hung(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    proc = torchrun([str(script)], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):  # every rank raises, so none waits in a collective for the others
        assert f"rank {r}: checkpoints differ (rank 0 and rank(s) 1 differ); share --out" in (
            proc.stdout
        )


def test_only_rank_0_says_what_an_interrupted_torchrun_training_keeps(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from celltally import training_data
    from celltally.cli import app

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_data, "build_and_fit", interrupted)
    args = ["train", "--out", str(tmp_path / "m"), "--simulated", "10", "--no-progress"]
    zero = CliRunner().invoke(app, args, env={"RANK": "0"})
    one = CliRunner().invoke(app, args, env={"RANK": "1"})
    assert zero.exit_code == one.exit_code == 130
    assert zero.output.startswith("interrupted: before any training was saved")
    assert one.output == ""  # N copies of rank 0's advice (some wrong) said nothing new


def test_when_rank_0_fails_mid_training_every_rank_says_one_line(tiny_model, tmp_path):
    plate = simulate_plate(
        tmp_path / "plate", images=8, blurs=(1, 23), stains=(1,), size=(130, 174), seed=5
    )
    out = tmp_path / "model"
    (out / "checkpoints" / "segmenter.tmp").mkdir(parents=True)  # rank 0 cannot save there
    proc = torchrun(
        ["-m", "celltally.cli", "train", "--out", str(out), "--data", str(plate)]
        + ["--from", str(tiny_model), "--seg-epochs", "1", "--count-epochs", "1"]
        + ["--workers", "1", "--no-progress"],
        tmp_path,
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert any(
        line.startswith("error: ") and "segmenter.tmp: cannot write the checkpoint" in line
        for line in ours
    ), proc.stderr[-3000:]
    assert any(line.startswith("rank 1: error: stopped: a collective") for line in ours), ours
    ranks_said = proc.stderr.split("torch/distributed/elastic")[0]  # before torchrun's own
    assert "Traceback" not in ranks_said, ranks_said


def test_only_torch_distributed_errors_are_told_as_a_broken_collective():
    import torch.distributed as dist

    from celltally.cli import _collective_error

    assert _collective_error(dist.DistBackendError("NCCL error: remote process exited"))
    gloo = "[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
    assert _collective_error(RuntimeError(gloo))
    assert not _collective_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not _collective_error(NotImplementedError("a bug"))
