"""The privacy-utility table of DP shares -> docs/privacy.md (section ``dp-table:PROFILE``).

A benchmark script, not a test: CI never runs it. For each dataset and each
epsilon it drives the command line exactly as a hospital would:

    epsilon finite:  distill buffer --dp-epsilon E --dp-init class-means -> distill run --init dp-means
                     -> distill audit -> distill export -> distill eval SHARE --baseline none
                     distill eval --baseline dp-sgd --epsilon E            (DP-SGD direct, same budget)
    epsilon = inf:   distill buffer -> distill run (--init real, the non-DP share) -> audit -> export -> eval
    once:            distill eval --baseline random-real --ipc K ; distill eval --baseline full

and writes one table: test accuracy and AUC (mean ± std over the profile's
runs) with the audit's verdict for each share. Steps go through
`benchmarks/results.py`'s Runner: recorded, skipped when done, so an
interrupted table resumes; ``--max-minutes`` starts no step after that long.

    python benchmarks/dp_table.py --profile cpu --device cpu
    python benchmarks/dp_table.py --profile cpu --datasets breastmnist --epsilons 8
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from distill.dp import STATS_FRACTION, STATS_POOL  # noqa: E402

FIRST_STATS_FRACTION = 0.1  # the class means' part before --dp-stats-fraction; rows made with it keep their names
from results import NotRun, Runner, _duration, _pm, git_commit, hardware, read_eval, software  # noqa: E402

CHUNK = "all"
NOT_RUN = "not run"
INF = math.inf
EXPERT_BATCH = 256  # BufferConfig.batch_size
SNAPSHOTS_PER_EPOCH = 3


@dataclass(frozen=True)
class Profile:
    name: str
    purpose: str
    ipc: int
    experts: int
    epochs: int
    snapshot_every: int
    iterations: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    runs: int
    eval_epochs: int | None  # None: the share's recipe
    full_epochs: int
    direct_runs: int = 2  # DP-SGD direct networks per row (each one is a whole DP-SGD training on the real data)
    audit_networks: int = 1
    audit_epochs: int = 50
    seed: int = 0


PROFILES = {
    # What two shared CPU cores finish in well under an hour per dataset; far from the paper's protocol.
    "cpu": Profile("cpu", "CPU: 2 experts x 6 epochs, 60 iterations of 10 student steps, 10 images per class, "
                          "hard labels", ipc=10, experts=2, epochs=6, snapshot_every=6, iterations=60, syn_steps=10,
                   expert_epochs=2, max_start_epoch=2, runs=3, eval_epochs=None, full_epochs=10),
    # The smallest settings that exercise every step (minutes): a smoke test of the script, not a result.
    "smoke": Profile("smoke", "smoke: every step at toy settings; not a result", ipc=2, experts=1, epochs=1,
                     snapshot_every=2, iterations=3, syn_steps=4, expert_epochs=1, max_start_epoch=0, runs=1,
                     eval_epochs=5, full_epochs=1, audit_epochs=2),
}


@dataclass
class Row:
    dataset: str
    label: str
    epsilon: float | None
    acc: tuple[float, float] | None = None
    auc: tuple[float, float] | None = None
    runs: int = 0
    audit: str = ""
    commands: list[int] = field(default_factory=list)
    note: str = ""


def eps_tag(e: float) -> str:
    return "inf" if e == INF else f"{e:g}"


def fill(row: Row, result: dict) -> Row:
    row.acc = (result["mean"]["accuracy"], result["std"]["accuracy"])
    row.auc = (result["mean"]["auc"], result["std"]["auc"])
    row.runs = len(result["runs"])
    return row


def audit_verdict(path: Path) -> str:
    """The audit's verdict and the loss attack's AUC on the share, from RUNDIR/audit.json."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return "no audit"
    verdict = "PASS" if report.get("passed") else "FAIL"
    share = report.get("summary", {}).get("membership", {}).get("share", {})
    auc = share.get("loss", {}).get("auc", {}).get("value")
    return verdict + (f", loss-attack AUC {auc:.3f}" if isinstance(auc, (int, float)) else "")


