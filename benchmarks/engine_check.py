"""On CUDA: the captured MTT iteration against the same function run eagerly (benchmarks/gpu_check.sh runs this).

For ConvNet-3 at 1x28x28 (2 classes x 10 images, 20 steps, DSA) and T = 1 and 4 trajectories, both
gradient modes: milliseconds per iteration eager and captured (median of 5 after 2 warm-ups), the
captured result's relative error against the eager one, and the aten operators a replay dispatches
on the host (counted with benchmarks/opcount.py's counter). Prints one line per row and a JSON line.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opcount import OpCounter, Problem, Setting  # noqa: E402

from distill.mtt.engine import MatchingEngine  # noqa: E402
from distill.mtt.unroll import make_plan, stack_plans  # noqa: E402
from distill.seeding import generator  # noqa: E402


def _time(fn, warmup: int = 2, reps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    device = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for t in (1, 4):
        p = Problem(Setting(width=128), t, device)
        plans = stack_plans([make_plan(len(p.images), p.s.syn_steps, 0, generator(0, 9, j), augment=p.augment,
                                       size=(p.s.size, p.s.size), device=device) for j in range(t)])
        args = (p.starts, p.targets, p.images, p.labels, p.log_lr, plans)
        for gradient in ("full", "checkpoint"):
            row = {"T": t, "gradient": gradient}
            eager = MatchingEngine(p.model, p.spec, p.augment, gradient=gradient, fast="eager")
            want = eager(*args)
            row["eager_ms"] = _time(lambda: eager(*args))
            # Compiling takes minutes: only for one trajectory. With four, vmapped (the default on CUDA) against a loop.
            variants = [("graphs", "graphs", None), ("compile", "compile", None)] if t == 1 else \
                [("graphs", "graphs", None), ("graphs_loop", "graphs", False)]
            for label, fast, vmap in variants:
                engine = MatchingEngine(p.model, p.spec, p.augment, gradient=gradient, fast=fast, vmap=vmap)
                t0 = time.perf_counter()
                try:
                    got = engine(*args)
                    row[f"{label}_mode"] = engine.mode(device)
                    row[f"{label}_first_s"] = time.perf_counter() - t0
                    row[f"{label}_ms"] = _time(lambda: engine(*args))
                    row[f"{label}_rel_err"] = max(float((a - b).norm() / b.norm()) for a, b in
                                                 ((got.images, want.images), (got.log_lr, want.log_lr)))
                    with OpCounter() as c:
                        engine(*args)
                    row[f"{label}_host_ops"] = c.total
                except Exception as e:  # noqa: BLE001 - a failure is a result to report
                    row[f"{label}_failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(row, flush=True)
    print(json.dumps({"engine_check": rows}))


if __name__ == "__main__":
    main()
