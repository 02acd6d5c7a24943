"""The run folder of ``distill run``: what the distiller does with it (is there a run, start over, draw a grid).

Its files, their names and the checkpoint's and metrics log's formats are :mod:`distill.formats.run`
(docs/method.md, "The run folder").
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data import Preprocessing
from ..formats.run import (CHECKPOINT_FILE, CONFIG_FILE, GRID_GLOB, METRICS_FILE, MetricsLog,  # noqa: F401 (re-exported)
                           grid_name, load_checkpoint, read_metrics, save_checkpoint)
from ..formats.synset import SYNSET_FILE
from ..grid import labelled_grid
from ..io import atomic_path


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
    for path in [folder / METRICS_FILE, *folder.glob(GRID_GLOB)]:
        path.unlink(missing_ok=True)


def save_grid(path: str | os.PathLike, images: torch.Tensor, preprocessing: Preprocessing, ipc: int,
              class_names: list[str] | None = None) -> None:
    """PNG of ``images`` (N, C, H, W) network space, class-major order, ``ipc`` per row; ZCA/normalisation undone.

    With ``class_names`` each row is labelled with its class.
    """
    shown = preprocessing.invert(images.detach().cpu())
    with atomic_path(path) as tmp:
        labelled_grid(shown, ipc, class_names, padding=1).save(tmp, format="PNG")
