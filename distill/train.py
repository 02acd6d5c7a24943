"""Train and evaluate one network on in-memory tensors: shared by experts and recipients.

Datasets here are small (MedMNIST, a few hundred synthetic images), so they
live on the device as whole tensors and mini-batches are index slices drawn
from an explicit generator: no DataLoader workers, no hidden randomness.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import Augment

log = logging.getLogger(__name__)

# Recipient protocol of the MTT reference (evaluate_synset): SGD, momentum 0.9,
# weight decay 5e-4, learning rate divided by 10 half-way, batch 256, DSA on.
EVAL_MOMENTUM = 0.9
EVAL_WEIGHT_DECAY = 5e-4
EVAL_BATCH = 256


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int
    lr: float
    batch_size: int = EVAL_BATCH
    momentum: float = EVAL_MOMENTUM
    weight_decay: float = EVAL_WEIGHT_DECAY
    decay_at_half: bool = True  # lr x 0.1 after half the epochs
    augment: Augment | None = None

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be positive; got {self.epochs}.")
        if not self.lr > 0:
            raise ValueError(f"The learning rate must be positive; got {self.lr}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {self.batch_size}.")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target that is either class ids (N,) or probabilities (N, K)."""
    if target.dtype in (torch.int64, torch.int32, torch.uint8):
        return F.cross_entropy(logits, target.long())
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def train_network(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    recipe: TrainRecipe,
    generator: torch.Generator,
    *,
    after_step: Callable[[int], None] | None = None,
    after_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` in place with SGD.

    images: (N, C, H, W) float32, already preprocessed, on the model's device.
    targets: (N,) int64 class ids or (N, K) float probabilities.
    ``after_step(step)`` runs after each optimiser step (1-based), ``after_epoch(epoch, stats)``
    after each epoch (1-based). Returns per-epoch ``{"loss", "acc"}`` on the training batches.
    """
    if len(images) == 0 or len(images) != len(targets):
        raise ValueError(f"train_network needs as many targets as images, and at least one; got {len(images)} and {len(targets)}.")
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sched = None
    if recipe.decay_at_half and recipe.epochs > 1:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[recipe.epochs // 2], gamma=0.1)
    n = len(images)
    hard = targets if targets.ndim == 1 else targets.argmax(1)
    step, history = 0, []
    model.train()
    for epoch in range(1, recipe.epochs + 1):
        order = torch.randperm(n, generator=generator).to(images.device)
        tot_loss, tot_correct = 0.0, 0
        for start in range(0, n, recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            x = images[idx]
            if recipe.augment is not None:
                x = recipe.augment(x, generator)
            out = model(x)
            loss = soft_cross_entropy(out, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            tot_loss += loss.item() * len(idx)
            tot_correct += int((out.argmax(1) == hard[idx]).sum())
            if after_step is not None:
                after_step(step)
        if sched is not None:
            sched.step()
        stats = {"loss": tot_loss / n, "acc": tot_correct / n}
        history.append(stats)
        if after_epoch is not None:
            after_epoch(epoch, stats)
    return history


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities (N, K) for preprocessed images, in eval mode."""
    was_training = model.training
    model.eval()
    # range() is empty for zero images; one forward pass on the empty batch still gives the (0, K) shape.
    starts = range(0, len(images), batch_size) or [0]
    out = torch.cat([F.softmax(model(images[i:i + batch_size]), 1) for i in starts])
    model.train(was_training)
    return out


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels.to(probs.device)).float().mean()) if len(labels) else float("nan")
