"""Differentially private training of one network (DP-SGD through Opacus), its accountant and its budget.

Shared by ``distill buffer --dp-epsilon`` (the experts) and ``distill eval --baseline dp-sgd`` (a network
trained directly on the real data), so it sits beside :mod:`distill.train` and imports nothing above it.

DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy"): each step draws a Poisson sample
(every image independently with probability q), clips each image's gradient to L2 norm ``clip``, sums,
adds Gaussian noise of standard deviation ``sigma * clip`` and divides by the expected batch size. Every
iterate is released by the analysis, so every stored snapshot of a trajectory is covered. The budget is
tracked by Opacus' accountants (PRV: Gopi et al. 2021; RDP: Mironov 2017), never by a formula of ours.

Randomness: Poisson sampling and the noise draw from the operating system's entropy, not from the run's
seed. The seed is written into every trajectory file, and anyone who knows it could regenerate the noise
and subtract it; the amplification by sampling likewise assumes the sample is secret. A DP buffer is
therefore not bit-reproducible; the model's initialisation, the shards and the augmentation still follow
the seed (they do not depend on the data).
"""
from __future__ import annotations

import contextlib
import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import device_generator
from .config import DP_ACCOUNTANTS as ACCOUNTANTS, BufferConfig
from .data import Preprocessing
from .errors import DistillError
from .io import atomic_path, new_h5
from .formats.common import FORMAT_KEY, VERSION_KEY
from .formats.dp_record import (DP_STATS_CLASS_MEANS, DP_STATS_FORMAT, DP_STATS_VERSION, NORMALISATION_FIXED,
                                DPRecord)
from .seeding import generator as seeded_generator
from .train import TrainRecipe, soft_cross_entropy

log = logging.getLogger(__name__)

DEFAULT_CLIP = 1.0  # per-image gradient L2 bound; 1 is the common DP-SGD choice (Abadi et al. 2016; De et al. 2022)
# delta defaults to 1 / (DELTA_FACTOR * n): well below 1/n, the level at which "publish one image" is (0, delta)-DP.
DELTA_FACTOR = 10
# With --dp-init class-means, this fraction of epsilon is planned for the class means, the rest for DP-SGD
# (`distill buffer --dp-stats-fraction`, whose default is this). Under DP the matching barely moves the images,
# so a DP share is about its DP class means (docs/privacy.md); RetinaMNIST's validation AUC picked 0.3 over 0.1.
STATS_FRACTION = BufferConfig.dp_stats_fraction
# In DP mode images are normalised with these fixed constants, per channel, never with statistics of the
# private images: x = (pixel / 255 - 0.5) / 0.5 puts every pixel in [-1, 1].
DP_MEAN, DP_STD = 0.5, 0.5
# The class means are released at (H / STATS_POOL) x (W / STATS_POOL), block averages, and enlarged back
# (bilinear, post-processing). The bound B = sqrt(C*h*w) shrinks with the grid, and so does the noise: on the
# PneumoniaMNIST epsilon-1 buffers of docs/privacy.md the smaller class's mean had RMS error 0.70 on a [-1, 1]
# scale at full size (the classes' means differ by 0.16: pure noise) and 0.23 at 7 x 7 (measured by
# benchmarks/dp_means_pool.py --compare BUFFER). Chosen with benchmarks/dp_means_pool.py on
# RetinaMNIST, outside the DP table: of 1, 2 and 4, 4 had the lowest error at epsilon 1 and 8.
STATS_POOL = 4
# The SGD step size of DP-SGD networks: the DP experts' default and the dp-sgd baseline's. Clipping shrinks
# each image's gradient to norm 1 where a fresh ConvNet-3's are ~20-30, so the reference's 0.01 barely moves
# a DP network (it predicted only the majority class: docs/privacy.md). Chosen by benchmarks/dp_lr.py on
# RetinaMNIST's validation split, a dataset outside the DP table, so that no table row's private data
# picked it: of 0.03, 0.1, 0.3 and 1, 0.3 had the highest validation AUC (the rule fixed before the sweep).
DP_LR = 0.3
SHARD_KEY = 7  # the seed's sub-stream that carves --dp-shards (distill/seeding.py)


