"""What DP-SGD costs an expert: one epoch of DP-SGD (distill/dp.py) against one epoch of plain SGD
(distill/train.py), same network, data, batch and augmentation, alternated in one process so that both see
the same load on a shared machine. CPU time (process_time) and wall time per epoch.

    OMP_NUM_THREADS=1 python benchmarks/dp_cost.py --data pneumoniamnist --rounds 2
"""
from __future__ import annotations

import argparse
import time

import torch

from distill import dp
from distill.augment import Augment
from distill.config import BufferConfig
from distill.data import load_data
from distill.models import create_model
from distill.train import TrainRecipe, train_network


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="pneumoniamnist")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--augment", default=BufferConfig.augment)
    args = ap.parse_args()
    data = load_data(args.data)
    pre = dp.fixed_preprocessing(data.channels, data.size)
    x, y = pre(data.train.images), data.train.labels
    augment = None if args.augment == "none" else Augment.parse(args.augment)
    recipe = TrainRecipe(epochs=1, lr=0.01, batch_size=args.batch_size, momentum=0.0, weight_decay=0.0,
                         decay_at_half=False, augment=augment)
    plan = dp.plan_budget(epsilon=8.0, delta=dp.default_delta(len(x)), n=len(x), batch_size=args.batch_size,
                          epochs=1, accountant="rdp")
    times: dict[str, list[tuple[float, float]]] = {"sgd": [], "dp-sgd": []}
    for r in range(args.rounds):
        for name in ("sgd", "dp-sgd"):
            torch.manual_seed(r)
            model = create_model(BufferConfig.model, data.num_classes, data.channels, data.size)
            gen = torch.Generator().manual_seed(r)
            c0, w0 = time.process_time(), time.perf_counter()
            if name == "sgd":
                train_network(model, x, y, recipe, gen)
            else:
                dp.train_dp(model, x, y, recipe, gen, plan=plan)
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))
    for name, t in times.items():
        cpu = sum(c for c, _ in t) / len(t)
        wall = sum(w for _, w in t) / len(t)
        print(f"{name}: {cpu:.1f} s CPU, {wall:.1f} s wall per epoch ({len(x)} images, batch {args.batch_size})")
    ratio = sum(c for c, _ in times["dp-sgd"]) / sum(c for c, _ in times["sgd"])
    print(f"DP-SGD / SGD, CPU time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
