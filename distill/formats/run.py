"""The run folder of ``distill run``: its file names, the checkpoint's format and the metrics log's records.

Layout (docs/method.md, "The run folder")::

    RUNDIR/config.toml      the fully resolved RunConfig (format distill-run-config, :mod:`distill.config`)
    RUNDIR/checkpoint.pt    the latest good state; format distill-run-checkpoint, written atomically
    RUNDIR/metrics.jsonl    one JSON object a line, "kind": "iteration" or "eval"
    RUNDIR/grid_NNNNN.png   the synthetic images at each evaluation, one row per class, preprocessing undone
    RUNDIR/synthetic.h5     the final synthetic set (:mod:`.synset`), read by export and audit
    RUNDIR/audit.json       the privacy audit's record (:mod:`.audit`)

The checkpoint is a ``torch.save`` dict: ``format``, ``format_version``,
``iteration`` (completed iterations), ``images``, ``labels``, ``logits`` (or
None), ``log_lr``, ``optimizers`` (name -> state dict), ``metrics_offset``
(bytes of metrics.jsonl that belong to the state) and ``config``. It holds no
generator state because every iteration derives its own generators from
``(seed, iteration)``.

A metrics record has ``kind`` (:data:`ITERATION` or :data:`EVAL`) and ``iteration``; an iteration record
has ``loss`` and ``syn_lr``, an eval record ``val_acc_mean`` and ``val_majority`` among others. Values
that are not finite are written as null (JSON has no NaN).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from ..config import load_toml
from ..errors import DistillError, FormatError
from ..io import append_text, strict_json, truncate_in_place, write_bytes_atomic
from .common import CONFIG_FILE, check_version

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
GRID_GLOB = "grid_*.png"
CHECKPOINT_FORMAT = "distill-run-checkpoint"
VERSION_MAJOR, VERSION_MINOR = 1, 0

# metrics.jsonl
KIND = "kind"
ITERATION = "iteration"  # also the key of the iteration number in every record
EVAL = "eval"
LOSS = "loss"  # iteration records: the trajectory-matching loss
SYN_LR = "syn_lr"  # both kinds: the learned synthetic step size
VAL_ACC_MEAN = "val_acc_mean"  # eval records: mean validation accuracy over the evaluation networks
VAL_MAJORITY = "val_majority"  # eval records: the majority-class accuracy of the validation split

# config.toml: the keys a reader of a finished run needs (the rest is RunConfig's, distill/config.py)
CONFIG_DATA = "data"  # the real data; "" = the data named in the buffer's config.toml
CONFIG_BUFFER = "buffer"  # the buffer folder the run distilled from


def grid_name(iteration: int) -> str:
    return f"grid_{iteration:05d}.png"


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
            # A missing value says 'not measured' more honestly than a fake number.
            append_text(self.path, json.dumps(strict_json(record), sort_keys=True) + "\n", what="metrics log")

    def offset(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_curves(rundir: str | os.PathLike) -> list[dict]:
    """The run's metrics records for a reader that must not fail: [] without a log, and a line cut by a crash
    (or anything that is not a JSON object) is skipped, so the rest of the log still draws."""
    path = Path(rundir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_run_config(rundir: str | os.PathLike, *, missing_ok: bool = True) -> dict:
    """The run's ``config.toml`` as a plain table, as written ({} when there is none and ``missing_ok``);
    :class:`DistillError` in one sentence when it is unreadable (or missing, without ``missing_ok``)."""
    path = Path(rundir) / CONFIG_FILE
    return {} if missing_ok and not path.exists() else load_toml(path)
