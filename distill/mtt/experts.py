"""The buffer as the distiller sees it: validated expert trajectories, read lazily.

A *segment* is what one MTT iteration matches: expert ``e``, start snapshot
``t`` and target snapshot ``t + M``. Snapshot indices count snapshot
intervals, not epochs: in a buffer made with ``--snapshot-every k`` one
interval is ``k`` optimiser steps; in the default buffer it is one epoch.
``expert_epochs`` (M) and the start epochs of :class:`~distill.config.RunConfig`
are in these units (docs/method.md).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import DistillError, FormatError
from ..formats.trajectory import (SHAPING_SETTINGS, ExpertFile, check_numbering, list_experts, read_buffer_preprocessing,
                                 read_expert, shaping_settings)
from ..models import create_model

log = logging.getLogger(__name__)

# Attributes every expert of one buffer must share for their segments to be interchangeable.
_SHARED_ATTRS = ("model", "num_classes", "channels", "size", "snapshot_every", "steps_per_epoch")
DEFAULT_CACHE = 8  # segments kept on the device; a ConvNet-3 segment is ~2.6 MB, a ResNet-18 one ~90 MB


@dataclass(frozen=True)
class Segment:
    expert: int  # position in ExpertPool.experts
    start: int  # snapshot index t
    target: int  # snapshot index t + M


class ExpertPool:
    """The experts of one buffer folder, checked for consistency; snapshots load on demand.

    Raises :class:`DistillError` (one sentence) for an empty or inconsistent buffer.
    """

    def __init__(self, folder: str | os.PathLike, cache_size: int = DEFAULT_CACHE):
        self.folder = Path(folder)
        paths = list_experts(self.folder)
        if not paths:
            raise DistillError(f"{self.folder} holds no expert_*.h5 files; make them with 'distill buffer --out {self.folder}'.")
        check_numbering(self.folder)
        self.preprocessing, self.fingerprint, self.preprocessing_sha256 = read_buffer_preprocessing(self.folder)
        self.experts: list[ExpertFile] = [read_expert(p) for p in paths]  # each checked against its checksum
        first = self.experts[0]
        for e in self.experts:
            differs = [k for k in _SHARED_ATTRS if e.attrs.get(k) != first.attrs.get(k)]
            if differs or e.model_kwargs != first.model_kwargs or e.num_params != first.num_params:
                what = ", ".join(differs) or "model arguments"
                raise FormatError(f"{e.path.name} differs from {first.path.name} in {what}; a buffer must hold experts of one kind.")
            settings, first_settings = shaping_settings(e), shaping_settings(first)
            mixed = [k for k in SHAPING_SETTINGS if settings[k] != first_settings[k]]
            if mixed:
                k = mixed[0]
                raise FormatError(f"{e.path.name} was made with {k} {settings[k]!r} but {first.path.name} with "
                                  f"{first_settings[k]!r}; a buffer must hold experts made with one setting, so "
                                  "rebuild it or move one kind to another folder.")
            if e.attrs.get("preprocessing_sha256") != self.preprocessing_sha256:
                raise FormatError(f"{e.path.name} was made with another preprocessing than {self.folder}/preprocessing.h5; rebuild the buffer.")
        self.num_snapshots = min(e.num_snapshots for e in self.experts)
        self._cache: OrderedDict[tuple[Segment, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size

    # ------------------------------------------------------------------ what the experts are

    @property
    def model_name(self) -> str:
        return str(self.experts[0].attrs["model"])

    @property
    def model_kwargs(self) -> dict:
        return dict(self.experts[0].model_kwargs)

    @property
    def num_classes(self) -> int:
        return int(self.experts[0].attrs["num_classes"])

    @property
    def channels(self) -> int:
        return int(self.experts[0].attrs["channels"])

    @property
    def size(self) -> int:
        return int(self.experts[0].attrs["size"])

    @property
    def train_recipe(self) -> dict:
        return dict(self.experts[0].train)

    def build_model(self) -> nn.Module:
        """A network of the experts' architecture (its own weights are never used by the unroll)."""
        return create_model(self.model_name, self.num_classes, self.channels, self.size, **self.model_kwargs)

    def summary(self) -> dict:
        """What the synthetic set records about the experts it was distilled from."""
        a = self.experts[0].attrs
        return {"count": len(self.experts), "epochs": int(self.train_recipe.get("epochs", -1)),
                "snapshot_every": int(a.get("snapshot_every", 0)), "steps_per_epoch": int(a.get("steps_per_epoch", -1)),
                "snapshots": self.num_snapshots, "train": self.train_recipe}

    # ------------------------------------------------------------------ segments

    def check_span(self, min_start: int, max_start: int, span: int) -> None:
        """Every segment [t, t + span] with min_start <= t <= max_start must exist in every expert."""
        intervals = self.num_snapshots - 1
        if max_start + span > intervals:
            raise DistillError(
                f"max_start_epoch ({max_start}) + expert_epochs ({span}) = {max_start + span} exceeds the "
                f"{intervals} snapshot intervals stored in {self.folder}; lower --max-start-epoch or --expert-epochs, "
                "or rebuild the buffer with more --epochs or a smaller --snapshot-every."
            )
        if not 0 <= min_start <= max_start:
            raise DistillError(f"min_start_epoch ({min_start}) must be between 0 and max_start_epoch ({max_start}).")

    def sample(self, generator: torch.Generator, count: int, min_start: int, max_start: int, span: int) -> list[Segment]:
        """``count`` segments: expert and start drawn uniformly (start in [min_start, max_start])."""
        experts = torch.randint(len(self.experts), (count,), generator=generator).tolist()
        starts = torch.randint(min_start, max_start + 1, (count,), generator=generator).tolist()
        return [Segment(e, t, t + span) for e, t in zip(experts, starts)]

    def expert_steps(self, seg: Segment) -> int:
        """Optimiser steps the expert took between the segment's two snapshots."""
        steps = self.experts[seg.expert].snapshot_steps
        return int(steps[seg.target] - steps[seg.start])

    def pair(self, seg: Segment, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ*_t, θ*_{t+M}) as flat float32 vectors ``(P,)`` on ``device``; a small LRU cache avoids re-reading."""
        key = (seg, str(device))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        both = self.experts[seg.expert].snapshots([seg.start, seg.target]).to(device)
        value = (both[0], both[1])
        self._cache[key] = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def snapshot(self, expert: int, index: int, device: torch.device) -> torch.Tensor:
        """One snapshot ``(P,)`` on ``device`` (not cached: used once, for the soft-label init)."""
        return self.experts[expert].snapshots([index])[0].to(device)
