"""The ``.h5`` share that one hospital sends another (schema: docs/share-format.md).

This module defines the in-memory :class:`Share`; the writer and the validating
reader live beside it. It imports nothing from ``mtt`` or ``buffer``: a share is
readable without the method that made it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import Preprocessing


@dataclass
class Recipe:
    """How the recipient should train on the share (the MTT reference's evaluation protocol by default)."""

    model: str  # a name in distill.models' registry
    model_kwargs: dict
    lr: float  # the learned step size
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    lr_decay: str  # "half" = lr x 0.1 after half the epochs; "none"
    augment: str  # distill.augment.Augment.parse syntax, or "none"
    loss: str  # "soft_cross_entropy" (targets softmax(logits / T)) or "cross_entropy"


@dataclass
class Share:
    images: torch.Tensor  # (N, C, H, W) float32, preprocessed (network) space
    labels: torch.Tensor  # (N,) int64 hard class ids
    label_logits: torch.Tensor | None  # (N, K) float32 soft-label logits, or None
    label_temperature: float
    class_names: list[str]
    preprocessing: Preprocessing
    recipe: Recipe
    provenance: dict = field(default_factory=dict)  # method, hyperparameters, experts, dataset fingerprint, software
    privacy: dict = field(default_factory=dict)  # audit summary (see distill/privacy.py), "forced" flag
    license: str = "CC-BY-4.0"  # SPDX identifier
    description: str = ""
    citation: str = ""
    created: str = ""
    format_version: str = ""
    payload_sha256: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def targets(self) -> torch.Tensor:
        """Training targets: softmax(logits / T) probabilities (N, K), or the class ids (N,)."""
        if self.label_logits is None:
            return self.labels
        return torch.softmax(self.label_logits / self.label_temperature, dim=1)
