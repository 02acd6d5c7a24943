"""Speed and memory: time to a share, the full unroll against the fast paths, expert training, storage, op counts.

A benchmark script, not a test: CI never runs it. It measures, in one process on
one device, the four cases of ../shared/BENCHMARKS.md and writes one report:

    python benchmarks/speed.py --device cuda --out docs/performance.md        # GPU, about 6 minutes
    python benchmarks/speed.py --smoke                                        # CPU, tiny sizes, 1-2 minutes
    python benchmarks/speed.py --render docs/performance.json --out docs/performance.md   # re-render only
    python benchmarks/speed.py --device cpu --sections pipeline,opcount --pipeline cpu    # CPU rows, ~5 minutes

*pipeline* times ``distill buffer``, ``run``, ``export`` and ``eval`` as the CLI
runs them (one subprocess each) on PneumoniaMNIST, beside the reference's
figures; ``--old-repo DIR`` also times another checkout's ``distill run`` (git
5bd3815, say) on the same buffer. *opcount* counts the aten operators of one MTT
iteration and one expert step (benchmarks/opcount.py), today's path against 5bd3815's.

Every MTT row pairs the full unroll with ``create_graph=True`` (the reference's
math and the project's correctness oracle, :func:`distill.mtt.unroll.unroll_student`)
with the constant-memory exact path (:func:`distill.mtt.checkpointed.matching_grads`),
on the same random data and the same unroll plan: milliseconds per iteration
(median of 5 after 2 warm-ups, ``torch.cuda.synchronize()`` around each timer),
peak memory, and the relative error of the image and step-size gradients
against the oracle in strict fp32, beside the oracle's disagreement with itself
and a float64 check. Expert training reports images/s one expert
at a time against K experts in one vmapped network, and the trajectories'
agreement. Storage reports disk per expert and what fp16/bf16 snapshots do to
the matching loss and its gradient (``--buffer DIR`` measures that on a real
buffer; without it, on a small expert trained here on a learnable synthetic task).

Next to the Markdown it writes the raw numbers as JSON (same name, ``.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import datetime as dt
import gc
import json
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from distill.augment import Augment  # noqa: E402
from distill.batched import train_batched  # noqa: E402
from distill.formats.trajectory import (decode_snapshots, encode_snapshots, list_experts, read_expert,  # noqa: E402
                                        write_expert)
from distill.io import atomic_path, software_versions, write_json  # noqa: E402
from distill.models import CONVNET_WIDTH, create_model, flatten_params, param_spec  # noqa: E402
from distill.mtt.checkpointed import CudaGraphSteps, matching_grads  # noqa: E402
from distill.mtt.engine import MatchingEngine  # noqa: E402
from distill.mtt.unroll import make_plan, matching_loss, stack_plans, unroll_student  # noqa: E402
from distill.seeding import generator, seeded  # noqa: E402
from distill.train import TrainRecipe, train_network  # noqa: E402

REPORT_VERSION = "1.0"
DSA = "color,crop,cutout,flip,scale,rotate"  # the reference's strategy
WARMUP, REPS = 2, 5  # ../shared/BENCHMARKS.md: median of at least 5 timed iterations after 2 warm-ups
GIB = 2.0 ** 30

# Targets from ../shared/BENCHMARKS.md.
TARGET_SPEEDUP = {"cifar_ipc10": 5.0, "medmnist28_ipc10": 10.0}
TARGET_MEMORY_RATIO = 0.25
TARGET_CXR_GIB = 12.0
TARGET_EXPERT_FACTOR = 4.0
TARGET_DISK_RATIO = 0.5
REFERENCE_EXPERT_IMG_S = {"cifar": 33_000, "medmnist28": 36_000}  # reference, one expert at a time, batch 256, DSA
REFERENCE_SNAPSHOTS = 51  # the reference keeps 51 fp32 snapshots per expert


@dataclass(frozen=True)
class Case:
    name: str
    channels: int
    size: int
    depth: int
    classes: int
    ipc: int
    syn_steps: int
    batch_syn: int
    ref_ms: float | None = None  # the reference's figures on an H200 (BENCHMARKS.md)
    ref_gib: float | None = None
    width: int = CONVNET_WIDTH

    @property
    def images(self) -> int:
        return self.classes * self.ipc


CASES = (
    Case("cifar_ipc10", 3, 32, 3, 10, 10, 30, 100, 428, 8.6),
    Case("cifar_ipc50", 3, 32, 3, 10, 50, 30, 500, 968, 42.4),
    Case("medmnist28_ipc10", 1, 28, 3, 2, 10, 30, 20, 499, 1.8),
    Case("cxr128_ipc20", 1, 128, 5, 4, 20, 20, 80, 1446, 77.8),
)


def smoke_case(c: Case) -> Case:
    """The same case shrunk to seconds on a CPU: 8 channels, 16 px, 4 steps."""
    return replace(c, size=16, depth=min(c.depth, 3), width=8, ipc=min(c.ipc, 5), syn_steps=4,
                   batch_syn=min(c.batch_syn, c.classes * min(c.ipc, 5)), ref_ms=None, ref_gib=None)


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


FP64_STEPS = 3  # a short unroll: float64 convolutions are slow, and the full unroll's memory doubles


def fp64_check(case: Case, device: torch.device) -> dict:
    """The checkpointed path with graphs against the full unroll, both in float64: exactness without rounding noise."""
    mc = MTTCase(case, device, syn_steps=FP64_STEPS, dtype=torch.float64)
    try:
        err = grad_error(mc.checkpointed(CudaGraphSteps(mc.model, mc.spec)), mc.full())
    except RuntimeError as e:
        if not is_oom(e):
            raise
        err = float("nan")
    del mc
    free(device)
    return {"syn_steps": FP64_STEPS, "grad_rel_err": err}


def mtt_section(cases: list[Case], device: torch.device, channels_last: bool = False) -> list[dict]:
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        mc = MTTCase(case, device)
        row = {"case": asdict(case), "params": mc.spec.total, "variants": []}
        log(f"[mtt] {case.name}: {mc.spec.total} parameters, {case.images} images, {case.syn_steps} steps")
        # The oracle: the full unroll in strict fp32 (its timed run's output), against which every variant is compared.
        with precision(False):
            full = run_variant("full", mc.full, device, None, keep_out=True)
        full["tf32"] = False
        oracle = full.pop("out", None)
        if oracle is not None:
            full["grad_rel_err"] = 0.0
        else:
            # The full unroll does not fit: check the gradients on a shorter unroll, where it does.
            steps = max(2, case.syn_steps // 4)
            short = MTTCase(case, device, syn_steps=steps)
            with precision(False):
                row["short_check"] = {"syn_steps": steps, "grad_rel_err": grad_error(
                    short.checkpointed(CudaGraphSteps(short.model, short.spec)), short.full())}
            del short
            free(device)
        row["variants"].append(full)
        log_variant(full)
        if oracle is not None:
            # The oracle against itself: GPU kernels that accumulate with atomics (cuDNN, grid_sample's backward)
            # round differently on every run, and the sum over inner steps can magnify that. No path can be
            # closer to the oracle than the oracle is to itself.
            with precision(False):
                row["oracle_repeat_err"] = grad_error(mc.full(), oracle)
            log(f"  oracle against itself: {row['oracle_repeat_err']:.1e}")
        row["fp64_check"] = fp64_check(case, device)
        log(f"  float64, {row['fp64_check']['syn_steps']} steps: {row['fp64_check']['grad_rel_err']:.1e}")
        # Each entry makes the function to time; graphs are captured on its first (warm-up) call and replayed after.
        variants = [
            ("checkpointed", False, lambda: mc.checkpointed),
            ("checkpointed+graphs", False, lambda: partial(mc.checkpointed, CudaGraphSteps(mc.model, mc.spec))),
            ("iteration graph (full)", False, lambda: partial(mc.iteration, MatchingEngine(
                mc.model, mc.spec, mc.augment, gradient="full", fast="graphs"))),
            ("iteration graph (checkpoint)", False, lambda: partial(mc.iteration, MatchingEngine(
                mc.model, mc.spec, mc.augment, gradient="checkpoint", fast="graphs"))),
            ("full", True, lambda: mc.full),
            ("checkpointed+graphs", True, lambda: partial(mc.checkpointed, CudaGraphSteps(mc.model, mc.spec))),
        ]
        if channels_last:
            variants.insert(2, ("checkpointed+graphs+channels_last", False,
                                lambda: partial(mc.checkpointed, CudaGraphSteps(mc.model, mc.spec, channels_last=True))))
        for name, tf32, make in variants:
            with precision(tf32):
                r = run_variant(name, make(), device, oracle)
            r["tf32"] = tf32
            row["variants"].append(r)
            log_variant(r)
        with precision(False):
            row["augment"] = mc.augment_cost(device)
        del oracle, mc
        free(device)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def compile_section(cases: list[Case], device: torch.device) -> list[dict]:
    """torch.compile of the step (torch.func form) inside the same CUDA graphs, against the eager step, fp32."""
    rows = []
    for case in cases:
        mc = MTTCase(case, device)
        with precision(False):
            oracle = mc.full()
            row = {"case": case.name, "variants": []}
            for name, compile_ in (("checkpointed+graphs", False), ("checkpointed+graphs+compile", True)):
                t0 = time.perf_counter()
                try:
                    r = run_variant(name, partial(mc.checkpointed, CudaGraphSteps(mc.model, mc.spec, compile=compile_)),
                                    device, oracle)
                except Exception as e:  # noqa: BLE001 - a failed experiment is a result to report, not a crash
                    r = {"variant": name, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    free(device)
                r["seconds_incl_compile"] = time.perf_counter() - t0
                row["variants"].append(r)
                log_variant(r)
        rows.append(row)
        del mc, oracle
        free(device)
    return rows


def steps_memory_section(case: Case, device: torch.device, steps: tuple[int, ...]) -> list[dict]:
    """Peak memory of the constant-memory path at several syn_steps (θ_k on the device, then in host memory)."""
    out = []
    for n in steps:
        mc = MTTCase(case, device, syn_steps=n)
        for store in ("device", "host"):
            graphs = CudaGraphSteps(mc.model, mc.spec)
            r = measure(lambda: mc.checkpointed(graphs, store=store), device, warmup=1, reps=1)
            out.append({"syn_steps": n, "store": store, "ms": r["ms"], "peak_gib": r.get("peak_gib"),
                        "reserved_gib": r.get("reserved_gib"), "base_gib": r.get("base_gib")})
            del graphs
        del mc
        free(device)
    return out


# ----------------------------------------------------------------------------- time to a share


@dataclass(frozen=True)
class Pipeline:
    """The settings of one pipeline run: buffer, run, export and eval, as a user would type them."""

    name: str
    data: str
    experts: int
    epochs: int
    ipc: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    iterations: int
    eval_runs: int
    eval_epochs: int | None = None  # None: the share's own recipe
    batch_experts: int | None = None  # None: distill buffer's default


# ../shared/BENCHMARKS.md's reduced protocol: 15 experts x 20 epochs, 10 images per class, hard labels,
# 20 student steps, span 2, 300 iterations. Starts up to 18, so that start + span stays within 20 epochs.
PIPELINES = {
    "cuda": Pipeline("reduced protocol", "pneumoniamnist", 15, 20, 10, 20, 2, 18, 300, 3),
    # Scaled down to a few minutes on 2 CPU cores; the rows say so.
    "cpu": Pipeline("scaled down for 2 CPU cores", "pneumoniamnist", 1, 2, 10, 10, 1, 1, 20, 1, eval_epochs=50),
}
REFERENCE_PIPELINE = {"buffer_s": 41.7, "run_s_per_iteration": 0.231}  # ../shared/BENCHMARKS.md, H200


def _cli(args: list[str], repo: Path, env: dict, log_to: Path) -> float:
    """Wall seconds of one ``python -m distill.cli ...`` in ``repo``; the output goes to ``log_to``."""
    t0 = time.perf_counter()
    with open(log_to, "a") as f:
        f.write(f"$ distill {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=repo, env={**env, "PYTHONPATH": str(repo)},
                              stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"distill {args[0]} failed (exit {proc.returncode}); see {log_to}")
    return seconds


def _iteration_seconds(run_dir: Path) -> dict:
    """Median seconds per iteration from the run's metrics.jsonl, without the first (capture, warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    secs = [r["seconds"] for r in rows if r.get("kind") == "iteration"]
    rest = secs[1:] or secs
    return {"first_s": secs[0], "median_s": statistics.median(rest), "iterations": len(secs)}


