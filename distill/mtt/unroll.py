"""The MTT inner loop as pure functions: unroll a student on the synthetic set, match the expert.

All randomness of one unroll (which synthetic images each step sees, and the
augmentation of each step) is drawn up front into an :class:`UnrollPlan` of
tensors on the run's device: the batch indices ``(S, B)`` and the augmentation
parameters with leading dims ``(S, B)``. Nothing is drawn or copied from the
host while the unroll runs. The full unroll here, the fast paths in
:mod:`.engine` and the per-step path in tests/oracles/checkpointed.py replay the same
plan, which is what lets the full unroll serve as the correctness oracle.

Shapes: parameters are flat vectors ``(P,)`` in :func:`distill.models.param_spec`
order; images are ``(N, C, H, W)`` in network space; targets are class ids
``(N,)`` int64 or probabilities ``(N, K)`` float (soft labels, already
``softmax(logits / T)``, so gradients reach the logits through autograd).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..augment import Augment, AugParams, select
from ..models import ParamSpec, flat_forward
from ..train import soft_cross_entropy


@dataclass(frozen=True)
class UnrollPlan:
    """One unroll's randomness, drawn before it runs; every tensor lives on the run's device.

    batches: (S, B) int64 indices into the synthetic set, one row per inner step.
    aug: the augmentation parameters of every step, leading dims (S, B); None without augmentation.
    A stack of T plans (:func:`stack_plans`) has one more leading dim on every tensor.
    """

    batches: torch.Tensor
    aug: AugParams | None = None

    @property
    def steps(self) -> int:
        return self.batches.shape[-2]

    def step(self, k: int) -> tuple[torch.Tensor, AugParams | None]:
        """Step ``k``'s batch indices ``(B,)`` and augmentation parameters (leading dim ``(B,)``)."""
        return self.batches[k], None if self.aug is None else select(self.aug, k)


def make_plan(num_images: int, syn_steps: int, batch_syn: int, generator: torch.Generator, *,
              augment: Augment | None = None, size: tuple[int, int] | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> UnrollPlan:
    """Draw the mini-batches (fresh permutation each pass over the set, as the reference) and the augmentation.

    ``batch_syn`` <= 0 or >= ``num_images`` means every step uses the whole synthetic set.
    The indices come from ``generator`` (CPU) and reach ``device`` in one copy. The augmentation is drawn
    on ``device`` by a generator seeded from ``generator``, so the plan depends only on ``generator``'s
    state and the device; ``size`` (H, W) is the images' size, needed with ``augment``.
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
    # Drawn whether or not there is augmentation, so that the batches of later plans do not depend on it.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    aug = None
    if augment is not None:
        if size is None:
            raise ValueError("make_plan needs the images' size to draw an augmentation.")
        device_gen = torch.Generator(device=device).manual_seed(seed)
        aug = augment.draw(b, device_gen, size=tuple(size), steps=syn_steps, dtype=dtype)
    return UnrollPlan(torch.stack(batches).to(device), aug)


def stack_plans(plans: list[UnrollPlan]) -> UnrollPlan:
    """T plans of the same shape as one: every tensor gains a leading trajectory dim."""
    aug = None
    if plans[0].aug is not None:
        aug = type(plans[0].aug)(*(torch.stack(fields) for fields in zip(*(p.aug for p in plans))))
    return UnrollPlan(torch.stack([p.batches for p in plans]), aug)


def inner_loss(model: nn.Module, spec: ParamSpec, params: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
               augment: Augment | None, aug: AugParams | None) -> torch.Tensor:
    """Cross-entropy of the student ``params`` on one synthetic batch, augmented with the parameters ``aug``."""
    x = augment.apply(images, aug) if augment is not None else images
    return soft_cross_entropy(flat_forward(model, spec, params, x), targets)


def student_step(model: nn.Module, spec: ParamSpec, params: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                 lr: torch.Tensor, augment: Augment | None, aug: AugParams | None, *, create_graph: bool = True) -> torch.Tensor:
    """One SGD step of the student: ``params - lr * d inner_loss / d params``."""
    loss = inner_loss(model, spec, params, images, targets, augment, aug)
    (grad,) = torch.autograd.grad(loss, params, create_graph=create_graph)
    return params - lr * grad


def unroll_student(model: nn.Module, spec: ParamSpec, start: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                   lr: torch.Tensor, plan: UnrollPlan, augment: Augment | None) -> torch.Tensor:
    """Full unroll with ``create_graph=True`` (the reference's math; memory grows with the steps).

    Returns the student's final parameters ``(P,)``, differentiable with respect to
    ``images``, ``targets`` (if float) and ``lr``.
    """
    params = start.detach().requires_grad_(True)
    for k in range(plan.steps):
        idx, aug = plan.step(k)
        params = student_step(model, spec, params, images[idx], targets[idx], lr, augment, aug, create_graph=True)
    return params


def matching_loss(student_end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||θ_student − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||² (1 = no better than standing still)."""
    return (student_end - target).pow(2).sum() / (start - target).pow(2).sum()
