"""The run folder's final synthetic set (``RUNDIR/synthetic.h5``), written by ``distill run``.

It is the hand-off between distillation and export/audit: a run folder is
self-contained, so those stages never open the buffer's experts.

Schema v1:

- ``images``: (N, C, H, W) float32 in network space (after normalisation/ZCA).
- ``labels``: (N,) int64 class ids (the class each image was initialised for).
- ``label_logits``: (N, K) float32 learned soft-label logits; absent with hard labels.
- ``preprocessing/``: the buffer's preprocessing (see :mod:`.common`).
- attributes: ``format``, ``format_version``, ``created``, ``syn_lr`` (learned step
  size), ``label_temperature``, ``hard_labels``, ``iteration``, ``model``,
  ``class_names`` (JSON), ``model_kwargs`` (JSON), ``fingerprint`` (JSON, the
  dataset fingerprint from the buffer), ``method`` (JSON: every hyperparameter
  of the run, initialisation included), ``experts`` (JSON: count, epochs,
  snapshot settings and the experts' training recipe), ``software`` (JSON).
- v1.1: ``dp`` (JSON, optional): the buffer's differential-privacy record
  (:class:`~.dp_record.DPRecord`, every field), present only when the experts were
  trained with DP; export copies it into the share.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import Preprocessing
from ..errors import FormatError
from ..io import atomic_path, new_h5
from .common import get_attr, get_json, open_checked, read_preprocessing, set_json, utc_now, write_preprocessing

SYNSET_FORMAT = "distill-synthetic"
VERSION_MAJOR, VERSION_MINOR = 1, 1
SYNSET_FILE = "synthetic.h5"
_JSON_KEYS = ("class_names", "model_kwargs", "fingerprint", "method", "experts", "software")


@dataclass
class SyntheticSet:
    images: torch.Tensor  # (N, C, H, W) float32, network space
    labels: torch.Tensor  # (N,) int64
    label_logits: torch.Tensor | None  # (N, K) float32, or None for hard labels
    preprocessing: Preprocessing
    syn_lr: float
    label_temperature: float
    model: str
    class_names: list[str]
    iteration: int = 0
    model_kwargs: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    experts: dict = field(default_factory=dict)
    software: dict = field(default_factory=dict)
    dp: dict | None = None  # DPRecord fields (with its format keys) when the buffer is a DP buffer

    @property
    def hard_labels(self) -> bool:
        return self.label_logits is None

    def targets(self) -> torch.Tensor:
        """Training targets: soft probabilities softmax(logits / T), or the class ids."""
        if self.label_logits is None:
            return self.labels
        return torch.softmax(self.label_logits / self.label_temperature, dim=1)


def write_synset(path: str | os.PathLike, s: SyntheticSet) -> None:
    with atomic_path(path) as tmp:
        with new_h5(tmp) as f:
            f.attrs["format"] = SYNSET_FORMAT
            f.attrs["format_version"] = f"{VERSION_MAJOR}.{VERSION_MINOR}"
            f.attrs["created"] = utc_now()
            f.create_dataset("images", data=s.images.detach().cpu().float().numpy())
            f.create_dataset("labels", data=s.labels.detach().cpu().long().numpy())
            if s.label_logits is not None:
                f.create_dataset("label_logits", data=s.label_logits.detach().cpu().float().numpy())
            write_preprocessing(f.create_group("preprocessing"), s.preprocessing)
            f.attrs["syn_lr"] = float(s.syn_lr)
            f.attrs["label_temperature"] = float(s.label_temperature)
            f.attrs["hard_labels"] = s.hard_labels
            f.attrs["iteration"] = int(s.iteration)
            f.attrs["model"] = s.model
            for k in _JSON_KEYS:
                set_json(f, k, getattr(s, k))
            if s.dp is not None:
                set_json(f, "dp", s.dp)


def read_synset(path: str | os.PathLike) -> SyntheticSet:
    path = Path(path)
    if path.is_dir():
        path = path / SYNSET_FILE
    if not path.exists():
        raise FormatError(f"{path} does not exist; has 'distill run' finished for this folder?")
    with open_checked(path, SYNSET_FORMAT, VERSION_MAJOR, VERSION_MINOR, "synthetic set",
                      foreign=f"{path} is not a distill synthetic-set file.") as f:
        try:
            images = torch.from_numpy(f["images"][()])
            labels = torch.from_numpy(f["labels"][()])
            logits = torch.from_numpy(f["label_logits"][()]) if "label_logits" in f else None
            pre = read_preprocessing(f["preprocessing"])
        except KeyError as e:
            raise FormatError(f"{path} lacks {e}.") from None
        return SyntheticSet(images=images, labels=labels, label_logits=logits, preprocessing=pre,
                            syn_lr=float(get_attr(f, "syn_lr")), label_temperature=float(get_attr(f, "label_temperature")),
                            model=str(get_attr(f, "model")), iteration=int(get_attr(f, "iteration")),
                            dp=get_json(f, "dp", None), **{k: get_json(f, k) for k in _JSON_KEYS})
