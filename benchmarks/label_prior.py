"""How should a union of shares be joined? Every `--label-prior` and `--share-weights`, scored on val and test.

A benchmark script, not a test: CI never runs it. Given the shares of several
sites (for instance those `benchmarks/hospitals.py` made), it joins them once
per pair of `distill eval --label-prior` and `--share-weights` choices, trains
``--runs`` networks on each union with the shares' recipe (run r of every
choice from the same initial weights and data order, as `distill eval` does),
and scores them on the dataset's **val** split, where the choice is made, and
on its test split, which is only reported. Two more rows train on the class
each image was distilled for (one-hot targets) as a reference; that is not an
option of `distill eval`.

    python benchmarks/label_prior.py DIR/site-*/share.h5 --data pneumoniamnist --runs 2 \\
        --tag 3 sites, α 0.3 --out docs/hospitals.md

With ``--out`` the table replaces its own marked section of that page (one per ``--tag``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from hospitals import merge_hospitals  # noqa: E402
from results import _pm, git_commit, hardware, software  # noqa: E402

HARD = "class ids (reference)"


def score(shares: list[str], data: str, runs: int, seed: int, device: str) -> tuple[list[dict], dict]:
    """Per choice: val and test accuracy/AUC for each run; and facts about the union for the page."""
    import torch

    from distill.config import LABEL_PRIORS, SHARE_WEIGHTS
    from distill.distributed import resolve_device
    from distill.evaluate import DATA_KEY, MODEL_KEY, join_shares, load_shares, site_counts
    from distill.data import load_data
    from distill.metrics import classification_metrics
    from distill.models import create_model
    from distill.seeding import generator, seeded
    from distill.train import TrainRecipe, predict, train_network

    dev = resolve_device(device)
    loaded = load_shares(shares)
    real = load_data(data)
    rows = []
    for choice, how in [(c, w) for c in (*LABEL_PRIORS, HARD) for w in SHARE_WEIGHTS]:
        union = join_shares(loaded, label_prior="shared" if choice == HARD else choice, share_weights=how)
        weights = None if union.weights is None else union.weights.to(dev)
        targets = union.labels if choice == HARD else union.targets
        recipe = TrainRecipe.following(union.recipe)
        k, c, size = len(union.class_names), union.images.shape[1], union.images.shape[-1]
        x = union.images.to(dev)
        split_x = {s: union.preprocessing(real.split(s).images).to(dev) for s in ("val", "test")}
        per_run, t0 = [], time.perf_counter()
        for run in range(runs):
            with seeded(seed, run, MODEL_KEY):
                net = create_model(union.recipe.model, k, c, size, **union.recipe.model_kwargs).to(dev)
            train_network(net, x, targets.to(dev), recipe, generator(seed, run, DATA_KEY), weights=weights)
            per_run.append({s: classification_metrics(predict(net, split_x[s]).cpu(), real.split(s).labels)
                            for s in ("val", "test")})
        moved = union.label_prior or {"prior": "shared"}
        rows.append({"choice": choice, "weights": how, "runs": per_run, "seconds": time.perf_counter() - t0,
                     "target_mix": moved.get("target_mix")})
        print(f"{choice}, {how}: val {[round(r['val']['accuracy'], 3) for r in per_run]}, "
              f"test {[round(r['test']['accuracy'], 3) for r in per_run]}", file=sys.stderr, flush=True)
    facts = {"images": int(union.images.shape[0]), "sites": len(loaded), "class_names": union.class_names,
             "site_counts": [site_counts(s) for _, s in loaded],
             "val_counts": torch.bincount(real.val.labels, minlength=k).tolist(),
             "test_counts": torch.bincount(real.test.labels, minlength=k).tolist()}
    return rows, facts


def render(tag: str, rows: list[dict], facts: dict, argv: list[str], device: str) -> str:
    from distill.metrics import mean_std

    def stat(r, split, key):
        return mean_std([run[split][key] for run in r["runs"]])

    best = max((r for r in rows if r["choice"] != HARD), key=lambda r: stat(r, "val", "accuracy")[0])
    lines = [f"### `--label-prior` and `--share-weights` on {tag}", "",
             f"- Command: `python benchmarks/label_prior.py {' '.join(argv)}`",
             f"- Hardware: {hardware(device)}; software: {software()}; commit `{git_commit()}`; "
             f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
             f"- {facts['sites']} shares, {facts['images']} images; the sites' training counts per class "
             f"({'/'.join(facts['class_names'])}): {', '.join('/'.join(map(str, c or ['?'])) for c in facts['site_counts'])}. "
             f"Val holds {'/'.join(map(str, facts['val_counts']))}, test {'/'.join(map(str, facts['test_counts']))}.",
             f"- Mean ± sample std over {len(rows[0]['runs'])} runs; the choice is the best **val** accuracy "
             f"(`{best['choice']}` with `{best['weights']}` weights here), test is reported, not used.", "",
             "| labels | class mix moved to | images weighed | val accuracy % | test accuracy % | test AUC | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mix = "–" if r["target_mix"] is None else "/".join(f"{v:.2f}" for v in r["target_mix"])
        lines.append(f"| {r['choice']} | {mix} | {r['weights']} | {_pm(*stat(r, 'val', 'accuracy'), 100, 1)} | "
                     f"{_pm(*stat(r, 'test', 'accuracy'), 100, 1)} | {_pm(*stat(r, 'test', 'auc'), 1, 3)} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shares", nargs="+")
    ap.add_argument("--data", required=True, help="the dataset whose val and test splits are scored")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tag", default="these shares", help="names the table and its section on the page")
    ap.add_argument("--out", default=None, help="a page to put the table on (its own marked section)")
    args = ap.parse_args(argv)
    os.environ.setdefault("DISTILL_DATA", str(ROOT.parent / "shared" / "data"))
    rows, facts = score(args.shares, args.data, args.runs, args.seed, args.device)
    section = render(args.tag, rows, facts, [shlex.quote(a) for a in argv], args.device)
    print(section)
    if args.out:
        from distill.io import atomic_path

        out = Path(args.out)
        key = "labels-" + re.sub(r"[^a-z0-9]+", "-", args.tag.lower()).strip("-")
        with atomic_path(out) as tmp:
            tmp.write_text(merge_hospitals(out.read_text(), key, section))


if __name__ == "__main__":
    main()
