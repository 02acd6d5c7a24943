"""The buffer folder's ``config.toml``: the resolved :class:`~distill.config.BufferConfig` of ``distill buffer``.

``distill buffer`` writes it with :func:`distill.config.save_toml`: TOML with
``format = "distill-buffer-config"`` and ``format_version`` (since 1.0; older
files have neither and read the same), then one key per ``BufferConfig`` field (``None`` fields are left out: TOML has no
null, and absence means the default). Later stages read it to reload the
buffer's real data with the same resize.

The exact split the experts trained on is in the buffer's ``preprocessing.h5``
(format 1.1): its fingerprint's ``split`` record (how the split came about:
``method`` official or carved, ``seed``, fractions, SHA-256 of each part's
positions) and, for a carved split, the exact positions (:mod:`.split`).
Buffers written before 1.1 have neither; they are reloaded with their seed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from ..config import FILE_KEYS, BufferConfig, build, load_toml, save_toml
from .common import CONFIG_FILE, get_json, read_preprocessing
from .split import read_split_group
from .trajectory import open_buffer_preprocessing

log = logging.getLogger(__name__)


def read_buffer_split(folder: str | os.PathLike) -> tuple[dict | None, dict[str, torch.Tensor] | None]:
    """The split the buffer's experts trained on: (its record, its exact positions or None).

    (None, None) for a buffer written before splits were recorded.
    """
    with open_buffer_preprocessing(folder) as (path, f):
        read_preprocessing(f["preprocessing"])  # checked as read_buffer_preprocessing checks it
        return get_json(f, "fingerprint").get("split"), read_split_group(f, str(path))


def read_buffer_config(folder: str | os.PathLike) -> BufferConfig | None:
    """The buffer's settings, or None when the folder has no config.toml.

    Keys this version does not know (written by a newer one) are ignored, so an
    older reader still finds the data; bad values raise :class:`~distill.errors.DistillError`.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        return None
    raw = load_toml(path)
    known = {f.name for f in dataclasses.fields(BufferConfig)} | set(FILE_KEYS)
    unknown = sorted(set(raw) - known)
    if unknown:
        log.debug("%s: ignoring keys this version does not know: %s", path, ", ".join(unknown))
    return build(BufferConfig, {k: v for k, v in raw.items() if k in known})


def write_buffer_config(cfg: BufferConfig, folder: str | os.PathLike) -> None:
    """Write ``folder/config.toml`` (atomically, with its format name and version) from ``cfg``."""
    save_toml(cfg, Path(folder) / CONFIG_FILE)


def buffer_data_spec(folder: str | os.PathLike) -> str | None:
    """The real data the buffer's config.toml names, as written; None when it names none or there is no file.

    Raw, not built: a reader that only wants the data still finds it in a file whose other settings this
    version would refuse. :class:`~distill.errors.DistillError` when the file is unreadable.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        return None
    return str(load_toml(path).get("data", "")) or None
