"""benchmarks/speed.py: what is measured. The MTT cases, pipelines and expert benches of ../shared/BENCHMARKS.md,
the targets and the reference's figures."""
from __future__ import annotations

from dataclasses import dataclass, replace

from distill.models import CONVNET_WIDTH

REPORT_VERSION = "1.0"
DSA = "color,crop,cutout,flip,scale,rotate"  # the reference's strategy
WARMUP, REPS = 2, 5  # ../shared/BENCHMARKS.md: median of at least 5 timed iterations after 2 warm-ups
GIB = 2.0 ** 30

# Targets from ../shared/BENCHMARKS.md.
TARGET_SPEEDUP = {"cifar_ipc10": 5.0, "medmnist28_ipc10": 10.0}
TARGET_MEMORY_RATIO = 0.25
TARGET_CXR_GIB = 12.0
TARGET_EXPERT_FACTOR = 4.0
TARGET_DISK_RATIO = 0.5
REFERENCE_EXPERT_IMG_S = {"cifar": 33_000, "medmnist28": 36_000}  # reference, one expert at a time, batch 256, DSA
REFERENCE_SNAPSHOTS = 51  # the reference keeps 51 fp32 snapshots per expert
FP64_STEPS = 3  # a short unroll: float64 convolutions are slow, and the full unroll's memory doubles


@dataclass(frozen=True)
class Case:
    name: str
    channels: int
    size: int
    depth: int
    classes: int
    ipc: int
    syn_steps: int
    batch_syn: int
    ref_ms: float | None = None  # the reference's figures on an H200 (BENCHMARKS.md)
    ref_gib: float | None = None
    width: int = CONVNET_WIDTH

    @property
    def images(self) -> int:
        return self.classes * self.ipc


CASES = (
    Case("cifar_ipc10", 3, 32, 3, 10, 10, 30, 100, 428, 8.6),
    Case("cifar_ipc50", 3, 32, 3, 10, 50, 30, 500, 968, 42.4),
    Case("medmnist28_ipc10", 1, 28, 3, 2, 10, 30, 20, 499, 1.8),
    Case("cxr128_ipc20", 1, 128, 5, 4, 20, 20, 80, 1446, 77.8),
)


def smoke_case(c: Case) -> Case:
    """The same case shrunk to seconds on a CPU: 8 channels, 16 px, 4 steps."""
    return replace(c, size=16, depth=min(c.depth, 3), width=8, ipc=min(c.ipc, 5), syn_steps=4,
                   batch_syn=min(c.batch_syn, c.classes * min(c.ipc, 5)), ref_ms=None, ref_gib=None)


# ----------------------------------------------------------------------------- time to a share


@dataclass(frozen=True)
class Pipeline:
    """The settings of one pipeline run: buffer, run, export and eval, as a user would type them."""

    name: str
    data: str
    experts: int
    epochs: int
    ipc: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    iterations: int
    eval_runs: int
    eval_epochs: int | None = None  # None: the share's own recipe
    batch_experts: int | None = None  # None: distill buffer's default


# ../shared/BENCHMARKS.md's reduced protocol: 15 experts x 20 epochs, 10 images per class, hard labels,
# 20 student steps, span 2, 300 iterations. Starts up to 18, so that start + span stays within 20 epochs.
PIPELINES = {
    "cuda": Pipeline("reduced protocol", "pneumoniamnist", 15, 20, 10, 20, 2, 18, 300, 3),
    # Scaled down to a few minutes on 2 CPU cores; the rows say so.
    "cpu": Pipeline("scaled down for 2 CPU cores", "pneumoniamnist", 1, 2, 10, 10, 1, 1, 20, 1, eval_epochs=50),
}
REFERENCE_PIPELINE = {"buffer_s": 41.7, "run_s_per_iteration": 0.231}  # ../shared/BENCHMARKS.md, H200


# ----------------------------------------------------------------------------- experts


@dataclass(frozen=True)
class ExpertBench:
    name: str
    channels: int
    size: int
    classes: int
    images: int = 256 * 20  # 20 steps of the reference batch per epoch
    batch: int = 256
    width: int = CONVNET_WIDTH
    # (K, bf16, augmentation) per batched measurement; K=1 rows are one expert at a time (train_network).
    runs: tuple[tuple[int, bool, bool], ...] = ((1, False, True), (10, False, True), (10, True, True),
                                                 (1, False, False), (10, False, False))


EXPERT_BENCHES = (ExpertBench("cifar", 3, 32, 10), ExpertBench("medmnist28", 1, 28, 2))


def smoke_expert(b: ExpertBench) -> ExpertBench:
    return replace(b, size=16, images=64, batch=16, width=8,
                   runs=((1, False, True), (4, False, True), (4, True, True), (1, False, False), (4, False, False)))
