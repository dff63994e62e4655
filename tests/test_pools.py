"""celltally.pools: process pools that stop at once."""

from __future__ import annotations

import time
from pathlib import Path

from celltally.pools import process_map


def _mark(job: tuple[str, int]) -> int:
    folder, k = job
    time.sleep(0.3)
    Path(folder, f"{k}.done").touch()
    return k


def test_results_come_in_order():
    assert list(process_map(abs, [-3, 1, -2, 5], workers=2)) == [3, 1, 2, 5]


def test_stopping_early_runs_no_further_job(tmp_path):
    jobs = [(str(tmp_path), k) for k in range(40)]
    results = process_map(_mark, jobs, workers=2)
    assert next(results) == 0
    results.close()  # what Ctrl-C in the consumer does too: the generator exits
    done = len(list(tmp_path.glob("*.done")))
    time.sleep(1.0)  # a pool left to finish would mark ~6 more jobs by now
    assert len(list(tmp_path.glob("*.done"))) == done
    assert done < 10  # of 40


_SCRIPT = """
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


def test_ctrl_c_ends_the_workers_instead_of_waiting_for_their_jobs(tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marks)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "0"  # the first job is done: the pool runs
    proc.send_signal(signal.SIGINT)  # to the main process only, as `timeout -s INT` does
    assert proc.wait(timeout=60) == 130
    done = len(list(marks.iterdir()))
    time.sleep(1.0)
    assert len(list(marks.iterdir())) == done  # no worker left running
    # "0" came with the first two chunks done (16 jobs); the two under way then (8 jobs
    # each) were ended, not run to their end (32)
    assert done < 24