def _run_args(p: Pipeline, buffer: Path, out: Path, device: torch.device, config: Path) -> list[str]:
    return ["run", "--buffer", str(buffer), "--out", str(out), "--ipc", str(p.ipc), "--hard-labels",
            "--syn-steps", str(p.syn_steps), "--expert-epochs", str(p.expert_epochs),
            "--max-start-epoch", str(p.max_start_epoch), "--iterations", str(p.iterations),
            "--device", device.type, "--config", str(config)]


def pipeline_section(p: Pipeline, device: torch.device, data_dir: Path, old_repo: Path | None = None) -> dict:
    """Wall time of each stage as the CLI runs it, in a scratch folder; seconds per MTT iteration from the run's log."""
    env = {**os.environ, "DISTILL_DATA": str(data_dir)}
    res: dict = {"settings": asdict(p), "device": device.type, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="distill-pipeline-") as tmp:
        work = Path(tmp)
        logfile = work / "log.txt"
        # No evaluation inside `distill run`: `distill eval` is its own stage.
        config = work / "run.toml"
        config.write_text("eval_models = 0\neval_every = 0\n")
        buf, run = work / "buffer", work / "run"
        stages = res["stages"]
        try:
            buffer_args = ["buffer", "--data", p.data, "--out", str(buf), "--experts", str(p.experts),
                           "--epochs", str(p.epochs), "--device", device.type]
            if p.batch_experts:
                buffer_args += ["--batch-experts", str(p.batch_experts)]
            stages["buffer"] = {"seconds": _cli(buffer_args, REPO, env, logfile)}
            log(f"[pipeline] buffer: {stages['buffer']['seconds']:.1f} s")
            stages["run"] = {"seconds": _cli(_run_args(p, buf, run, device, config), REPO, env, logfile),
                             **_iteration_seconds(run)}
            log(f"[pipeline] run: {stages['run']['seconds']:.1f} s, {stages['run']['median_s']:.4f} s/iteration")
            share = work / "share.h5"
            # The privacy audit is its own stage (distill audit); --force records in the share that it was skipped.
            stages["export"] = {"seconds": _cli(["export", str(run), "--out", str(share), "--force"], REPO, env, logfile)}
            log(f"[pipeline] export: {stages['export']['seconds']:.1f} s")
            eval_args = ["eval", str(share), "--test", p.data, "--baseline", "none", "--runs", str(p.eval_runs),
                         "--device", device.type, "--json", str(work / "eval.json")]
            if p.eval_epochs:
                eval_args += ["--epochs", str(p.eval_epochs)]
            stages["eval"] = {"seconds": _cli(eval_args, REPO, env, logfile)}
            report = json.loads((work / "eval.json").read_text())
            first = report["results"][0]
            stages["eval"] |= {"accuracy_mean": first["mean"]["accuracy"], "accuracy_std": first["std"]["accuracy"]}
            log(f"[pipeline] eval: {stages['eval']['seconds']:.1f} s")
            if old_repo is not None:
                # The older checkout's run, then this one's again, then the older one's again: on a shared
                # machine the load changes over minutes, and alternating lets both see the same spread.
                res["old_run"], res["new_again"] = [], []
                for k in range(2):
                    for repo, key in ((old_repo, "old_run"), (REPO, "new_again")):
                        if key == "new_again" and k == 1:
                            break
                        out_dir = work / f"{key}-{k}"
                        secs = _cli(_run_args(p, buf, out_dir, device, config), repo, env, logfile)
                        res[key].append({"repo": str(repo), "seconds": secs, **_iteration_seconds(out_dir)})
                        log(f"[pipeline] {key} {k}: {secs:.1f} s, {res[key][-1]['median_s']:.4f} s/iteration")
        except Exception as e:  # noqa: BLE001 - report what was measured, and why the rest was not
            res["failed"] = f"{type(e).__name__}: {e}"
            tail = logfile.read_text().splitlines()[-15:] if logfile.exists() else []
            res["log_tail"] = tail
            log(f"[pipeline] failed: {e}\n" + "\n".join(tail))
    return res


