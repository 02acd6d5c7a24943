"""Stage 2: MTT distillation. ``distill_run(cfg)`` turns a buffer of expert trajectories into a synthetic set.

The core is pure functions (:mod:`.unroll`, :func:`.distiller.compute_grads`);
:mod:`.distiller` adds the loop, checkpoints and evaluation, :mod:`.rundir`
the run folder's files. This package knows no command line.
"""
from .distiller import compute_grads, distill_run, matching_objective

__all__ = ["compute_grads", "distill_run", "matching_objective"]
