"""The run folder of ``distill run``: checkpoint, metrics log and image grids.

Layout (docs/method.md, "The run folder")::

    RUNDIR/config.toml      the fully resolved RunConfig
    RUNDIR/checkpoint.pt    the latest good state; format distill-run-checkpoint, written atomically
    RUNDIR/metrics.jsonl    one JSON object a line, "kind": "iteration" or "eval"
    RUNDIR/grid_NNNNN.png   the synthetic images at each evaluation, one row per class, preprocessing undone
    RUNDIR/synthetic.h5     the final synthetic set (distill.formats.synset), read by export and audit

The checkpoint is a ``torch.save`` dict: ``format``, ``format_version``,
``iteration`` (completed iterations), ``images``, ``labels``, ``logits`` (or
None), ``log_lr``, ``optimizers`` (name -> state dict), ``metrics_offset``
(bytes of metrics.jsonl that belong to the state) and ``config``. It holds no
generator state because every iteration derives its own generators from
``(seed, iteration)``.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import torch

from ..data import Preprocessing
from ..errors import DistillError, FormatError
from ..formats.common import check_version
from ..formats.share import labelled_grid
from ..formats.synset import SYNSET_FILE
from ..io import append_text, atomic_path, truncate_in_place, write_bytes_atomic

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FORMAT = "distill-run-checkpoint"
VERSION_MAJOR, VERSION_MINOR = 1, 0


def grid_name(iteration: int) -> str:
    return f"grid_{iteration:05d}.png"


def has_run(folder: str | os.PathLike) -> bool:
    """True when ``folder`` already holds (part of) a run."""
    folder = Path(folder)
    return any((folder / f).exists() for f in (CHECKPOINT_FILE, METRICS_FILE, SYNSET_FILE))


def restartable(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds no checkpoint and no synthetic set: a run stopped before its first
    checkpoint, which nothing can resume, so a new run may start over there."""
    folder = Path(folder)
    return not (folder / CHECKPOINT_FILE).exists() and not (folder / SYNSET_FILE).exists()


def clear_run(folder: str | os.PathLike) -> None:
    """Remove what a run stopped before its first checkpoint left: its metrics log and grids."""
    folder = Path(folder)
    for path in [folder / METRICS_FILE, *folder.glob("grid_*.png")]:
        path.unlink(missing_ok=True)


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` (tensors moved to the CPU by the caller or not) atomically with its format version."""
    # Serialised in memory first: torch.save's zip writer reports a full disk as a RuntimeError
    # ("unexpected pos ..."), a Python write as an OSError that atomic_path turns into one sentence.
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": f"{VERSION_MAJOR}.{VERSION_MINOR}", **payload}, buf)
    write_bytes_atomic(path, buf.getbuffer())


def load_checkpoint(path: str | os.PathLike, device: torch.device) -> dict:
    path = Path(path)
    if not path.exists():
        raise DistillError(f"--resume was given but {path.parent} has no {path.name} to continue from; drop --resume to start a new run.")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle and zip errors come in many types
        raise FormatError(f"{path} cannot be read as a run checkpoint ({type(e).__name__}).") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"{path} is not a distill run checkpoint.")
    check_version(str(path), ck.get("format_version", ""), VERSION_MAJOR, VERSION_MINOR, "run checkpoint")
    return ck


def _finite_or_none(v):
    """JSON has no NaN/Inf; a missing value says 'not measured' more honestly than a fake number."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


class MetricsLog:
    """Append-only ``metrics.jsonl``; flushed every line so a crash loses at most the line being written."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate(self, offset: int) -> None:
        """Drop what was logged after the checkpoint being resumed (those iterations run again)."""
        if self.enabled and os.path.lexists(self.path):
            truncate_in_place(self.path, offset, what="metrics log")

    def write(self, record: dict) -> None:
        if self.enabled:
            append_text(self.path, json.dumps(_finite_or_none(record), sort_keys=True) + "\n", what="metrics log")

    def offset(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_grid(path: str | os.PathLike, images: torch.Tensor, preprocessing: Preprocessing, ipc: int,
              class_names: list[str] | None = None) -> None:
    """PNG of ``images`` (N, C, H, W) network space, class-major order, ``ipc`` per row; ZCA/normalisation undone.

    With ``class_names`` each row is labelled with its class.
    """
    shown = preprocessing.invert(images.detach().cpu())
    with atomic_path(path) as tmp:
        labelled_grid(shown, ipc, class_names, padding=1).save(tmp, format="PNG")