# ----------------------------------------------------------------------------- operator counts


def opcount_section() -> list[dict]:
    from opcount import opcounts

    rows = opcounts()
    for r in rows:
        log(f"[opcount] {r}")
    return rows


def iteration_section(device: torch.device, reps: int = 3) -> list[dict]:
    """Seconds per MTT iteration (plan and gradients) at the op-count setting with ConvNet width 128:
    5bd3815's path against the engine, both gradient modes, eagerly (on CUDA the engine is also captured)."""
    from opcount import Problem, Setting

    rows = []
    for t in (1, 4):
        p = Problem(Setting(width=CONVNET_WIDTH, syn_steps=10), t, device, vmap=None)  # as distill run: loop off CUDA
        fns = {"5bd3815 (full)": p.old_iteration, "engine full": lambda: p.new_iteration("full"),
               "engine checkpoint": lambda: p.new_iteration("checkpoint")}
        if t > 1:  # one trajectory is never vmapped
            vm = Problem(Setting(width=CONVNET_WIDTH, syn_steps=10), t, device, vmap=True)
            fns["engine full, vmapped"] = lambda: vm.new_iteration("full")
        row = {"T": t, "syn_steps": p.s.syn_steps}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            fn()  # warm-up
        # Interleaved, so that a change in the machine's load (a shared CPU) hits every variant alike.
        for _ in range(reps):
            for name, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
        for name in fns:
            row[name] = statistics.median(times[name])
            log(f"[iteration] T={t} {name}: {row[name]:.3f} s")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- experts


@dataclass(frozen=True)
class ExpertBench:
    name: str
    channels: int
    size: int
    classes: int
    images: int = 256 * 20  # 20 steps of the reference batch per epoch
    batch: int = 256
    width: int = CONVNET_WIDTH
    # (K, bf16, augmentation) per batched measurement; K=1 rows are one expert at a time (train_network).
    runs: tuple[tuple[int, bool, bool], ...] = ((1, False, True), (10, False, True), (10, True, True),
                                                 (1, False, False), (10, False, False))


EXPERT_BENCHES = (ExpertBench("cifar", 3, 32, 10), ExpertBench("medmnist28", 1, 28, 2))


def smoke_expert(b: ExpertBench) -> ExpertBench:
    return replace(b, size=16, images=64, batch=16, width=8,
                   runs=((1, False, True), (4, False, True), (4, True, True), (1, False, False), (4, False, False)))


def expert_section(benches: list[ExpertBench], device: torch.device) -> list[dict]:
    rows = []
    for b in benches:
        g = generator(0, 3)
        x = torch.randn(b.images, b.channels, b.size, b.size, generator=g).to(device)
        y = torch.randint(0, b.classes, (b.images,), generator=g).to(device)
        recipe = TrainRecipe(epochs=1, lr=0.01, batch_size=b.batch, momentum=0.0, weight_decay=0.0,
                             decay_at_half=False, augment=Augment.parse(DSA))

        def model(i):
            with seeded(0, i):
                return create_model("convnet", b.classes, b.channels, b.size, width=b.width, depth=3).to(device)

        res = {"bench": asdict(b), "runs": []}
        with precision(True):  # torch's default for convolutions; the reference ran with it
            for k, bf16, aug in b.runs:
                rec = recipe if aug else replace(recipe, augment=None)
                if k == 1:
                    def fn():
                        train_network(model(0), x, y, rec, generator(0, 0))
                else:
                    def fn():
                        train_batched([model(i) for i in range(k)], x, y, rec, [generator(0, i) for i in range(k)],
                                      bf16=bf16)
                try:
                    r = measure(fn, device, warmup=1, reps=3)
                    res["runs"].append({"k": k, "bf16": bf16, "augment": aug, "img_s": k * b.images / (r["ms"] / 1e3),
                                        "peak_gib": r.get("peak_gib")})
                except RuntimeError as e:
                    if not is_oom(e):
                        raise
                    res["runs"].append({"k": k, "bf16": bf16, "augment": aug, "oom": True})
                free(device)
            res["agreement"] = trajectory_agreement(b, x, y, recipe, model, device)
        log(f"[experts] {b.name}: " + ", ".join(
            f"K={r['k']}{' bf16' if r['bf16'] else ''}{'' if r['augment'] else ' no-aug'} {r.get('img_s', 0):.0f}"
            for r in res["runs"]))
        rows.append(res)
        free(device)
    return rows


def trajectory_agreement(b: ExpertBench, x, y, recipe, model, device, k: int = 4, epochs: int = 3) -> dict:
    """Batched against one-at-a-time trajectories after ``epochs`` epochs: ‖Δθ‖ / ‖θ_end − θ_0‖, worst expert.

    Also two one-at-a-time runs against each other, the floor that nondeterministic GPU kernels set.
    """
    recipe = replace(recipe, epochs=epochs)
    init = torch.stack([flatten_params(model(i)) for i in range(k)])
    singles, repeats = [], []
    for i in range(k):
        for store in (singles, repeats):
            m = model(i)
            train_network(m, x, y, recipe, generator(0, i))
            store.append(flatten_params(m))
    move = [float((s - i0).norm()) for s, i0 in zip(singles, init)]
    out = {"k": k, "epochs": epochs,
           "repeat": max(float((a - s).norm()) / mv for a, s, mv in zip(repeats, singles, move))}
    for bf16 in (False, True):
        st, _ = train_batched([model(i) for i in range(k)], x, y, recipe, [generator(0, i) for i in range(k)], bf16=bf16)
        flat = st.flat()
        out["bf16" if bf16 else "fp32"] = max(float((flat[i] - singles[i]).norm()) / move[i] for i in range(k))
    return out


# ----------------------------------------------------------------------------- storage


