"""benchmarks/speed.py: the Markdown report (docs/performance.md) from the JSON of a run."""
from __future__ import annotations

import statistics

from speed_cases import FP64_STEPS, PIPELINES, REFERENCE_EXPERT_IMG_S, REFERENCE_PIPELINE, REPS, WARMUP
from speed_verdicts import (NOTES, best_checkpointed, disk_verdict, expert_verdicts, fmt, mem_cell, mtt_verdicts,
                            own_ratio, pick)


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
    L += _mtt(res, rows)
    L += _experts(res, smoke)
    L += _storage(res)
    L += _compile(res, rows)
    L += ["", "## What is used, and why", ""] + NOTES
    return "\n".join(L) + "\n"


def _mtt(res: dict, rows: list[dict]) -> list[str]:
    """The MTT iteration tables: headline, every variant, the augmentation's cost, memory against syn_steps."""
    if not rows:
        return []
    L: list[str] = []
    L += ["## MTT iteration: full unroll against the constant-memory exact gradient", "",
          "*Full* is the reference's math: the whole unroll kept as one `create_graph=True` graph, differentiated",
          "once (`distill/mtt/unroll.py`, the project's correctness oracle). *Checkpointed* runs the unroll",
          "forward without a graph, keeping only each step's parameters, then walks back one step at a time with",
          "a Hessian-vector product (`tests/oracles/checkpointed.py`). *graphs*: each step's network work is one",
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
    return L


def _experts(res: dict, smoke: bool) -> list[str]:
    """Expert training: throughput one at a time against K vmapped, and the trajectories' agreement."""
    if not (res.get("experts")):
        return []
    L: list[str] = []
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
    return L


def _storage(res: dict) -> list[str]:
    """Snapshot storage: disk per expert and what fp16/bf16 do to matching."""
    L: list[str] = []
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
    return L


def _compile(res: dict, rows: list[dict]) -> list[str]:
    """torch.compile of the inner step against the eager step and the full unroll."""
    if not (res.get("compile")):
        return []
    L: list[str] = []
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
    return L


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
