"""benchmarks/speed.py: the GPU sections. MTT iteration paths, torch.compile, memory against syn_steps, operator
counts, one captured iteration, and expert training."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, replace
from functools import partial

import torch

from distill.augment import Augment
from distill.batched import train_batched
from distill.models import CONVNET_WIDTH, create_model, flatten_params
from distill.mtt.engine import MatchingEngine
from distill.seeding import generator, seeded
from distill.train import TrainRecipe, train_network
from oracles.checkpointed import CudaGraphSteps
from speed_cases import DSA, FP64_STEPS, Case, ExpertBench
from speed_harness import MTTCase, free, grad_error, is_oom, log, log_variant, measure, precision, run_variant, sync

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