def disk_section(cases: list[Case], snapshots: int) -> list[dict]:
    """Bytes of one expert file with ``snapshots`` snapshots, per storage dtype."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            model = create_model("convnet", case.classes, case.channels, case.size, width=case.width, depth=case.depth)
            p = param_spec(model).total
            snaps = torch.randn(snapshots, p, generator=generator(0, 4)) * 0.05
            row = {"case": case.name, "params": p, "snapshots": snapshots}
            for dtype in ("float32", "float16", "bfloat16"):
                path = Path(tmp) / f"{case.name}_{dtype}.h5"
                write_expert(path, snaps, list(range(snapshots)), snapshot_dtype=dtype,
                             history={"train_loss": [0.0]}, attrs={"model": "convnet"},
                             json_attrs={"param_names": [], "param_shapes": []})
                row[dtype + "_mb"] = path.stat().st_size / 1e6
                path.unlink()
            rows.append(row)
    return rows


def synthetic_trajectory(device: torch.device, smoke: bool) -> tuple[torch.Tensor, dict]:
    """Snapshots (T, P) of an expert trained here on a learnable synthetic 2-class 28x28 task."""
    size, n = (16, 128) if smoke else (28, 1024)
    g = generator(0, 5)
    protos = torch.randn(2, 1, size, size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (protos[y] + 1.5 * torch.randn(n, 1, size, size, generator=g)).to(device)
    with seeded(0, 6):
        model = create_model("convnet3", 2, 1, size, **({"width": 8} if smoke else {})).to(device)
    snaps = [flatten_params(model).cpu()]
    recipe = TrainRecipe(epochs=6, lr=0.01, batch_size=256 if not smoke else 32, momentum=0.0, weight_decay=0.0,
                         decay_at_half=False, augment=Augment.parse(DSA))
    train_network(model, x, y.to(device), recipe, generator(0, 7),
                  after_epoch=lambda e, s: snaps.append(flatten_params(model).cpu()))
    return torch.stack(snaps), {"source": f"synthetic 2-class {size}x{size} task, {n} images, convnet3, 6 epochs",
                                "model": "convnet3", "classes": 2, "channels": 1, "size": size,
                                "model_kwargs": {"width": 8} if smoke else {}}


def buffer_trajectory(folder: str) -> tuple[torch.Tensor, dict]:
    experts = list_experts(folder)
    if not experts:
        raise SystemExit(f"--buffer {folder} holds no expert_*.h5 files.")
    e = read_expert(experts[0])
    if e.attrs["snapshot_dtype"] != "float32":
        raise SystemExit(f"--buffer {folder} stores {e.attrs['snapshot_dtype']} snapshots; the comparison needs float32.")
    return e.snapshots(), {"source": f"{experts[0].name} of {folder} ({e.fingerprint.get('name', '?')})",
                           "model": e.attrs["model"], "classes": int(e.attrs["num_classes"]),
                           "channels": int(e.attrs["channels"]), "size": int(e.attrs["size"]),
                           "model_kwargs": e.model_kwargs}


def precision_section(snaps: torch.Tensor, info: dict, device: torch.device) -> dict:
    """What storing snapshots in fp16/bf16 does to the matching loss and its gradients.

    For each start t, the same student (same images, plan and step size) is matched against
    θ*_t, θ*_{t+2} as stored in fp32 and as decoded from fp16/bf16 (start and target both decoded,
    as a run would read them).
    """
    model = create_model(info["model"], info["classes"], info["channels"], info["size"], **info["model_kwargs"]).to(device)
    spec = param_spec(model)
    g = generator(0, 8)
    ipc, steps, span = 10, 10, 2
    images = torch.randn(info["classes"] * ipc, info["channels"], info["size"], info["size"], generator=g).to(device)
    labels = (torch.arange(len(images)) % info["classes"]).to(device)
    starts = list(range(0, len(snaps) - span))[:4]
    out = {"info": info, "starts": starts, "span": span, "syn_steps": steps, "dtypes": {}}
    with precision(False):
        for dtype in ("float32", "float16", "bfloat16"):
            q = decode_snapshots(encode_snapshots(snaps, dtype), dtype).to(device)
            rows = []
            for t in starts:
                s32, t32 = snaps[t].to(device), snaps[t + span].to(device)
                plan = make_plan(len(images), steps, 0, generator(0, 9, t))
                lr = torch.tensor(0.01, device=device)  # the reference's initial student step size
                ref = matching_grads(model, spec, s32, t32, images, labels, lr, plan, None)
                got = matching_grads(model, spec, q[t], q[t + span], images, labels, lr, plan, None)
                rows.append({"t": t,
                             "quant_over_movement": float((q[t + span] - t32).norm() / (t32 - s32).norm()),
                             "loss_fp32": float(ref[0]), "loss": float(got[0]),
                             "loss_rel_change": abs(float(got[0]) - float(ref[0])) / abs(float(ref[0])),
                             "grad_images_rel_err": rel_err(got[1], ref[1]),
                             "grad_lr_rel_err": rel_err(got[3], ref[3])})
            out["dtypes"][dtype] = rows
    return out


# ----------------------------------------------------------------------------- report


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(v, spec=".1f", none="—") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def pick(row: dict, name: str, tf32: bool) -> dict | None:
    return next((v for v in row["variants"] if v["variant"] == name and v["tf32"] == tf32), None)


def best_checkpointed(row: dict, tf32: bool) -> dict | None:
    ok = [v for v in row["variants"] if v["tf32"] == tf32 and v["variant"] != "full" and "ms" in v]
    return min(ok, key=lambda v: v["ms"]) if ok else None


def render(res: dict) -> str:
    smoke = res["smoke"]
    L = ["# Performance", ""]
    L += ["<!-- Written by benchmarks/speed.py; edit the script, not this file. -->", ""]
    if smoke:
        L += ["> **CPU smoke run.** Tiny sizes (8-channel ConvNets, 16x16 images, 4 inner steps) on a CPU, to check",
              "> that the benchmark runs. These are not performance figures: rerun on a GPU with",
              "> `python benchmarks/speed.py --device cuda --out docs/performance.md`.", ""]
    L += [f"Measured on **{res['device']['name']}**, torch {res['software']['torch']}, {res['date']}, "
          f"in {res['seconds']:.0f} s, by `{res['command']}`. Ratios hold across machines; absolute times only for "
          "this device. Raw numbers: the `.json` file beside this one.", ""]
    if res.get("note"):
        L += [f"> {res['note']}", ""]
    L += render_pipeline(res.get("pipeline"), res["device"]["name"])
    L += render_opcount(res.get("opcount"))
    L += render_iteration(res.get("iteration"), res["device"]["name"])
    if res.get("kept_from"):
        k = res["kept_from"]
        L += ["## Earlier measurements", "",
              f"Every section below was measured on **{k['device']}** on {k['date']} by `{k['command']}`, before "
              "`distill run` captured whole iterations (distill/mtt/engine.py) and before the one-pass augmentation; "
              "carried over unchanged (`--keep`) until the GPU is measured again with `benchmarks/gpu_check.sh`.", ""]
        if k.get("note"):
            L += [f"> {k['note']}", ""]

    rows = res.get("mtt", [])
    if rows:
        L += ["## MTT iteration: full unroll against the constant-memory exact gradient", "",
              "*Full* is the reference's math: the whole unroll kept as one `create_graph=True` graph, differentiated",
              "once (`distill/mtt/unroll.py`, the project's correctness oracle). *Checkpointed* runs the unroll",
              "forward without a graph, keeping only each step's parameters, then walks back one step at a time with",
              "a Hessian-vector product (`distill/mtt/checkpointed.py`). *graphs*: each step's network work is one",
              "captured CUDA graph (the augmentation stays eager). *channels_last*: NHWC images into the network.",
              "*TF32*: convolutions and matrix products on TF32 tensor cores; other rows are strict fp32",
              "(`allow_tf32` off for cuDNN and cuBLAS). Same random data, same plan, same augmentation in every row;",
              f"ms = median of {REPS} after {WARMUP} warm-ups; memory = `max_memory_allocated` over warm-ups and timed",
              "runs (graph capture happens in the warm-ups) and, in brackets, `max_memory_reserved`, which also counts",
              "the pools captured graphs keep. Gradient error = the larger of ‖Δ‖/‖g‖ for the image gradient and for",
              "the step-size gradient, against the full unroll in strict fp32.", ""]
        L += ["### Headline", "",
              "| case | precision | full ms | best optimised | ms | speed-up | full peak GiB (reserved) | "
              "optimised peak GiB (reserved) | memory ratio | grad rel. error | oracle vs itself | float64 error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            for tf32 in (False, True):
                full, best = pick(row, "full", tf32), best_checkpointed(row, tf32)
                if best is None:
                    continue
                fms = full.get("ms") if full else None
                speed = fms / best["ms"] if fms else None
                mem = own_ratio(best, full)
                f64 = row.get("fp64_check", {}).get("grad_rel_err")
                L.append(f"| {row['case']['name']} | {'TF32' if tf32 else 'fp32'} | "
                         f"{'out of memory' if full and full.get('oom') else fmt(fms)} | {best['variant']} | {fmt(best['ms'])} | "
                         f"{fmt(speed, '.2f')}x | {mem_cell(full)} | {mem_cell(best)} | {fmt(mem, '.3f')} | "
                         f"{fmt(best.get('grad_rel_err'), '.1e')} | {fmt(row.get('oracle_repeat_err'), '.1e')} | "
                         f"{fmt(f64 if not tf32 else None, '.1e')} |")
        L += ["", "Memory ratio = optimised / full `max_memory_allocated`, each net of what was allocated before its call.",
              "*Oracle vs itself*: the full unroll run twice",
              "in strict fp32; GPU kernels that accumulate with atomics round differently on every run, and the sum",
              "over inner steps can magnify that, so no path can agree with the oracle more closely than this. "
              f"*Float64 error*: checkpointed+graphs against the full unroll, both in float64, over {FP64_STEPS} inner steps,",
              "which tests the algebra without rounding noise.", ""]
        L += ["### Every variant", "",
              "| case | variant | precision | ms / iteration | peak GiB (reserved) | grad rel. error | reference ms, GiB (H200) |",
              "|---|---|---|---|---|---|---|"]
        for row in rows:
            c = row["case"]
            for v in row["variants"]:
                ref = f"{fmt(c['ref_ms'], '.0f')}, {fmt(c['ref_gib'])}" if v["variant"] == "full" and not v["tf32"] else ""
                ms = "out of memory" if v.get("oom") else (f"failed: {v['failed']}" if v.get("failed") else fmt(v.get("ms")))
                L.append(f"| {c['name']} | {v['variant']} | {'TF32' if v['tf32'] else 'fp32'} | {ms} | {mem_cell(v)} | "
                         f"{fmt(v.get('grad_rel_err'), '.1e')} | {ref} |")
        for row in rows:
            if row.get("short_check"):
                sc = row["short_check"]
                L.append("")
                L.append(f"{row['case']['name']}: the full unroll did not fit in memory, so its gradient was checked on a "
                         f"{sc['syn_steps']}-step unroll instead: relative error {sc['grad_rel_err']:.1e}.")
        L += ["", "### Cost of the kornia augmentation", "",
              "One call on one step's batch; the checkpointed path makes two per inner step (one without a graph in",
              "the forward pass, one with its backward in the backward pass).", "",
              "| case | augment ms (no grad) | augment ms (fwd + bwd) | per iteration, ms | share of the best fp32 iteration |",
              "|---|---|---|---|---|"]
        for row in rows:
            a, steps = row["augment"], row["case"]["syn_steps"]
            per_it = steps * (a["fwd_ms"] + a["fwd_bwd_ms"])
            best = best_checkpointed(row, False)
            L.append(f"| {row['case']['name']} | {a['fwd_ms']:.2f} | {a['fwd_bwd_ms']:.2f} | {per_it:.0f} | "
                     f"{fmt(per_it / best['ms'] * 100 if best else None, '.0f')} % |")
        if res.get("steps_memory"):
            sm = res["steps_memory"]
            L += ["", f"### Peak memory against syn_steps ({res['steps_memory_case']}, checkpointed+graphs, fp32)", "",
                  "`store=device` keeps each θ_k (P floats) on the device; `store=host` keeps them in pinned CPU memory.",
                  "*Own peak* = peak allocated minus what was allocated before the call (the inputs).", "",
                  "| syn_steps | store | ms / iteration | own peak GiB | peak GiB (reserved) |", "|---|---|---|---|---|"]
            for r in sm:
                own = r["peak_gib"] - r["base_gib"] if r.get("peak_gib") is not None and r.get("base_gib") is not None else None
                L.append(f"| {r['syn_steps']} | {r['store']} | {fmt(r['ms'])} | {fmt(own, '.3f')} | {mem_cell(r)} |")
        L += ["", "### Targets", ""] + mtt_verdicts(res)
    if res.get("experts"):
        b0 = res["experts"][0]["bench"]
        L += ["", "## Expert training: one at a time against K experts in one vmapped network", "",
              f"Random data, ConvNet depth 3 (width {b0['width']}), batch {b0['batch']}, SGD lr 0.01, one epoch of "
              f"{b0['images']} images per expert; convolutions with torch's default TF32 (as the reference ran).",
              "K = 1 is `train_network`, one expert at a time; K > 1 is `train_batched`. images/s counts every",
              "expert's images. bf16 = `torch.autocast(bfloat16)` around the forward pass (`--bf16`).", "",
              "| input | K | bf16 | augmentation | images/s | x one at a time (same augmentation) | x reference (H200) |",
              "|---|---|---|---|---|---|---|"]
        for r in res["experts"]:
            b = r["bench"]
            ref = REFERENCE_EXPERT_IMG_S.get(b["name"])
            single = {x["augment"]: x.get("img_s") for x in r["runs"] if x["k"] == 1}
            for x in r["runs"]:
                label = f"{b['name']} {b['channels']}x{b['size']}x{b['size']}"
                if x.get("oom"):
                    L.append(f"| {label} | {x['k']} | {'yes' if x['bf16'] else 'no'} | {'DSA' if x['augment'] else 'none'} | "
                             "out of memory | | |")
                    continue
                base = single.get(x["augment"])
                vs_ref = x["img_s"] / ref if ref and x["augment"] and not smoke else None
                L.append(f"| {label} | {x['k']} | {'yes' if x['bf16'] else 'no'} | {'DSA' if x['augment'] else 'none'} | "
                         f"{x['img_s']:.0f} | {fmt(x['img_s'] / base if base else None, '.2f')} | {fmt(vs_ref, '.2f')} |")
        L += ["", "Agreement with one-at-a-time training (same seeds), worst of K experts, after a few epochs:",
              "‖θ_batched − θ_single‖ / ‖θ_single − θ_0‖. *repeat* is one-at-a-time against itself (nondeterministic",
              "GPU kernels alone).", "", "| input | K | epochs | repeat | batched fp32 | batched bf16 |", "|---|---|---|---|---|---|"]
        for r in res["experts"]:
            a = r["agreement"]
            L.append(f"| {r['bench']['name']} | {a['k']} | {a['epochs']} | {a['repeat']:.1e} | {a['fp32']:.1e} | {a['bf16']:.1e} |")
        L += ["", "### Targets", ""] + expert_verdicts(res)
    if res.get("disk"):
        L += ["", "## Snapshot storage", "",
              f"One expert file with {res['disk'][0]['snapshots']} snapshots (the reference keeps 51 fp32), in MB:", "",
              "| case | parameters | float32 | float16 | bfloat16 | fp16 / fp32 |", "|---|---|---|---|---|---|"]
        for r in res["disk"]:
            L.append(f"| {r['case']} | {r['params']:,} | {r['float32_mb']:.1f} | {r['float16_mb']:.1f} | "
                     f"{r['bfloat16_mb']:.1f} | {r['float16_mb'] / r['float32_mb']:.2f} |")
    for p in res.get("precision", []):
        L += ["", f"Effect on matching, measured on {p['info']['source']}: the same student (random synthetic images,",
              f"{p['syn_steps']} steps, no augmentation) matched against θ*_t → θ*_(t+{p['span']}) as stored in fp32 and as",
              "decoded from fp16/bf16, for start t in " + ", ".join(map(str, p["starts"])) + " (worst case shown).",
              "*Rounding / movement* = ‖θ*_q − θ*‖ / ‖θ*_(t+span) − θ*_t‖: the storage rounding against the expert's",
              "own movement, which is the matching loss's denominator.", "",
              "| stored as | rounding / movement | matching loss change | image gradient rel. error | step-size gradient rel. error |",
              "|---|---|---|---|---|"]
        for dtype in ("float32", "float16", "bfloat16"):
            rows_ = p["dtypes"][dtype]
            worst = {k: max(r[k] for r in rows_) for k in ("quant_over_movement", "loss_rel_change",
                                                           "grad_images_rel_err", "grad_lr_rel_err")}
            label = "float32 (run again: the device's own noise)" if dtype == "float32" else dtype
            L.append(f"| {label} | {worst['quant_over_movement']:.1e} | {worst['loss_rel_change']:.1e} | "
                     f"{worst['grad_images_rel_err']:.1e} | {worst['grad_lr_rel_err']:.1e} |")
    if res.get("disk"):
        L += ["", "Target: disk per expert at most 1/2 of fp32 snapshots. " + disk_verdict(res)]
    if res.get("compile"):
        L += ["", "## torch.compile of the inner step", "",
              "The step written with `torch.func.grad`/`vjp` and compiled (inductor), inside the same CUDA graphs, against",
              "the eager step; strict fp32. *Wall s* includes compiling and capturing.", "",
              "| case | variant | ms / iteration | x full unroll (fp32, above) | peak GiB (reserved) | grad rel. error | wall s |",
              "|---|---|---|---|---|---|---|"]
        fulls = {r["case"]["name"]: pick(r, "full", False) for r in rows}
        for row in res["compile"]:
            full = fulls.get(row["case"])
            for v in row["variants"]:
                ms = f"failed: {v['failed']}" if v.get("failed") else ("out of memory" if v.get("oom") else fmt(v.get("ms")))
                x = full["ms"] / v["ms"] if full and "ms" in full and "ms" in v else None
                L.append(f"| {row['case']} | {v['variant']} | {ms} | {fmt(x, '.2f')} | {mem_cell(v)} | "
                         f"{fmt(v.get('grad_rel_err'), '.1e')} | {v['seconds_incl_compile']:.0f} |")
    L += ["", "## What is used, and why", ""] + NOTES
    return "\n".join(L) + "\n"


def render_pipeline(pl: dict | None, device_name: str) -> list[str]:
    """The time-to-a-share table; the reference's H200 figures beside ours."""
    if not pl:
        return []
    st, p = pl.get("stages", {}), pl["settings"]
    gpu = pl["device"] == "cuda"
    L = ["## Time to a share", "",
         f"`distill buffer`, `run`, `export` and `eval` as the CLI runs them (one process each), on {device_name}: "
         f"{p['data']}, {p['experts']} expert(s) x {p['epochs']} epochs, {p['ipc']} images per class, hard labels, "
         f"{p['syn_steps']} student steps, expert span {p['expert_epochs']}, starts up to {p['max_start_epoch']}, "
         f"{p['iterations']} iterations, `eval` {p['eval_runs']} run(s) of the share alone"
         + (f" for {p['eval_epochs']} epochs" if p.get("eval_epochs") else "") + f" ({p['name']}). Seconds per "
         "iteration: the median of `distill run`'s own per-iteration times (metrics.jsonl), without the first (which, "
         "on CUDA, captures the graph).", ""]
    ref = REFERENCE_PIPELINE if gpu else {}
    run = st.get("run", {})
    L += ["| stage | wall s | per iteration s | reference (H200) | x reference |", "|---|---|---|---|---|"]
    for name in ("buffer", "run", "export", "eval"):
        if name not in st:
            L.append(f"| `distill {name}` | not measured |  |  |  |")
            continue
        secs = st[name]["seconds"]
        per = fmt(run.get("median_s"), ".4f") if name == "run" else ""
        r = ref.get("buffer_s") if name == "buffer" else ref.get("run_s_per_iteration") if name == "run" else None
        mine = secs if name == "buffer" else run.get("median_s") if name == "run" else None
        L.append(f"| `distill {name}` | {secs:.1f} | {per} | {fmt(r, '.3f') if r else '—'} | "
                 f"{fmt(r / mine, '.2f') + 'x' if r and mine else '—'} |")
    if "eval" in st and st["eval"].get("accuracy_mean") is not None:
        e = st["eval"]
        spread = f" ± {100 * e['accuracy_std']:.1f}" if p["eval_runs"] > 1 else ""  # one network has no spread
        L += ["", f"Test accuracy of the share: {100 * e['accuracy_mean']:.1f}{spread} % ({p['eval_runs']} network(s))."]
    if pl.get("old_run"):
        olds = [o["median_s"] for o in pl["old_run"]]
        news = [run["median_s"]] + [o["median_s"] for o in pl.get("new_again", [])]
        L += ["", f"The same `distill run` command from `{pl['old_run'][0]['repo']}` (an older checkout) on the same "
                  f"buffer, alternated with this version's (this, old, this, old): old "
                  f"{', '.join(f'{v:.3f}' for v in olds)} s per iteration, this version "
                  f"{', '.join(f'{v:.3f}' for v in news)} s; the ratio of the means: this version's iterations are "
                  f"{statistics.mean(olds) / statistics.mean(news):.2f}x as fast."]
    if pl.get("failed"):
        L += ["", f"Stopped early: {pl['failed']}"]
    if not gpu:
        g = PIPELINES["cuda"]
        L += ["", f"On a GPU, at the reference's reduced protocol ({g.experts} experts x {g.epochs} epochs, {g.ipc} "
                  f"images per class, hard labels, {g.syn_steps} student steps, span {g.expert_epochs}, "
                  f"{g.iterations} iterations; `benchmarks/gpu_check.sh`):", "",
              "| stage | wall s | per iteration s | reference (H200) | x reference |", "|---|---|---|---|---|",
              f"| `distill buffer` | not measured in this session |  | {REFERENCE_PIPELINE['buffer_s']} |  |",
              f"| `distill run` | not measured in this session | not measured in this session | "
              f"{REFERENCE_PIPELINE['run_s_per_iteration']} per iteration |  |",
              "| `distill export` | not measured in this session |  |  |  |",
              "| `distill eval` | not measured in this session |  |  |  |"]
    return L + [""]


