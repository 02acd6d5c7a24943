"""benchmarks/speed.py: time to a share (the CLI, one subprocess per stage) and storage (disk per expert, what
fp16/bf16 snapshots do to the matching loss and its gradient)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from distill.augment import Augment
from distill.formats.trajectory import (TrajectoryMeta, decode_snapshots, encode_snapshots, list_experts, read_expert,
                                       write_expert)
from distill.models import create_model, flatten_params, param_spec
from distill.mtt.unroll import make_plan
from distill.seeding import generator, seeded
from distill.train import TrainRecipe, train_network
from oracles.checkpointed import matching_grads
from speed_cases import DSA, Case, Pipeline
from speed_harness import log, precision, rel_err

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- time to a share


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


# ----------------------------------------------------------------------------- storage


def disk_section(cases: list[Case], snapshots: int) -> list[dict]:
    """Bytes of one expert file with ``snapshots`` snapshots, per storage dtype."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            kwargs = {"width": case.width, "depth": case.depth}
            model = create_model("convnet", case.classes, case.channels, case.size, **kwargs)
            spec = param_spec(model)
            p = spec.total
            snaps = torch.randn(snapshots, p, generator=generator(0, 4)) * 0.05
            # The metadata a buffer's expert carries (distill/buffer.py), so the size is that of a real file.
            meta = TrajectoryMeta(model="convnet", num_classes=case.classes, channels=case.channels, size=case.size,
                                  param_names=list(spec.names), param_shapes=[list(s) for s in spec.shapes],
                                  model_kwargs=kwargs)
            row = {"case": case.name, "params": p, "snapshots": snapshots}
            for dtype in ("float32", "float16", "bfloat16"):
                path = Path(tmp) / f"{case.name}_{dtype}.h5"
                write_expert(path, snaps, list(range(snapshots)), snapshot_dtype=dtype,
                             history={"train_loss": [0.0]}, meta=meta)
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
