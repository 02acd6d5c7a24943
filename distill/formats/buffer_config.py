"""The buffer folder's ``config.toml``: the resolved :class:`~distill.config.BufferConfig` of ``distill buffer``.

``distill buffer`` writes it with :func:`distill.config.save_toml`: TOML with
one key per ``BufferConfig`` field (``None`` fields are left out: TOML has no
null, and absence means the default). Later stages read it to reload the
buffer's real data with the same resize and split seed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ..config import BufferConfig, build, load_toml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"


def read_buffer_config(folder: str | os.PathLike) -> BufferConfig | None:
    """The buffer's settings, or None when the folder has no config.toml.

    Keys this version does not know (written by a newer one) are ignored, so an
    older reader still finds the data; bad values raise :class:`~distill.errors.DistillError`.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        return None
    raw = load_toml(path)
    known = {f.name for f in dataclasses.fields(BufferConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        log.debug("%s: ignoring keys this version does not know: %s", path, ", ".join(unknown))
    return build(BufferConfig, {k: v for k, v in raw.items() if k in known})
