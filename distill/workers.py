"""Independent jobs (experts, evaluation networks) in parallel processes on the CPU: ``--workers N``.

On a CPU at 28 px one process gains almost nothing from a second thread (the quickstart measured
2.8 s per expert epoch either way), so the cores are used by running whole jobs side by side, one
thread each. Every job draws its randomness from its own seed stream (its index), so what a job
computes does not depend on which worker runs it or when; a worker sets its thread count once,
from the worker count alone, so the results are deterministic for a given worker count.
``--workers 1`` runs the jobs in this process, one after another, as before.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, so a container's limit counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(asked: int, device: torch.device, jobs: int) -> int:
    """``asked`` made concrete: 0 = one per usable core on a CPU, 1 on a GPU; never more than the jobs."""
    if device.type != "cpu":
        return 1
    n = usable_cores() if asked == 0 else asked
    return max(1, min(n, jobs))


def threads_per_worker(workers: int) -> int:
    """Each worker's share of the cores (at least one)."""
    return max(1, usable_cores() // workers)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    logging.basicConfig(level=logging.WARNING)  # a worker says only what goes wrong; the parent logs progress


def run_jobs(fn: Callable[..., T], jobs: Sequence[tuple], workers: int,
             on_done: Callable[[T], None] | None = None) -> list[T]:
    """``[fn(*job) for job in jobs]``, in ``workers`` spawned processes when ``workers > 1``; results in job order.

    ``fn`` must be a module-level function and every job picklable (tensors are copied to the workers).
    """
    if workers <= 1:
        out = []
        for job in jobs:
            out.append(fn(*job))
            if on_done is not None:
                on_done(out[-1])
        return out
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch's thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads_per_worker(workers),)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        out = []
        for f in futures:
            out.append(f.result())
            if on_done is not None:
                on_done(out[-1])
        return out