def snapshot_every(p: Profile, ds: str) -> int:
    """About SNAPSHOTS_PER_EPOCH snapshots an epoch (PneumoniaMNIST: every 6 of 19 steps; BreastMNIST: every
    step of 3), so that the start window and span fit a small dataset too (docs/method.md); the profile's
    value is the cap."""
    from results import class_counts

    steps = -(-sum(class_counts(ds)) // EXPERT_BATCH)
    return max(1, min(p.snapshot_every, steps // SNAPSHOTS_PER_EPOCH))


def share_pipeline(run: Runner, p: Profile, ds: str, eps: float, device: str, work: Path,
                   dp_lr: float | None = None) -> Row:
    tag = eps_tag(eps)
    dp = eps != INF
    if dp and dp_lr is not None:  # the experts' SGD step size, for DP buffers only (default: BufferConfig.lr)
        tag = f"{tag}-lr{dp_lr:g}"
    if dp and STATS_POOL != 1:  # the class means' release grid: a new grid is a new row, not a reused one
        tag = f"{tag}-pool{STATS_POOL}"
    if dp and STATS_FRACTION != FIRST_STATS_FRACTION:  # so is a new part of the budget for the means
        tag = f"{tag}-frac{STATS_FRACTION:g}"
    d = work / ds / f"eps-{tag}"
    grid = f", class means on a 1/{STATS_POOL} grid" if STATS_POOL != 1 else ""
    if STATS_FRACTION != FIRST_STATS_FRACTION:
        grid += f", {STATS_FRACTION:g} of ε for them"
    label = f"DP share (ε = {eps_tag(eps)}{f', experts at lr {dp_lr:g}' if dp and dp_lr is not None else ''}{grid})" \
        if dp else "share without DP (--init real)"
    row = Row(ds, label, None if not dp else eps)
    common = ["--seed", str(p.seed), "--device", device]
    buf = ["buffer", "--data", ds, "--out", str(d / "buffer"), "--experts", str(p.experts), "--epochs", str(p.epochs),
           "--snapshot-every", str(snapshot_every(p, ds))]
    if dp:
        buf += ["--dp-epsilon", f"{eps:g}", "--dp-init", "class-means"] + (["--lr", f"{dp_lr:g}"] if dp_lr else [])
    try:
        row.commands.append(run(f"{ds}-{tag}-buffer", buf + common, CHUNK)[0])
        r = ["run", "--buffer", str(d / "buffer"), "--out", str(d / "run"), "--ipc", str(p.ipc),
             "--iterations", str(p.iterations), "--syn-steps", str(p.syn_steps), "--expert-epochs", str(p.expert_epochs),
             "--max-start-epoch", str(p.max_start_epoch), "--eval-every", "0", "--hard-labels"]
        if dp:
            r += ["--init", "dp-means"]
        row.commands.append(run(f"{ds}-{tag}-run", r + common, CHUNK, resumable=d / "run")[0])
        row.commands.append(_audit(run, ds, tag, d, p, common))
        row.audit = audit_verdict(d / "run" / "audit.json")
        row.commands.append(run(f"{ds}-{tag}-export", ["export", str(d / "run"), "--out", str(d / "share.h5"),
                                                       "--force", "--overwrite"], CHUNK)[0])
        ev = ["eval", str(d / "share.h5"), "--test", ds, "--baseline", "none", "--runs", str(p.runs),
              "--json", str(d / "eval.json")] + common
        if p.eval_epochs:
            ev += ["--epochs", str(p.eval_epochs)]
        row.commands.append(run(f"{ds}-{tag}-eval", ev, CHUNK)[0])
        fill(row, read_eval(d / "eval.json"))
    except NotRun:
        row.note = NOT_RUN
    return row


def _audit(run: Runner, ds: str, tag: str, d: Path, p: Profile, common: list[str]) -> int:
    """`distill audit` exits 3 on a FAIL verdict; the table reports the verdict rather than stopping.

    The Runner treats a non-zero exit as a failed step, so the audit runs through a tiny shell wrapper
    that maps exit 3 to 0 (the verdict is read from audit.json).
    """
    args = ["audit", str(d / "run"), "--data", ds, "--networks", str(p.audit_networks), "--epochs",
            str(p.audit_epochs), "--pairs", "0"] + common
    try:
        return run(f"{ds}-{tag}-audit", args, CHUNK)[0]
    except SystemExit as e:
        if (d / "run" / "audit.json").exists():  # a FAIL verdict (exit 3): the audit ran; record it
            rec = run.work / "steps" / f"{ds}-{tag}-audit.json"
            rec.write_text(json.dumps({"command": run.commands[-1], "returncode": 0, "wall_seconds": 0.0,
                                       "verdict_exit": 3, "note": str(e)}) + "\n")
            return len(run.commands)
        raise


def eval_row(run: Runner, key: str, row: Row, args: list[str], out: Path) -> Row:
    """One `distill eval` step whose JSON (``out``) fills ``row``; a step not run leaves it marked so."""
    try:
        row.commands.append(run(key, args, CHUNK)[0])
        fill(row, read_eval(out))
    except NotRun:
        row.note = NOT_RUN
    return row


def direct_dp(run: Runner, p: Profile, ds: str, eps: float, device: str, work: Path) -> Row:
    from distill.dp import DP_LR  # the dp-sgd baseline's step size; in the key, so a new default is a new row

    tag = f"{eps_tag(eps)}-lr{DP_LR:g}"
    out = work / ds / f"dpsgd-{tag}.json"
    row = Row(ds, f"DP-SGD direct (ε = {eps_tag(eps)}, lr {DP_LR:g})", eps)
    args = ["eval", "--baseline", "dp-sgd", "--epsilon", f"{eps:g}", "--train", ds, "--test", ds, "--runs",
            str(p.direct_runs), "--json", str(out), "--seed", str(p.seed), "--device", device]
    return eval_row(run, f"{ds}-dpsgd-{tag}", row, args, out)


def baseline(run: Runner, p: Profile, ds: str, which: str, device: str, work: Path) -> Row:
    out = work / ds / f"{which}.json"
    label = {"random-real": f"random real, {p.ipc} per class", "full": "full data"}[which]
    row = Row(ds, label, None)
    args = ["eval", "--baseline", which, "--train", ds, "--test", ds, "--runs", str(p.runs), "--json", str(out),
            "--seed", str(p.seed), "--device", device]
    args += ["--ipc", str(p.ipc)] if which == "random-real" else ["--epochs", str(p.full_epochs)]
    if which == "random-real" and p.eval_epochs:
        args += ["--epochs", str(p.eval_epochs)]
    return eval_row(run, f"{ds}-{which}", row, args, out)


def section_name(profile: str, dp_lr: float | None) -> str:
    """The docs section's name: the profile, and what makes its rows differ from older sections' (the experts'
    step size, the class means' grid and their part of the budget), so that older sections stay apart."""
    return profile + (f"-dplr{dp_lr:g}" if dp_lr else "") + (f"-pool{STATS_POOL}" if STATS_POOL != 1 else "") \
        + (f"-frac{STATS_FRACTION:g}" if STATS_FRACTION != FIRST_STATS_FRACTION else "")


def render(meta: dict, rows: list[Row], commands: list[str]) -> str:
    p = meta["profile"]
    lines = [f"### DP table, profile `{p['name']}`", "",
             f"{p['purpose']}. Measured {meta['finished']} at commit {meta['commit']} on {meta['hardware']}; "
             f"{meta['software']}. Steps took {_duration(meta['wall_seconds'])} in all. Test split, "
             f"{p['runs']} networks per row; accuracy in %, mean ± std. The audit column is `distill audit`'s "
             "default (quick) verdict; it is computed from the private images and is outside any guarantee.", "",
             "| dataset | row | ε | accuracy % | AUC | audit | commands |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = _pm(*r.acc, 100, 1) if r.acc else r.note or NOT_RUN
        auc = _pm(*r.auc, 1, 3) if r.auc else ""
        eps = "∞" if r.epsilon is None and "without DP" in r.label else ("" if r.epsilon is None else f"{r.epsilon:g}")
        lines.append(f"| {r.dataset} | {r.label} | {eps} | {acc} | {auc} | {r.audit} | "
                     f"{', '.join(f'[{c}]' for c in r.commands)} |")
    lines += ["", "Commands (from the repository root, `DISTILL_DATA=../shared/data`):", ""]
    lines += [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    return "\n".join(lines) + "\n"


def merge(existing: str, name: str, section: str) -> str:
    begin, end = f"<!-- dp-table:{name}:begin -->", f"<!-- dp-table:{name}:end -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(existing):
        return pattern.sub(lambda _: block, existing, count=1)
    return existing.rstrip() + "\n\n" + block


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--datasets", default="pneumoniamnist,breastmnist")
    ap.add_argument("--epsilons", default="1,4,8,inf", help="comma list; inf is the share without DP")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=str(ROOT / "docs" / "privacy.md"))
    ap.add_argument("--work", default=None, help="default /tmp/distill-dp-PROFILE")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--dp-lr", type=float, default=None,
                    help="the DP experts' step size (default: distill buffer's); rows and section are named for it")
    ap.add_argument("--no-baselines", action="store_true", help="only the share and DP-SGD rows")
    args = ap.parse_args(argv)
    p = PROFILES[args.profile]
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    epsilons = [INF if e.strip() == "inf" else float(e) for e in args.epsilons.split(",") if e.strip()]
    work = Path(args.work or f"/tmp/distill-dp-{p.name}")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISTILL_DATA", str(ROOT.parent / "shared" / "data"))
    run = Runner(work, dict(os.environ), render_only=args.render_only,
                 max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    rows: list[Row] = []
    for ds in datasets:
        for eps in epsilons:
            rows.append(share_pipeline(run, p, ds, eps, args.device, work, args.dp_lr))
            if eps != INF:
                rows.append(direct_dp(run, p, ds, eps, args.device, work))
        if not args.no_baselines:
            rows.append(baseline(run, p, ds, "random-real", args.device, work))
            rows.append(baseline(run, p, ds, "full", args.device, work))
    meta = {"profile": dict(p.__dict__), "hardware": hardware(args.device), "software": software(),
            "commit": git_commit(), "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": run.total_seconds}
    section = render(meta, rows, run.commands)
    from distill.io import atomic_path

    out = Path(args.out)
    with atomic_path(out) as tmp:
        name = section_name(p.name, args.dp_lr)
        tmp.write_text(merge(out.read_text() if out.exists() else "", name, section))
    print(section)


if __name__ == "__main__":
    main()
