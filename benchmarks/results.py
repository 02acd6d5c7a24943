"""The results table: full data, random real, distilled (hard and soft labels) -> docs/results.md.

A benchmark script, not a test: CI never runs it. It drives the whole pipeline
through the command line, exactly as a user would, and records every command:

    distill buffer  -> distill run [--hard-labels] -> distill export --force -> distill eval SHARE --baseline none
    distill eval --baseline random-real --ipc K     distill eval --baseline full

for each dataset and each images-per-class (IPC) value where every class has
at least MIN_POOL_RATIO times IPC training images, and, under each model of the
profile's ``cross_models``, the same evaluations of random real and of both
shares (cross-architecture rows). Each row is the mean ± std over the profile's runs.

    python benchmarks/results.py --profile quick                      # CPU, minutes
    python benchmarks/results.py --profile paper --list-chunks        # the paper profile's chunks
    python benchmarks/results.py --profile paper --device cuda --chunk pneumoniamnist:buffer --max-minutes 8

The script rewrites only its own profile's section of docs/results.md, so the
quick and paper tables live side by side, each with the hardware that made it.
Finished steps are kept in --work and skipped when the script is run again, so
a profile too long for one session runs in chunks (``--chunk DATASET:PART``,
PART one of full, buffer or an IPC), session after session; ``--max-minutes``
starts no step once that much time has passed. Rows no session finished are
rendered "not run". A `distill run` stopped half-way is continued with --resume.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist")
NOT_RUN = "not run"
ROW_LABELS = ("full data", "random real", "distilled, hard labels", "distilled, soft labels")
# A class needs this many times IPC training images: with fewer, the "distilled" set is a large share of
# the class and random real approaches full data (RetinaMNIST's rarest class has 66: no 50/class row).
MIN_POOL_RATIO = 2

# Targets from the issue (benchmark figures, not tests).
TARGET_MARGIN_POINTS = 5.0  # distilled 10/class must beat random real by this many accuracy points ...
TARGET_MARGIN_DATASETS = ("pneumoniamnist", "breastmnist")  # ... on these datasets
TARGET_MARGIN_IPC = 10
TARGET_FULL_FRACTION = 0.95  # distilled 50/class must reach this fraction of full-data accuracy ...
TARGET_FULL_DATASETS = ("pneumoniamnist",)  # ... on these
TARGET_FULL_IPC = 50


@dataclass(frozen=True)
class Profile:
    name: str
    purpose: str
    ipcs: tuple[int, ...]
    experts: int
    buffer_epochs: int
    iterations: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int | None  # None: `distill run`'s own window by IPC (the flag is left out)
    runs: int
    eval_epochs: int | None  # None: the share's recipe (300) and the evaluator's random-real default (300)
    full_epochs: int | None  # None: the evaluator's full-data default
    seed: int = 0
    # Snapshots per expert epoch; 0 = one per epoch (the reference). Small datasets have few
    # optimiser steps per epoch (BreastMNIST: 3), so matching in steps needs several (docs/method.md).
    snapshots_per_epoch: int = 0
    # Cap on synthetic images per student step (distill run --batch-syn); 0 = the whole set. On two
    # CPU cores an iteration costs time in proportion to this (PneumoniaMNIST, 1 thread: 20 images
    # about 5 s, 100 images about 40 s), so the CPU profiles draw minibatches at 50 images per class.
    max_batch_syn: int = 0
    # Cross-architecture rows: random real and both shares, evaluated under each of these models too,
    # at these IPCs (None: every IPC of the profile).
    cross_models: tuple[str, ...] = ("resnet18", "vgg11")
    cross_ipcs: tuple[int, ...] | None = None


PROFILES = {
    # Every stage runs, at a size two shared CPU cores finish in tens of minutes. The expert
    # buffer and the distillation are far too short to show what the method can do.
    "quick": Profile("quick", "CPU, minutes: shows the pipeline working end to end; not the method's accuracy",
                     ipcs=(1, 10, 50), experts=2, buffer_epochs=4, iterations=30, syn_steps=10, expert_epochs=2,
                     max_start_epoch=2, runs=3, eval_epochs=50, full_epochs=2, max_batch_syn=20, cross_ipcs=(1,)),
    # The largest run two CPU cores finish in a couple of hours: enough experts, snapshots and
    # iterations for distillation to do something. The targets' datasets (PneumoniaMNIST, BreastMNIST).
    "cpu": Profile("cpu", "CPU, hours: a small but real distillation at 1, 10 and 50 images per class",
                   ipcs=(1, 10, 50), experts=4, buffer_epochs=8, iterations=200, syn_steps=20, expert_epochs=2,
                   max_start_epoch=16, runs=3, eval_epochs=None, full_epochs=10, snapshots_per_epoch=3,
                   max_batch_syn=20, cross_ipcs=(10,)),
    # The protocol of issue 12's GPU measurements (15 experts x 20 epochs, 300 iterations of 20 student
    # steps, 3 networks with the share's recipe), split into chunks (--list-chunks) that each fit a
    # session; the start window is `distill run`'s own (by IPC).
    "paper": Profile("paper", "GPU: 15 experts x 20 epochs, 300 distillation iterations, the share's recipe, in chunks",
                     ipcs=(1, 10, 50), experts=15, buffer_epochs=20, iterations=300, syn_steps=20, expert_epochs=2,
                     max_start_epoch=None, runs=3, eval_epochs=None, full_epochs=50, snapshots_per_epoch=3),
}


@dataclass
class Row:
    dataset: str
    ipc: int | None  # None for full data
    label: str
    acc_mean: float | None = None  # accuracy in [0, 1]
    acc_std: float | None = None
    auc_mean: float | None = None
    auc_std: float | None = None
    runs: int = 0
    wall_seconds: float = 0.0
    commands: list[int] = field(default_factory=list)  # 1-based references into the command list
    note: str = ""  # why a row has no numbers


# ----------------------------------------------------------------------------- running commands


def distill_argv() -> list[str]:
    """The `distill` console script of this interpreter's environment, else `python -m distill.cli`."""
    script = Path(sys.executable).parent / "distill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "distill.cli"]