def render_iteration(rows: list[dict] | None, device_name: str) -> list[str]:
    if not rows:
        return []
    names = [k for k in rows[-1] if k not in ("T", "syn_steps")]
    L = ["## Seconds per MTT iteration at a small setting", "",
         f"On {device_name}, one thread: ConvNet-3 (width 128), 1x28x28, 2 classes x 10 images, "
         f"{rows[0]['syn_steps']} student steps, DSA; plan drawing and gradients, median of 3 after 1 warm-up, the "
         "variants interleaved (benchmarks/opcount.py's setting). Eager: no graph capture off CUDA. *engine full* "
         "and *checkpoint* loop over the T trajectories, as `distill run` does off CUDA; *vmapped* is what it runs on "
         "CUDA.", "",
         "| T | " + " | ".join(names) + " | 5bd3815 / engine full | 5bd3815 / engine checkpoint |",
         "|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        old = r[names[0]]
        L.append(f"| {r['T']} | " + " | ".join(fmt(r.get(n), ".3f") for n in names) +
                 f" | {old / r['engine full']:.2f}x | {old / r['engine checkpoint']:.2f}x |")
    return L + [""]


def render_opcount(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    L = ["## Operator calls (aten ops dispatched, counted on the CPU)", "",
         "One MTT iteration (plan drawing and the gradients; the optimiser update is the same in both) and one expert",
         "step, counted by a `TorchDispatchMode` (benchmarks/opcount.py): ConvNet-3, 1x28x28, 2 classes x 10 images,",
         "20 student steps, the whole set each step, DSA. *Today* is git 5bd3815: a Python loop over steps and",
         "trajectories, each step's augmentation drawn on the CPU. *Eager* is this version's engine called without",
         "capture, its T trajectories vmapped as on CUDA. *Captured*: a replayed CUDA graph dispatches no aten",
         "operator for its work, only the copies of the iteration's inputs into the graph and of its outputs (counted",
         "from the engine's inputs and outputs here; `benchmarks/engine_check.py` counts them during a real replay).", "",
         "| what | T | today (5bd3815) | eager, gradient full | eager, checkpoint | captured (host, expected) | "
         "eager full / today | captured / today |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["what"] == "mtt_iteration":
            L.append(f"| MTT iteration | {r['T']} | {r['old']} | {r['new_full']} | {r['new_checkpoint']} | "
                     f"{r['captured_host']} | {r['new_full'] / r['old']:.2f} | {r['captured_host'] / r['old']:.4f} |")
        else:
            L.append(f"| expert step (batch 256) | 1 | {r['old']} | {r['new']} | — | — | {r['new'] / r['old']:.2f} | — |")
    mtt = [r for r in rows if r["what"] == "mtt_iteration"]
    measured = all(r.get("captured_measured") for r in mtt)
    ok = all(r["captured_host"] <= r["old"] / 10 for r in mtt)
    eager_ok = all(r["new_full"] <= r["old"] / 10 for r in mtt)
    captured = ('met' if ok else '**missed**') if measured else (
        "not measured (the captured column counts the copies a replay would make, not a replay; "
        "it needs a GPU run of benchmarks/engine_check.py)")
    L += ["", "Per trajectory, divide by T. The issue's target, at most 1/10 of today's calls per iteration: "
          f"captured path {captured}; eager path {'met' if eager_ok else '**missed**'} ("
          + ", ".join(f"T={r['T']}: {r['new_full'] / r['old']:.2f} of today's" for r in mtt) + ").", ""]
    return L


def own_ratio(best: dict | None, full: dict | None) -> float | None:
    """Optimised / full peak memory, each net of what was allocated before its call (so leftovers of earlier rows
    don't count)."""
    if not best or not full or best.get("peak_gib") is None or full.get("peak_gib") is None:
        return None
    own = [v["peak_gib"] - v.get("base_gib", 0.0) for v in (best, full)]
    return own[0] / own[1] if own[1] > 0 else None


def mem_cell(v: dict | None) -> str:
    if not v or v.get("oom"):
        return "out of memory" if v else "—"
    if v.get("peak_gib") is None:
        return "—"
    return f"{v['peak_gib']:.2f} ({v['reserved_gib']:.2f})"


def mtt_verdicts(res: dict) -> list[str]:
    if res["smoke"]:
        return ["CPU smoke run: targets are judged on a GPU only."]
    out = []
    by = {r["case"]["name"]: r for r in res["mtt"]}
    compiled = {c["case"]: c for c in res.get("compile", [])}
    for name, want in TARGET_SPEEDUP.items():
        row = by.get(name)
        if not row:
            continue
        for tf32 in (False, True):
            full, best = pick(row, "full", tf32), best_checkpointed(row, tf32)
            if not full or "ms" not in full or not best:
                continue
            label = best["variant"]
            if not tf32 and name in compiled:
                # Measured in its own section, same case, same settings, same process.
                c = [v for v in compiled[name]["variants"] if "compile" in v["variant"] and "ms" in v]
                if c and c[0]["ms"] < best["ms"]:
                    best, label = c[0], c[0]["variant"]
            got = full["ms"] / best["ms"]
            out.append(f"- {name}, {'TF32' if tf32 else 'fp32'}: {label} is {got:.2f}x faster than the full unroll "
                       f"(target {want:.0f}x): " + ("met." if got >= want else f"**missed by {want / got:.1f}x**. "
                                                    + why_slow(row, best["ms"], full["ms"])))
    for row in res["mtt"]:
        full, best = pick(row, "full", False), best_checkpointed(row, False)
        ratio = own_ratio(best, full)
        if ratio is not None:
            out.append(f"- {row['case']['name']}: peak memory {ratio:.3f} of the full unroll (target ≤ {TARGET_MEMORY_RATIO}; "
                       f"reserved: {best['reserved_gib'] / full['reserved_gib']:.3f}): "
                       + ("met." if ratio <= TARGET_MEMORY_RATIO else "**missed**."))
        elif full and full.get("oom") and best:
            out.append(f"- {row['case']['name']}: the full unroll ran out of memory on this device; the optimised path "
                       f"peaked at {best['peak_gib']:.2f} GiB.")
        errs = [v["grad_rel_err"] for v in row["variants"] if not v["tf32"] and v["variant"] != "full" and "grad_rel_err" in v]
        f64 = row.get("fp64_check", {}).get("grad_rel_err")
        if errs:
            e, floor = max(errs), row.get("oracle_repeat_err")
            verdict = "met." if e <= 1e-4 else ("**missed**, but no closer than the oracle to itself on this GPU "
                                                f"({floor:.1e}); see the float64 column." if floor is not None and floor >= e / 3
                                                else "**missed**.")
            out.append(f"- {row['case']['name']}: worst fp32 gradient error {e:.1e} (target ≤ 1e-4): {verdict}"
                       + (f" Float64 over {FP64_STEPS} steps: {f64:.1e}." if f64 is not None else ""))
    cxr = by.get("cxr128_ipc20")
    if cxr:
        best = best_checkpointed(cxr, False)
        if best:
            g = best["peak_gib"]
            out.append(f"- cxr128_ipc20 in {g:.2f} GiB allocated, {best['reserved_gib']:.2f} GiB reserved "
                       f"(target ≤ {TARGET_CXR_GIB:.0f} GiB): " + ("met." if g <= TARGET_CXR_GIB else "**missed**."))
    if res.get("steps_memory"):
        for store in ("device", "host"):
            r = [x for x in res["steps_memory"] if x["store"] == store and x.get("peak_gib") is not None
                 and x.get("base_gib") is not None]
            if len(r) >= 2:
                own = [x["peak_gib"] - x["base_gib"] for x in (r[0], r[-1])]
                growth = (own[1] - own[0]) / (r[-1]["syn_steps"] - r[0]["syn_steps"]) * 1024
                out.append(f"- store={store}: the call's own peak grows by {growth:.2f} MiB per extra inner step "
                           f"({own[0]:.3f} GiB at {r[0]['syn_steps']} steps, {own[1]:.3f} GiB at {r[-1]['syn_steps']}).")
    return out


def why_slow(row: dict, best_ms: float, full_ms: float) -> str:
    """A measured reason for a missed speed target."""
    a = row.get("augment")
    if not a:
        return ""
    aug_ms = row["case"]["syn_steps"] * (a["fwd_ms"] + a["fwd_bwd_ms"])
    if aug_ms >= 0.3 * best_ms:
        return (f"The eager kornia augmentation alone takes about {aug_ms:.0f} of its {best_ms:.0f} ms (measured on its own); "
                f"with a free network step the ratio would still stop near {full_ms / aug_ms:.1f}x.")
    return (f"The network's kernels dominate here (the augmentation is about {aug_ms:.0f} of the {best_ms:.0f} ms): the exact "
            "constant-memory path runs every step's forward and backward once more than the full unroll, so at the same "
            "precision it does more work, not less; what it buys is memory. The torch.compile table shows what fusing "
            "the step's kernels gains.")


def expert_verdicts(res: dict) -> list[str]:
    if res["smoke"]:
        return ["CPU smoke run: targets are judged on a GPU only."]
    out = []
    for r in res["experts"]:
        ref = REFERENCE_EXPERT_IMG_S.get(r["bench"]["name"])
        runs = [x for x in r["runs"] if "img_s" in x and x["augment"]]
        if not runs or not ref:
            continue
        best = max(runs, key=lambda x: x["img_s"])
        f = best["img_s"] / ref
        out.append(f"- {r['bench']['name']}: best {best['img_s']:.0f} images/s (K={best['k']}{', bf16' if best['bf16'] else ''}) "
                   f"= {f:.2f}x the reference's {ref} (target {TARGET_EXPERT_FACTOR:.0f}x): "
                   + ("met." if f >= TARGET_EXPERT_FACTOR else f"**missed by {TARGET_EXPERT_FACTOR / f:.1f}x**."))
        noaug = [x for x in r["runs"] if "img_s" in x and not x["augment"]]
        if noaug:
            nb = max(noaug, key=lambda x: x["img_s"])
            out.append(f"  Without augmentation the same code reaches {nb['img_s']:.0f} images/s (K={nb['k']}): the rest "
                       "of the gap is the augmentation, which runs once per expert per step.")
    return out


def disk_verdict(res: dict) -> str:
    if res["smoke"]:
        return "CPU smoke run (tiny models, where the file's fixed overhead dominates): judged at full size only."
    worst = max(res["disk"], key=lambda r: r["float16_mb"] / r["float32_mb"])
    ratio = worst["float16_mb"] / worst["float32_mb"]
    if ratio <= TARGET_DISK_RATIO:
        return f"fp16 and bf16 files are {ratio:.4f} of fp32 at most: met."
    # The snapshots take exactly half; what is left over is the file's fixed metadata, counted twice in fp32 / 2.
    over_kb = (worst["float16_mb"] - worst["float32_mb"] / 2) * 1e3
    return (f"fp16 and bf16 files are {ratio:.4f} of fp32 at most: the snapshots take exactly half, and the file's fixed "
            f"metadata adds {over_kb:.0f} kB over the half ({worst['case']}).")


NOTES = [
    "- **One function per iteration** (`distill/mtt/engine.py`, what `distill run` uses): the iteration's unroll and its",
    "  derivative for all of a rank's trajectories, written in `torch.func` form and vmapped over the trajectories,",
    "  with every random number drawn beforehand on the device (the plan). On CUDA it is captured once per input shape",
    "  as one CUDA graph and replayed (`--fast auto`, the default; `--fast compile` compiles it first); where capture",
    "  fails, one warning and the same math eagerly. A replay dispatches only the copies of the inputs and outputs",
    "  (the operator-count table). tests/test_checkpointed.py checks it against the full unroll on a CPU to 1e-4 in",
    "  fp32 and 1e-10 in float64, for images, soft-label logits and the log step size, one trajectory or several.",
    "- **Constant-memory exact gradient** (`gradient = \"checkpoint\"`, in the engine and in",
    "  `distill/mtt/checkpointed.py`): exact, not an approximation. Between its two passes it keeps θ_k, P floats per",
    "  inner step (1.2 MB for convnet3, 2.4 MB for convnet5 at 128x128): small against one step's activations, but",
    "  proportional to syn_steps; `matching_grads(store=\"host\")` keeps them in pinned CPU memory instead (the",
    "  syn_steps table).",
    "- **Cost**: it runs each step's forward and backward twice (once without a graph, once with the double backward),",
    "  so where the network's kernels dominate it does more work than the full unroll; what it buys is memory.",
    "- **Per-step CUDA graphs** (`CudaGraphSteps` in `distill/mtt/checkpointed.py`, kept for comparison): one graph",
    "  for a step's gradient and one for its vector-Jacobian product, the augmentation eager between them.",
    "- **TF32** (a flag, off by default): tensor cores for convolutions and matrix products; the TF32 rows give its",
    "  speed and its error against strict fp32.",
    "- **channels_last** (`CudaGraphSteps(channels_last=True)`, `--channels-last` here): on the H200 on 2026-11-27 it was",
    "  6-11 % slower than NCHW in three cases and 2 % faster on medmnist28 (within run-to-run spread), so it is off",
    "  by default and timed only on request.",
    "- **Fused parameter updates**: the student's parameters are one flat vector, so each update is one kernel; the",
    "  batched experts update all K experts with one foreach SGD step over stacked tensors.",
    "- **Augmentation** (`distill/augment.py`): every parameter of an iteration drawn at once on the device, then a",
    "  fixed sequence of tensor operations per step (one warp), so it vmaps and is captured with the rest.",
    "- **Batched experts** (`distill buffer --batch-experts K`): K experts in one `vmap(functional_call)` over",
    "  stacked parameters; trajectories equal one-at-a-time training to the level at which the GPU disagrees with",
    "  itself (the agreement table). It runs the augmentation once per expert per step, so it gains little while",
    "  the augmentation dominates (compare the rows without augmentation).",
    "- **Snapshot precision** (`--snapshot-dtype`): float16 halves the disk; bfloat16 halves it too but rounds",
    "  θ by far more against an expert's movement on small medical datasets (the precision tables), so float16 is the",
    "  one to use when disk matters.",
]


def _cpu_section(out: Path) -> str:
    """benchmarks/speed_cpu.py's section of ``out`` (between its markers), kept when this script rewrites the file."""
    text = out.read_text() if out.exists() else ""
    i, j = text.find("<!-- speed_cpu:begin -->"), text.find("<!-- speed_cpu:end -->")
    return "" if i < 0 or j < 0 else "\n" + text[i:j + len("<!-- speed_cpu:end -->")] + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--smoke", action="store_true", help="Tiny sizes, to check on a CPU that everything runs.")
    ap.add_argument("--out", default=None, help="Markdown report (default docs/performance.md; out/performance-smoke.md with --smoke).")
    ap.add_argument("--sections", default="pipeline,mtt,steps,experts,storage,compile,opcount",
                    help="Comma list of pipeline, mtt, steps, experts, storage, compile, opcount, iteration "
                         "(run in this order).")
    ap.add_argument("--keep", default=None, metavar="JSON",
                    help="Carry the sections this run does not measure over from an earlier report (rendered as such).")
    ap.add_argument("--pipeline", default=None, choices=sorted(PIPELINES),
                    help="Pipeline settings: cuda = the reference's reduced protocol, cpu = scaled down (default: the device's).")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                    help="Folder with pneumoniamnist.npz for the pipeline (DISTILL_DATA).")
    ap.add_argument("--old-repo", default=None,
                    help="Another checkout (e.g. `git archive 5bd3815 | tar -x -C /tmp/old`) whose distill run is timed too.")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES), help="Comma list of MTT cases.")
    ap.add_argument("--compile-cases", default=None,
                    help="Cases for the torch.compile section (default medmnist28_ipc10,cifar_ipc10 on a GPU, none on a CPU, "
                         "where compiling takes minutes; '' for none).")
    ap.add_argument("--channels-last", action="store_true", help="Also time the graphs path with NHWC images.")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="Only rewrite the Markdown report (--out) from a JSON file this script wrote.")
    ap.add_argument("--buffer", default=None,
                    help="Comma list of real buffer folders (float32 snapshots) for the snapshot-precision check.")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        if res.get("format") != "distill-benchmark-speed":
            raise SystemExit(f"{args.render} is not a report of this script.")
        out = Path(args.out or Path(args.render).with_suffix(".md"))
        with atomic_path(out) as tmp:
            tmp.write_text(render(res) + _cpu_section(out))
        log(f"Wrote {out}.")
        return

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    sections = set(args.sections.split(","))
    if device.type == "cpu" and not args.smoke and sections - {"pipeline", "opcount", "iteration"}:
        raise SystemExit("Without a GPU the full sizes take hours; use --smoke on a CPU (pipeline and opcount run as they are).")
    out = Path(args.out or (REPO / ("out/performance-smoke.md" if args.smoke else "docs/performance.md")))
    names = [n for n in args.cases.split(",") if n]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"Unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(c.name for c in CASES)}.")
    cases = [c for c in CASES if c.name in names]
    if args.smoke:
        cases = [smoke_case(c) for c in cases]

    t0 = time.perf_counter()
    res = {"format": "distill-benchmark-speed", "format_version": REPORT_VERSION, "smoke": args.smoke,
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
           "command": "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
           "device": {"type": device.type,
                      "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"},
           "software": software_versions(), "seconds": 0.0}

    def save():
        # After every section, so a run cut short still leaves what it measured.
        res["seconds"] = time.perf_counter() - t0
        write_json(out.with_suffix(".json"), res)
        with atomic_path(out) as tmp:
            tmp.write_text(render(res) + _cpu_section(out))

    if args.keep:
        old = json.loads(Path(args.keep).read_text())
        kept = [k for k in ("mtt", "steps_memory_case", "steps_memory", "experts", "disk", "precision", "compile")
                if k in old]
        res |= {k: old[k] for k in kept}
        res["kept_from"] = {"date": old.get("date"), "device": old.get("device", {}).get("name"),
                            "command": old.get("command"), "note": old.get("note"), "sections": kept}
    if "pipeline" in sections:
        p = PIPELINES[args.pipeline or device.type]
        res["pipeline"] = pipeline_section(p, device, Path(args.data_dir), Path(args.old_repo) if args.old_repo else None)
        save()
    if "mtt" in sections:
        res["mtt"] = []
        for case in cases:  # saved after each case, so a run cut short keeps the cases it finished
            res["mtt"] += mtt_section([case], device, args.channels_last)
            save()
    if "steps" in sections and cases:
        base = cases[0]
        steps = (base.syn_steps, 2 * base.syn_steps) if args.smoke else (10, 30)
        res["steps_memory_case"] = base.name
        res["steps_memory"] = steps_memory_section(base, device, steps)
        save()
    if "experts" in sections:
        benches = [smoke_expert(b) for b in EXPERT_BENCHES] if args.smoke else list(EXPERT_BENCHES)
        res["experts"] = expert_section(benches, device)
        save()
    if "storage" in sections:
        disk_cases = cases or [smoke_case(c) if args.smoke else c for c in CASES]
        res["disk"] = disk_section(disk_cases, REFERENCE_SNAPSHOTS)
        trajectories = [buffer_trajectory(b) for b in args.buffer.split(",")] if args.buffer else \
            [synthetic_trajectory(device, args.smoke)]
        res["precision"] = [precision_section(snaps, info, device) for snaps, info in trajectories]
        save()
    wanted = args.compile_cases if args.compile_cases is not None else ("medmnist28_ipc10,cifar_ipc10" if device.type == "cuda" else "")
    compile_cases = [c for c in cases if c.name in set(filter(None, wanted.split(",")))]
    if "compile" in sections and compile_cases:
        res["compile"] = compile_section(compile_cases, device)
        save()
    if "opcount" in sections:
        res["opcount"] = opcount_section()
        save()
    if "iteration" in sections:
        res["iteration"] = iteration_section(device)
        save()
    log(f"Wrote {out} and {out.with_suffix('.json')} in {res['seconds']:.0f} s.")


if __name__ == "__main__":
    main()
