"""Train and evaluate one network on in-memory tensors: shared by experts and recipients.

Datasets here are small (MedMNIST, a few hundred synthetic images), so they
live on the device as whole tensors and mini-batches are index slices drawn
from an explicit generator: no DataLoader workers, no hidden randomness.

The augmentation draws on the data's device from a generator seeded once per
training run by the caller's (CPU) generator, one draw per epoch for all its
batches (:func:`epoch_augmentation`), so no step copies random numbers from the
host, and loss and accuracy are read back once per epoch rather than per step.
A CPU run is bit-reproducible from its seed; a CUDA run is reproducible on CUDA
but draws another augmentation stream than the CPU with that seed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import Augment, AugParams, device_generator, select
from .reference_defaults import BATCH

log = logging.getLogger(__name__)

# Recipient protocol of the MTT reference (evaluate_synset): SGD, momentum 0.9,
# weight decay 5e-4, learning rate divided by 10 half-way, batch 256 (reference_defaults.BATCH), DSA on.
EVAL_MOMENTUM = 0.9
EVAL_WEIGHT_DECAY = 5e-4
EVAL_BATCH = BATCH


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

    @classmethod
    def following(cls, recipe) -> "TrainRecipe":
        """The recipe that a share's :class:`distill.formats.share.Recipe` (data) describes; ``ValueError`` for an
        unknown augmentation. The share's schema holds the recipe; the trainer interprets it here."""
        return cls(epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, momentum=recipe.momentum,
                   weight_decay=recipe.weight_decay, decay_at_half=recipe.lr_decay == "half",
                   augment=Augment.parse(recipe.augment))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against a target that is either class ids (N,) or probabilities (N, K).

    ``weight`` (N,) scales each sample's loss; the batch's loss is still the mean over its N samples,
    so weights that average one over the training set keep the step size's meaning.
    """
    hard = target.dtype in (torch.int64, torch.int32, torch.uint8)
    if hard and weight is None:
        return F.cross_entropy(logits, target.long())
    if hard:
        per_sample = F.cross_entropy(logits, target.long(), reduction="none")
    else:
        # Not F.cross_entropy with probability targets: it rounds differently in the last bit, and this
        # expression keeps every earlier soft-label result bit-reproducible.
        per_sample = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    return (per_sample if weight is None else per_sample * weight).mean()


def train_network(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    recipe: TrainRecipe,
    generator: torch.Generator,
    *,
    weights: torch.Tensor | None = None,
    after_step: Callable[[int], None] | None = None,
    after_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` in place with SGD.

    images: (N, C, H, W) float32, already preprocessed, on the model's device.
    targets: (N,) int64 class ids or (N, K) float probabilities.
    weights: optional (N,) per-image loss weights (see :func:`soft_cross_entropy`), on the same device.
    ``after_step(step)`` runs after each optimiser step (1-based), ``after_epoch(epoch, stats)``
    after each epoch (1-based). Returns per-epoch ``{"loss", "acc"}`` on the training batches.
    """
    if len(images) == 0 or len(images) != len(targets):
        raise ValueError(f"train_network needs as many targets as images, and at least one; got {len(images)} and {len(targets)}.")
    if weights is not None and weights.shape != (len(images),):
        raise ValueError(f"train_network needs one weight per image; got shape {tuple(weights.shape)} for {len(images)} images.")
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sched = None
    if recipe.decay_at_half and recipe.epochs > 1:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[recipe.epochs // 2], gamma=0.1)
    n = len(images)
    hard = targets if targets.ndim == 1 else targets.argmax(1)
    aug_gen = device_generator(generator, images.device) if recipe.augment is not None else None
    step, history = 0, []
    model.train()
    for epoch in range(1, recipe.epochs + 1):
        order = torch.randperm(n, generator=generator).to(images.device)
        aug = epoch_augmentation(recipe, aug_gen, images)
        # Loss and accuracy stay on the device until the epoch ends: a .item() per step would make the
        # CPU wait for the GPU at every step.
        tot_loss = torch.zeros((), device=images.device)
        tot_correct = torch.zeros((), device=images.device)
        for k, start in enumerate(range(0, n, recipe.batch_size)):
            idx = order[start:start + recipe.batch_size]
            x = images[idx]
            if aug is not None:
                x = recipe.augment.apply(x, select(aug, (k, slice(0, len(idx)))))
            out = model(x)
            loss = soft_cross_entropy(out, targets[idx], None if weights is None else weights[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            with torch.no_grad():
                tot_loss += loss.detach().float() * len(idx)
                tot_correct += (out.argmax(1) == hard[idx]).sum()
            if after_step is not None:
                after_step(step)
        if sched is not None:
            sched.step()
        stats = {"loss": float(tot_loss) / n, "acc": float(tot_correct) / n}
        history.append(stats)
        if after_epoch is not None:
            after_epoch(epoch, stats)
    return history


def epoch_augmentation(recipe: TrainRecipe, generator: torch.Generator | None, images: torch.Tensor) -> AugParams | None:
    """One epoch's augmentation parameters, (steps, batch, ...) on ``generator``'s device, or None.

    Drawn once per epoch for every batch (row k is batch k; a short last batch uses the first rows of
    its draw), so the training loop itself draws nothing.
    """
    if recipe.augment is None or generator is None:
        return None
    n = len(images)
    return recipe.augment.draw(min(recipe.batch_size, n), generator, tuple(images.shape[-2:]),
                               steps=-(-n // recipe.batch_size), dtype=images.dtype)


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
