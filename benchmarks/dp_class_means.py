"""Stand-in for part A's DP statistics (issue 23): DP per-class means written as a buffer's dp_stats.h5.

Used for the measurement in docs/privacy.md ("A DP share: starting without patient images") before
`distill buffer --dp-epsilon` could release them itself; not part of the package.

    python benchmarks/dp_class_means.py BUFFER DATA EPSILON DELTA SEED

Mechanism: for each class c release S_c + N(0, (s D)^2 I) and N_c + N(0, (s D)^2), where S_c is the sum
of the class's training images in [0, 1]^d and N_c its count. Adding or removing one image changes one
pair (S_c, N_c) by at most D = sqrt(d + 1) in L2, and s = sqrt(2 ln(1.25 / delta)) / epsilon is the
classical Gaussian mechanism (Dwork & Roth 2014, Thm A.1; valid for epsilon <= 1). The noisy mean
S~/N~ is clamped to [0, 1], rounded to uint8 pixels and preprocessed as the buffer's images are.
"""
import math
import sys

import h5py
import torch

from distill.data import load_data
from distill.formats.dp_record import DP_STATS_CLASS_MEANS, DP_STATS_FILE, DP_STATS_FORMAT, DP_STATS_VERSION
from distill.formats.trajectory import read_buffer_preprocessing


def main(buffer: str, data: str, eps: float, delta: float, seed: int) -> None:
    pre, _, _ = read_buffer_preprocessing(buffer)
    real = load_data(data)
    x, y = real.train.images.float().div(255.0), real.train.labels
    scale = math.sqrt(2 * math.log(1.25 / delta)) / eps * math.sqrt(x[0].numel() + 1)
    g = torch.Generator().manual_seed(seed)
    means = []
    for c in range(real.num_classes):
        xc = x[y == c]
        total = xc.sum(0) + scale * torch.randn(xc.shape[1:], generator=g)
        count = len(xc) + scale * float(torch.randn((), generator=g))
        m = (total / max(count, 1.0)).clamp(0, 1)
        print(f"class {c}: mean absolute error {(m - xc.mean(0)).abs().mean():.4f} (pixel units)")
        means.append(m)
    net = pre((torch.stack(means) * 255).round().to(torch.uint8))  # (K, C, H, W) in network space
    with h5py.File(f"{buffer}/{DP_STATS_FILE}", "w") as f:
        f.attrs["format"], f.attrs["format_version"] = DP_STATS_FORMAT, DP_STATS_VERSION
        f.attrs["epsilon"], f.attrs["delta"] = eps, delta
        f.create_dataset(DP_STATS_CLASS_MEANS, data=net[:, None].numpy())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
