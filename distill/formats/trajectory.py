"""Expert trajectory files (``buffers/expert_0000.h5``) and the buffer's preprocessing file.

Schema v1 of one expert file:

- ``snapshots``: (T, P) parameters at T moments, flat in ``param_names`` order,
  stored as float32, float16, or bfloat16 (as uint16 bit patterns).
- ``snapshot_steps``: (T,) int64 optimiser step of each snapshot (0 = initial).
- ``history/train_loss``, ``history/train_acc``, ``history/val_acc``: (epochs,) float64.
- attributes: ``format``, ``format_version``, ``model``, ``model_kwargs`` (JSON),
  ``num_classes``, ``channels``, ``size``, ``param_names``/``param_shapes`` (JSON),
  ``expert_index``, ``seed``, ``train`` (JSON recipe), ``snapshot_every``
  (steps; 0 = per epoch), ``steps_per_epoch``, ``snapshot_dtype``,
  ``fingerprint`` (JSON: name, class names, counts, sha256 of the source),
  ``preprocessing_sha256`` (of the buffer's ``preprocessing.h5``),
  ``software`` (JSON), ``created``.
- since 1.1: ``snapshots_sha256``, the SHA-256 of the ``snapshots`` bytes as stored (row by
  row, C order) followed by those of ``snapshot_steps``. Readers check it and refuse a file
  whose data does not match (a torn or damaged write); a 1.0 file without it is read unchecked.

The buffer folder also holds ``preprocessing.h5`` (see :mod:`.common`), which
every later stage applies, with the split the experts trained on (format 1.1,
:mod:`.split`), and ``config.toml``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from ..config import SNAPSHOT_DTYPES
from ..data import Preprocessing
from ..errors import DistillError, FormatError
from ..io import atomic_path, new_h5, sha256_file
from .common import FORMAT_KEY, VERSION_KEY, get_attr, get_json, open_checked, read_preprocessing, set_json, utc_now, write_preprocessing
from .split import write_split_group

TRAJECTORY_FORMAT = "distill-trajectory"
PREPROCESSING_FORMAT = "distill-preprocessing"
VERSION_MAJOR, VERSION_MINOR = 1, 1
FORMAT_VERSION = f"{VERSION_MAJOR}.{VERSION_MINOR}"
# preprocessing.h5 has its own minor version: 1.1 added the split the experts trained on (formats/split.py); 1.0 still reads
PREPROCESSING_VERSION_MINOR = 1
PREPROCESSING_VERSION = f"{VERSION_MAJOR}.{PREPROCESSING_VERSION_MINOR}"
PREPROCESSING_FILE = "preprocessing.h5"
EXPERT_PATTERN = re.compile(r"^expert_(\d{4,})\.h5$")


def expert_path(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / f"expert_{index:04d}.h5"


def list_experts(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if EXPERT_PATTERN.match(p.name))


def expert_index(path: Path) -> int:
    return int(EXPERT_PATTERN.match(path.name).group(1))


def numbering_gaps(folder: str | os.PathLike) -> list[int]:
    """Expert indices missing below the highest one in ``folder`` (empty when the numbering is whole)."""
    present = {expert_index(p) for p in list_experts(folder)}
    return sorted(set(range(max(present, default=-1) + 1)) - present)


def check_numbering(folder: str | os.PathLike) -> None:
    """Refuse a buffer whose expert numbering has a gap: an expert was deleted or never finished."""
    gaps = numbering_gaps(folder)
    if gaps:
        names = ", ".join(expert_path(folder, i).name for i in gaps[:3]) + (", ..." if len(gaps) > 3 else "")
        raise DistillError(f"The expert numbering of {folder} has a gap ({names} missing); finish the buffer with "
                           f"'distill buffer --out {folder}' and its settings, then run again.")


def snapshots_checksum(snapshots: h5py.Dataset | np.ndarray, steps: np.ndarray) -> str:
    """SHA-256 of the stored snapshot rows, then of the steps; reads one row at a time."""
    h = hashlib.sha256()
    for i in range(len(snapshots)):
        h.update(np.ascontiguousarray(snapshots[i]).tobytes())
    h.update(np.ascontiguousarray(steps, dtype=np.int64).tobytes())
    return h.hexdigest()


def encode_snapshots(flat: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return flat.float().cpu().numpy()
    if dtype == "float16":
        return flat.half().cpu().numpy()
    if dtype == "bfloat16":
        return flat.bfloat16().cpu().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"snapshot dtype must be one of {', '.join(SNAPSHOT_DTYPES)}; got {dtype!r}.")


def decode_snapshots(arr: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(arr)).float()


# Attributes stored as JSON text; every other TrajectoryMeta field is a plain HDF5 attribute.
JSON_KEYS = ("model_kwargs", "param_names", "param_shapes", "fingerprint", "train", "software")


@dataclass(frozen=True)
class TrajectoryMeta:
    """What an expert file says about itself, besides its snapshots (one attribute per field)."""

    model: str  # registered model name
    num_classes: int
    channels: int
    size: int  # image side, pixels
    param_names: list[str]  # flat snapshot layout: parameters in this order ...
    param_shapes: list[list[int]]  # ... with these shapes
    expert_index: int = 0
    seed: int = 0  # the buffer's seed; expert i draws from derive_seed(seed, i)
    snapshot_every: int = 0  # optimiser steps between snapshots; 0 = once per epoch
    steps_per_epoch: int = 0
    preprocessing_sha256: str = ""  # of the buffer's preprocessing.h5
    model_kwargs: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)  # the dataset's: name, class names, counts, sha256
    train: dict = field(default_factory=dict)  # the expert's training recipe
    software: dict = field(default_factory=dict)


def write_expert(path: str | os.PathLike, snapshots: torch.Tensor, snapshot_steps: list[int], *, history: dict,
                 meta: TrajectoryMeta, snapshot_dtype: str = "float32") -> None:
    """Write one expert atomically. snapshots: (T, P) float; history: name -> (epochs,) values."""
    with atomic_path(path) as tmp:
        with new_h5(tmp) as f:
            f.attrs["format"] = TRAJECTORY_FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["snapshot_dtype"] = snapshot_dtype
            f.attrs["created"] = utc_now()
            for fld in fields(meta):
                value = getattr(meta, fld.name)
                if fld.name in JSON_KEYS:
                    set_json(f, fld.name, value)
                else:
                    f.attrs[fld.name] = value
            data = encode_snapshots(snapshots, snapshot_dtype)
            steps = np.asarray(snapshot_steps, dtype=np.int64)
            f.create_dataset("snapshots", data=data, chunks=(1, data.shape[1]))
            f.create_dataset("snapshot_steps", data=steps)
            f.attrs["snapshots_sha256"] = snapshots_checksum(data, steps)
            h = f.create_group("history")
            for k, v in history.items():
                h.create_dataset(k, data=np.asarray(v, dtype=np.float64))


@dataclass
class ExpertFile:
    """A lazily read expert trajectory. Snapshots are read on demand, one row at a time."""

    path: Path
    attrs: dict
    fingerprint: dict
    model_kwargs: dict
    train: dict
    param_names: list[str]
    param_shapes: list[list[int]]
    snapshot_steps: np.ndarray
    num_params: int

    @property
    def num_snapshots(self) -> int:
        return len(self.snapshot_steps)

    def snapshots(self, indices: list[int] | None = None) -> torch.Tensor:
        """(len(indices), P) float32 on the CPU."""
        with _open(self.path) as f:
            ds = f["snapshots"]
            if indices is None:
                arr = ds[()]
            else:
                arr = np.stack([ds[i] for i in indices])
        return decode_snapshots(arr, self.attrs["snapshot_dtype"])

    def history(self) -> dict[str, np.ndarray]:
        with _open(self.path) as f:
            return {k: f["history"][k][()] for k in f["history"]}


def _open(path: Path) -> h5py.File:
    """An expert file opened again during a run; one sentence when it was deleted or moved meanwhile.

    Its format and version were checked when it was listed (:func:`read_expert`, through open_checked).
    """
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DistillError(f"The expert file {path} disappeared during the run; restore it (or rebuild the buffer) "
                           "and continue with --resume.") from None
    except OSError:
        raise FormatError(f"{path} is no longer a readable HDF5 trajectory file; rebuild the buffer.") from None


# Every setting that shapes an expert's file: experts that differ in one of them are not interchangeable,
# and a buffer's config.toml could not describe them all. "batched" is whether the experts went through
# the vmapped path (batching changes the rounding; the group size does not change an expert's arithmetic,
# so a buffer grown with more experts per group stays one kind).
SHAPING_SETTINGS = ("model", "seed", "snapshot_every", "snapshot_dtype", "epochs", "lr", "momentum", "weight_decay",
                    "batch_size", "augment", "batched", "bf16")


def shaping_settings(e: ExpertFile) -> dict:
    """The :data:`SHAPING_SETTINGS` an expert file records; None where an older file does not say."""
    batch_experts = e.train.get("batch_experts")
    return {"model": e.attrs.get("model"), "seed": e.attrs.get("seed"), "snapshot_every": e.attrs.get("snapshot_every"),
            "snapshot_dtype": e.attrs.get("snapshot_dtype"),
            **{k: e.train.get(k) for k in ("epochs", "lr", "momentum", "weight_decay", "batch_size", "augment")},
            "batched": None if batch_experts is None else batch_experts > 1 or bool(e.train.get("bf16")),
            "bf16": e.train.get("bf16")}


def read_expert(path: str | os.PathLike, verify: bool = True) -> ExpertFile:
    """Open an expert file and check its schema; with ``verify``, also the checksum of its snapshots."""
    path = Path(path)
    with open_checked(path, TRAJECTORY_FORMAT, VERSION_MAJOR, VERSION_MINOR, "trajectory",
                      unreadable=f"{path} is not a readable HDF5 trajectory file.",
                      foreign=f"{path} is not a distill trajectory file.") as f:
        if "snapshots" not in f or "snapshot_steps" not in f:
            raise FormatError(f"{path} lacks its snapshots.")
        attrs = {k: get_attr(f, k) for k in f.attrs if k not in JSON_KEYS}
        out = ExpertFile(
            path=path, attrs=attrs, fingerprint=get_json(f, "fingerprint"), model_kwargs=get_json(f, "model_kwargs"),
            train=get_json(f, "train"), param_names=get_json(f, "param_names"), param_shapes=get_json(f, "param_shapes"),
            snapshot_steps=f["snapshot_steps"][()], num_params=int(f["snapshots"].shape[1]),
        )
        if f["snapshots"].shape[0] != len(out.snapshot_steps):
            raise FormatError(f"{path}: {f['snapshots'].shape[0]} snapshots but {len(out.snapshot_steps)} steps.")
        stored = attrs.get("snapshots_sha256")
        if verify and stored is not None and snapshots_checksum(f["snapshots"], out.snapshot_steps) != stored:
            raise FormatError(f"The snapshots in {path} do not match their checksum (a torn or damaged write); "
                              "running 'distill buffer' again with the buffer's settings retrains that expert.")
    return out


def write_buffer_preprocessing(folder: str | os.PathLike, pre: Preprocessing, fingerprint: dict,
                               split_indices: dict | None = None) -> Path:
    path = Path(folder) / PREPROCESSING_FILE
    with atomic_path(path) as tmp:
        with new_h5(tmp) as f:
            f.attrs[FORMAT_KEY] = PREPROCESSING_FORMAT
            f.attrs[VERSION_KEY] = PREPROCESSING_VERSION
            set_json(f, "fingerprint", fingerprint)
            write_preprocessing(f.create_group("preprocessing"), pre)
            write_split_group(f, split_indices)
    return path


@contextlib.contextmanager
def open_buffer_preprocessing(folder: str | os.PathLike) -> Iterator[tuple[Path, h5py.File]]:
    """(path, open file) of the buffer's checked ``preprocessing.h5``; one sentence for a missing, foreign,
    unreadable or newer-major file."""
    path = Path(folder) / PREPROCESSING_FILE
    if not path.exists():
        raise FormatError(f"{folder} has no {PREPROCESSING_FILE}; is it a buffer folder made by 'distill buffer'?")
    try:
        with open_checked(path, PREPROCESSING_FORMAT, VERSION_MAJOR, PREPROCESSING_VERSION_MINOR, "preprocessing",
                          foreign=f"{path} is not a distill preprocessing file.") as f:
            yield path, f
    except OSError:
        raise FormatError(f"{path} is not a readable HDF5 file.") from None


def read_buffer_preprocessing(folder: str | os.PathLike) -> tuple[Preprocessing, dict, str]:
    """Return (preprocessing, dataset fingerprint, sha256 of the file)."""
    with open_buffer_preprocessing(folder) as (path, f):
        return read_preprocessing(f["preprocessing"]), get_json(f, "fingerprint"), sha256_file(path)
