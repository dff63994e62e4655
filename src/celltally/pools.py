"""Process pools that stop at once on Ctrl-C (simulated scenes are made in several)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def process_map(
    fn: Callable[[Any], Any], jobs: Iterable[Any], *, workers: int, chunksize: int = 1
) -> Iterator[Any]:
    """``fn`` over ``jobs`` in ``workers`` processes, results in order (``Executor.map``).

    On Ctrl-C (or any error, or the caller stopping early) the jobs not yet
    started are cancelled and the workers ended, instead of leaving the pool's
    shutdown to finish every job submitted: a process worker that gets the
    same SIGINT reports it as its current job's error and goes on with the
    next, so ``train --simulated 2000`` hung for minutes after an interrupt.
    """
    pool = ProcessPoolExecutor(workers)
    try:
        yield from pool.map(fn, jobs, chunksize=chunksize)
    except BaseException:
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # a job under way would otherwise run to its end
            process.terminate()
        for process in processes:
            process.join(timeout=5)
        raise
    pool.shutdown(wait=True)
