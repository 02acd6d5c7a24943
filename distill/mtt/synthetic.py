"""The learnable synthetic set: image initialisers, soft-label initialisation, the step size.

Three things are learned: the images ``(N, C, H, W)`` in network space, per-image
label logits ``(N, K)`` (targets are ``softmax(logits / T)``), and the student's
step size, held as its logarithm so that no update can make it zero or negative
(docs/method.md, "small datasets").
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..data import Preprocessing, Split
from ..errors import DistillError
from ..models import ParamSpec, flat_forward

# name -> fn(ipc, num_classes, channels, size, generator, train, preprocessing) -> (images, labels)
Initialiser = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_INITIALISERS: dict[str, Initialiser] = {}
_NEEDS_REAL: set[str] = set()


def register_init(name: str, *, needs_real: bool = False):
    def deco(fn: Initialiser) -> Initialiser:
        _INITIALISERS[name] = fn
        if needs_real:
            _NEEDS_REAL.add(name)
        return fn

    return deco


def list_inits() -> list[str]:
    return sorted(_INITIALISERS)


def needs_real_data(name: str) -> bool:
    """Whether initialiser ``name`` draws from the real training split."""
    return name in _NEEDS_REAL


def class_labels(ipc: int, num_classes: int) -> torch.Tensor:
    """(ipc * K,) int64: ``ipc`` images of class 0, then class 1, ... (the grid's row order)."""
    return torch.arange(num_classes).repeat_interleave(ipc)


@register_init("real", needs_real=True)
def init_real(ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
              train: Split | None, preprocessing: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` training images per class, drawn without replacement, preprocessed (CPU float32)."""
    if train is None:
        raise DistillError("--init real needs the buffer's training images, which could not be loaded; use --init noise or --data.")
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(train.labels == c).flatten()
        if len(idx) < ipc:
            raise DistillError(f"Class {c} has only {len(idx)} training images, fewer than --ipc {ipc}; lower --ipc or use --init noise.")
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:ipc]])
    return preprocessing(train.images[torch.cat(picks)]), class_labels(ipc, num_classes)


@register_init("noise")
def init_noise(ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
               train: Split | None, preprocessing: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal pixels: the scale of normalised real images (zero mean, unit variance per channel)."""
    n = ipc * num_classes
    return torch.randn(n, channels, size, size, generator=generator), class_labels(ipc, num_classes)


def initial_images(name: str, ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
                   train: Split | None, preprocessing: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in _INITIALISERS:
        raise DistillError(f"Unknown --init {name!r}; choose one of {', '.join(list_inits())}.")
    return _INITIALISERS[name](ipc, num_classes, channels, size, generator, train, preprocessing)


@torch.no_grad()
def initial_logits(model: nn.Module, spec: ParamSpec, expert_params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The expert's logits ``(N, K)`` on the initial images: soft labels start as the expert's belief."""
    return flat_forward(model, spec, expert_params, images).float()


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, K) probabilities ``softmax(logits / T)``; differentiable in the logits."""
    return torch.softmax(logits / temperature, dim=1)


def log_step_size(step_size: float) -> torch.Tensor:
    if not step_size > 0:
        raise DistillError(f"The initial step size must be positive; got {step_size}.")
    return torch.tensor(math.log(step_size))


@torch.no_grad()
def bound_log_step(log_lr: torch.Tensor, before: torch.Tensor, max_step: float) -> bool:
    """Clip, in place, the change of ``log_lr`` since ``before`` to ``±max_step``; True when it clipped.

    Why: the gradient with respect to the step size can be 1e3 on a small dataset
    (docs/method.md); one unbounded step then collapses the step size.
    """
    delta = log_lr - before
    clipped = bool(delta.abs() > max_step)
    if clipped:
        log_lr.copy_(before + delta.clamp(-max_step, max_step))
    return clipped
