"""``split.json`` of ``distill split``: how a dataset's training set was spread across hospitals.

A JSON object: ``format`` = ``"distill-split"``, ``format_version``, ``created``, ``software``, ``source``
(``data``, ``name``, ``sha256``, ``class_names``, ``class_counts`` per split), ``sites``, ``alpha``,
``min_per_class``, ``seed``, ``scarce_below``, ``patient_grouped``, ``val``, ``test`` and ``site_files``: per
site ``site``, ``path`` (relative to the folder), ``images``, ``class_counts``, ``lacks``, ``scarce``,
``sha256`` and ``train_indices``. It is written last, so its presence means every site file is complete.
(Not to be confused with :mod:`.split`, the split group inside a buffer's preprocessing.h5.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .common import format_header

SPLIT_FORMAT = "distill-split"
SPLIT_FORMAT_VERSION = "1.0"
SPLIT_JSON = "split.json"
SITE_FILES = "site_files"


def split_header() -> dict[str, str]:
    return format_header(SPLIT_FORMAT, SPLIT_FORMAT_VERSION)


def read_sites_split(folder: str | os.PathLike) -> dict:
    """The ``split.json`` in ``folder``, as written."""
    return json.loads((Path(folder) / SPLIT_JSON).read_text())
