"""Choose the grid the DP class means are released on (``dp.STATS_POOL``), on a dataset outside the DP table.

For each block size, the class means are released as ``distill buffer --dp-init class-means`` releases
them (10 % of epsilon, the buffer's default delta) and compared with the exact full-size means: the RMS
error per pixel on the [-1, 1] scale, averaged over classes and seeds. A smaller grid lowers the noise (the
bound B = sqrt(C*h*w) shrinks) and adds blur; the lowest error wins. RetinaMNIST chose STATS_POOL:

    OMP_NUM_THREADS=1 python benchmarks/dp_means_pool.py --data retinamnist --epsilons 1,8

A benchmark, not a test: it reads the named dataset's training split, as the buffer would.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill import dp  # noqa: E402
from distill.data import load_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="retinamnist")
    ap.add_argument("--epsilons", default="1,8")
    ap.add_argument("--pools", default="1,2,4")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    data = load_data(args.data)
    x = data.train.images.float() / 255 * 2 - 1  # the fixed DP normalisation, pixels in [-1, 1]
    y, k = data.train.labels, data.num_classes
    exact, _ = dp.noised_class_means(x, y, k, 0.0, pool=1)
    delta = dp.default_delta(len(y))
    print(f"{args.data}: {len(y)} training images, per class {torch.bincount(y, minlength=k).tolist()}")
    print("| epsilon | pool | grid | RMS error per pixel (mean over classes) |\n|---|---|---|---|")
    for eps in (float(e) for e in args.epsilons.split(",")):
        sigma = dp.solve_sigma(dp.STATS_FRACTION * eps, delta, 1.0, 1, "prv")
        for pool in (int(p) for p in args.pools.split(",")):
            errs = [(dp.noised_class_means(x, y, k, sigma, torch.Generator().manual_seed(s), pool=pool)[0] - exact)
                    .pow(2).flatten(1).mean(1).sqrt().mean().item() for s in range(args.seeds)]
            grid = -(-data.size // pool)
            print(f"| {eps:g} | {pool} | {grid}x{grid} | {np.mean(errs):.3f} ± {np.std(errs):.3f} |")


if __name__ == "__main__":
    main()
