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
RESULTS = "results"


def eval_header() -> dict[str, str]:
    return format_header(EVAL_FORMAT, EVAL_FORMAT_VERSION)


def read_eval_report(path: str | os.PathLike) -> dict:
    """The report at ``path``, checked to be a version-1 eval report; :class:`DistillError` in one sentence if not."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DistillError(f"{path} is not a readable JSON file; pass the file `distill eval --json` wrote.") from None
    if not isinstance(doc, dict) or doc.get(FORMAT_KEY) != EVAL_FORMAT or not isinstance(doc.get(RESULTS), list):
        raise DistillError(f"{path} is not a `distill eval --json` report.")
    if str(doc.get(VERSION_KEY, "")).split(".")[0] != EVAL_FORMAT_VERSION.split(".")[0]:
        raise DistillError(f"{path} has eval format {doc.get(VERSION_KEY)!r}; this page reads version 1.")
    return doc
