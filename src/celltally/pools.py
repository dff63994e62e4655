"""Process pools that stop promptly on Ctrl-C (simulated scenes are made in several)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def process_map(
    fn: Callable[[Any], Any], jobs: Iterable[Any], *, workers: int, chunksize: int = 1
) -> Iterator[Any]:
    """``fn`` over ``jobs`` in ``workers`` processes, results in order (``Executor.map``).

    On Ctrl-C (or any error, or the caller stopping early) the jobs not yet
    handed to a worker are cancelled and the pool is shut down without waiting:
    the jobs under way finish in the background and the workers then exit.
    Leaving it to ``with ProcessPoolExecutor()`` kept ``train --simulated 2000``
    running for over 90 s after an interrupt (one measured run; 3.5 s now).
    The workers are not killed: one killed while sending a result larger than
    the pipe's buffer left the pool's reader waiting for the rest of it, and
    the interpreter never exited.
    """
    pool = ProcessPoolExecutor(workers)
    try:
        yield from pool.map(fn, jobs, chunksize=chunksize)
    except BaseException as err:
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(err.__context__, KeyboardInterrupt) and isinstance(err, RuntimeError):
            # Ctrl-C inside the wait for a result can leave the waiting Condition's lock
            # released twice (a CPython race, seen in 1 of many runs): the "cannot release
            # un-acquired lock" that follows stands for the Ctrl-C
            raise KeyboardInterrupt from None
        raise
    pool.shutdown(wait=True)
