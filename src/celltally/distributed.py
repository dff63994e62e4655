"""torch.distributed helpers, so that ``celltally train`` runs unchanged under torchrun.

    torchrun --nproc_per_node 2 -m celltally.cli train --out models/mine --simulated 2000

Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) every helper here is
a no-op and training is exactly what it was. Under torchrun:

* :func:`setup` joins the process group: NCCL with one GPU per process
  (``LOCAL_RANK``) when CUDA is available, gloo on CPU.
* Each rank takes its own equal share of every epoch's shuffled order
  (:func:`shard`; all ranks draw the same order from the same seed), the
  DistributedSampler scheme, so the configured batch size is per process and
  one step sees ``world_size x batch_size`` images.
* :func:`wrap` puts the module being trained in DistributedDataParallel, which
  averages gradients across ranks, so the replicas stay identical;
  :func:`check_in_sync` verifies that at the end.
* Only rank 0 validates, logs, shows progress and writes checkpoints and the
  model folder (:func:`is_main`).
* :func:`autocast` gives bfloat16 mixed precision on GPU (no loss scaling needed)
  and nothing on CPU. Set ``CELLTALLY_AMP=0`` to train in float32 on GPU.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "agree",
    "autocast",
    "bfloat16_on",
    "barrier",
    "check_in_sync",
    "device",
    "is_distributed",
    "is_main",
    "launched",
    "local_rank",
    "mean",
    "rank",
    "session",
    "setup",
    "shard",
    "shard_size",
    "sync_buffers",
    "teardown",
    "to_float",
    "weights_digest",
    "world_size",
    "wrap",
]


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_distributed() -> bool:
    """Whether a process group is initialized (this process is one of several ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes training together (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``, else 0)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Whether this process logs, checkpoints and writes outputs (rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def setup(backend: str | None = None, *, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes (``env://``), if launched by it.

    Parameters
    ----------
    backend : str, optional
        ``'nccl'`` or ``'gloo'``; default NCCL when CUDA is available, else gloo.
    timeout_s : float, default 1800
        How long a collective waits for the other ranks.

    Returns
    -------
    bool
        True if this call initialized the group (so the caller should tear it down).
    """
    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
        backend = backend or "nccl"
    dist.init_process_group(backend=backend or "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def teardown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if is_distributed():
        # Drop unreachable DistributedDataParallel wrappers first: they hold the group, which
        # would otherwise be freed (its threads joined) only at interpreter shutdown.
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """``with session():`` sets up the process group under torchrun and tears it down."""
    started = setup()
    try:
        yield
    except BaseException:
        # no barrier here: the other ranks may be inside a collective that never completes
        if started:
            teardown()
        raise
    if started:
        # Leave together: a rank that destroyed its gloo group while rank 0 was still
        # saving the model was seen to abort ("terminate called without an active exception").
        barrier()
        teardown()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def shard_size(n: int) -> int:
    """How many of ``n`` items each rank gets from :func:`shard` (all ranks the same)."""
    return n // world_size() if world_size() > 1 else n


def shard(order: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous, equal share of ``order`` (the remainder is dropped).

    Every rank must pass the same ``order`` (the same permutation from the same
    seeded generator); equal shares keep the ranks' step counts equal, which
    DistributedDataParallel needs. Returns ``order`` itself when not distributed.
    """
    world = world_size()
    if world == 1:
        return order
    size = order.shape[0] // world
    return order[rank() * size : (rank() + 1) * size]


def wrap(module: torch.nn.Module, on: torch.device | None = None) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when distributed, else ``module`` itself.

    The wrapper shares ``module``'s parameters, so an optimizer over
    ``module.parameters()`` and ``module.state_dict()`` work unchanged.
    """
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    on = on or next(module.parameters()).device
    if on.type != "cuda":
        return DistributedDataParallel(module)
    index = on.index if on.index is not None else torch.cuda.current_device()
    return DistributedDataParallel(module, device_ids=[index])


def mean(value: float) -> float:
    """The mean of a float over all ranks (``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    backend_device = device() if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def bfloat16_on(on: torch.device) -> bool:
    """Whether training on ``on`` runs under bfloat16 autocast (a CUDA device that
    supports it, unless ``CELLTALLY_AMP=0``)."""
    return (
        on.type == "cuda"
        and os.environ.get("CELLTALLY_AMP", "1") != "0"
        and torch.cuda.is_bf16_supported()
    )


def autocast(on: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on a CUDA device that supports it; a null context otherwise."""
    if bfloat16_on(on):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_float(value: Any) -> Any:
    """Cast floating tensors in nested lists/tuples to float32 (no copy if already)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, list | tuple):
        return type(value)(to_float(v) for v in value)
    return value


def sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm running statistics).

    DistributedDataParallel keeps parameters identical, but each rank's last
    forward pass updates its running statistics with its own batch; call this at
    the end of training so all replicas (and whatever they compute next) agree.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes), for comparing ranks."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def agree(value: Any, *, what: str, hint: str = "") -> None:
    """Raise ValueError unless every rank passes an equal ``value`` (picklable; no-op
    when not distributed): the ranks of one run must hold the same data and start."""
    if not is_distributed():
        return
    digest = hashlib.sha256(repr(value).encode()).hexdigest()
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        ranks = ", ".join(map(str, differ[:5]))
        raise ValueError(f"{what} (rank 0 and rank(s) {ranks} differ){'; ' + hint if hint else ''}")


def check_in_sync(module: torch.nn.Module) -> list[str]:
    """Every rank's :func:`weights_digest` of ``module``; raise if they differ.

    Returns
    -------
    list of str
        The digests by rank (one entry when not distributed).

    Raises
    ------
    RuntimeError
        If two ranks hold different weights.
    """
    mine = weights_digest(module)
    if not is_distributed():
        return [mine]
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        shown = ", ".join(f"rank {i}: {d[:12]}" for i, d in enumerate(digests))
        raise RuntimeError(f"ranks ended with different weights ({shown})")
    return [str(d) for d in digests]
