"""Resumable, exactly-once batch counting (celltally.batch) and the streaming listing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import tifffile
import torch
from conftest import blob_image, tiny_config
from typer.testing import CliRunner

from celltally import batch, io
from celltally.batch import output_paths, read_results, run_batch
from celltally.cli import app
from celltally.models.pipeline import CountingPipeline
from celltally.simulate import simulate_plate
from celltally.train import save_model_folder


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    """42 small BBBC005-named TIFFs (7 scenes x 3 blurs x 2 stains)."""
    root = simulate_plate(tmp_path_factory.mktemp("plate"), images=7, size=(130, 174), seed=3)
    return root / "images"


def files_of(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() == ".tif")


def assert_exactly_once(out: Path, expected: list[str]) -> list[dict]:
    rows = read_results(out)
    seen = Counter(r["file"] for r in rows)
    duplicated = [f for f, n in seen.items() if n > 1]
    assert not duplicated, f"duplicated rows: {duplicated[:3]}"
    assert sorted(seen) == sorted(expected), "lost or foreign rows"
    assert out.read_bytes().endswith(b"\n")
    return rows


# -- listing ---------------------------------------------------------------------


def test_iter_images_streams_same_files_as_list_images(tmp_path):
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in ("a.tif", "b.PNG", "sub/c.tiff", "sub/deeper/d.jpg", ".hidden/e.tif", ".f.tif"):
        (root / rel).write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    for recursive in (False, True):
        streamed = io.iter_images([root], recursive=recursive)
        assert not isinstance(streamed, list)
        listed = io.list_images([root], recursive=recursive)
        assert sorted(map(str, streamed)) == sorted(map(str, listed))
    # a file named twice (folder + file argument) comes once
    twice = list(io.iter_images([root, root / "a.tif", str(root / "*.tif")]))
    assert len(twice) == len(set(map(os.path.abspath, twice))) == 2


def test_a_link_back_up_the_tree_is_listed_once(tmp_path):
    root = tmp_path / "loop"
    (root / "sub").mkdir(parents=True)
    (root / "a.tif").write_bytes(b"x")
    (root / "sub" / "b.tif").write_bytes(b"x")
    (root / "sub" / "up").symlink_to("..")  # a loop
    (root / "again").symlink_to("sub")  # a folder reached twice
    found = sorted(p.name for p in io.iter_images([root], recursive=True))
    assert found == ["a.tif", "b.tif"]


def test_an_image_link_to_itself_is_listed_and_fails_on_its_own(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"x")
    (tmp_path / "loopy.tif").symlink_to("loopy.tif")
    found = sorted(p.name for p in io.iter_images([tmp_path]))
    assert found == ["a.tif", "loopy.tif"]  # not dropped unseen
    with pytest.raises(io.ImageReadError, match="loopy.tif"):
        io.read_image(tmp_path / "loopy.tif")


def test_a_runs_own_mask_and_label_folders_are_not_counted(plate, tiny_model, tmp_path):
    root = tmp_path / "plate"
    (root / "a").mkdir(parents=True)
    for name in files_of(plate)[:4]:
        (root / "a" / Path(name).name).write_bytes(Path(name).read_bytes())
    expected = [str(p) for p in sorted((root / "a").iterdir())]
    out = tmp_path / "r.csv"
    args = [root, "-o", out, "--model", tiny_model, "--recursive", "--no-progress"]
    for _ in range(2):  # a rerun must not find the first run's masks and labels either
        result = CliRunner().invoke(
            app,
            ["count", *map(str, args), "--save-masks", str(root / "masks"), "--save-labels",
             str(root / "labels")],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert_exactly_once(out, expected)
    assert any((root / "masks").rglob("*_mask.png")) and any((root / "labels").rglob("*.png"))
    same = CliRunner().invoke(
        app, ["count", str(root / "a"), "-o", str(tmp_path / "s.csv"), "--model", str(tiny_model),
              "--save-masks", str(root / "a")],
    )  # fmt: skip
    assert same.exit_code == 2 and "is also where this run writes its masks" in same.output
    assert not (tmp_path / "s.csv").exists()
    # an output folder inside the counted tree that holds images of the user's
    hidden = CliRunner().invoke(
        app, ["count", str(root), "-o", str(tmp_path / "h.csv"), "--model", str(tiny_model),
              "--recursive", "--save-masks", str(root / "a")],
    )  # fmt: skip
    assert hidden.exit_code == 2 and "holds images of its own" in hidden.output


@pytest.mark.parametrize(
    "arg, message",
    [("missing.tif", "no such file"), ("empty", "contains no"), ("notes.txt", "unsupported")],
)
def test_iter_images_checks_every_argument_up_front(tmp_path, arg, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "good.tif").write_bytes(b"x")
    with pytest.raises(io.InputError, match=message):
        io.iter_images([tmp_path / "good.tif", tmp_path / arg])  # raised before any file


# -- resume and exactly-once --------------------------------------------------------


def cli_count(
    folder: Path, out: Path, model: Path, *extra: str, sigterm_default: bool = False
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celltally.cli", "count", str(folder), "-o", str(out)]
        + ["--model", str(model), "--batch-size", "2", "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # a SIGTERM ignored by whatever started pytest would be ignored by the child too
        preexec_fn=(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
        if sigterm_default
        else None,
    )


def rows_on_disk(out: Path) -> int:
    try:
        return out.read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return -1


def test_sigkill_mid_run_then_resume_gives_exactly_one_row_per_image(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    expected = files_of(plate)
    rng = random.Random(os.getpid())
    kills = 0
    for _ in range(2):
        done = max(0, rows_on_disk(out))
        room = len(expected) - done - 6
        if room < 1:  # the first kill came late: too few images left for a second one
            break
        target = done + rng.randint(1, room)  # kill after new rows
        proc = cli_count(plate, out, tiny_model)
        deadline = time.monotonic() + 120
        while proc.poll() is None and rows_on_disk(out) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        rows = read_results(out)
        assert len(rows) == len({r["file"] for r in rows}) < len(expected) or proc.returncode == 0
    assert kills >= 1, "the run finished before it could be killed"
    before = len(read_results(out))
    proc = cli_count(plate, out, tiny_model)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert f"{len(expected) - before} of {len(expected) - before} images" in stdout.decode()
    assert f"{before} already in" in stdout.decode()
    assert_exactly_once(out, expected)
    manifest = json.loads(output_paths(out).manifest.read_text())
    statuses = [run["status"] for run in manifest["runs"]]
    assert statuses[-1] == "finished" and statuses.count("interrupted") == kills
    assert manifest["finished"] is not None


def test_torn_last_row_is_dropped_and_recounted(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    expected = files_of(plate)[:6]
    first = run_batch(expected, out=out, model=tiny_model, batch_size=4)
    assert first.counted == 6
    data = out.read_bytes()
    lines = data.splitlines(keepends=True)
    # as if killed while writing a batch: the last two rows gone, the first one half-written
    torn = b"".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2]
    out.write_bytes(torn)
    notes: list[str] = []
    second = run_batch(expected, out=out, model=tiny_model, batch_size=4, log=notes.append)
    assert (second.counted, second.skipped) == (2, 4)
    assert any("torn last row" in n for n in notes)
    rows = assert_exactly_once(out, expected)
    again = {r["file"]: r["count"] for r in rows}
    assert again == {r["file"]: r["count"] for r in read_results_from(data)}


def test_resume_knows_an_image_however_its_path_is_spelt(plate, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "res.csv"
    monkeypatch.chdir(plate.parent)
    first = run_batch([plate.name], out=out, model=tiny_model)  # relative: images/...
    assert first.counted == 42
    for spelling in (str(plate), f"./{plate.name}", f"{plate.name}/"):
        again = run_batch([spelling], out=out, model=tiny_model)
        assert (again.counted, again.skipped) == (0, 42), spelling
    monkeypatch.chdir(tmp_path)  # another working folder: the rows' names are taken from
    elsewhere = run_batch([str(plate)], out=out, model=tiny_model)  # where they were written
    assert (elsewhere.counted, elsewhere.skipped) == (0, 42)
    assert len(read_results(out)) == 42


def test_relative_names_from_another_working_folder_are_not_taken_for_these(
    plate, tiny_model, tmp_path, monkeypatch
):
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):  # the same relative names, different images
        (root / "images").mkdir(parents=True)
    for i, src in enumerate(files_of(plate)[:4]):
        shutil.copy(src, one / "images" / f"f{i}.tif")
    for i, src in enumerate(files_of(plate)[4:8]):
        shutil.copy(src, two / "images" / f"f{i}.tif")
    out = tmp_path / "res.csv"
    monkeypatch.chdir(one)
    assert run_batch(["images"], out=out, model=tiny_model).counted == 4
    monkeypatch.chdir(two)
    again = run_batch([str(two / "images")], out=out, model=tiny_model)
    assert (again.counted, again.skipped) == (4, 0)  # two's images are not one's
    assert len(read_results(out)) == 8


def test_same_relative_names_in_another_working_folder_are_other_images(
    plate, tiny_model, tmp_path, monkeypatch
):
    """Both runs give 'plate1' from their own folder: only the recorded file's place decides."""
    import shutil

    out = tmp_path / "all.csv"
    for k, where in enumerate(("scrA", "scrB")):
        folder = tmp_path / where / "plate1"
        folder.mkdir(parents=True)
        for i, src in enumerate(files_of(plate)[4 * k : 4 * k + 2]):
            shutil.copy(src, folder / f"f{i}.tif")
        monkeypatch.chdir(tmp_path / where)
        done = run_batch(["plate1"], out=out, model=tiny_model)
        assert (done.counted, done.skipped) == (2, 0), where
    assert len(read_results(out)) == 4
    # the same project at another place (another node's mount): still known by name
    monkeypatch.chdir(tmp_path / "scrA")
    run_batch(["plate1"], out=tmp_path / "a.csv", model=tiny_model)
    shutil.move(tmp_path / "scrA", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    again = run_batch(["plate1"], out=tmp_path / "a.csv", model=tiny_model)
    assert (again.counted, again.skipped) == (0, 2)


def test_a_resume_in_a_copy_of_a_project_says_whose_images_its_rows_name(
    plate, tiny_model, tmp_path, monkeypatch
):
    """A copy may hold new images under the old names: they are counted, with a note."""
    import shutil

    original = tmp_path / "project"
    (original / "images").mkdir(parents=True)
    for src in files_of(plate)[:2]:
        shutil.copy(src, original / "images")
    monkeypatch.chdir(original)
    assert run_batch(["images"], out=Path("res.csv"), model=tiny_model).counted == 2
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)  # e.g. a template for the next experiment
    for src, old in zip(files_of(plate)[2:4], sorted((copy / "images").iterdir()), strict=True):
        shutil.copy(src, old)  # new images under the old names
    monkeypatch.chdir(copy)
    said: list[str] = []
    again = run_batch(["images"], out=Path("res.csv"), model=tiny_model, log=said.append)
    assert (again.counted, again.skipped) == (2, 0)  # never the old counts for new images
    note = [line for line in said if line.startswith("note: res.csv was written in")]
    assert note and str(original) in note[0] and "give it a new --out" in note[0]
    said.clear()  # where it was written: no note
    monkeypatch.chdir(original)
    run_batch(["images"], out=Path("res.csv"), model=tiny_model, log=said.append)
    assert not [line for line in said if line.startswith("note:")]