def default_delta(n: int) -> float:
    return 1.0 / (DELTA_FACTOR * n)


def check_budget(epsilon: float | None, delta: float | None, n: int) -> float:
    """Refuse an impossible (epsilon, delta) for ``n`` private images in one sentence; return delta resolved."""
    if epsilon is None or not epsilon > 0 or not math.isfinite(epsilon):
        raise DistillError(f"--dp-epsilon must be a positive finite number; got {epsilon}.")
    if delta is None:
        return default_delta(n)
    if not 0 < delta < 1 / n:
        raise DistillError(f"--dp-delta must be above 0 and below 1/n = {1 / n:.3g} for {n} training images "
                           f"(at 1/n, releasing one image outright would qualify); got {delta:g}. "
                           f"Leave it out for 1/(10 n) = {default_delta(n):.3g}.")
    return float(delta)


def fixed_preprocessing(channels: int, size: int) -> Preprocessing:
    """The DP mode's normalisation: constants, so that nothing about the private images leaks through it."""
    return Preprocessing(mean=torch.full((channels,), DP_MEAN), std=torch.full((channels,), DP_STD), size=size,
                         channels=channels, meta={"normalisation": NORMALISATION_FIXED})


def check_model(model: nn.Module, name: str) -> None:
    """Refuse a network whose layers DP-SGD cannot train image by image (batch norm mixes the images)."""
    from opacus.validators import ModuleValidator

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        why = "its batch norm makes one image's output depend on the others in its batch"
    else:
        errors = ModuleValidator.validate(model, strict=False)
        why = str(errors[0]).split(".")[0] if errors else None
    if why:
        raise DistillError(f"Model {name} cannot be trained with DP-SGD ({why}); use convnet3, whose instance "
                           "norm (GroupNorm) Opacus trains image by image.")


# ----------------------------------------------------------------------------- accounting


