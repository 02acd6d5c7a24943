"""The learnable synthetic set: image initialisers, soft-label initialisation, the step size.

Three things are learned: the images ``(N, C, H, W)`` in network space, per-image
label logits ``(N, K)`` (targets are ``softmax(logits / T)``), and the student's
step size, held as its logarithm so that no update can make it zero or negative
(docs/method.md, "small datasets").
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

from ..data import Preprocessing, Split
from ..errors import DistillError
from ..models import ParamSpec, flat_forward

log = logging.getLogger(__name__)

# name -> fn(ipc, num_classes, channels, size, generator, train, preprocessing, prefer=None, *, buffer, arg)
# -> (images, labels); buffer is the buffer folder, arg what follows "name:" in --init (e.g. public:PATH).
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
    return name.partition(":")[0] in _NEEDS_REAL


def class_labels(ipc: int, num_classes: int) -> torch.Tensor:
    """(ipc * K,) int64: ``ipc`` images of class 0, then class 1, ... (the grid's row order)."""
    return torch.arange(num_classes).repeat_interleave(ipc)


@register_init("real", needs_real=True)
def init_real(ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
              train: Split | None, preprocessing: Preprocessing, prefer: torch.Tensor | None = None, **_
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` training images per class, drawn without replacement, preprocessed (CPU float32).

    prefer: optional (N_train,) bool; images where it is True are drawn first. A class with
    fewer than ``ipc`` of them is topped up from its others, with one warning.
    """
    return _draw_real(ipc, num_classes, generator, train, preprocessing, prefer, scarce="refuse")


@register_init("real-or-noise", needs_real=True)
def init_real_or_noise(ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
                       train: Split | None, preprocessing: Preprocessing, prefer: torch.Tensor | None = None, **_
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``real``; a class with fewer than ``ipc`` training images keeps all of them and starts the rest from noise.

    Why: at a site that holds 1 image of a class, ``noise`` would start every class from noise, also
    the classes it holds hundreds of images of (docs/hospitals.md).
    """
    return _draw_real(ipc, num_classes, generator, train, preprocessing, prefer, scarce="noise")


def _draw_real(ipc: int, num_classes: int, generator: torch.Generator, train: Split | None, preprocessing: Preprocessing,
               prefer: torch.Tensor | None, scarce: str, source: str = "training") -> tuple[torch.Tensor, torch.Tensor]:
    """Both real initialisers (and the public one); ``scarce`` says what a class with fewer than ``ipc`` images
    does: "refuse" or "noise"; ``source`` names the images in messages."""
    if train is None:
        name = "real" if scarce == "refuse" else "real-or-noise"
        raise DistillError(f"--init {name} needs the buffer's training images, which could not be loaded; use --init noise or --data.")
    picks, short = [], {}
    for c in range(num_classes):
        idx = torch.nonzero(train.labels == c).flatten()
        if len(idx) < ipc:
            if scarce == "refuse":
                raise DistillError(f"Class {c} has only {len(idx)} {source} images, fewer than --ipc {ipc}; lower --ipc, "
                                   "or use --init real-or-noise (the missing images start from noise) or --init noise.")
            short[c] = len(idx)
        order = idx[torch.randperm(len(idx), generator=generator)]
        if prefer is not None:
            good = prefer[order]
            if int(good.sum()) < min(ipc, len(idx)):
                log.warning("Class %d has only %d training image(s) that the labelling expert classifies correctly, fewer "
                            "than --ipc %d; the others start from images it misclassifies.", c, int(good.sum()), ipc)
            order = torch.cat([order[good], order[~good]])  # stable: the random order is kept within each part
        picks.append(order[:ipc])
    images = preprocessing(train.images[torch.cat(picks)])
    if short:
        log.warning("Class(es) %s have fewer than --ipc %d training images (%s); their other synthetic images start "
                    "from noise.", ", ".join(map(str, short)), ipc, ", ".join(f"{c}: {n}" for c, n in short.items()))
        blocks, start = [], 0
        for c, pick in enumerate(picks):  # each class: its real images, then noise up to ipc
            blocks.append(images[start:start + len(pick)])
            start += len(pick)
            if len(pick) < ipc:
                blocks.append(torch.randn(ipc - len(pick), *images.shape[1:], generator=generator))
        images = torch.cat(blocks)
    return images, class_labels(ipc, num_classes)


@register_init("noise")
def init_noise(ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
               train: Split | None, preprocessing: Preprocessing, prefer: torch.Tensor | None = None, **_
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal pixels: the scale of normalised real images (zero mean, unit variance per channel)."""
    n = ipc * num_classes
    return torch.randn(n, channels, size, size, generator=generator), class_labels(ipc, num_classes)


def initial_images(name: str, ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
                   train: Split | None, preprocessing: Preprocessing, prefer: torch.Tensor | None = None,
                   buffer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial images and labels of ``--init name`` (``name`` may be ``registered:argument``)."""
    base, _, arg = name.partition(":")
    if base not in _INITIALISERS:
        raise DistillError(f"Unknown --init {name!r}; choose one of {', '.join(list_inits())}.")
    return _INITIALISERS[base](ipc, num_classes, channels, size, generator, train, preprocessing, prefer=prefer,
                               buffer=buffer, arg=arg)


@torch.no_grad()
def initial_logits(model: nn.Module, spec: ParamSpec, expert_params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The expert's logits ``(N, K)`` on the initial images: soft labels start as the expert's belief."""
    return flat_forward(model, spec, expert_params, images).float()


PREDICT_CHUNK = 1024  # images per forward pass when an expert classifies the training split


@torch.no_grad()
def correctly_classified(model: nn.Module, spec: ParamSpec, expert_params: torch.Tensor, images: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool on the CPU: whether the expert's arg-max on each image is its label.

    images: (N, C, H, W) preprocessed, on the CPU; moved to ``expert_params``'s device a chunk at a time.
    Why: a soft label starts as the expert's logits, so an image it misclassifies would start with
    a label that points to the wrong class (DATM draws only correctly classified images).
    """
    device = expert_params.device
    hits = [flat_forward(model, spec, expert_params, images[i:i + PREDICT_CHUNK].to(device)).argmax(1).cpu()
            == labels[i:i + PREDICT_CHUNK] for i in range(0, len(images), PREDICT_CHUNK)]
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


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


@torch.no_grad()
def floor_log_step(log_lr: torch.Tensor, floor: float) -> bool:
    """Raise ``log_lr`` in place to ``floor`` (a log step size) when below it; True when it did.

    Why: at 1 image per class the learned step size fell from 0.01 to 0.0007, and networks
    trained on the set with it barely left their initialisation (docs/method.md).
    """
    low = bool(log_lr < floor)
    if low:
        log_lr.fill_(floor)
    return low