def test_a_file_linked_under_another_name_gets_its_own_row_resumed_or_not(
    plate, tiny_model, tmp_path
):
    import shutil

    folder = tmp_path / "p"
    folder.mkdir()
    for src in files_of(plate)[:2]:
        shutil.copy(src, folder)
    first = sorted(folder.iterdir())[0]
    (folder / "z_alias.tif").symlink_to(first.name)
    whole = run_batch([folder], out=tmp_path / "whole.csv", model=tiny_model)
    assert whole.counted == 3
    out = tmp_path / "resumed.csv"
    run_batch([first], out=out, model=tiny_model)
    resumed = run_batch([folder], out=out, model=tiny_model)
    assert (resumed.counted, resumed.skipped) == (2, 1)
    assert len(read_results(out)) == 3
    # a linked folder is the same files, however it is spelt
    (tmp_path / "link").symlink_to(folder)
    assert run_batch([tmp_path / "link"], out=out, model=tiny_model).counted == 0


def test_resume_after_runs_from_two_working_folders_counts_nothing_twice(
    plate, tiny_model, tmp_path, monkeypatch
):
    import shutil

    data = tmp_path / "a" / "images"
    data.mkdir(parents=True)
    for src in files_of(plate)[:2]:
        shutil.copy(src, data)
    out = tmp_path / "res.csv"
    monkeypatch.chdir(tmp_path / "a")
    run_batch(["images"], out=out, model=tiny_model)  # relative names, from a/
    shutil.copy(files_of(plate)[2], data)
    monkeypatch.chdir(tmp_path)  # from elsewhere: adds the new image only
    assert run_batch([str(data)], out=out, model=tiny_model).counted == 1
    monkeypatch.chdir(tmp_path / "a")
    again = run_batch(["images"], out=out, model=tiny_model)
    assert (again.counted, again.skipped) == (0, 3)
    assert len(read_results(out)) == 3