def epsilon_spent(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Opacus' epsilon for a composition of (noise multiplier, sample rate, steps) entries at ``delta``."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with _quiet_accountant():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def _quiet_accountant():
    """PRV at q = 1 takes log(0) on its way (harmless, the result is finite); RDP may note its alpha range."""
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def solve_sigma(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (to Opacus' tolerance) whose ``steps`` steps at ``sample_rate`` spend at most epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_accountant():
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant, epsilon_tolerance=0.005))
    except ValueError:
        raise DistillError(f"epsilon {epsilon:g} is too small for {steps} DP-SGD steps at sampling rate "
                           f"{sample_rate:.3g}; raise --dp-epsilon or train fewer experts or epochs.") from None


@dataclass(frozen=True)
class DPPlan:
    """How a DP buffer (or one DP network) spends its budget, fixed before any training starts.

    Every expert trains ``steps`` steps at ``sample_rate`` with noise ``noise_multiplier``. The experts of
    one shard compose (``experts_per_shard * steps`` steps under one accountant); disjoint shards compose
    in parallel, so the budget is the worst shard's: the one with the most experts. Each shard samples
    every image with probability ``sample_rate`` (batch / n), whatever its size.
    """

    epsilon: float  # the budget asked for
    delta: float
    accountant: str
    clip: float
    noise_multiplier: float
    sample_rate: float
    steps: int  # optimiser steps per expert
    steps_per_epoch: int
    experts: int
    shards: int
    experts_per_shard: int
    train_size: int
    shard_size: int  # the smallest shard's images
    stats_noise_multiplier: float | None = None  # the class means' Gaussian release, or None
    stats_fraction: float | None = None  # the part of epsilon planned for the class means

    def history(self, stats: bool = True) -> list[tuple[float, float, int]]:
        h = [(self.noise_multiplier, self.sample_rate, self.experts_per_shard * self.steps)]
        if stats and self.stats_noise_multiplier is not None:
            h.append((self.stats_noise_multiplier, 1.0, 1))  # one release of all sums and counts at once
        return h

    def record(self, opacus_version: str) -> DPRecord:
        total = epsilon_spent(self.history(), self.delta, self.accountant)
        sgd = epsilon_spent(self.history(stats=False), self.delta, self.accountant)
        stats = self.stats_noise_multiplier is not None
        return DPRecord(
            epsilon=total, delta=self.delta, accountant=self.accountant, noise_multiplier=self.noise_multiplier,
            clip=self.clip, sample_rate=self.sample_rate, steps=self.steps, experts=self.experts, shards=self.shards,
            train_size=self.train_size, opacus_version=opacus_version,
            stats=DP_STATS_CLASS_MEANS if stats else None, sgd_epsilon=sgd,
            stats_epsilon=epsilon_spent(self.history()[1:], self.delta, self.accountant) if stats else 0.0,
            extra={"epsilon_budget": self.epsilon, "steps_per_epoch": self.steps_per_epoch,
                   "experts_per_shard": self.experts_per_shard, "shard_size": self.shard_size,
                   "delta_rule": f"1/({DELTA_FACTOR} n) unless given", "normalisation_constants": [DP_MEAN, DP_STD],
                   "noise_source": "operating-system entropy (not the recorded seed)",
                   **({"stats_noise_multiplier": self.stats_noise_multiplier, "stats_fraction": self.stats_fraction,
                       "stats_bound": f"each image averaged over {STATS_POOL}x{STATS_POOL} pixel blocks, then its L2 norm "
                          "clipped to sqrt(C*h*w), the largest for pixels in [-1, 1] on that grid",
                       "stats_pool": STATS_POOL,
                       "sgd_and_stats_epsilon": "each computed alone; epsilon is their composition"} if stats else {})})


def plan_budget(*, epsilon: float, delta: float, n: int, batch_size: int, epochs: int, experts: int = 1,
                shards: int = 1, clip: float = DEFAULT_CLIP, accountant: str = "prv",
                stats: bool = False, stats_fraction: float = STATS_FRACTION) -> DPPlan:
    """Solve the noise so that the whole buffer (all experts, and the class means if ``stats``) spends at most epsilon."""
    if accountant not in ACCOUNTANTS:
        raise DistillError(f"--dp-accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}.")
    if shards > experts or n // shards < 1:
        raise DistillError(f"--dp-shards {shards} needs at least as many experts and images as shards; "
                           f"got {experts} expert(s) and {n} images.")
    shard_size = n // shards
    per_shard = -(-experts // shards)
    # q is batch / n whatever the shards: a shard's batches hold about batch / shards images, and its
    # experts take as many steps as one on all the data. (Keeping the batch instead would double q on
    # 2 shards and weaken the amplification by sampling about as much as parallel composition saves.)
    sample_rate = min(1.0, batch_size / n)
    steps_per_epoch = -(-n // batch_size)
    steps = epochs * steps_per_epoch
    if stats and not 0 < stats_fraction < 1:
        raise DistillError(f"--dp-stats-fraction must lie strictly between 0 and 1; got {stats_fraction:g}.")
    stats_sigma = solve_sigma(stats_fraction * epsilon, delta, 1.0, 1, accountant) if stats else None
    target = (1 - stats_fraction) * epsilon if stats else epsilon
    best = None
    # Composed, the two parts spend other than the sum of their parts: move DP-SGD's share until the
    # total is just under epsilon (a few solves; the best plan within budget is kept).
    for _ in range(4 if stats else 1):
        sigma = solve_sigma(target, delta, sample_rate, per_shard * steps, accountant)
        plan = DPPlan(epsilon, delta, accountant, clip, sigma, sample_rate, steps, steps_per_epoch, experts, shards,
                      per_shard, n, shard_size, stats_sigma, stats_fraction if stats else None)
        total = epsilon_spent(plan.history(), delta, accountant)
        if total <= epsilon and (best is None or plan.noise_multiplier < best.noise_multiplier):
            best = plan
        if epsilon - 0.02 * epsilon <= total <= epsilon:
            break
        target *= 0.995 * epsilon / total
    if best is None:
        raise DistillError(f"Could not fit DP-SGD and the class means into epsilon {epsilon:g}; raise --dp-epsilon.")
    return best


# ----------------------------------------------------------------------------- training


def shard_indices(n: int, shards: int, seed: int) -> list[torch.Tensor]:
    """Disjoint shards of range(n), carved with the seed (data-independent, so they cost no budget)."""
    order = torch.randperm(n, generator=seeded_generator(seed, SHARD_KEY))
    size = n // shards
    return [order[s * size:(s + 1) * size].sort().values for s in range(shards)]


def secret_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's entropy: for the noise and the Poisson sample."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def train_dp(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, recipe: TrainRecipe,
             generator: torch.Generator, *, plan: DPPlan, weights: torch.Tensor | None = None,
             after_step: Callable[[int], None] | None = None,
             after_epoch: Callable[[int, dict], None] | None = None,
             noise_generator: torch.Generator | None = None) -> list[dict]:
    """Train ``model`` in place with DP-SGD: ``plan.steps`` steps, ``plan.steps_per_epoch`` to an epoch.

    Same contract as :func:`distill.train.train_network` (images preprocessed on the model's device;
    targets (N,) class ids; hooks called with 1-based step and epoch), so either can train an arm.
    ``generator`` drives the augmentation only; ``noise_generator`` (default: fresh OS entropy) draws
    the Poisson sample and the noise, and must stay secret. Batches vary in size (Poisson sampling);
    the update divides by the expected batch size, as the analysis assumes.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if weights is not None:
        raise DistillError("DP-SGD trains on unweighted images; per-image weights would change the sensitivity.")
    if targets.ndim != 1:
        raise DistillError("DP-SGD trains on class ids, not soft labels.")
    n = len(images)
    noise_gen = noise_generator if noise_generator is not None else secret_generator()
    gsm = GradSampleModule(model)
    base = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)
    expected = max(1, round(plan.sample_rate * n))
    device_noise = noise_gen if images.device.type == "cpu" else device_generator(noise_gen, images.device)
    opt = DPOptimizer(base, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.clip,
                      expected_batch_size=expected, generator=device_noise)
    epochs = -(-plan.steps // plan.steps_per_epoch)
    sched = None
    if recipe.decay_at_half and epochs > 1:
        sched = torch.optim.lr_scheduler.MultiStepLR(base, milestones=[(epochs // 2) * plan.steps_per_epoch], gamma=0.1)
    aug_gen = device_generator(generator, images.device) if recipe.augment is not None else None
    history, step = [], 0
    gsm.train()
    try:
        for epoch in range(1, epochs + 1):
            tot_loss = torch.zeros((), device=images.device)
            tot_correct = torch.zeros((), device=images.device)
            seen = 0
            for _ in range(min(plan.steps_per_epoch, plan.steps - step)):
                # Poisson sampling: every image joins this step independently with probability q.
                idx = (torch.rand(n, generator=noise_gen) < plan.sample_rate).nonzero().flatten().to(images.device)
                opt.zero_grad(set_to_none=True)
                if len(idx):
                    x = images[idx]
                    if aug_gen is not None:
                        # Augmenting an image before its own gradient is computed leaves one image's
                        # contribution bounded by the clip: the sensitivity is unchanged.
                        x = recipe.augment.apply(x, recipe.augment.draw(len(idx), aug_gen, tuple(x.shape[-2:]),
                                                                        dtype=x.dtype))
                    out = gsm(x)
                    loss = soft_cross_entropy(out, targets[idx])
                    with warnings.catch_warnings():  # the input needs no gradient; the hooks need none either
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    with torch.no_grad():
                        tot_loss += loss.detach().float() * len(idx)
                        tot_correct += (out.argmax(1) == targets[idx]).sum()
                    seen += len(idx)
                else:  # an empty sample is still a step: it releases noise alone, as the accountant counts
                    for p in model.parameters():
                        p.grad_sample = p.new_zeros((0, *p.shape))
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                if after_step is not None:
                    after_step(step)
            stats = {"loss": float(tot_loss) / max(seen, 1), "acc": float(tot_correct) / max(seen, 1)}
            history.append(stats)
            if after_epoch is not None:
                after_epoch(epoch, stats)
    finally:
        gsm._close()  # take Opacus' hooks and per-sample buffers off the caller's model
    return history


def dp_trainer(plan: DPPlan) -> Callable[..., list[dict]]:
    """:func:`train_dp` bound to ``plan``, with :func:`distill.train.train_network`'s signature."""
    def train(model, images, targets, recipe, generator, **kw):
        return train_dp(model, images, targets, recipe, generator, plan=plan, **kw)
    return train


# ----------------------------------------------------------------------------- DP statistics


def noised_class_means(images: torch.Tensor, labels: torch.Tensor, num_classes: int, noise_multiplier: float,
                       noise_generator: torch.Generator | None = None,
                       pool: int = STATS_POOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean images released by the Gaussian mechanism: ((K, 1, C, H, W) means, (K,) noised counts).

    images: (N, C, H, W) float32 in the fixed DP normalisation, pixels in [-1, 1]. Each image is first
    averaged over ``pool`` x ``pool`` blocks (a data-independent map: pixels stay in [-1, 1]) to a
    (C, h, w) grid, h = ceil(H / pool). It is clipped to L2 norm B = sqrt(C*h*w) (a no-op for such
    pixels; it guards the bound) and adds B to its class's count (the counts are scaled by B so that
    one image moves (sums, B * counts) by at most sqrt(2) * B). Noise of std ``noise_multiplier *
    sqrt(2) * B`` on every sum and scaled count makes it a Gaussian mechanism with that noise
    multiplier: one full-batch step (q = 1) in the accountant. The division, the clamp to [-1, 1] and
    the bilinear enlargement back to H x W are post-processing.
    """
    gen = noise_generator if noise_generator is not None else secret_generator()
    full = images.detach().float().cpu()
    size = tuple(full.shape[-2:])
    grid = tuple(-(-d // pool) for d in size)
    small = F.adaptive_avg_pool2d(full, grid) if grid != size else full
    x = small.flatten(1)
    bound = math.sqrt(x.shape[1])
    x = x * (bound / x.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).unsqueeze(1)
    sums = torch.zeros(num_classes, x.shape[1]).index_add_(0, labels.cpu(), x)
    counts = torch.bincount(labels.cpu(), minlength=num_classes).float() * bound
    std = noise_multiplier * math.sqrt(2) * bound
    sums = sums + std * torch.randn(sums.shape, generator=gen)
    counts = counts + std * torch.randn(counts.shape, generator=gen)
    noisy_counts = (counts / bound).clamp_min(1.0)
    means = (sums / noisy_counts.unsqueeze(1)).clamp(-1.0, 1.0).view(num_classes, *small.shape[1:])
    if grid != size:
        means = F.interpolate(means, size=size, mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return means.view(num_classes, 1, *full.shape[1:]), noisy_counts


def write_dp_stats(path, means: torch.Tensor, noisy_counts: torch.Tensor, plan: DPPlan) -> None:
    """dp_stats.h5, atomically: the class means (K, 1, C, H, W) with the format, version and what they cost."""
    with atomic_path(path) as tmp:
        with new_h5(tmp) as f:
            f.attrs[FORMAT_KEY] = DP_STATS_FORMAT
            f.attrs[VERSION_KEY] = DP_STATS_VERSION
            f.attrs["normalisation"] = NORMALISATION_FIXED
            f.attrs["noise_multiplier"] = float(plan.stats_noise_multiplier)
            f.attrs["epsilon"] = epsilon_spent(plan.history()[1:], plan.delta, plan.accountant)
            f.attrs["delta"] = plan.delta
            f.attrs["released_grid_pool"] = STATS_POOL  # released as block averages over this many pixels a side
            f.create_dataset(DP_STATS_CLASS_MEANS, data=means.numpy())
            f.create_dataset("noised_counts", data=noisy_counts.numpy())
