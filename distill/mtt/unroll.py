"""The MTT inner loop as pure functions: unroll a student on the synthetic set, match the expert.

All randomness of one unroll (which synthetic images each step sees, and the
augmentation of each step) is drawn up front into an :class:`UnrollPlan`. The
full unroll here and the constant-memory path in :mod:`.checkpointed` replay the
same plan, which is what lets the full unroll serve as the correctness oracle.

Shapes: parameters are flat vectors ``(P,)`` in :func:`distill.models.param_spec`
order; images are ``(N, C, H, W)`` in network space; targets are class ids
``(N,)`` int64 or probabilities ``(N, K)`` float (soft labels, already
``softmax(logits / T)``, so gradients reach the logits through autograd).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..augment import Augment
from ..models import ParamSpec, flat_forward
from ..train import soft_cross_entropy


@dataclass(frozen=True)
class UnrollPlan:
    batches: tuple[torch.Tensor, ...]  # one (B,) int64 index tensor per inner step
    aug_seeds: tuple[int, ...]  # one seed per inner step for that step's augmentation

    @property
    def steps(self) -> int:
        return len(self.batches)


def make_plan(num_images: int, syn_steps: int, batch_syn: int, generator: torch.Generator) -> UnrollPlan:
    """Draw the mini-batches (fresh permutation each pass over the set, as the reference) and augmentation seeds.

    ``batch_syn`` <= 0 or >= ``num_images`` means every step uses the whole synthetic set.
    """
    if syn_steps < 1:
        raise ValueError(f"syn_steps must be positive; got {syn_steps}.")
    b = num_images if batch_syn <= 0 or batch_syn >= num_images else batch_syn
    batches: list[torch.Tensor] = []
    order = torch.empty(0, dtype=torch.long)
    while len(batches) < syn_steps:
        if len(order) < b:
            order = torch.cat([order, torch.randperm(num_images, generator=generator)])
        batches.append(order[:b])
        order = order[b:]
    seeds = torch.randint(0, 2**62, (syn_steps,), generator=generator).tolist()
    return UnrollPlan(tuple(batches), tuple(int(s) for s in seeds))


def step_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inner_loss(model: nn.Module, spec: ParamSpec, params: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
               augment: Augment | None, aug_seed: int) -> torch.Tensor:
    """Cross-entropy of the student ``params`` on one (augmented) synthetic batch."""
    x = augment(images, step_generator(aug_seed)) if augment is not None else images
    return soft_cross_entropy(flat_forward(model, spec, params, x), targets)


def student_step(model: nn.Module, spec: ParamSpec, params: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                 lr: torch.Tensor, augment: Augment | None, aug_seed: int, *, create_graph: bool = True) -> torch.Tensor:
    """One SGD step of the student: ``params - lr * d inner_loss / d params``."""
    loss = inner_loss(model, spec, params, images, targets, augment, aug_seed)
    (grad,) = torch.autograd.grad(loss, params, create_graph=create_graph)
    return params - lr * grad


def unroll_student(model: nn.Module, spec: ParamSpec, start: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                   lr: torch.Tensor, plan: UnrollPlan, augment: Augment | None) -> torch.Tensor:
    """Full unroll with ``create_graph=True`` (the reference's math; memory grows with the steps).

    Returns the student's final parameters ``(P,)``, differentiable with respect to
    ``images``, ``targets`` (if float) and ``lr``.
    """
    params = start.detach().requires_grad_(True)
    for idx, seed in zip(plan.batches, plan.aug_seeds):
        params = student_step(model, spec, params, images[idx], targets[idx], lr, augment, seed, create_graph=True)
    return params


def matching_loss(student_end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||θ_student − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||² (1 = no better than standing still)."""
    return (student_end - target).pow(2).sum() / (start - target).pow(2).sum()


def movement_ratio(student_end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> float:
    """||θ_student − θ_t|| / ||θ*_{t+M} − θ_t||: far from 1 means the settings do not fit the data."""
    with torch.no_grad():
        return float((student_end - start).norm() / (target - start).norm())
