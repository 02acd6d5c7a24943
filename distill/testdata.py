"""The receiving side's own test data, used whole: ``distill eval SHARE --test FOLDER|TABLE``.

A folder or labels table without splits of its own is all test data
(:func:`distill.data.load_data` with ``whole_test``). Its classes are matched to
the share's by name; a test class the share lacks is refused, a share class the
test data lacks is named, and the accuracy says which classes it covers.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .data import RealData, Split
from .errors import DataError

log = logging.getLogger(__name__)


def _key(name: str) -> str:
    return name.strip().lower()


def align_test_classes(data: RealData, share_classes: Sequence[str]) -> tuple[RealData, list[str]]:
    """Relabel whole test data into the share's class order, by name.

    Returns (the relabelled data, the share's classes that have no test image). Unnamed classes
    ("0", "1", ...: an npz, integer labels) are left to the usual pairing by position.
    """
    ours = [_key(c) for c in data.class_names]
    theirs = [_key(c) for c in share_classes]
    if ours == [str(i) for i in range(len(ours))] or ours == theirs:
        return data, []
    present = set(int(c) for c in torch.unique(data.test.labels).tolist())  # an empty class folder is no class
    extra = [data.class_names[i] for i in sorted(present) if ours[i] not in theirs]
    if extra:
        raise DataError(f"The test data {data.name} has class(es) {', '.join(map(repr, extra))} that the share lacks "
                        f"(it has {', '.join(map(repr, share_classes))}); remove those images or test another share.")
    mapping = torch.tensor([theirs.index(k) if k in theirs else -1 for k in ours], dtype=torch.int64)
    missing = [c for c, k in zip(share_classes, theirs) if k not in [ours[i] for i in present]]
    if missing:
        log.warning("The test data %s has no image of the share's class(es) %s; the accuracy covers only %s.",
                    data.name, ", ".join(map(repr, missing)),
                    ", ".join(repr(c) for c in share_classes if c not in missing))
    test = Split(data.test.images, mapping[data.test.labels])
    empty = Split(data.test.images[:0], data.test.labels[:0])
    return RealData(name=data.name, class_names=list(share_classes), train=empty, val=empty, test=test,
                    source_sha256=data.source_sha256, split_record=dict(data.split_record)), missing


def baselines_for_whole_test(asked: tuple[str, ...] | None, resolved: tuple[str, ...], has_train: bool,
                             name: str) -> tuple[str, ...]:
    """Baselines train on real images; whole test data has none, so they need ``--train``.

    ``asked``: the baselines the user named (None: the defaults). Defaults are dropped with a note;
    named ones without ``--train`` are refused.
    """
    if has_train or not resolved:
        return resolved
    if asked is None:
        log.info("%s is all test data, so no baseline is trained; pass --train DATA for random-real and full rows.",
                 name)
        return ()
    raise DataError(f"{name} is all test data (it has no train split), and --baseline {resolved[0]} trains on real "
                    "images; pass --train DATA as well.")
