"""Several hospitals on the same split: the union of shares against federated learning -> docs/hospitals.md.

A benchmark script, not a test: CI never runs it. For each dataset, number of
sites N and Dirichlet alpha it runs, on one `distill split`:

    distill split DATA --sites N --alpha A           one .npz per site
    per site: distill buffer -> distill run -> distill export --force   (the site's share)
    distill eval SHARE_1 ... SHARE_N --baseline none                     (the union of shares)
    [python] per run: one network per site on its own real data, from one common initialisation
             -> local only (mean over sites, best site), one-round FedAvg of those networks,
                ensemble distillation (a student on the union of shares, labelled by the
                averaged soft predictions of the site networks, its images weighed as
                `distill eval` weighs them)
    distill eval --baseline full --train DATA                            (centralised, once per dataset)

and reports test accuracy and AUC (mean ± std over runs) with the bytes that
leave each site. The command-line steps go through `benchmarks/results.py`'s
Runner (recorded, skipped when done); the federated step is recorded the same way.

    python benchmarks/hospitals.py --profile cpu --device cpu         # 3 sites, 3 alphas, PneumoniaMNIST, < 30 min on 2 cores
    python benchmarks/hospitals.py --profile cpu6 --device cpu        # the target's 6 sites at alpha 0.3, ~20 min
    python benchmarks/hospitals.py --profile cpu-retina --device cpu  # RetinaMNIST, 3 sites
    python benchmarks/hospitals.py --profile cpu6-retina --device cpu  # RetinaMNIST, 6 sites, about an hour
    python benchmarks/hospitals.py --profile gpu --device cuda --budget-minutes 8   # repeat until complete
    bash benchmarks/gpu_hospitals.sh  # the gpu6 profile in one device call (see the script for how to call it)

``--budget-minutes M`` starts no new step after M minutes and renders the
unfinished rows as not run; the next call resumes where the last stopped, so a
long profile runs in chunks of about M minutes (plus the step in flight).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from results import NotRun, Runner, _duration, _pm, git_commit, hardware, merge_section, read_eval, software  # noqa: E402

NOT_RUN = "not run"
CHUNK = "all"  # results.Runner's chunk of every step here: this script chunks by --budget-minutes instead
EXPERT_BATCH = 256  # BufferConfig.batch_size: optimiser steps an epoch = ceil(images / 256)

# Targets from the issue, for N = 6 sites at alpha = 0.3 (benchmark figures, not tests).
TARGET_SITES, TARGET_ALPHA, TARGET_IPC = 6, "0.3", 10
TARGET_MARGIN_POINTS = 5.0  # the union must beat local-only and one-round FedAvg by this many accuracy points
TARGET_CENTRAL_POINTS = 3.0  # ... and come within this many points of centralised training ...
TARGET_CENTRAL_DATASETS = ("pneumoniamnist",)  # ... on these datasets

ROWS = ("local only, mean over sites", "local only, best site", "union of shares", "one-round FedAvg",
        "ensemble distillation", "centralised")


@dataclass(frozen=True)
class Profile:
    name: str
    purpose: str
    datasets: tuple[str, ...]
    sites: tuple[int, ...]
    alphas: tuple[str, ...]
    ipc: int
    experts: int
    buffer_epochs: int  # also the epochs of every real-data network (local, FedAvg's sites, centralised)
    iterations: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    snapshots_per_epoch: int  # expert snapshots per epoch where a site has the steps for it (as results.py)
    runs: int
    student_epochs: int  # epochs of the networks trained on shares (the share's recipe, via the run's eval_epochs)
    audit: bool  # run `distill audit` on every site's share before export
    seed: int = 0
    min_per_class: int = 1


PROFILES = {
    # Two CPU cores, under 30 minutes: PneumoniaMNIST, 3 sites, the three alphas. At 200 student
    # epochs an alpha took about 7 minutes (measured, 2026-12-01). Experts, distillation and real-data
    # networks are far shorter than the method needs; the table shows the comparison working end to
    # end, not what each arm can reach.
    "cpu": Profile("cpu", "CPU, 2 cores, under 30 minutes: 3 sites, α 0.3, 1.0 and IID, short experts and distillation",
                   datasets=("pneumoniamnist",), sites=(3,), alphas=("0.3", "1.0", "iid"), ipc=10, experts=2,
                   buffer_epochs=4, iterations=20, syn_steps=10, expert_epochs=2, max_start_epoch=4,
                   snapshots_per_epoch=2, runs=2, student_epochs=200, audit=False),
    # The target configuration (6 sites, alpha 0.3) at the cpu profile's settings.
    "cpu6": Profile("cpu6", "CPU, 2 cores, about 20 minutes: the target's 6 sites at α 0.3, the cpu profile's "
                    "settings", datasets=("pneumoniamnist",), sites=(6,), alphas=("0.3",), ipc=10, experts=2,
                    buffer_epochs=4, iterations=20, syn_steps=10, expert_epochs=2, max_start_epoch=4,
                    snapshots_per_epoch=2, runs=2, student_epochs=200, audit=False),
    # cpu6 with five times the distillation iterations: does a better distilled share move the union?
    "cpu6-long": Profile("cpu6-long", "CPU, 2 cores, an estimated 30 minutes: cpu6 (6 sites, α 0.3) with 100 distillation "
                         "iterations instead of 20", datasets=("pneumoniamnist",), sites=(6,), alphas=("0.3",), ipc=10,
                         experts=2, buffer_epochs=4, iterations=100, syn_steps=10, expert_epochs=2, max_start_epoch=4,
                         snapshots_per_epoch=2, runs=2, student_epochs=200, audit=False),
    # RetinaMNIST (5 grades, RGB, 1,080 training images) at the cpu profile's settings, 3 sites.
    "cpu-retina": Profile("cpu-retina", "CPU, 2 cores, about 35 minutes: RetinaMNIST, 3 sites, α 0.3, 1.0 and IID, "
                          "the cpu profile's settings", datasets=("retinamnist",), sites=(3,),
                          alphas=("0.3", "1.0", "iid"), ipc=10, experts=2, buffer_epochs=4, iterations=20,
                          syn_steps=10, expert_epochs=2, max_start_epoch=4, snapshots_per_epoch=2, runs=2,
                          student_epochs=200, audit=False),
    # RetinaMNIST at the target's 6 sites, the cpu profile's settings. Distillation is per site, so this
    # costs about twice cpu-retina's distillation time (estimated from cpu-retina's steps).
    "cpu6-retina": Profile("cpu6-retina", "CPU, 2 cores, about an hour: RetinaMNIST, 6 sites, α 0.3, 1.0 and IID, "
                           "the cpu profile's settings", datasets=("retinamnist",), sites=(6,),
                           alphas=("0.3", "1.0", "iid"), ipc=10, experts=2, buffer_epochs=4, iterations=20,
                           syn_steps=10, expert_epochs=2, max_start_epoch=4, snapshots_per_epoch=2, runs=2,
                           student_epochs=200, audit=False),
    # Minutes on a CPU: checks that every step of the script runs; its numbers mean nothing.
    "smoke": Profile("smoke", "CPU, minutes: every step once, numbers meaningless",
                     datasets=("pneumoniamnist",), sites=(3,), alphas=("0.3",), ipc=2, experts=1, buffer_epochs=1,
                     iterations=2, syn_steps=2, expert_epochs=1, max_start_epoch=1, snapshots_per_epoch=1, runs=2,
                     student_epochs=5, audit=False),
    # The targets' configuration alone (PneumoniaMNIST, 6 sites, alpha 0.3), sized by estimate to finish in
    # one device call of about 8 minutes (benchmarks/gpu_hospitals.sh). The gpu profile's settings for these
    # 6 sites alone are estimated at more than a session's 15 minutes of device time. Not yet measured.
    "gpu6": Profile("gpu6", "GPU, one call of an estimated 5 to 10 minutes: the targets' 6 sites at α 0.3, 10× the cpu profiles' "
                    "distillation", datasets=("pneumoniamnist",), sites=(6,), alphas=("0.3",), ipc=10, experts=5,
                    buffer_epochs=20, iterations=200, syn_steps=20, expert_epochs=2, max_start_epoch=10,
                    snapshots_per_epoch=1, runs=3, student_epochs=300, audit=False),
    # The grid on one GPU, each step well under 8 minutes, so `--budget-minutes 8` chunks it.
    "gpu": Profile("gpu", "GPU, in 8-minute chunks: the issue's grid, 3 and 6 sites, PneumoniaMNIST and RetinaMNIST",
                   datasets=("pneumoniamnist", "retinamnist"), sites=(3, 6), alphas=("0.3", "1.0", "iid"), ipc=10,
                   experts=10, buffer_epochs=20, iterations=500, syn_steps=20, expert_epochs=2, max_start_epoch=10,
                   snapshots_per_epoch=1, runs=5, student_epochs=300, audit=True),
}


@dataclass
class Row:
    dataset: str
    sites: int
    alpha: str
    label: str
    acc_mean: float | None = None
    acc_std: float | None = None
    auc_mean: float | None = None
    auc_std: float | None = None
    runs: int = 0
    bytes_out: str = "–"  # what leaves each site
    commands: list[int] = field(default_factory=list)
    note: str = ""


def mean_std(values: list[float]) -> tuple[float, float]:
    from distill.metrics import mean_std as ms

    return ms(values)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# ----------------------------------------------------------------------------- the federated step (python)


def federated(split_dir: Path, shares: list[Path], dataset: str, p: Profile, device: str) -> dict:
    """Local, FedAvg and ensemble-distillation scores per run; a JSON-able dict.

    Every real-data network uses the recipe of `distill eval --baseline full` (SGD 0.01, momentum 0.9,
    weight decay 5e-4, decay at half, the experts' augmentation) for ``p.buffer_epochs`` epochs and the
    mean/std of the whole training split, the normalisation sites would agree on in a federation. Run
    r's site networks all start from the same weights (FedAvg averages networks of one initialisation).
    """
    import torch

    from distill.augment import Augment
    from distill.data import fit_preprocessing, load_data
    from distill.distributed import resolve_device
    from distill.config import EvalConfig
    from distill.evaluate import DEFAULT_AUGMENT, REAL_LR, join_shares, load_shares, renormalise
    from distill.metrics import classification_metrics
    from distill.models import create_model
    from distill.seeding import generator, seeded
    from distill.formats.sites_split import read_sites_split
    from distill.sites import average_predictions, fedavg
    from distill.train import TrainRecipe, predict, train_network

    dev = resolve_device(device)
    record = read_sites_split(split_dir)
    sites = [load_data(split_dir / s["path"]) for s in record["site_files"]]
    whole = load_data(dataset)
    common = fit_preprocessing(whole.train.images)
    k, c, size = whole.num_classes, whole.channels, whole.size
    x_test, y_test = common(whole.test.images).to(dev), whole.test.labels
    recipe = TrainRecipe(epochs=p.buffer_epochs, lr=REAL_LR, augment=Augment.parse(DEFAULT_AUGMENT))
    sizes = [len(s.train) for s in sites]

    # The student sees the union exactly as `distill eval` trains on it (its default --share-weights), so this
    # row and the union's differ only in the labels.
    union = join_shares(load_shares([str(s) for s in shares]), share_weights=EvalConfig.share_weights)
    weights = None if union.weights is None else union.weights.to(dev)
    student_recipe = TrainRecipe.following(union.recipe)
    x_union_share = union.images.to(dev)  # the first share's input space: the student's
    x_union_common = renormalise(union.images, union.preprocessing, common).to(dev)  # the site networks'
    x_test_share = union.preprocessing(whole.test.images).to(dev)
    model_kwargs = dict(union.recipe.model_kwargs)

    out = {"local": [], "fedavg": [], "ensemble": [], "sizes": sizes}
    for run in range(p.runs):
        with seeded(p.seed, run, 0):  # evaluate.MODEL_KEY: the same initial weights as `distill eval`'s run r
            init = create_model(union.recipe.model, k, c, size, **model_kwargs).state_dict()
        nets = []
        for i, site in enumerate(sites):
            net = create_model(union.recipe.model, k, c, size, **model_kwargs)
            net.load_state_dict(init)
            net.to(dev)
            train_network(net, common(site.train.images).to(dev), site.train.labels.to(dev), recipe,
                          generator(p.seed, run, 1, i))
            nets.append(net)
        out["local"].append([classification_metrics(predict(n, x_test).cpu(), y_test) for n in nets])
        avg = create_model(union.recipe.model, k, c, size, **model_kwargs).to(dev)
        avg.load_state_dict(fedavg([n.state_dict() for n in nets], weights=sizes))
        out["fedavg"].append(classification_metrics(predict(avg, x_test).cpu(), y_test))
        soft = average_predictions(nets, x_union_common)
        with seeded(p.seed, run, 0):
            student = create_model(union.recipe.model, k, c, size, **model_kwargs)
        student.to(dev)
        train_network(student, x_union_share, soft, student_recipe, generator(p.seed, run, 1), weights=weights)
        out["ensemble"].append(classification_metrics(predict(student, x_test_share).cpu(), y_test))
    out["model_bytes"] = sum(t.numel() * t.element_size() for t in nets[0].state_dict().values())
    return out


def _strip(metrics: dict) -> dict:
    return {"accuracy": metrics["accuracy"], "auc": metrics["auc"]}


def run_federated(run: Runner, key: str, *args) -> tuple[dict, float]:
    """The python step, recorded as the CLI steps are: skipped when done, NotRun past the budget."""
    record = run.work / "steps" / f"{key}.json"
    if record.exists():
        done = json.loads(record.read_text())
        run.total_seconds += done["wall_seconds"]
        return done["result"], done["wall_seconds"]
    if run.render_only:
        raise NotRun(key)
    print(f"[python] federated step {key}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    result = federated(*args)
    wall = time.perf_counter() - t0
    result = {**result, "local": [[_strip(m) for m in ms] for ms in result["local"]],
              "fedavg": [_strip(m) for m in result["fedavg"]], "ensemble": [_strip(m) for m in result["ensemble"]]}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"result": result, "wall_seconds": wall}) + "\n")
    run.total_seconds += wall
    return result, wall


# ----------------------------------------------------------------------------- one split


class Budget:
    """Turns the runner to render-only once ``minutes`` have passed, so no new step starts."""

    def __init__(self, run: Runner, minutes: float | None):
        self.run, self.deadline = run, None if minutes is None else time.monotonic() + 60 * minutes

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.run.render_only = True


def site_pipeline(run: Runner, budget: Budget, p: Profile, tag: str, site_npz: Path, counts: list[int], d: Path,
                  device: str) -> tuple[Path, list[int]]:
    """buffer -> run -> (audit) -> export for one site; returns its share and command references."""
    buf, rundir, share = d / "buffer", d / "run", d / "share.h5"
    conf = d / "run.toml"
    d.mkdir(parents=True, exist_ok=True)
    # The share's recipe epochs are the run's eval_epochs; one network at the end is enough to check the set.
    conf.write_text(f"eval_models = 1\neval_epochs = {p.student_epochs}\n")
    # A small site has few optimiser steps an epoch (75 images: one batch), so snapshots and the latest
    # start follow its size: the start plus the span must fit in the intervals its experts store.
    steps_per_epoch = -(-sum(counts) // EXPERT_BATCH)
    every = max(1, steps_per_epoch // p.snapshots_per_epoch)
    intervals = steps_per_epoch * p.buffer_epochs // every
    max_start = max(0, min(p.max_start_epoch, intervals - p.expert_epochs))
    refs = []
    budget.check()
    refs.append(run(f"{tag}-buffer", ["buffer", "--data", str(site_npz), "--out", str(buf), "--experts", str(p.experts),
                                      "--epochs", str(p.buffer_epochs), "--snapshot-every", str(every),
                                      "--seed", str(p.seed), "--device", device], CHUNK)[0])
    # --init real draws ipc real images per class; at a site with fewer, real-or-noise keeps that class's few real
    # images and starts the rest of it from noise (sections rendered before this showed --init noise: all from noise).
    init = "real" if min(counts) >= p.ipc else "real-or-noise"
    budget.check()
    refs.append(run(f"{tag}-run", ["run", "--buffer", str(buf), "--out", str(rundir), "--ipc", str(p.ipc),
                                   "--iterations", str(p.iterations), "--syn-steps", str(p.syn_steps),
                                   "--expert-epochs", str(p.expert_epochs), "--max-start-epoch", str(max_start),
                                   "--init", init, "--eval-every", "0", "--config", str(conf), "--seed", str(p.seed),
                                   "--device", device], CHUNK, resumable=rundir)[0])
    if p.audit:
        budget.check()
        refs.append(run(f"{tag}-audit", ["audit", str(rundir), "--data", str(site_npz), "--seed", str(p.seed),
                                         "--device", device], CHUNK)[0])
    budget.check()
    refs.append(run(f"{tag}-export", ["export", str(rundir), "--out", str(share), "--force"], CHUNK)[0])
    return share, refs


def run_split(run: Runner, budget: Budget, p: Profile, dataset: str, n: int, alpha: str, device: str,
              work: Path) -> list[Row]:
    d = work / dataset / f"sites{n}-alpha{alpha}"
    rows = {label: Row(dataset, n, alpha, label) for label in ROWS[:-1]}
    common = ["--runs", str(p.runs), "--seed", str(p.seed), "--device", device]
    try:
        budget.check()
        ref_split = run(f"{dataset}-{n}-{alpha}-split", ["split", dataset, "--sites", str(n), "--alpha", alpha,
                                                          "--min-per-class", str(p.min_per_class),
                                                          "--seed", str(p.seed), "--out", str(d / "split")],
                        CHUNK)[0]
        from distill.formats.sites_split import read_sites_split

        record = read_sites_split(d / "split")
        shares, refs = [], [ref_split]
        for s in record["site_files"]:
            share, r = site_pipeline(run, budget, p, f"{dataset}-{n}-{alpha}-site{s['site']}",
                                     d / "split" / s["path"], s["class_counts"], d / f"site-{s['site']}", device)
            shares.append(share)
            refs += r
        budget.check()
        ref_union = run(f"{dataset}-{n}-{alpha}-union", ["eval", *map(str, shares), "--test", dataset,
                                                         "--baseline", "none", *common,
                                                         "--json", str(d / "union.json")], CHUNK)[0]
        budget.check()
        fed, _ = run_federated(run, f"{dataset}-{n}-{alpha}-federated", d / "split", shares, dataset, p, device)
    except NotRun:
        for r in rows.values():
            r.note = NOT_RUN
        return list(rows.values())

    noise = [str(s["site"]) for s in record["site_files"] if min(s["class_counts"]) < p.ipc]
    share_bytes = [s.stat().st_size for s in shares]
    share_text = f"share {_size(np.mean(share_bytes))}"
    model_text = f"model {_size(fed['model_bytes'])}"

    union = rows["union of shares"]
    result = read_eval(d / "union.json")
    union.acc_mean, union.acc_std = result["mean"]["accuracy"], result["std"]["accuracy"]
    union.auc_mean, union.auc_std = result["mean"]["auc"], result["std"]["auc"]
    union.runs, union.bytes_out, union.commands = len(result["runs"]), share_text, refs + [ref_union]
    notes = []
    moved = result["trained_on"].get("label_prior", {"prior": "shared"})
    if moved.get("prior") != "shared":
        notes.append(f"soft labels moved to the {moved['prior']} class mix (`--label-prior`)")
    if result["trained_on"].get("share_weights", {"weights": "equal"})["weights"] != "equal":
        notes.append("images weighed by the real images behind them (`--share-weights`)")
    if noise:
        notes.append(f"--init real-or-noise at site(s) {', '.join(noise)} (a class with fewer than {p.ipc} images)")
    union.note = "; ".join(notes)

    def put(row: Row, runs: list[dict], bytes_out: str) -> None:
        row.acc_mean, row.acc_std = mean_std([m["accuracy"] for m in runs])
        row.auc_mean, row.auc_std = mean_std([m["auc"] for m in runs])
        row.runs, row.bytes_out = len(runs), bytes_out

    # Local only: per run, the mean over sites; the best site is the one with the best mean accuracy over runs.
    per_run_mean = [{"accuracy": float(np.mean([m["accuracy"] for m in ms])), "auc": float(np.mean([m["auc"] for m in ms]))}
                    for ms in fed["local"]]
    put(rows["local only, mean over sites"], per_run_mean, "nothing")
    # Chosen after the fact on test accuracy: an optimistic bound on what one hospital alone reaches.
    best = max(range(n), key=lambda i: np.mean([ms[i]["accuracy"] for ms in fed["local"]]))
    put(rows["local only, best site"], [ms[best] for ms in fed["local"]], "nothing")
    rows["local only, best site"].note = f"site {best}, {fed['sizes'][best]} images (chosen on test accuracy)"
    put(rows["one-round FedAvg"], fed["fedavg"], model_text)
    put(rows["ensemble distillation"], fed["ensemble"], f"{share_text} + {model_text}")
    rows["ensemble distillation"].commands = refs  # the shares; the labels come from federated()
    rows["local only, mean over sites"].note = "sites " + ", ".join(
        f"{s['images']} ({'/'.join(map(str, s['class_counts']))})" for s in record["site_files"])
    return list(rows.values())


def run_central(run: Runner, budget: Budget, p: Profile, dataset: str, sites: tuple[int, ...], device: str,
                work: Path) -> Row:
    row = Row(dataset, 0, "–", "centralised")
    path = work / dataset / "central.json"
    try:
        budget.check()
        ref = run(f"{dataset}-central", ["eval", "--baseline", "full", "--train", dataset, "--test", dataset,
                                         "--epochs", str(p.buffer_epochs), "--runs", str(p.runs), "--seed", str(p.seed),
                                         "--device", device, "--json", str(path)], CHUNK)[0]
    except NotRun:
        row.note = NOT_RUN
        return row
    result = read_eval(path)
    row.acc_mean, row.acc_std = result["mean"]["accuracy"], result["std"]["accuracy"]
    row.auc_mean, row.auc_std = result["mean"]["auc"], result["std"]["auc"]
    row.runs, row.commands = len(result["runs"]), [ref]
    from distill.data import load_data

    train = load_data(dataset).train
    total = train.images.numel() + train.labels.numel()  # uint8 pixels and labels
    row.bytes_out = "all its images: " + ", ".join(f"{_size(total / n)} at {n} sites" for n in sites)
    return row


# ----------------------------------------------------------------------------- the markdown


def check_targets(rows: list[Row], central: dict[str, Row]) -> list[str]:
    """One sentence per target: met, not met by how much, or not measured.

    Where the table has the target's alpha at another number of sites, the same comparisons follow,
    marked as indicative only.
    """
    def find(ds, n, alpha, label):
        return next((r for r in rows if (r.dataset, r.sites, r.alpha, r.label) == (ds, n, alpha, label)
                     and r.acc_mean is not None), None)

    out = []
    for ds in dict.fromkeys(r.dataset for r in rows):
        others = sorted({r.sites for r in rows if r.dataset == ds and r.alpha == TARGET_ALPHA
                         and r.sites != TARGET_SITES and r.acc_mean is not None})
        for n in (TARGET_SITES, *others):
            tag = "" if n == TARGET_SITES else f" [indicative only: {n} sites, not the target's {TARGET_SITES}]"
            union = find(ds, n, TARGET_ALPHA, "union of shares")
            pairs = [(f"union of {TARGET_IPC}/class shares ≥ {other} + {TARGET_MARGIN_POINTS:g} points",
                      find(ds, n, TARGET_ALPHA, other), False)
                     for other in ("local only, mean over sites", "local only, best site", "one-round FedAvg")]
            if ds in TARGET_CENTRAL_DATASETS:
                c = central.get(ds)
                pairs.append((f"union within {TARGET_CENTRAL_POINTS:g} points of centralised",
                              c if c is not None and c.acc_mean is not None else None, True))
            for what, base, is_central in pairs:
                what = f"{ds}, {n} sites, α {TARGET_ALPHA}: {what}"
                if union is None or base is None:
                    if not tag:
                        out.append(f"{what}: not measured in this table.")
                    continue
                gap = 100 * (union.acc_mean - base.acc_mean)
                if is_central:
                    short = -gap - TARGET_CENTRAL_POINTS
                else:
                    short = TARGET_MARGIN_POINTS - gap
                verdict = "met" if short <= 0 else f"NOT met by {short:.1f} points"
                out.append(f"{what}: {verdict} ({100 * union.acc_mean:.1f} vs {100 * base.acc_mean:.1f}, "
                           f"{gap:+.1f}){tag}.")
    return out


def render_section(meta: dict, rows: list[Row], central: dict[str, Row], commands: list[str]) -> str:
    p = meta["profile"]
    if commands:
        ran = [f"- Hardware: {meta['hardware']}", f"- Software: {meta['software']}",
               f"- Commit: `{meta['commit']}`; finished {meta['finished']}; wall time of all steps "
               f"{_duration(meta['wall_seconds'])}."]
    else:
        ran = ["- **Not run**: no step of this profile has been run yet (the page was rendered with "
               "`--render-only`); every row below is a plan, without numbers."]
    lines = [
        f"## Profile `{p['name']}`", "", f"{p['purpose']}.", "", *ran,
        f"- Split: seed {p['seed']}, at least {p['min_per_class']} image(s) of every class per site; val and test "
        "are the dataset's own, the same at every site.",
        f"- Each site: {p['experts']} experts × {p['buffer_epochs']} epochs ({p['snapshots_per_epoch']} snapshot(s) "
        f"an epoch where the site has the steps), {p['iterations']} iterations of "
        f"{p['syn_steps']} student steps at {p['ipc']} images/class, {'audited' if p['audit'] else 'not audited'}, "
        "exported (`--force`).",
        f"- Real-data networks (local, FedAvg's sites, ensemble teachers, centralised): {p['buffer_epochs']} epochs, "
        f"the `distill eval --baseline full` recipe. Networks on shares: {p['student_epochs']} epochs, the share's recipe.",
        f"- Accuracy and AUC on the official test split, mean ± sample std over {p['runs']} runs. "
        "Bytes: what one site sends (mean over sites); a model is its float32 state dict.", "",
    ]
    for ds in dict.fromkeys(r.dataset for r in rows):
        lines += [f"### {ds}", "", "| sites | α | arm | accuracy % | AUC | runs | leaves each site | commands | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in rows if r.dataset == ds] + ([central[ds]] if ds in central else []):
            n = "all" if r.label == "centralised" else str(r.sites)
            refs = ", ".join(f"[{c}]" for c in r.commands) if len(r.commands) <= 3 else \
                f"[{r.commands[0]}]–[{r.commands[-1]}]"
            if r.label != "union of shares" and r.label != "centralised":
                refs = "federated()" + (f" on {refs}" if refs else "")
            if r.acc_mean is None:
                lines.append(f"| {n} | {r.alpha} | {r.label} | – | – | – | – | – | {r.note} |")
                continue
            lines.append(f"| {n} | {r.alpha} | {r.label} | {_pm(r.acc_mean, r.acc_std, 100, 1)} | "
                         f"{_pm(r.auc_mean, r.auc_std, 1, 3)} | {r.runs} | {r.bytes_out} | {refs} | {r.note} |")
        lines.append("")
    lines += ["### Targets", "", "The issue's targets are for 6 sites at α 0.3.", ""]
    lines += [f"- {t}" for t in check_targets(rows, central)] + [""]
    lines += ["### Commands", "", "Run from the repository root with `DISTILL_DATA` pointing at the MedMNIST files. "
              "The FedAvg, local-only and ensemble rows come from `federated()` in benchmarks/hospitals.py, run after "
              "the union's eval on the same split and shares.", ""]
    lines += [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    return "\n".join(lines) + "\n"


HEADER = """# Several hospitals: the union of shares against federated learning

The hand-written part below explains the comparison; each marked section is
written by `benchmarks/hospitals.py` and names the profile and hardware that
produced it.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--datasets", default=None, help="comma list (default: the profile's)")
    ap.add_argument("--sites", default=None, help="comma list of site counts (default: the profile's)")
    ap.add_argument("--alphas", default=None, help="comma list of alphas or iid (default: the profile's)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "hospitals.md"))
    ap.add_argument("--work", default=None, help="folder for splits, buffers, runs, shares and JSONs "
                                                 "(default /tmp/distill-hospitals-PROFILE)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="start no new step after this many minutes; run again to continue")
    ap.add_argument("--render-only", action="store_true", help="run nothing: write the table from finished steps")
    args = ap.parse_args(argv)
    p = PROFILES[args.profile]
    pick = lambda text, default, conv=str: tuple(conv(x.strip()) for x in text.split(",")) if text else default  # noqa: E731
    datasets, sites, alphas = pick(args.datasets, p.datasets), pick(args.sites, p.sites, int), pick(args.alphas, p.alphas)
    work = Path(args.work or f"/tmp/distill-hospitals-{p.name}")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISTILL_DATA", str(ROOT.parent / "shared" / "data"))

    from distill.io import atomic_path

    run = Runner(work, dict(os.environ), render_only=args.render_only)
    budget = Budget(run, args.budget_minutes)
    rows, central = [], {}
    for ds in datasets:
        central[ds] = run_central(run, budget, p, ds, sites, args.device, work)  # first: every target needs it
        for n in sites:
            for alpha in alphas:
                rows += run_split(run, budget, p, ds, n, alpha, args.device, work)
    meta = {"profile": {**asdict(p), "datasets": datasets, "sites": sites, "alphas": alphas},
            "hardware": hardware(args.device), "software": software(), "commit": git_commit(),
            "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": run.total_seconds}
    section = render_section(meta, rows, central, run.commands)
    out = Path(args.out)
    existing = out.read_text() if out.exists() else HEADER
    with atomic_path(out) as tmp:
        tmp.write_text(merge_hospitals(existing, p.name, section))
    print(section)


def merge_hospitals(existing: str, profile: str, section: str) -> str:
    """results.merge_section with this page's markers (``<!-- hospitals:PROFILE:begin -->``)."""
    ours, theirs = "<!-- hospitals:", "<!-- results:"
    return merge_section(existing.replace(ours, theirs), profile, section).replace(theirs, ours)


if __name__ == "__main__":
    main()
