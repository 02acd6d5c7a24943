"""The differential-privacy record: what a DP buffer spent, carried unchanged into runs and shares.

One dataclass, :class:`DPRecord`, written by ``distill buffer --dp-epsilon`` into the
buffer folder (``dp.json``, atomically, with ``format``/``format_version``), read by
``distill run`` (which then refuses anything that would touch the private data) and
copied verbatim into the share's privacy group by ``distill export``.

The guarantee it states: every released object (expert snapshots, any DP statistics
released beside them, and everything computed only from those) is (epsilon, delta)-
differentially private with respect to adding or removing one training image. A
patient with k images is protected at group level only (roughly k * epsilon).

This module is the only place that spells the file name and the keys.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError

DP_FILE = "dp.json"
DP_FORMAT = "distill-dp-record"
DP_VERSION = "1.0"

# DP statistics a DP buffer may release beside its experts (``distill buffer --dp-init class-means``):
# one HDF5 file with ``format``/``format_version`` attributes and the dataset below, shape
# [classes, images_per_class_or_1, channels, size, size], in the buffer's preprocessed space.
# ``distill run --init dp-means`` starts from it. Its epsilon is part of DPRecord.epsilon.
DP_STATS_FILE = "dp_stats.h5"
DP_STATS_FORMAT = "distill-dp-stats"
DP_STATS_VERSION = "1.0"
DP_STATS_CLASS_MEANS = "class_means"

PRIVACY_UNIT = "one training image"
#: Where a DP buffer's normalisation comes from: fixed constants, never the private images.
NORMALISATION_FIXED = "fixed"


@dataclass(frozen=True)
class DPRecord:
    """The (epsilon, delta) guarantee of a DP buffer and how it was obtained.

    ``epsilon`` is the total spent by everything released (DP-SGD for all experts
    composed under ``accountant``, plus ``stats_epsilon`` for DP statistics released
    beside them, e.g. noised per-class means for initialisation). ``delta`` likewise.
    """

    epsilon: float
    delta: float
    accountant: str  # "prv" or "rdp" (Opacus' names)
    noise_multiplier: float  # sigma of DP-SGD, in units of the clip norm
    clip: float  # per-sample gradient L2 bound
    sample_rate: float  # Poisson sampling probability q = batch_size / n
    steps: int  # optimiser steps per expert
    experts: int
    shards: int  # experts train on this many disjoint shards (parallel composition); 1 = all on all data
    train_size: int  # n, the private training images (public: it fixes q and delta < 1/n)
    opacus_version: str
    unit: str = PRIVACY_UNIT
    normalisation: str = NORMALISATION_FIXED
    # DP statistics released beside the experts (e.g. "class_means"), with the epsilon they cost;
    # None when none were released. ``epsilon`` above already includes stats_epsilon.
    stats: str | None = None
    stats_epsilon: float = 0.0
    sgd_epsilon: float = 0.0  # the part of ``epsilon`` spent by DP-SGD
    extra: dict[str, Any] = field(default_factory=dict)

    def sentence(self) -> str:
        """The one sentence a data-protection officer signs."""
        return (f"(ε = {self.epsilon:.3g}, δ = {self.delta:.3g})-differentially private with respect to any single "
                f"training image; a patient with several images is protected only at group level.")

    def to_json(self) -> str:
        return json.dumps({"format": DP_FORMAT, "format_version": DP_VERSION, **dataclasses.asdict(self)},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "DP record") -> "DPRecord":
        try:
            raw = json.loads(text)
        except ValueError:
            raise FormatError(f"{where} is not valid JSON.") from None
        if not isinstance(raw, dict) or raw.get("format") != DP_FORMAT:
            raise FormatError(f"{where} is not a {DP_FORMAT} record.")
        major = str(raw.get("format_version", "")).split(".")[0]
        if major != DP_VERSION.split(".")[0]:
            raise FormatError(f"{where}: DP record version {raw.get('format_version')!r} is not supported "
                              f"(this reader reads {DP_VERSION.split('.')[0]}.x).")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            record = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as e:
            raise FormatError(f"{where} lacks a field: {e}.") from None
        record.check(where)
        return record

    def check(self, where: str = "DP record") -> None:
        """Refuse a record whose values could not have come from ``distill buffer`` (a hostile or damaged share)."""
        def number(name: str, low: float, high: float = math.inf, integer: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) \
                    or not math.isfinite(v) or not low <= v <= high:
                raise FormatError(f"{where}: {name} = {v!r} is not a {'whole ' if integer else ''}number in "
                                  f"[{low:g}, {high:g}].")

        number("epsilon", 0.0)
        number("delta", 0.0, 1.0)
        number("noise_multiplier", 0.0)
        number("clip", 0.0)
        number("sample_rate", 0.0, 1.0)
        number("stats_epsilon", 0.0)
        number("sgd_epsilon", 0.0)
        for name in ("steps", "experts", "shards", "train_size"):
            number(name, 0, integer=True)
        for name in ("accountant", "opacus_version", "unit", "normalisation"):
            if not isinstance(getattr(self, name), str):
                raise FormatError(f"{where}: {name} is not text.")
        if self.stats is not None and not isinstance(self.stats, str):
            raise FormatError(f"{where}: stats is not text.")
        if not isinstance(self.extra, dict):
            raise FormatError(f"{where}: extra is not a JSON object.")


def dp_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / DP_FILE


def read_dp_record(folder: str | os.PathLike) -> DPRecord | None:
    """The buffer folder's DP record, or None for a buffer trained without DP."""
    path = dp_path(folder)
    if not path.exists():
        return None
    return DPRecord.from_json(path.read_text(encoding="utf-8"), where=str(path))
