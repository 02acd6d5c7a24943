"""Which matching gradient fits in memory: ``distill run --gradient auto --max-memory GIB``.

The full unroll (gradient "full", :func:`distill.mtt.unroll.unroll_student`'s math) keeps every
student step's autograd graph until the matching loss is differentiated, so its memory grows with
``syn_steps``: on a CPU a 64 px run with 12 synthetic images and 20 steps peaked at 12.6 GiB
(issue 28). The constant-memory gradient ("checkpoint", :mod:`distill.mtt.engine`) keeps only each
step's parameters (P floats) and rebuilds one step's graph at a time. It is exact, and on a CPU a
little slower (docs/performance.md), so "auto" keeps the full unroll wherever its estimate fits
the budget and switches otherwise.

The estimate traces one student step of the plain-autograd oracle with ``create_graph=True`` and
adds up the tensors autograd saves for it (:func:`torch.autograd.graph.saved_tensors_hooks`),
then scales by the steps and the trajectories held at once.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

GIB = 2**30
# Default budget: this fraction of the memory available when the run starts. Half, because the
# run's own data, the experts and other jobs on the machine share the rest.
MEMORY_FRACTION = 0.5
# Peak memory of the engine's full unroll per byte that one oracle step saves for its backward pass,
# measured with benchmarks/memory_cpu.py at 28 and 64 px (docs/performance.md, "Peak memory of
# distill run on the CPU"): the torch.func unroll holds more than the oracle's saved tensors (the
# double backward's own intermediates, the augmentation's grids): 4.3x at 64 px, 10 steps (6.5 GiB), and a margin.
FULL_UNROLL_FACTOR = 4.5
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class GradientChoice:
    """What ``--gradient auto`` decided, and why; ``budget_bytes`` None when the free memory is unknown."""

    gradient: str  # "full" or "checkpoint"
    estimate_bytes: int  # the full unroll's estimated peak, beyond what the run holds anyway
    budget_bytes: int | None

    def record(self) -> dict:
        """Fields for metrics.jsonl (GiB)."""
        return {"kind": "memory", "gradient": self.gradient, "full_unroll_estimate_gib": self.estimate_bytes / GIB,
                "max_memory_gib": None if self.budget_bytes is None else self.budget_bytes / GIB}

    def sentence(self) -> str:
        est = f"{self.estimate_bytes / GIB:.2f} GiB"
        if self.budget_bytes is None:
            return (f"Gradient auto: the free memory is unknown here, so the full unroll (estimated {est}) is kept; "
                    "pass --max-memory GIB to let it choose.")
        budget = f"{self.budget_bytes / GIB:.2f} GiB"
        if self.gradient == "full":
            return f"Gradient auto: the full unroll (estimated {est}) fits the budget of {budget} (--max-memory); using it."
        return (f"Gradient auto: the full unroll would take about {est}, over the budget of {budget} (--max-memory); "
                "using the constant-memory gradient (checkpoint), whose memory does not grow with --syn-steps.")


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on ``device``: CUDA's free memory, else MemAvailable of /proc/meminfo."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def saved_bytes(step: Callable[[], object]) -> int:
    """Bytes autograd keeps for its backward pass while ``step()`` runs (views of one storage count once).

    ``step`` is one student step with ``create_graph=True`` (distill/mtt/distiller.py builds it).
    """
    storages: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def choose_gradient(per_step_bytes: int, syn_steps: int, at_once: int, budget_bytes: int | None) -> GradientChoice:
    """"full" when ``syn_steps`` steps of ``at_once`` trajectories fit ``budget_bytes``, else "checkpoint"."""
    estimate = int(math.ceil(FULL_UNROLL_FACTOR * per_step_bytes * syn_steps * at_once))
    if budget_bytes is None or estimate <= budget_bytes:
        return GradientChoice("full", estimate, budget_bytes)
    return GradientChoice("checkpoint", estimate, budget_bytes)


def budget_bytes(max_memory_gib: float | None, device: torch.device) -> int | None:
    """``--max-memory`` in bytes, or :data:`MEMORY_FRACTION` of the available memory when it is not given."""
    if max_memory_gib is not None:
        return int(max_memory_gib * GIB)
    free = available_bytes(device)
    return None if free is None else int(MEMORY_FRACTION * free)
