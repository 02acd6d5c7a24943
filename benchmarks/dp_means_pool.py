"""Choose the grid the DP class means are released on (``dp.STATS_POOL``), on a dataset outside the DP table.

For each block size, the class means are released as ``distill buffer --dp-init class-means`` releases
them (``--stats-fraction`` of epsilon, 0.1 by default: the buffers' part when the grid was chosen; the
buffer's default delta) and compared with the exact full-size means: the RMS
error per pixel on the [-1, 1] scale, averaged over classes and seeds. A smaller grid lowers the noise (the
bound B = sqrt(C*h*w) shrinks) and adds blur; the lowest error wins. RetinaMNIST chose STATS_POOL:

    OMP_NUM_THREADS=1 python benchmarks/dp_means_pool.py --data retinamnist --epsilons 1,8

``--compare BUFFER`` instead reads the class means a DP buffer released (dp_stats.h5) and prints their RMS
error per class against the exact means of --data, and the RMS difference between the exact class means.

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
    ap.add_argument("--stats-fraction", type=float, default=0.1,
                    help="the part of epsilon for the means (0.1: the figures in docs/privacy.md; buffers now use "
                         "dp.STATS_FRACTION)")
    ap.add_argument("--compare", action="append", default=[], help="a DP buffer folder whose released means to score")
    args = ap.parse_args()
    data = load_data(args.data)
    x = data.train.images.float() / 255 * 2 - 1  # the fixed DP normalisation, pixels in [-1, 1]
    y, k = data.train.labels, data.num_classes
    exact, _ = dp.noised_class_means(x, y, k, 0.0, pool=1)
    if args.compare:
        import h5py

        from distill.formats.dp_record import DP_STATS_CLASS_MEANS, DP_STATS_FILE

        rms = lambda a, b: (a - b).pow(2).flatten(1).mean(1).sqrt()  # noqa: E731
        print(f"{args.data}: RMS difference between the exact means of classes 0 and 1: "
              f"{rms(exact[:1, 0], exact[1:2, 0]).item():.3f}")
        for folder in args.compare:
            with h5py.File(Path(folder) / DP_STATS_FILE, "r") as f:
                released = torch.from_numpy(f[DP_STATS_CLASS_MEANS][:])
            print(f"{folder}: RMS error per class {[round(v, 3) for v in rms(released[:, 0], exact[:, 0]).tolist()]}")
        return
    delta = dp.default_delta(len(y))
    print(f"{args.data}: {len(y)} training images, per class {torch.bincount(y, minlength=k).tolist()}")
    print("| epsilon | pool | grid | RMS error per pixel (mean over classes) |\n|---|---|---|---|")
    for eps in (float(e) for e in args.epsilons.split(",")):
        sigma = dp.solve_sigma(args.stats_fraction * eps, delta, 1.0, 1, "prv")
        for pool in (int(p) for p in args.pools.split(",")):
            errs = [(dp.noised_class_means(x, y, k, sigma, torch.Generator().manual_seed(s), pool=pool)[0] - exact)
                    .pow(2).flatten(1).mean(1).sqrt().mean().item() for s in range(args.seeds)]
            grid = -(-data.size // pool)
            print(f"| {eps:g} | {pool} | {grid}x{grid} | {np.mean(errs):.3f} ± {np.std(errs):.3f} |")


if __name__ == "__main__":
    main()