def test_resume_refuses_a_model_whose_ensemble_or_ood_files_changed(plate, tiny_model, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    shutil.copy(model / "model.safetensors", model / "ensemble_1.safetensors")
    out = tmp_path / "res.csv"
    run_batch(files_of(plate)[:2], out=out, model=model)
    run_batch(files_of(plate)[:3], out=out, model=model)  # unchanged: resumes
    torch.manual_seed(5)  # another member: its --epistemic counts would differ
    save_model_folder(CountingPipeline(tiny_config()), tiny_config(), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "ensemble_1.safetensors")
    with pytest.raises(io.InputError, match=r"other ensemble or out-of-distribution files"):
        run_batch(files_of(plate)[:4], out=out, model=model)  # mixed its rows silently


def test_a_recalibrated_model_is_named_as_the_reason_resume_refuses(plate, tiny_model, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "res.csv"
    run_batch(files_of(plate)[:2], out=out, model=model)
    config = json.loads((model / "config.json").read_text())
    config["calibration"] = {"default": "conformal", "scores": [0.5, 1.0, 2.0]}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(io.InputError, match=r"another config.json \(same weights: recalibrated"):
        run_batch(files_of(plate)[:2], out=out, model=model)


def test_outputs_that_would_overwrite_inputs_or_each_other_are_refused(plate, tiny_model, tmp_path):
    image = tmp_path / "a.tif"
    image.write_bytes(Path(files_of(plate)[0]).read_bytes())
    with pytest.raises(io.InputError, match="names an image file"):
        run_batch([image], out=image, model=tiny_model, overwrite=True)
    assert image.read_bytes() == Path(files_of(plate)[0]).read_bytes()
    out = tmp_path / "res.csv"
    with pytest.raises(io.InputError, match="--save-masks"):
        run_batch([image], out=out, model=tiny_model, save_masks=out)
    assert not out.exists()


def read_results_from(data: bytes) -> list[dict]:
    import csv
    import io as stdio

    return list(csv.DictReader(stdio.StringIO(data.decode())))


def test_malformed_row_in_the_middle_is_refused(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    files = files_of(plate)[:3]
    run_batch(files, out=out, model=tiny_model)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(lines[0] + b"garbage,row\n" + b"".join(lines[1:]))
    with pytest.raises(io.InputError, match="malformed row"):
        run_batch(files, out=out, model=tiny_model)


def other_model(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    config = tiny_config()
    config["name"] = "other"
    return save_model_folder(CountingPipeline(config), config, tmp_path / "other")


def test_changing_model_or_level_needs_new_out_or_overwrite(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    files = files_of(plate)[:3]
    run_batch(files, out=out, model=tiny_model, level=0.95)
    with pytest.raises(io.InputError, match="--overwrite") as err:
        run_batch(files, out=out, model=tiny_model, level=0.9)
    assert "level 0.95" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(io.InputError, match="model 'other'"):
        run_batch(files, out=out, model=other_model(tmp_path), level=0.95)
    with pytest.raises(
        io.InputError, match="made with no counter options; this run uses --calibration gaussian"
    ):
        run_batch(files, out=out, model=tiny_model, counter_options={"calibration": "gaussian"})
    # a background setting is named, even 'none' (it may undo the model's own)
    norm = {"method": "percentile", "low": 0.5, "high": 99.95, "background": "none"}
    with pytest.raises(io.InputError, match="this run uses normalization .*, --background none"):
        run_batch(files, out=out, model=tiny_model, counter_options={"norm": norm})
    result = CliRunner().invoke(
        app, ["count", str(plate), "-o", str(out), "--model", str(tiny_model), "--level", "0.9"]
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error:") and "--overwrite" in result.output
    again = run_batch(files, out=out, model=tiny_model, level=0.9, overwrite=True)
    assert again.counted == 3
    assert {r["level"] for r in read_results(out)} == {"0.9"}
    manifest = json.loads(output_paths(out).manifest.read_text())
    assert manifest["settings"]["level"] == 0.9 and len(manifest["runs"]) == 1


def test_manifest_records_model_version_settings_and_times(plate, tiny_model, tmp_path):
    out = tmp_path / "deep" / "res.csv"
    summary = run_batch(files_of(plate)[:2], out=out, model=tiny_model, batch_size=3)
    assert summary.manifest == tmp_path / "deep" / "res.manifest.json"
    manifest = json.loads(summary.manifest.read_text())
    identity = batch.model_identity(tiny_model)
    assert manifest["model"] == identity and identity["name"] == "tiny"
    assert len(identity["config_sha256"]) == len(identity["weights_sha256"]) == 64
    assert manifest["celltally_version"]
    assert manifest["settings"] == {
        "level": 0.95,
        "counter_options": {},
        "batch_size": 3,
        "recursive": False,
    }
    run = manifest["runs"][0]
    assert run["status"] == "finished" and run["counted"] == 2 and run["failed"] == 0
    assert run["started"] <= run["finished"] == manifest["finished"]


def test_the_manifest_is_final_before_the_results_lock_is_released(
    plate, tiny_model, tmp_path, monkeypatch
):
    out = tmp_path / "res.csv"
    seen = []
    close = batch._ResultsFile.close

    def closing(self):  # a run waiting for the lock may take it from here on
        seen.append(json.loads(output_paths(out).manifest.read_text())["runs"][-1]["status"])
        close(self)

    monkeypatch.setattr(batch._ResultsFile, "close", closing)
    run_batch(files_of(plate)[:2], out=out, model=tiny_model)
    # it was "running": that run's final entry then overwrote the waiting run's
    assert seen == ["finished"]


def test_existing_foreign_csv_is_not_appended_to(plate, tiny_model, tmp_path):
    out = tmp_path / "mine.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(io.InputError, match="no celltally manifest"):
        run_batch(files_of(plate)[:1], out=out, model=tiny_model)
    assert out.read_text() == "a,b\n1,2\n"


def test_second_writer_on_same_out_is_refused(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    holder = batch._ResultsFile(out, batch.COUNT_COLUMNS)
    holder.open()
    try:
        with pytest.raises(io.InputError, match="another celltally run"):
            run_batch(files_of(plate)[:1], out=out, model=tiny_model)
    finally:
        holder.close()


def test_unreadable_files_are_listed_run_finishes_and_they_are_retried(tiny_model, tmp_path):
    folder = tmp_path / "plate"
    folder.mkdir()
    for i in range(5):
        tifffile.imwrite(folder / f"img_{i}.tif", blob_image(i + 1, seed=i))
    (folder / "broken.tif").write_bytes(b"II*\x00garbage")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "res.csv"
    result = CliRunner().invoke(
        app, ["count", str(folder), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    )
    assert result.exit_code == 1
    assert "counted 5 of 7 images" in result.output
    assert "broken.tif" in result.output and "empty.png" in result.output
    assert "Traceback" not in result.output
    assert len(read_results(out)) == 5
    errors_file = output_paths(out).errors
    errors = read_results(errors_file)
    assert sorted(Path(e["file"]).name for e in errors) == ["broken.tif", "empty.png"]
    assert all(e["error"] for e in errors)
    # fix one file: the rerun counts only it, still reports the other
    tifffile.imwrite(folder / "broken.tif", blob_image(3, seed=9))
    summary = run_batch([folder], out=out, model=tiny_model)
    assert (summary.counted, summary.skipped, summary.failed) == (1, 5, 1)
    assert [Path(e["file"]).name for e in read_results(errors_file)] == ["empty.png"]
    (folder / "empty.png").unlink()
    summary = run_batch([folder], out=out, model=tiny_model)
    assert (summary.counted, summary.failed) == (0, 0) and not errors_file.exists()
    assert_exactly_once(out, files_of(folder))


def test_bad_settings_fail_before_anything_is_written(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    for kwargs, message in [
        ({"level": 1.5}, "--level"),
        ({"batch_size": 0}, "--batch-size"),
        ({"threads": 0}, "--threads"),
        ({"read_threads": -1}, "--read-threads"),
        ({"dask": "local:0"}, "local:N"),
    ]:
        with pytest.raises(io.InputError, match=message):
            run_batch(files_of(plate)[:1], out=out, model=tiny_model, **kwargs)
    assert not out.exists()


def test_a_run_that_failed_before_counting_does_not_block_the_corrected_rerun(
    plate, tiny_model, tmp_path
):
    out = tmp_path / "res.csv"
    files = files_of(plate)[:3]
    # the tiny model records no object scale, so --diameter fails when the model loads
    with pytest.raises(io.InputError, match="diameter"):
        run_batch(files, out=out, model=tiny_model, counter_options={"diameter": 20.0})
    assert not out.exists()  # refused before any output was made
    # a CSV that holds no counted row yet (a run stopped before its first image) starts
    # afresh whatever its settings were
    run_batch(files, out=out, model=tiny_model, level=0.9)
    out.write_bytes(out.read_bytes().splitlines(keepends=True)[0])  # only the header left
    again = run_batch(files, out=out, model=tiny_model)
    assert again.counted == 3 and len(read_results(out)) == 3
    manifest = json.loads(output_paths(out).manifest.read_text())
    assert manifest["settings"]["counter_options"] == {} and len(manifest["runs"]) == 1


def test_threads_are_set_back_after_a_run(plate, tiny_model, tmp_path):
    before = torch.get_num_threads()
    run_batch(files_of(plate)[:1], out=tmp_path / "res.csv", model=tiny_model, threads=before + 1)
    assert torch.get_num_threads() == before


def test_reading_inline_gives_the_same_rows_as_reading_ahead(plate, tiny_model, tmp_path):
    files = files_of(plate)[:9]
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    ahead = run_batch([*files, str(bad)], out=tmp_path / "a.csv", model=tiny_model, batch_size=4)
    inline = run_batch(
        [*files, str(bad)], out=tmp_path / "b.csv", model=tiny_model, batch_size=4, read_threads=0
    )
    assert (inline.counted, inline.failed) == (ahead.counted, ahead.failed) == (9, 1)
    key = ("file", "count", "low", "high")
    rows = [[tuple(r[k] for k in key) for r in read_results(tmp_path / f"{n}.csv")] for n in "ab"]
    assert rows[0] == rows[1]


# -- Dask ----------------------------------------------------------------------


def test_local_cluster_workers_keep_glibc_mmap_threshold(monkeypatch):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which slows counting ~1.4x unless
    MALLOC_MMAP_THRESHOLD_ is pinned too; local:N workers must start with it."""
    pytest.importorskip("dask.distributed")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    client, cluster = batch._connect("local:1", lambda _: None)
    try:
        seen = client.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    finally:
        client.close()
        cluster.close()
    assert list(seen.values()) == [str(batch.MMAP_THRESHOLD)]


def test_unreachable_scheduler_is_a_one_line_error(plate, tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr(batch, "CONNECT_TIMEOUT", "1s")
    out = tmp_path / "res.csv"
    with pytest.raises(io.InputError, match="cannot reach the scheduler") as err:
        run_batch(files_of(plate)[:2], out=out, model=tiny_model, dask="tcp://127.0.0.1:9")
    assert "\n" not in str(err.value)
    # nothing was counted; the same command runs once the cluster is there
    assert read_results(out) == []
    assert run_batch(files_of(plate)[:2], out=out, model=tiny_model).counted == 2


def test_dask_cluster_gives_same_counts_as_one_process(plate, tiny_model, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    files = files_of(plate)[:16]
    local = run_batch(files, out=tmp_path / "local.csv", model=tiny_model, batch_size=4)
    assert local.counted == 16
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = tmp_path / "dask.csv"
        first = run_batch(
            files[:10], out=out, model=tiny_model, batch_size=4, chunk_size=3,
            dask=cluster.scheduler_address,
        )  # fmt: skip
        summary = run_batch(
            files, out=out, model=tiny_model, batch_size=4, chunk_size=3,
            dask=cluster.scheduler_address,
        )  # fmt: skip
        loads = client.run(lambda: __import__("celltally.batch").batch._WORKER_LOADS)
        # with masks and a labels folder (as --save-labels passes it): the workers were
        # sent the labels folder as their model
        labelled = run_batch(
            files[:2], out=tmp_path / "labelled.csv", model=tiny_model,
            save_masks=tmp_path / "masks", exclude=[tmp_path / "labels"],
            dask=cluster.scheduler_address,
        )  # fmt: skip
    assert labelled.counted == 2 and not labelled.errors
    assert (first.counted, summary.counted, summary.skipped) == (10, 6, 10)
    # a worker loads the model on its first chunk only: both counted, each loaded it once
    assert sorted(loads.values()) == [1, 1], loads
    by_file = {r["file"]: r for r in read_results(tmp_path / "local.csv")}
    rows = assert_exactly_once(out, files)
    for row in rows:
        ref = by_file[row["file"]]
        assert float(row["count"]) == pytest.approx(float(ref["count"]), abs=0.011)
        assert float(row["high"]) == pytest.approx(float(ref["high"]), abs=0.011)
        assert (row["well"], row["true_count"]) == (ref["well"], ref["true_count"])


def test_two_images_whose_outputs_would_share_a_name_are_not_mixed(plate, tiny_model, tmp_path):
    from PIL import Image

    from celltally.batch import SAME_OUTPUT_NAME

    folder = tmp_path / "in"
    folder.mkdir()
    first, second = files_of(plate)[:2]
    Image.fromarray(tifffile.imread(first)).save(folder / "A01.png")
    (folder / "A01.tif").write_bytes(Path(second).read_bytes())
    out, masks = tmp_path / "r.csv", tmp_path / "masks"
    for _ in range(2):  # the same on a rerun
        summary = run_batch([folder], out=out, model=tiny_model, save_masks=masks)
        assert summary.failed == 1 and SAME_OUTPUT_NAME in summary.errors[0]
        assert len(read_results(out)) == 1  # the other one, with its own masks
    assert sorted(p.name for p in masks.iterdir()) == ["A01_mask.png", "A01_mask_std.tif"]
    # without masks there is nothing to mix: both are counted
    assert run_batch([folder], out=tmp_path / "plain.csv", model=tiny_model).counted == 2


def test_ctrl_c_on_a_local_dask_run_is_one_line_and_resumes(plate, tiny_model, tmp_path):
    """Ctrl-C reaches the whole process group: only the command speaks, not each worker."""
    pytest.importorskip("dask.distributed")
    out = tmp_path / "r.csv"
    args = ["count", str(plate), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    args += ["--dask", "local:1", "--batch-size", "1", "--chunk-size", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "celltally.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
        # Ctrl-C as a terminal's foreground job gets it: a shell running these tests in
        # the background (`pytest &`) has SIGINT ignored, which the command would inherit
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(read_results(out) if out.exists() else []) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    said, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in said and "KeyboardInterrupt" not in said, said
    assert "interrupted: the rows written so far are kept" in said
    kept = len(read_results(out))
    assert 2 <= kept < 42
    rerun = run_batch([plate], out=out, model=tiny_model)
    assert rerun.skipped == kept and rerun.counted == 42 - kept


def test_each_row_is_resolved_from_the_folder_of_the_run_that_wrote_it(
    plate, tiny_model, tmp_path, monkeypatch
):
    import shutil

    images = files_of(plate)
    for where, names in (("X", ["a"]), ("Y", ["a", "b"])):  # Y's a.tif is another image
        (tmp_path / where / "plate").mkdir(parents=True)
        for i, name in enumerate(names):
            shutil.copy(images[i + (where == "Y")], tmp_path / where / "plate" / f"{name}.tif")
    out = tmp_path / "r.csv"
    monkeypatch.chdir(tmp_path / "X")
    assert run_batch(["plate/a.tif"], out=out, model=tiny_model).counted == 1
    monkeypatch.chdir(tmp_path / "Y")
    assert run_batch(["plate/b.tif"], out=out, model=tiny_model).counted == 1
    third = run_batch(["plate/a.tif"], out=out, model=tiny_model)  # Y's own a.tif: new
    assert (third.counted, third.skipped) == (1, 0)
    again = run_batch(["plate"], out=out, model=tiny_model)
    assert (again.counted, again.skipped) == (0, 2)
    monkeypatch.chdir(tmp_path / "X")
    assert run_batch(["plate"], out=out, model=tiny_model).skipped == 1


def test_an_image_counted_before_keeps_its_output_names(plate, tiny_model, tmp_path):
    """A01.tif added beside an A01.png counted earlier: A01.tif is said, whatever the order."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    first, second = files_of(plate)[:2]
    Image.fromarray(tifffile.imread(first)).save(folder / "A01.png")
    out, masks = tmp_path / "r.csv", tmp_path / "masks"
    run_batch([folder], out=out, model=tiny_model, save_masks=masks)
    before = (masks / "A01_mask.png").read_bytes()
    (folder / "A01.tif").write_bytes(Path(second).read_bytes())
    summary = run_batch([folder], out=out, model=tiny_model, save_masks=masks)
    assert (summary.counted, summary.skipped, summary.failed) == (0, 1, 1)
    assert "A01.tif" in summary.errors[0]
    assert (masks / "A01_mask.png").read_bytes() == before


def test_adding_a_folder_moves_earlier_masks_instead_of_counting_again(plate, tiny_model, tmp_path):
    """p1 counted with masks, then p1 and p2: p1's masks move under p1/, none is recounted."""
    images = files_of(plate)[:4]
    for name, chosen in (("p1", images[:2]), ("p2", images[2:])):
        (tmp_path / name).mkdir()
        for image in chosen:
            (tmp_path / name / Path(image).name).write_bytes(Path(image).read_bytes())
    out, masks = tmp_path / "r.csv", tmp_path / "masks"
    run_batch([tmp_path / "p1"], out=out, model=tiny_model, save_masks=masks)
    first = {p.name: p.read_bytes() for p in masks.glob("*_mask.png")}
    assert len(first) == 2
    notes: list[str] = []
    both = [tmp_path / "p1", tmp_path / "p2"]
    summary = run_batch(both, out=out, model=tiny_model, save_masks=masks, log=notes.append)
    assert (summary.counted, summary.skipped, summary.masks_only) == (2, 2, 0)
    assert summary.output_root == tmp_path
    assert {p.name: p.read_bytes() for p in (masks / "p1").glob("*_mask.png")} == first
    assert len(list((masks / "p2").glob("*_mask.png"))) == 2
    assert not list(masks.glob("*_mask*"))  # nothing left at the old names
    assert any("moved the outputs of 2 image(s)" in n for n in notes)
    # p2 alone again keeps the layout of the folder holding both
    again = run_batch([tmp_path / "p2"], out=out, model=tiny_model, save_masks=masks)
    assert (again.counted, again.masks_only, again.output_root) == (0, 0, tmp_path)


def test_a_new_root_moves_every_earlier_output_not_only_this_runs_images(
    tiny_model, tmp_path, monkeypatch
):
    """screen/, then screen/ mine/images, then a file outside both and one of screen's: the
    third run moves the outputs of every image counted before, not only the one it names,
    and a kill mid-move loses none of them and the next run finishes the move."""
    proj = tmp_path / "proj"
    named = {"screen": ["a", "b", "c"], "mine/images": ["d", "e"], "../other": ["x"]}
    for i, (folder, stems) in enumerate(named.items()):
        (proj / folder).mkdir(parents=True)
        for j, stem in enumerate(stems):
            tifffile.imwrite(proj / folder / f"{stem}.tif", blob_image(2 + j, seed=10 * i + j))
    monkeypatch.chdir(proj)
    common = {"out": "r.csv", "model": tiny_model, "save_masks": "mvm", "exclude": ["lab"]}
    run_batch(["screen"], **common)
    run_batch(["screen", "mine/images"], **common)
    assert sorted(p.name for p in (proj / "mvm").iterdir()) == ["mine", "screen"]
    for stem in ("screen/a", "mine/images/d"):  # labels, laid out as the masks are
        (proj / "lab" / stem).parent.mkdir(parents=True, exist_ok=True)
        (proj / "lab" / f"{stem}_labels.tif").write_bytes(stem.encode())
    earlier = {
        p.relative_to(proj / "mvm").as_posix(): p.read_bytes()
        for p in (proj / "mvm").rglob("*")
        if p.is_file()
    }
    assert len(earlier) == 10  # a mask and its std per image

    third = [str(tmp_path / "other" / "x.tif"), "screen/b.tif"]
    moves = []

    def killed_mid_move(source, target):  # after an image's std, before its mask
        if f"{os.sep}mvm{os.sep}" in os.path.abspath(source):
            moves.append(source)
            if len(moves) == 6:
                raise KeyboardInterrupt
        os.rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_mid_move)
        with pytest.raises(KeyboardInterrupt):
            run_batch(third, **common)
    # every output is still somewhere: at its old name or its new one
    now = {p.read_bytes() for p in (proj / "mvm").rglob("*") if p.is_file()}
    assert set(earlier.values()) <= now
    notes: list[str] = []
    summary = run_batch(third, **common, log=notes.append)
    assert (summary.counted, summary.skipped, summary.masks_only) == (1, 1, 0)
    assert summary.output_root == tmp_path
    moved = [n for n in notes if n.startswith("moved the outputs of")]
    assert len(moved) == 1 and "of 3 image(s)" in moved[0], notes  # 2 moved before the kill
    after = {
        p.relative_to(proj / "mvm").as_posix(): p.read_bytes()
        for p in (proj / "mvm").rglob("*")
        if p.is_file()
    }
    assert after == {
        **{f"proj/{name}": data for name, data in earlier.items()},
        "other/x_mask.png": after["other/x_mask.png"],
        "other/x_mask_std.tif": after["other/x_mask_std.tif"],
    }
    labels = sorted(p.relative_to(proj / "lab").as_posix() for p in (proj / "lab").rglob("*.tif"))
    assert labels == ["proj/mine/images/d_labels.tif", "proj/screen/a_labels.tif"]
    # once: a later run in this layout moves nothing and counts nothing again
    notes.clear()
    again = run_batch(["screen", "mine/images"], **common, log=notes.append)
    assert (again.counted, again.skipped, again.masks_only) == (0, 5, 0)
    assert not [n for n in notes if n.startswith("moved")]


def _errors_listed(out: Path) -> list[str]:
    import csv

    path = output_paths(out).errors
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return sorted(Path(r["file"]).name for r in csv.DictReader(handle))


def test_failures_stay_listed_until_a_rerun_tries_them_again(tiny_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"b{i}.tif", blob_image(4, seed=i))
    for name in ("z_bad1.tif", "z_bad2.tif"):
        (folder / name).write_bytes(b"II*\x00 truncated")
    out = tmp_path / "res.csv"
    kw = dict(out=out, model=tiny_model, batch_size=1, read_threads=1)
    run_batch([folder], **kw)
    assert _errors_listed(out) == ["z_bad1.tif", "z_bad2.tif"]
    # new images sort first; the rerun is stopped after its first one, before it
    # has tried the bad files again: their record is kept
    for i in range(3):
        tifffile.imwrite(folder / f"a{i}.tif", blob_image(5, seed=10 + i))

    def stop(_: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch([folder], on_commit=stop, **kw)
    assert _errors_listed(out) == ["z_bad1.tif", "z_bad2.tif"]
    # one bad file fixed: a finished rerun lists only the one that still fails
    tifffile.imwrite(folder / "z_bad1.tif", blob_image(2, seed=30))
    summary = run_batch([folder], **kw)
    assert summary.failed == 1 and _errors_listed(out) == ["z_bad2.tif"]
    tifffile.imwrite(folder / "z_bad2.tif", blob_image(2, seed=31))
    assert run_batch([folder], **kw).failed == 0 and _errors_listed(out) == []
    rows = read_results(out)
    assert sorted(Path(r["file"]).name for r in rows) == sorted(p.name for p in folder.iterdir())


def test_dask_workers_in_another_folder_count_the_files_the_user_named(
    plate, tiny_model, tmp_path, monkeypatch
):
    distributed = pytest.importorskip("dask.distributed")
    here, there = tmp_path / "here", tmp_path / "there"
    for i, f in enumerate(files_of(plate)[:4]):  # the same names, there not images at all
        for root, data in ((here, Path(f).read_bytes()), (there, b"not an image")):
            (root / "screen").mkdir(parents=True, exist_ok=True)
            (root / "screen" / f"A0{i + 1}.tif").write_bytes(data)
    (here / "screen" / "z_bad.tif").write_bytes(b"not a tiff")  # its error names it as given
    monkeypatch.chdir(there)  # the workers start here ...
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        monkeypatch.chdir(here)  # ... and the user counts from here
        kw = dict(model=tiny_model, batch_size=2)
        plain = run_batch(["screen"], out=here / "plain.csv", **kw)
        on_dask = run_batch(["screen"], out=here / "dask.csv", dask=cluster.scheduler_address, **kw)
    assert plain.counted == on_dask.counted == 4
    assert plain.errors == on_dask.errors and plain.errors[0].startswith("screen/z_bad.tif: ")
    expected = {r["file"]: r["count"] for r in read_results(here / "plain.csv")}
    got = {r["file"]: r["count"] for r in read_results(here / "dask.csv")}
    assert got == expected and sorted(got) == [f"screen/A0{i}.tif" for i in range(1, 5)]


def test_an_image_that_kills_its_dask_worker_is_one_error_and_the_rest_is_counted(plate, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    import dask
    import numpy as np

    folder = tmp_path / "in"
    folder.mkdir()
    for i, f in enumerate(files_of(plate)[:3]):
        (folder / f"a{i}.tif").write_bytes(Path(f).read_bytes())
    # 256 M 16-bit pixels: about a MB on disk; decoding it alone takes 512 MB, past the
    # worker's limit for seconds (a 144 M 8-bit one was not always caught in time)
    big = np.zeros((16000, 16000), dtype=np.uint16)
    big[::97, ::89] = 4000
    tifffile.imwrite(folder / "a1_big.tif", big, compression="zlib")
    del big
    # a worker with the model loaded holds ~250-400 MB: never paused (a paused worker
    # starts nothing), killed at 95% of 800 MiB, which the big image passes at once
    settings = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.target": False,
    }
    with (
        dask.config.set(settings),
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
            memory_limit="800MiB",
        ) as cluster,
    ):  # fmt: skip
        summary = run_batch(
            [folder],
            out=tmp_path / "r.csv",
            model="bbbc005",
            batch_size=4,
            chunk_size=4,
            dask=cluster.scheduler_address,
        )  # fmt: skip  (a density-head model: it would count the big image in tiles)
    assert (summary.counted, summary.failed) == (3, 1)
    assert "a1_big.tif: the Dask worker counting it died" in summary.errors[0]


def test_absolute_files_place_names_only_where_the_manifest_says_which_run_wrote_them(
    tmp_path,
):
    from celltally.batch import absolute_files

    out = tmp_path / "r.csv"
    out.write_text("file\na.tif\n")
    manifest = output_paths(out).manifest
    one = {"runs": [{"cwd": "/x", "rows_before": 0}]}
    manifest.write_text(json.dumps(one))
    assert absolute_files(out, ["a.tif", "/abs/b.tif"]) == ["/x/a.tif", "/abs/b.tif"]
    older = {"runs": [{"cwd": "/x"}, {"cwd": "/y"}]}  # no rows_before: which folder?
    manifest.write_text(json.dumps(older))
    assert absolute_files(out, ["a.tif"]) is None
    manifest.unlink()
    assert absolute_files(out, ["a.tif"]) is None  # not written by count


def test_an_image_never_takes_the_mask_of_a_namesake_outside_its_layout(tmp_path):
    from celltally.batch import _move_image

    masks = tmp_path / "masks"
    masks.mkdir()
    # p1/a.tif was counted under root p1 (mask a_mask.png); p2/a.tif never had a mask
    (masks / "a_mask.png").write_bytes(b"p1's mask")
    moved = _move_image(masks, [], tmp_path / "p2" / "a.tif", [tmp_path / "p1"], tmp_path)
    assert moved is False
    assert (masks / "a_mask.png").read_bytes() == b"p1's mask"
    assert not (masks / "p2").exists()
    # p1/a.tif itself does move to the new layout
    assert _move_image(masks, [], tmp_path / "p1" / "a.tif", [tmp_path / "p1"], tmp_path)
    assert (masks / "p1" / "a_mask.png").read_bytes() == b"p1's mask"


def test_a_run_over_other_inputs_keeps_the_failures_it_did_not_try(tiny_model, tmp_path):
    one, two = tmp_path / "Plate1", tmp_path / "Plate3"
    for folder in (one, two):
        folder.mkdir()
        tifffile.imwrite(folder / f"{folder.name}_C05_s1.tif", blob_image(4, seed=1))
    (one / "Plate1_C05_s2.tif").write_bytes(b"II*\x00garbage")
    out = tmp_path / "res.csv"
    base = ["count", "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    assert CliRunner().invoke(app, [*base, str(one)]).exit_code == 1
    result = CliRunner().invoke(app, [*base, str(two)])
    # Plate1's unread site was dropped from the errors file: its well total lacked it silently
    assert (
        result.exit_code == 1 and "1 image(s) that an earlier run could not read" in result.output
    )
    assert _errors_listed(out) == ["Plate1_C05_s2.tif"]
    wells = CliRunner().invoke(app, ["wells", str(out), "-o", str(tmp_path / "w.csv")])
    assert "include images that could not be counted" in wells.output
    (one / "Plate1_C05_s2.tif").unlink()  # a file deleted: its failure goes
    assert CliRunner().invoke(app, [*base, str(two)]).exit_code == 0
    assert not output_paths(out).errors.exists()


def test_a_failure_tried_again_under_another_spelling_is_listed_once(
    tiny_model, tmp_path, monkeypatch
):
    folder = tmp_path / "plate"
    folder.mkdir()
    tifffile.imwrite(folder / "B03_s1.tif", blob_image(3, seed=1))
    (folder / "B03_s2.tif").write_bytes(b"II*\x00garbage")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res.csv"
    assert run_batch(["plate"], out=out, model=tiny_model).failed == 1
    again = run_batch([str(folder.resolve())], out=out, model=tiny_model)  # absolute now
    assert (again.failed, again.earlier_failed) == (1, 0)
    assert _errors_listed(out) == ["B03_s2.tif"]  # was listed twice: one image, two failures


def test_a_results_file_resaved_with_a_byte_order_mark_resumes(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    run_batch(files_of(plate)[:2], out=out, model=tiny_model)
    out.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())  # as Excel saves "CSV UTF-8"
    summary = run_batch(files_of(plate)[:3], out=out, model=tiny_model)  # was refused
    assert (summary.counted, summary.skipped) == (1, 2)
    assert len(read_results(out)) == 3


def test_sigterm_mid_run_keeps_the_rows_says_so_and_resumes(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    expected = files_of(plate)
    proc = cli_count(plate, out, tiny_model, "--batch-size", "1", sigterm_default=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and rows_on_disk(out) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)  # as SLURM does at the time limit
    _, stderr = proc.communicate(timeout=60)
    # it died silently, its manifest saying "running"
    assert proc.returncode == 143 and "terminated (SIGTERM): the rows" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    manifest = json.loads(output_paths(out).manifest.read_text())
    assert manifest["runs"][-1]["status"] == "interrupted"
    assert cli_count(plate, out, tiny_model).wait(timeout=120) == 0
    assert_exactly_once(out, expected)


def test_resume_takes_options_spelt_out_at_their_defaults(plate, tiny_model, tmp_path):
    out = tmp_path / "res.csv"
    files = [str(f) for f in files_of(plate)[:3]]
    base = ["count", "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    assert CliRunner().invoke(app, [*base, *files[:2]]).exit_code == 0
    # the model's own calibration method and scale, spelt out: the same run (was refused)
    again = CliRunner().invoke(app, [*base, *files, "--calibration", "conformal", "--rescale", "1"])
    assert again.exit_code == 0, again.output
    assert "counted 1 of 1 images (2 already in" in again.output


def test_out_in_a_folder_it_cannot_write_in_is_refused_before_counting(
    plate, tiny_model, tmp_path, monkeypatch
):
    out = tmp_path / "res.csv"
    run_batch(files_of(plate)[:1], out=out, model=tiny_model)
    real = os.access

    def access(path, mode, **kw):  # as a read-only folder holding a writable file (root
        # passes every permission check, so the folder's is simulated)
        return False if Path(path) == tmp_path and mode & os.W_OK else real(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    result = CliRunner().invoke(
        app, ["count", str(plate), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    )
    # the early check passed (the file is writable): the run died at its manifest
    assert result.exit_code == 2 and f"no permission to write in {tmp_path}" in result.output
    assert len(read_results(out)) == 1


def test_earlier_failures_are_kept_across_working_folders_and_all_failed_runs(
    tiny_model, tmp_path, monkeypatch
):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a / "p1", a / "p2", b):
        folder.mkdir(parents=True)
    (a / "p1" / "bad.tif").write_bytes(b"II*\x00garbage")  # p1's only image: a run with no row
    tifffile.imwrite(a / "p2" / "good.tif", blob_image(3, seed=1))
    tifffile.imwrite(a / "p2" / "bad2.tif", blob_image(3, seed=2))
    out = tmp_path / "res.csv"
    monkeypatch.chdir(a)
    assert run_batch(["p1"], out=out, model=tiny_model).failed == 1
    second = run_batch(["p2"], out=out, model=tiny_model)  # every earlier image had failed:
    assert second.earlier_failed == 1  # the errors file was deleted as a fresh start
    tifffile.imwrite(a / "p2" / "new.tif", blob_image(4, seed=3))
    monkeypatch.chdir(b)  # another working folder: "p1/bad.tif" names nothing here
    third = run_batch([str(a / "p2" / "new.tif")], out=out, model=tiny_model)
    assert (third.counted, third.earlier_failed) == (1, 1)  # it was dropped as gone
    listed = read_results(output_paths(out).errors)  # relative to the last run's folder
    assert [r["file"] for r in listed] == [str(a / "p1" / "bad.tif")]
    again = run_batch([str(a / "p1")], out=out, model=tiny_model)  # the same file, absolute
    assert (again.failed, again.earlier_failed) == (1, 0)
    assert _errors_listed(out) == ["bad.tif"]  # once


def test_a_warm_dask_worker_checks_the_models_other_files_again(tiny_model, monkeypatch):
    identity = batch.model_identity(tiny_model)
    monkeypatch.setattr(batch, "_WORKER_COUNTERS", {})
    model, weights = str(tiny_model), identity["weights_sha256"]
    first = batch._worker_counter(model, weights, {}, identity["files_sha256"])
    assert batch._worker_counter(model, weights, {}, identity["files_sha256"]) is first
    # the client's ensemble or ood files differ from the worker's: its cached counter was
    # reused without a check
    with pytest.raises(io.InputError, match="other ensemble or out-of-distribution files"):
        batch._worker_counter(model, weights, {}, "0" * 64)


def test_sigterm_is_taken_over_only_while_count_runs_and_only_from_its_default(
    plate, tiny_model, tmp_path
):
    args = ["count", str(files_of(plate)[0]), "--model", str(tiny_model), "--no-progress"]
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever pytest was given
    try:
        assert CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a.csv")]).exit_code == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # not left to this process
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a caller that ignores it keeps its way
        assert CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b.csv")]).exit_code == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert CliRunner().invoke(app, ["models"]).exit_code == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_earlier_failures_survive_a_moved_project_and_a_resaved_errors_file(
    tiny_model, tmp_path, monkeypatch
):
    project = tmp_path / "nodeA" / "proj"
    for sub in ("p1", "p2"):
        (project / sub).mkdir(parents=True)
    (project / "p1" / "bad.tif").write_bytes(b"II*\x00garbage")
    tifffile.imwrite(project / "p1" / "good.tif", blob_image(3, seed=1))
    tifffile.imwrite(project / "p2" / "new.tif", blob_image(3, seed=2))
    monkeypatch.chdir(project)
    assert run_batch(["p1"], out="res.csv", model=tiny_model).failed == 1
    errors = output_paths(project / "res.csv").errors
    errors.write_bytes(b"\xef\xbb\xbf" + errors.read_bytes())  # re-saved by a spreadsheet
    moved = tmp_path / "nodeB" / "proj"
    moved.parent.mkdir()
    project.rename(moved)  # the recorded working folder is gone
    monkeypatch.chdir(moved)
    summary = run_batch(["p2"], out="res.csv", model=tiny_model)
    assert (summary.counted, summary.earlier_failed) == (1, 1)  # was dropped as gone
    listed = read_results(output_paths(moved / "res.csv").errors)  # reads a BOM too
    assert [r["file"] for r in listed] == ["p1/bad.tif"]
    from celltally.wells import well_totals

    well_totals(moved / "res.csv", moved / "w.csv")  # read its errors file past the BOM too
    (moved / "res.csv").unlink()  # results deleted to start afresh: their failures go too
    assert run_batch(["p2"], out="res.csv", model=tiny_model).earlier_failed == 0


def test_a_deleted_failure_is_not_taken_for_a_namesake_in_another_folder(
    tiny_model, tmp_path, monkeypatch
):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a / "p1", b / "p1", b / "p2"):
        folder.mkdir(parents=True)
    (a / "p1" / "bad.tif").write_bytes(b"II*\x00garbage")
    tifffile.imwrite(b / "p1" / "bad.tif", blob_image(3, seed=1))  # another file, never given
    tifffile.imwrite(b / "p2" / "new.tif", blob_image(3, seed=2))
    out = tmp_path / "res.csv"
    monkeypatch.chdir(a)
    assert run_batch(["p1"], out=out, model=tiny_model).failed == 1
    (a / "p1" / "bad.tif").unlink()  # the failed file is gone; its folder is not
    monkeypatch.chdir(b)
    summary = run_batch(["p2"], out=out, model=tiny_model)
    assert (summary.counted, summary.earlier_failed) == (1, 0)  # b/p1/bad.tif was carried
    assert not output_paths(out).errors.exists()
