"""The report of ``distill eval --json`` (docs/evaluation.md): written by :mod:`distill.evaluate`, read by the
review page (:mod:`distill.report`).

A JSON object: ``format`` = ``"distill-eval"``, ``format_version``, ``created``, ``software``, ``device``,
``seed``, ``runs``, ``model``, ``model_kwargs``, ``preprocessing``, ``test`` (the scored split: ``data``,
``name``, ``split``, ``images``, ``class_names``, ``class_counts``, ``missing_classes``) and ``results``: one
object per row (``name``, ``kind``, ``trained_on``, ``recipe``, ``mean``, ``std``, ``runs``...). Values that
are not finite are null.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DistillError
from .common import FORMAT_KEY, VERSION_KEY, format_header

EVAL_FORMAT = "distill-eval"
EVAL_FORMAT_VERSION = "1.0"


class EvalKey:
    """Top-level keys of the report (besides ``format`` and ``format_version``)."""

    CREATED = "created"
    SOFTWARE = "software"
    DEVICE = "device"
    SEED = "seed"
    RUNS = "runs"  # networks trained per row
    PRECISION = "precision"  # fp32 | bf16 | auto, as asked
    WORKERS = "workers"  # processes that trained a row's networks
    MODEL = "model"
    MODEL_KWARGS = "model_kwargs"
    PREPROCESSING = "preprocessing"
    TEST = "test"
    RESULTS = "results"


class ScoredSplitKey:
    """``test``: the scored split."""

    DATA = "data"
    NAME = "name"
    SPLIT = "split"
    IMAGES = "images"
    CLASS_NAMES = "class_names"
    CLASS_COUNTS = "class_counts"
    MISSING_CLASSES = "missing_classes"


class RowKey:
    """One object of ``results``: a row (the share, or a baseline) over its runs."""

    NAME = "name"
    KIND = "kind"  # DISTILLED, or the baseline's name
    TRAINED_ON = "trained_on"
    RECIPE = "recipe"
    RUNS = "runs"  # one object per network: its seeds, timings and test metrics (MetricKey)
    MEAN = "mean"  # metric -> mean over runs
    STD = "std"  # metric -> standard deviation over runs (n-1)
    WALL_SECONDS = "wall_seconds"


DISTILLED = "distilled"  # the kind of the row trained on the share(s)


class MetricKey:
    """The test metrics of a run (:func:`distill.metrics.classification_metrics`), and of a row's ``mean`` and
    ``std``."""

    ACCURACY = "accuracy"
    AUC = "auc"
    PER_CLASS_ACCURACY = "per_class_accuracy"
    CONFUSION = "confusion"  # per run only


class TrainedOnKey:
    """A row's ``trained_on``: what its networks were trained on."""

    IMAGES = "images"
    SHARES = "shares"  # distilled row: one object per share (ShareKey)
    CLASS_COUNTS = "class_counts"
    SHARES_PER_CLASS = "shares_per_class"
    LABELS = "labels"
    LABEL_PRIOR = "label_prior"  # {PRIOR: ...}
    SHARE_WEIGHTS = "share_weights"  # {WEIGHTS: ...}
    PRIOR = "prior"
    WEIGHTS = "weights"
    DATA = "data"  # baseline rows: the real data, its name and split
    NAME = "name"
    SPLIT = "split"


class ShareKey:
    """One share of a distilled row's ``trained_on.shares``."""

    PATH = "path"
    IMAGES = "images"
    CLASS_COUNTS = "class_counts"
    LABELS = "labels"
    LABEL_TEMPERATURE = "label_temperature"
    LR = "lr"
    RECIPE = "recipe"
    PAYLOAD_SHA256 = "payload_sha256"


class RecipeKey:
    """A row's ``recipe``: the recipe its networks trained with."""

    EPOCHS = "epochs"
    LR = "lr"


def eval_header() -> dict[str, str]:
    return format_header(EVAL_FORMAT, EVAL_FORMAT_VERSION)


def read_eval_report(path: str | os.PathLike) -> dict:
    """The report at ``path``, checked to be a version-1 eval report; :class:`DistillError` in one sentence if not."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DistillError(f"{path} is not a readable JSON file; pass the file `distill eval --json` wrote.") from None
    if (not isinstance(doc, dict) or doc.get(FORMAT_KEY) != EVAL_FORMAT
            or not isinstance(doc.get(EvalKey.RESULTS), list)):
        raise DistillError(f"{path} is not a `distill eval --json` report.")
    if str(doc.get(VERSION_KEY, "")).split(".")[0] != EVAL_FORMAT_VERSION.split(".")[0]:
        raise DistillError(f"{path} has eval format {doc.get(VERSION_KEY)!r}; this page reads version 1.")
    return doc
