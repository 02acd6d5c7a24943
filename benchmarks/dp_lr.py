"""Choose the DP experts' step size on a dataset the DP table does not report (issue 23).

A DP buffer's experts are DP-SGD networks. Their step size is a hyperparameter, and choosing it on
the private data's own validation split would spend privacy that nothing accounts for (a choice made
by looking at private data is a release too). So the choice is made once, on another dataset
(RetinaMNIST by default, which docs/privacy.md's DP table does not use), and then fixed for every
dataset as ``distill buffer``'s DP default.

For each step size: train DP-SGD networks with the buffer's recipe (batch, momentum, weight decay,
DSA, no decay) at the given epsilon, and score them on the VALIDATION split: accuracy, AUC (macro
one-vs-rest) and cross-entropy. The rule, fixed before the sweep: the highest mean validation AUC wins
(a DP network at few steps often predicts the majority class, so accuracy ties; AUC still ranks). Also
printed: the median per-image gradient norm of a fresh network on this dataset, the number that
clipping at 1 divides the step by. Nothing touches a test split. Prints a Markdown table, writes JSON.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/dp_lr.py --data retinamnist --epsilon 8 \
        --lrs 0.03,0.1,0.3,1 --epochs 6 --seeds 2 --json /tmp/dp_lr.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import opacus
import torch

from distill import dp
from distill.augment import Augment
from distill.config import BufferConfig
from distill.data import load_data
from distill.models import create_model
from distill.seeding import generator, seeded
import torch.nn.functional as F

from distill.metrics import auc_ovr
from distill.train import TrainRecipe, accuracy, predict


def run(data_name: str, epsilon: float, lrs: list[float], epochs: int, seeds: int) -> dict:
    data = load_data(data_name)
    pre = dp.fixed_preprocessing(data.channels, data.size)
    x_train, y_train = pre(data.train.images), data.train.labels
    x_val, y_val = pre(data.val.images), data.val.labels
    base = BufferConfig(data=data_name, out="unused")
    n = len(y_train)
    delta = dp.check_budget(epsilon, None, n)
    plan = dp.plan_budget(epsilon=epsilon, delta=delta, n=n, batch_size=base.batch_size, epochs=epochs)
    rows = []
    for lr in lrs:
        recipe = TrainRecipe(epochs=epochs, lr=lr, batch_size=base.batch_size, momentum=base.momentum,
                             weight_decay=base.weight_decay, decay_at_half=False, augment=Augment.parse(base.augment))
        accs, aucs, losses, t0 = [], [], [], time.perf_counter()
        for seed in range(seeds):
            with seeded(seed, 0, 101):
                model = create_model(base.model, data.num_classes, data.channels, data.size)
            dp.train_dp(model, x_train, y_train, recipe, generator(seed, 0, 102), plan=plan)
            model.eval()
            probs = predict(model, x_val)
            accs.append(accuracy(probs, y_val))
            aucs.append(auc_ovr(probs, y_val))
            losses.append(float(F.nll_loss(probs.clamp_min(1e-12).log(), y_val)))
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        rows.append({"lr": lr, "val_acc": accs, "val_auc": aucs, "val_loss": losses, "mean": statistics.fmean(accs),
                     "std": sd(accs), "auc_mean": statistics.fmean(aucs), "auc_std": sd(aucs),
                     "loss_mean": statistics.fmean(losses), "seconds": time.perf_counter() - t0})
        r = rows[-1]
        print(f"lr {lr:g}: val acc {r['mean']:.3f} ± {r['std']:.3f}, AUC {r['auc_mean']:.3f} ± {r['auc_std']:.3f}, "
              f"loss {r['loss_mean']:.3f} ({r['seconds']:.0f} s)", flush=True)
    best = max(rows, key=lambda r: r["auc_mean"])
    majority = max(torch.bincount(y_val).tolist()) / len(y_val)
    with seeded(0, 0, 101):
        fresh = create_model(base.model, data.num_classes, data.channels, data.size)
    norms = []
    for i in range(min(128, n)):  # per-image gradient norms of a fresh network: what clipping at 1 divides by
        fresh.zero_grad()
        F.cross_entropy(fresh(x_train[i:i + 1]), y_train[i:i + 1]).backward()
        norms.append(float(torch.cat([p.grad.flatten() for p in fresh.parameters()]).norm()))
    return {"data": data_name, "split": "val", "epsilon": epsilon, "delta": delta, "sigma": plan.noise_multiplier,
            "steps": plan.steps, "sample_rate": plan.sample_rate, "epochs": epochs, "batch_size": base.batch_size,
            "seeds": seeds, "opacus": opacus.__version__, "median_grad_norm": statistics.median(norms), "majority_val": majority, "rows": rows, "best_lr": best["lr"]}


def markdown(res: dict) -> str:
    lines = [f"DP-SGD networks with the buffer's recipe on {res['data']}, scored on its validation split: "
             f"ε = {res['epsilon']:g}, δ = {res['delta']:.2g}, σ = {res['sigma']:.3f}, "
             f"{res['steps']} steps ({res['epochs']} epochs, batch {res['batch_size']}), {res['seeds']} seeds; "
             f"majority class on validation {100 * res['majority_val']:.1f} %; median per-image gradient norm of a "
             f"fresh network {res['median_grad_norm']:.1f} (128 training images).", "",
             "| step size | validation AUC (mean ± std) | validation accuracy % | validation loss | seconds |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        mark = " (chosen)" if r["lr"] == res["best_lr"] else ""
        lines.append(f"| {r['lr']:g}{mark} | {r['auc_mean']:.3f} ± {r['auc_std']:.3f} | {100 * r['mean']:.1f} ± "
                     f"{100 * r['std']:.1f} | {r['loss_mean']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="retinamnist")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--lrs", default="0.01,0.03,0.1,0.3,1")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = run(a.data, a.epsilon, [float(x) for x in a.lrs.split(",")], a.epochs, a.seeds)
    print(markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
