"""benchmarks/speed.py: how it is measured. Timers, peak memory, errors against the oracle, and one MTT case set up
for every path (the full unroll, the checkpointed oracle path, the engine)."""
from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time

import torch

from distill.augment import Augment
from distill.models import create_model, flatten_params, param_spec
from distill.mtt.engine import MatchingEngine
from distill.mtt.unroll import make_plan, matching_loss, stack_plans, unroll_student
from distill.seeding import generator, seeded
from oracles.checkpointed import CudaGraphSteps, matching_grads
from speed_cases import DSA, GIB, REPS, WARMUP, Case

# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def precision(tf32: bool):
    """Strict fp32 (tf32=False) or TF32 tensor cores for convolutions and matrix products."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def measure(fn, device: torch.device, warmup: int = WARMUP, reps: int = REPS) -> dict:
    """Median ms of ``reps`` calls after ``warmup`` calls; peak memory over all of them (warm-ups hold graph capture)."""
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    res = {"ms": statistics.median(times), "ms_all": times, "out": out}
    if device.type == "cuda":
        # Reserved memory too: a captured graph keeps its pool reserved though the tensors in it are freed.
        res["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        res["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        res["base_gib"] = base / GIB
    return res


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- MTT iteration


class MTTCase:
    """One case's model, random synthetic set, expert segment and unroll plan (fixed for all variants)."""

    def __init__(self, case: Case, device: torch.device, syn_steps: int | None = None,
                 dtype: torch.dtype = torch.float32):
        self.case, self.device = case, device
        with seeded(0, 1):
            self.model = create_model("convnet", case.classes, case.channels, case.size, width=case.width,
                                      depth=case.depth).to(device=device, dtype=dtype)
        self.spec = param_spec(self.model)
        g = generator(0, 2)
        self.start = flatten_params(self.model)
        # A target 5 % of the parameters' norm away: random data, where only the arithmetic matters.
        step = torch.randn(self.start.shape, generator=g).to(device, dtype)
        self.target = self.start + 0.05 * step / step.norm() * self.start.norm()
        self.images = torch.randn(case.images, case.channels, case.size, case.size, generator=g).to(device, dtype)
        self.labels = (torch.arange(case.images) % case.classes).to(device)  # hard labels, as the reference
        self.lr = torch.tensor(0.01, device=device, dtype=dtype)
        self.augment = Augment.parse(DSA)
        self.plan = make_plan(case.images, syn_steps or case.syn_steps, case.batch_syn, g, augment=self.augment,
                              size=(case.size, case.size), device=device, dtype=dtype)

    def full(self):
        x = self.images.detach().requires_grad_(True)
        lr = self.lr.detach().requires_grad_(True)
        end = unroll_student(self.model, self.spec, self.start, x, self.labels, lr, self.plan, self.augment)
        gx, glr = torch.autograd.grad(matching_loss(end, self.start, self.target), [x, lr])
        return gx, glr

    def checkpointed(self, graphs: CudaGraphSteps | None = None, store: str = "device"):
        _, gx, _, glr, _ = matching_grads(self.model, self.spec, self.start, self.target, self.images, self.labels,
                                          self.lr, self.plan, self.augment, store=store, graphs=graphs)
        return gx, glr

    def iteration(self, engine: MatchingEngine):
        """The engine ``distill run`` uses: the whole iteration in one call (one CUDA graph with fast="graphs")."""
        m = engine(self.start[None], self.target[None], self.images, self.labels, self.lr.log(), stack_plans([self.plan]))
        return m.images, m.log_lr / self.lr  # d/d lr = d/d log lr / lr, as the other variants report

    def augment_cost(self, device: torch.device) -> dict:
        """ms per augmentation call on one step's batch: without a graph (forward pass) and with its backward."""
        b = self.plan.batches[0].numel()
        x = self.images[:b]
        gen = torch.Generator(device=device).manual_seed(0)

        def fwd():
            with torch.no_grad():
                return self.augment(x, gen)

        def fwd_bwd():
            xl = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.augment(xl, gen), xl, torch.ones_like(x))

        n = 20  # calls per timed repetition: one call is too short to time alone
        f = measure(lambda: [fwd() for _ in range(n)], device)
        fb = measure(lambda: [fwd_bwd() for _ in range(n)], device)
        return {"fwd_ms": f["ms"] / n, "fwd_bwd_ms": fb["ms"] / n}


def grad_error(got, ref) -> float:
    """The larger of the image and step-size gradients' relative errors."""
    return max(rel_err(got[0], ref[0]), rel_err(got[1], ref[1]))


def run_variant(name: str, fn, device: torch.device, oracle, keep_out: bool = False) -> dict:
    try:
        r = measure(fn, device)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        free(device)
        return {"variant": name, "oom": True}
    out = r.pop("out")
    r.pop("ms_all", None)
    r["variant"] = name
    if oracle is not None:
        r["grad_rel_err"] = grad_error(out, oracle)
    if keep_out:
        r["out"] = out
    del out
    free(device)
    return r


def log_variant(r: dict) -> None:
    log(f"  {r['variant']}{' tf32' if r.get('tf32') else ''}: " + (
        "out of memory" if r.get("oom") else r.get("failed") or
        f"{r['ms']:.1f} ms" + (f", {r['peak_gib']:.2f} GiB ({r['reserved_gib']:.2f})" if 'peak_gib' in r else "") +
        (f", err {r['grad_rel_err']:.1e}" if 'grad_rel_err' in r else "")))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