class NotRun(Exception):
    """--render-only met a step that no earlier attempt finished."""


class Runner:
    """Runs `distill ...` commands in order, records them, and skips those finished on an earlier attempt.

    A step runs only when its chunk is selected (``chunks``; None = all), ``render_only`` is off and
    fewer than ``max_seconds`` have passed since the Runner was made. Otherwise a step without a
    finished record raises NotRun, and its row is shown as not run.
    """

    def __init__(self, work: Path, env: dict[str, str], render_only: bool = False, chunks: set[str] | None = None,
                 max_seconds: float | None = None):
        self.work, self.env, self.render_only = work, env, render_only
        self.chunks, self.max_seconds, self.started = chunks, max_seconds, time.perf_counter()
        self.commands: list[str] = []
        self.total_seconds = 0.0  # summed per step, so a resumed benchmark still reports the whole cost
        self.walls: dict[str, float] = {}  # wall seconds of each command finished now or earlier

    def may_run(self, chunk: str) -> bool:
        if self.render_only or (self.chunks is not None and chunk not in self.chunks):
            return False
        return self.max_seconds is None or time.perf_counter() - self.started < self.max_seconds

    def __call__(self, key: str, args: list[str], chunk: str, resumable: Path | None = None) -> tuple[int, float]:
        """Run ``distill ARGS`` as part of ``chunk``; returns (1-based command reference, wall seconds).

        resumable: a run folder; when it holds a checkpoint from a stopped attempt, the step runs with --resume
        (the command shown stays the one that makes the result from scratch).
        """
        shown = "distill " + shlex.join(args)
        if shown in self.walls:  # a run or export shared by several rows: one command, counted once
            return self.commands.index(shown) + 1, self.walls[shown]
        self.commands.append(shown)
        ref = len(self.commands)
        record = self.work / "steps" / f"{key}.json"
        if record.exists():
            done = json.loads(record.read_text())
            if done.get("command") == shown and done.get("returncode") == 0:
                print(f"[{ref}] done earlier: {shown}", file=sys.stderr)
                self.total_seconds += float(done["wall_seconds"])
                self.walls[shown] = float(done["wall_seconds"])
                return ref, float(done["wall_seconds"])
        if not self.may_run(chunk):
            self.commands.pop()
            raise NotRun(shown)
        resume = resumable is not None and (resumable / "checkpoint.pt").exists()
        print(f"[{ref}] {shown}{' (resumed)' if resume else ''}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(distill_argv() + args + (["--resume"] if resume else []), env=self.env, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"Step {key} failed (exit {proc.returncode}): {shown}")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"command": shown, "returncode": 0, "wall_seconds": wall, "resumed": resume}) + "\n")
        self.total_seconds += wall
        self.walls[shown] = wall
        return ref, wall


def read_eval(path: Path) -> dict:
    """The single result of an eval JSON written with --json (one arm per command here)."""
    report = json.loads(path.read_text())
    if report.get("format") != "distill-eval" or not str(report.get("format_version", "")).startswith("1."):
        raise SystemExit(f"{path} is not a distill-eval 1.x report; delete it and run the benchmark again.")
    (result,) = report["results"]
    return result


def fill(row: Row, result: dict) -> Row:
    row.acc_mean, row.acc_std = result["mean"]["accuracy"], result["std"]["accuracy"]
    row.auc_mean, row.auc_std = result["mean"]["auc"], result["std"]["auc"]
    row.runs = len(result["runs"])
    return row


def class_counts(dataset: str) -> list[int]:
    from distill.data import class_counts as counts, load_data

    data = load_data(dataset)
    return counts(data.train.labels, data.num_classes)


def run_dataset(run: Runner, profile: Profile, dataset: str, ipcs: tuple[int, ...], device: str, work: Path) -> tuple[list[Row], dict]:
    p, d = profile, work / dataset
    common = ["--runs", str(p.runs), "--seed", str(p.seed), "--device", device]
    eval_epochs = ["--epochs", str(p.eval_epochs)] if p.eval_epochs else []
    rows: list[Row] = []

    full = Row(dataset, None, "full data")
    info: dict = {}
    try:
        ref, wall = run(f"{dataset}-full", ["eval", "--baseline", "full", "--train", dataset, "--test", dataset, *common,
                                            *(["--epochs", str(p.full_epochs)] if p.full_epochs else []),
                                            "--json", str(d / "full.json")], f"{dataset}:full")
        full.commands, full.wall_seconds = [ref], wall
        rows.append(fill(full, read_eval(d / "full.json")))
        test_counts = json.loads((d / "full.json").read_text())["test"]["class_counts"]
        info["majority_accuracy"] = max(test_counts) / sum(test_counts)
    except NotRun:
        full.note = NOT_RUN
        rows.append(full)

    buf = d / "buffer"
    counts = class_counts(dataset)
    snapshot = []
    if p.snapshots_per_epoch:
        steps_per_epoch = -(-sum(counts) // 256)  # the expert batch size, BufferConfig.batch_size
        snapshot = ["--snapshot-every", str(max(1, steps_per_epoch // p.snapshots_per_epoch))]
    try:
        info["buffer_command"], info["buffer_seconds"] = run(f"{dataset}-buffer", [
            "buffer", "--data", dataset, "--out", str(buf), "--experts", str(p.experts), "--epochs", str(p.buffer_epochs),
            *snapshot, "--seed", str(p.seed), "--device", device], f"{dataset}:buffer")
    except NotRun:
        pass
    for k in ipcs:
        chunk = f"{dataset}:{k}"
        cross = p.cross_models if p.cross_ipcs is None or k in p.cross_ipcs else ()
        if min(counts) < MIN_POOL_RATIO * k:
            why = f"a class has only {min(counts)} training images, fewer than {MIN_POOL_RATIO} × {k}"
            rows += [Row(dataset, k, label, note=why) for label in ROW_LABELS[1:]]
            continue
        for model in ("", *cross):
            on = ["--model", model] if model else []
            tag = f"-{model}" if model else ""
            rr = Row(dataset, k, _label("random real", model))
            try:
                ref, wall = run(f"{dataset}-random-{k}{tag}", [
                    "eval", "--baseline", "random-real", "--ipc", str(k), "--train", dataset, "--test", dataset, *on,
                    *common, *eval_epochs, "--json", str(d / f"random_{k}{tag}.json")], chunk)
                rr.commands, rr.wall_seconds = [ref], wall
                rows.append(fill(rr, read_eval(d / f"random_{k}{tag}.json")))
            except NotRun:
                rr.note = NOT_RUN
                rows.append(rr)
            n_syn = k * len(counts)
            batch = ["--batch-syn", str(p.max_batch_syn)] if p.max_batch_syn and n_syn > p.max_batch_syn else []
            for labels in ("hard", "soft"):
                row = Row(dataset, k, _label(f"distilled, {labels} labels", model))
                try:
                    row.commands, row.wall_seconds = _distilled(run, p, dataset, d, buf, k, labels, batch, device,
                                                                common, eval_epochs, model, chunk)
                except NotRun:
                    row.note = NOT_RUN
                    rows.append(row)
                    continue
                rows.append(fill(row, read_eval(d / f"distilled_{k}_{labels}{tag}.json")))
    return rows, info


def _label(what: str, model: str) -> str:
    """A row's label; rows under another model than the experts' name it."""
    return f"{what}, {model}" if model else what


def _distilled(run, p, dataset, d, buf, k, labels, batch, device, common, eval_epochs, model, chunk
               ) -> tuple[list[int], float]:
    """run -> export -> eval (under ``model``, "" for the recipe's) for one distilled row; returns its command
    references and wall seconds. The run and export are shared by every model's row and counted in each."""
    rundir, share = d / f"run_{k}_{labels}", d / f"share_{k}_{labels}.h5"
    window = ["--max-start-epoch", str(p.max_start_epoch)] if p.max_start_epoch is not None else []
    r1, w1 = run(f"{dataset}-run-{k}-{labels}", [
        "run", "--buffer", str(buf), "--out", str(rundir), "--ipc", str(k), "--iterations", str(p.iterations),
        "--syn-steps", str(p.syn_steps), "--expert-epochs", str(p.expert_epochs), *window, *batch,
        "--hard-labels" if labels == "hard" else "--soft-labels", "--seed", str(p.seed), "--device", device],
        chunk, resumable=rundir)
    # The benchmark measures accuracy, not privacy: `distill audit` is a separate check.
    r2, w2 = run(f"{dataset}-export-{k}-{labels}", ["export", str(rundir), "--out", str(share), "--force", "--overwrite"],
                 chunk)
    tag = f"-{model}" if model else ""
    r3, w3 = run(f"{dataset}-eval-{k}-{labels}{tag}", [
        "eval", str(share), "--test", dataset, "--baseline", "none", *(["--model", model] if model else []),
        *common, *eval_epochs, "--json", str(d / f"distilled_{k}_{labels}{tag}.json")], chunk)
    return [r1, r2, r3], w1 + w2 + w3


# ----------------------------------------------------------------------------- the markdown (pure functions)


def check_targets(rows: list[Row]) -> list[str]:
    """One sentence per target and distilled variant: met, not met, or not measured."""
    def find(dataset, ipc, label):
        return next((r for r in rows if r.dataset == dataset and r.ipc == ipc and r.label == label
                     and r.acc_mean is not None), None)

    out = []
    for ds in TARGET_MARGIN_DATASETS:
        base = find(ds, TARGET_MARGIN_IPC, "random real")
        for labels in ("hard", "soft"):
            dist = find(ds, TARGET_MARGIN_IPC, f"distilled, {labels} labels")
            what = f"{ds}, {TARGET_MARGIN_IPC}/class, {labels} labels: distilled ≥ random real + {TARGET_MARGIN_POINTS:g} points"
            if base is None or dist is None:
                out.append(f"{what}: not measured in this table.")
                continue
            gap = 100 * (dist.acc_mean - base.acc_mean)
            verdict = "met" if gap >= TARGET_MARGIN_POINTS else "NOT met"
            out.append(f"{what}: {verdict} ({100 * dist.acc_mean:.1f} vs {100 * base.acc_mean:.1f}, {gap:+.1f} points).")
    for ds in TARGET_FULL_DATASETS:
        full = find(ds, None, "full data")
        for labels in ("hard", "soft"):
            dist = find(ds, TARGET_FULL_IPC, f"distilled, {labels} labels")
            what = (f"{ds}, {TARGET_FULL_IPC}/class, {labels} labels: distilled ≥ {100 * TARGET_FULL_FRACTION:g}% of "
                    "full-data accuracy")
            if full is None or dist is None:
                out.append(f"{what}: not measured in this table.")
                continue
            ratio = dist.acc_mean / full.acc_mean
            verdict = "met" if ratio >= TARGET_FULL_FRACTION else "NOT met"
            out.append(f"{what}: {verdict} ({100 * dist.acc_mean:.1f} vs {100 * full.acc_mean:.1f}, "
                       f"{100 * ratio:.1f}%).")
    return out


def _pm(mean: float | None, std: float | None, scale: float, digits: int) -> str:
    return "–" if mean is None else f"{scale * mean:.{digits}f} ± {scale * (std or 0):.{digits}f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render_section(meta: dict, rows: list[Row], commands: list[str], buffers: dict[str, dict]) -> str:
    """The markdown for one profile: provenance, one table per dataset, targets, the exact commands."""
    p = meta["profile"]
    lines = [
        f"## Profile `{p['name']}`", "",
        f"{p['purpose']}.", "",
        f"- Hardware: {meta['hardware']}",
        f"- Software: {meta['software']}",
        f"- Commit: `{meta['commit']}`; finished {meta['finished']}; wall time of all commands "
        f"{_duration(meta['wall_seconds'])}.",
        f"- Settings: {p['experts']} experts × {p['buffer_epochs']} epochs"
        f"{', %d snapshots per epoch' % p['snapshots_per_epoch'] if p.get('snapshots_per_epoch') else ''}; "
        f"{p['iterations']} iterations of "
        f"{p['syn_steps']} student steps"
        f"{' on at most %d synthetic images each' % p['max_batch_syn'] if p.get('max_batch_syn') else ''}, "
        f"starting at snapshots up to {'auto (by IPC)' if p['max_start_epoch'] is None else p['max_start_epoch']}; "
        f"evaluation {p['runs']} runs per row, "
        f"{p['eval_epochs'] or 'recipe'} epochs (full data {p['full_epochs'] or 'default'}); seed {p['seed']}.",
        "- Accuracy and AUC on the dataset's official test split, mean ± sample std over the runs. "
        "Wall time of a distilled row covers `run`, `export` and `eval`; the shared expert buffer is listed "
        "under each table.", "",
    ]
    for ds in dict.fromkeys(r.dataset for r in rows):
        lines += [f"### {ds}", "", "| images/class | trained on | accuracy % | AUC | runs | wall time | commands |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.dataset == ds):
            ipc = "all" if r.ipc is None else str(r.ipc)
            if r.acc_mean is None:
                lines.append(f"| {ipc} | {r.label} | – | – | – | – | {'' if r.note.startswith('not run') else 'skipped: '}{r.note} |")
                continue
            refs = ", ".join(f"[{c}]" for c in r.commands)
            lines.append(f"| {ipc} | {r.label} | {_pm(r.acc_mean, r.acc_std, 100, 1)} | "
                         f"{_pm(r.auc_mean, r.auc_std, 1, 3)} | {r.runs} | {_duration(r.wall_seconds)} | {refs} |")
        if ds in buffers:
            b = buffers[ds]
            if "buffer_command" in b:
                lines += ["", f"Expert buffer: {_duration(b['buffer_seconds'])}, command [{b['buffer_command']}]."]
            if "majority_accuracy" in b:
                # Test splits are imbalanced: accuracy near this line means a network that learned little.
                lines += ["", f"Always predicting the most frequent test class scores "
                              f"{100 * b['majority_accuracy']:.1f} % accuracy (AUC 0.5)."]
        lines.append("")
    lines += ["### Targets", ""] + [f"- {t}" for t in check_targets(rows)] + [""]
    lines += ["### Commands", "", "Run from the repository root with `DISTILL_DATA` pointing at the MedMNIST files.", ""]
    lines += [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    return "\n".join(lines) + "\n"


HEADER = """# Results

Each marked section is written by `benchmarks/results.py`; do not edit those
by hand. Each names the profile and the hardware that produced it, and every
number in it comes from the commands listed under its table. The notes at the
end are written by hand.
"""


def merge_section(existing: str, profile: str, section: str) -> str:
    """Replace (or append) the marked section of ``profile`` and keep every other profile's section."""
    begin, end = f"<!-- results:{profile}:begin -->", f"<!-- results:{profile}:end -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if not existing.strip():
        return HEADER + "\n" + block
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(existing):
        return pattern.sub(lambda _: block, existing, count=1)
    return existing.rstrip() + "\n\n" + block


# ----------------------------------------------------------------------------- provenance


def hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"CPU {cpu}, {os.cpu_count()} logical cores"
    import torch

    if device != "cpu" and torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    elif device != "cpu":
        text += "; no GPU was available"
    return text


def software() -> str:
    from distill.io import software_versions

    return ", ".join(f"{k} {v}" for k, v in software_versions().items())


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        # The pages the benchmarks write do not count as changes to the code that produced them.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)docs/results.md", ":(exclude)docs/hospitals.md",
                                 ":(exclude)docs/privacy.md"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def chunk_names(profile: Profile, datasets: tuple[str, ...], ipcs: tuple[int, ...],
                counts: dict[str, list[int]] | None = None) -> list[str]:
    """Every chunk in the order the script runs them: per dataset full, buffer, then each IPC
    (with ``counts``, the training images per class, only the IPCs that every class allows).

    A chunk's steps depend only on earlier chunks of its dataset (an IPC chunk on the buffer).
    """
    def allowed(ds: str, k: int) -> bool:
        return counts is None or min(counts[ds]) >= MIN_POOL_RATIO * k

    return [f"{ds}:{part}" for ds in datasets
            for part in ("full", "buffer", *(str(k) for k in ipcs if allowed(ds, k)))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma list (default: all three)")
    ap.add_argument("--ipc", default=None, help="comma list of images per class (default: the profile's)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: write the table from the steps finished so far, marking the others not run")
    ap.add_argument("--chunk", action="append", default=None,
                    help="run only these chunks (DATASET:full, DATASET:buffer or DATASET:IPC; repeatable or a comma "
                         "list); every other step is taken from earlier sessions or shown as not run")
    ap.add_argument("--list-chunks", action="store_true", help="print the profile's chunks in order and exit")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no step after this many minutes (a step already running finishes)")
    ap.add_argument("--work", default=None, help="folder for buffers, runs, shares and eval JSONs "
                                                 "(default /tmp/distill-results-PROFILE)")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    ipcs = tuple(int(k) for k in args.ipc.split(",")) if args.ipc else profile.ipcs
    work = Path(args.work or f"/tmp/distill-results-{profile.name}")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISTILL_DATA", str(ROOT.parent / "shared" / "data"))
    env = dict(os.environ)

    sys.path.insert(0, str(ROOT))
    from distill.io import atomic_path

    if args.list_chunks:
        print("\n".join(chunk_names(profile, datasets, ipcs, {ds: class_counts(ds) for ds in datasets})))
        return
    chunks = None
    if args.chunk:
        chunks = {c.strip() for arg in args.chunk for c in arg.split(",") if c.strip()}
        unknown = sorted(chunks - set(chunk_names(profile, datasets, ipcs)))
        if unknown:
            raise SystemExit(f"Unknown chunk(s) {', '.join(unknown)}; see --list-chunks.")
    run = Runner(work, env, render_only=args.render_only, chunks=chunks,
                 max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    rows, buffers = [], {}
    for ds in datasets:
        ds_rows, buffers[ds] = run_dataset(run, profile, ds, ipcs, args.device, work)
        rows += ds_rows
    meta = {"profile": {**profile.__dict__}, "hardware": hardware(args.device), "software": software(),
            "commit": git_commit(), "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": run.total_seconds}
    section = render_section(meta, rows, run.commands, buffers)
    out = Path(args.out)
    existing = out.read_text() if out.exists() else ""
    with atomic_path(out) as tmp:
        tmp.write_text(merge_section(existing, profile.name, section))
    print(section)


if __name__ == "__main__":
    main()
