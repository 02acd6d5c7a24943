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
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

from .errors import DistillError
from .text import LOG_FORMAT

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


# ----------------------------------------------------------------------------- ranks of one process group

def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, args: tuple, rank: int, size: int, port: int, threads: int, level: int, results) -> None:
    """One rank: torchrun's variables set, its share of the cores, then ``fn(*args)``; the outcome to ``results``."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    logging.basicConfig(level=level if rank == 0 else max(level, logging.WARNING), format=LOG_FORMAT)
    try:
        fn(*args)
    except KeyboardInterrupt:
        results.put((rank, "interrupted", None))
    except BaseException as e:  # noqa: BLE001 -- every failure goes back to the parent, which re-raises it
        import pickle
        import traceback

        if not isinstance(e, DistillError):  # a bug: its traceback is this process's to show
            traceback.print_exc()

        try:
            pickle.dumps(e)
            results.put((rank, "error", e))
        except Exception:  # noqa: BLE001 -- an exception that cannot travel goes as its text
            results.put((rank, "error", RuntimeError(f"{type(e).__name__}: {e}")))
    else:
        results.put((rank, "done", None))


def run_ranks(fn: Callable, args: tuple, workers: int) -> None:
    """``fn(*args)`` in ``workers`` spawned processes that form one gloo process group on this machine, as
    torchrun would start them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), each with its share of the cores.

    The first rank to fail stops the others (a rank left waiting in a collective would wait for ever), and its
    exception is raised here; Ctrl-C reaches every rank (they handle it: rank 0 keeps a checkpoint), and is
    raised here once they have stopped.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch's thread pools
    results = ctx.SimpleQueue()
    port, threads = _free_port(), threads_per_worker(workers)
    level = logging.getLogger().getEffectiveLevel()
    procs = [ctx.Process(target=_rank_main, args=(fn, args, r, workers, port, threads, level, results))
             for r in range(workers)]
    for p in procs:
        p.start()
    failure: BaseException | None = None
    interrupted = False
    try:
        for _ in range(workers):
            while results.empty():
                if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                    dead = next(p for p in procs if p.exitcode not in (None, 0))
                    failure = DistillError(f"A worker process stopped with exit code {dead.exitcode} (killed, or "
                                           "out of memory?); run again with --resume, or with --workers 1.")
                    break
                time.sleep(0.05)
            if failure is not None:
                break
            rank, what, err = results.get()
            if what == "error":
                failure = err
                break
            interrupted |= what == "interrupted"
    except KeyboardInterrupt:
        interrupted = True
        deadline = time.monotonic() + 60
        for p in procs:  # the ranks got the same Ctrl-C; let rank 0 keep its checkpoint
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        if failure is not None or interrupted:  # none is left waiting for a rank that has gone
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join()
        results.close()
    if failure is not None:
        raise failure
    if interrupted:
        raise KeyboardInterrupt
