"""The ``split`` group of a buffer's ``preprocessing.h5`` (format 1.1): the exact split the experts trained on.

Present only when val and/or test were carved from a pool (``train/``, or a
folder without split sub-folders): one int64 dataset per split (``train``,
``val``, ``test``) holding positions in that pool, whose files are sorted by
class, then by name. How the split was made (seed, fractions, SHA-256 of each
part's positions) is the ``split`` record of the file's fingerprint; its ``patient_grouped``
flag says that the source named patients and no patient has images in two parts, and its
``read`` record says how DICOM/NIfTI files were read (:class:`distill.medical.ReadOptions`).
"""
from __future__ import annotations

import h5py
import numpy as np
import torch

from ..data import SPLITS
from ..errors import FormatError

SPLIT_GROUP = "split"


def write_split_group(f: h5py.File, indices: dict[str, torch.Tensor] | None) -> None:
    """Store a carved split's positions (split -> (n,) int64) in an open file; None stores nothing."""
    if indices is None:
        return
    g = f.create_group(SPLIT_GROUP)
    for s in SPLITS:
        g.create_dataset(s, data=np.asarray(indices[s], dtype=np.int64))


def read_split_group(f: h5py.File, where: str) -> dict[str, torch.Tensor] | None:
    """The positions stored by :func:`write_split_group`, or None when the file has none."""
    if SPLIT_GROUP not in f:
        return None
    g = f[SPLIT_GROUP]
    missing = [s for s in SPLITS if s not in g]
    if missing:
        raise FormatError(f"{where}: its split group lacks {', '.join(missing)}.")
    return {s: torch.from_numpy(g[s][()].astype(np.int64)) for s in SPLITS}
