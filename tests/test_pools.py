"""celltally.pools: process pools that stop promptly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from celltally.pools import process_map


def _mark(job: tuple[str, int]) -> int:
    folder, k = job
    time.sleep(0.3)
    Path(folder, f"{k}.done").touch()
    return k


def _settled(folder: Path) -> int:
    """The number of marks once no job is left running (the count stops changing)."""
    done = -1
    while (now := len(list(folder.iterdir()))) != done:
        done = now
        time.sleep(1.0)
    return done


def test_results_come_in_order():
    assert list(process_map(abs, [-3, 1, -2, 5], workers=2)) == [3, 1, 2, 5]


def test_stopping_early_starts_no_further_job(tmp_path):
    jobs = [(str(tmp_path), k) for k in range(40)]
    results = process_map(_mark, jobs, workers=2)
    assert next(results) == 0
    results.close()  # what Ctrl-C in the consumer does too: the generator exits
    assert _settled(tmp_path) < 10  # the jobs under way finish; of 40, no more start


def _run(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )


_INTERRUPTED = """
import sys, time, signal
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
from celltally.pools import process_map

def job(k):
    time.sleep(0.5)
    Path(sys.argv[1], f"{k}.done").touch()
    return k

if __name__ == "__main__":
    try:
        for k in process_map(job, range(64), workers=2, chunksize=8):
            print(k, flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


def test_ctrl_c_starts_no_further_job_and_the_process_exits(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _run(_INTERRUPTED, str(marks))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "0"  # two chunks of 8 done: the pool runs
    proc.send_signal(signal.SIGINT)  # to the main process only, as `timeout -s INT` does
    assert proc.wait(timeout=60) == 130
    # the chunks under way or already handed to the workers' queue finish (8 jobs each:
    # 2 running + 3 queued); the other 8 - 2 - 5 are never started
    assert _settled(marks) <= 56


_BIG_RESULTS = """
from celltally.pools import process_map

def job(k):
    if k == 5:
        raise ValueError("job 5 failed")
    return bytes(1 << 20)  # more than a pipe's buffer, as a chunk of scenes is

if __name__ == "__main__":
    try:
        list(process_map(job, range(40), workers=2))
    except ValueError as err:
        print("raised:", err, flush=True)
"""


def test_a_failed_job_among_large_results_lets_the_process_exit():
    proc = _run(_BIG_RESULTS)
    try:
        assert proc.wait(timeout=60) == 0  # killing workers mid-send hung it at exit
    finally:
        proc.kill()
    assert proc.stdout is not None and proc.stdout.read().strip() == "raised: job 5 failed"


def test_the_lock_error_of_a_ctrl_c_mid_wait_is_reported_as_the_ctrl_c(monkeypatch):
    """CPython's race: Ctrl-C inside Condition.wait can surface as a RuntimeError."""
    from concurrent.futures import ProcessPoolExecutor

    def interrupted_map(self, fn, jobs, chunksize=1):
        yield 1
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot release un-acquired lock")  # noqa: B904 (as CPython)

    monkeypatch.setattr(ProcessPoolExecutor, "map", interrupted_map)
    results = process_map(abs, [1, 2], workers=1)
    assert next(results) == 1
    with pytest.raises(KeyboardInterrupt):
        next(results)

    def failing_map(self, fn, jobs, chunksize=1):
        raise RuntimeError("a real error")
        yield  # a generator

    monkeypatch.setattr(ProcessPoolExecutor, "map", failing_map)
    with pytest.raises(RuntimeError, match="a real error"):
        list(process_map(abs, [1], workers=1))
