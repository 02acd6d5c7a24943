"""What the audit looks at: the synthetic set (from a run folder or a share) and the real data it came from.

:func:`load_subject` reads either file into one :class:`Subject`;
:func:`load_matching_data` loads the real data and refuses data that cannot be
the subject's; :func:`holdout_split` picks the real non-members.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch

from ..data import Preprocessing, RealData, load_data
from ..errors import DataError, FormatError
from ..formats.share import load_share, share_targets
from ..formats.synset import SYNSET_FILE, SYNSET_FORMAT, read_synset
from ..io import sha256_file
from ..runshare import share_from_synset
from ..train import TrainRecipe
from .neighbours import nearest_rms

log = logging.getLogger(__name__)

# A held-out image whose nearest training image is closer (RMS pixel difference) than 0.4 x the
# held-out median is the same picture, not another patient, and is dropped from the baseline and
# from the non-members. Measured on MedMNIST (docs/privacy.md): such copies sit at <= 0.36 x the
# median (31 of 78 BreastMNIST val images, the 8 PneumoniaMNIST train/val copies at 0), genuinely
# different patients at >= 0.47 x (PneumoniaMNIST, RetinaMNIST) and >= 0.82 x (BreastMNIST val).
NEAR_DUPLICATE_RATIO = 0.4


@dataclass(frozen=True)
class Subject:
    """What is audited, whatever file it came from."""

    images: torch.Tensor  # (N, C, H, W) float32, network space
    labels: torch.Tensor  # (N,) int64
    targets: torch.Tensor  # (N,) int64 or (N, K) float32 probabilities: what a recipient trains on
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    model: str
    model_kwargs: dict
    recipe: TrainRecipe
    data_sha256: str | None  # unsalted hash of the real data, when the source keeps one
    file_sha256: str
    rundir: Path | None  # where audit.json goes; None for a share


def load_subject(source: str | os.PathLike) -> Subject:
    """Read a run folder, its ``synthetic.h5``, or a share ``.h5`` into one :class:`Subject`."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path} does not exist; give a run folder or a share .h5 file.")
    if path.is_dir():
        return _from_synset(path / SYNSET_FILE, path)
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except OSError:
        raise FormatError(f"{path} is not a readable HDF5 file.") from None
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt == SYNSET_FORMAT:
        return _from_synset(path, path.parent)
    return _from_share(path)


def _from_synset(path: Path, rundir: Path) -> Subject:
    s = read_synset(path)
    # The share this run would export, so the audit trains on exactly the recipe a recipient gets.
    share = share_from_synset(s, {}, license="", description="", citation="")
    fp = s.fingerprint or {}
    return _subject(share, sha256_file(path), rundir, fp.get("sha256"), str(path))


def _from_share(path: Path) -> Subject:
    # A share keeps only a salted hash of its data, so it cannot prove which data made it.
    return _subject(load_share(path), sha256_file(path), None, None, str(path))


def _subject(share, file_sha: str, rundir: Path | None, data_sha: str | None, where: str) -> Subject:
    try:
        recipe = share.recipe.to_train_recipe()
    except ValueError as e:
        raise FormatError(f"{where}: its training recipe is not usable ({str(e).rstrip('.')}).") from None
    if not torch.isfinite(share.images).all():
        # NaN compares as 'not similar' and would pass the nearest-neighbour check unseen.
        raise FormatError(f"{where} holds NaN or infinite pixels; it cannot be audited or shared.")
    return Subject(images=share.images.float(), labels=share.labels.long(), targets=share_targets(share, where),
                   preprocessing=share.preprocessing, class_names=tuple(share.class_names), model=share.recipe.model,
                   model_kwargs=dict(share.recipe.model_kwargs or {}), recipe=recipe, data_sha256=data_sha,
                   file_sha256=file_sha, rundir=rundir)


def load_matching_data(subject: Subject, data_spec: str | os.PathLike) -> tuple[RealData, str]:
    """Load the real data and refuse data that cannot be the subject's; returns (data, how it was checked)."""
    data = load_data(data_spec)
    pre = subject.preprocessing
    same_file = subject.data_sha256 is not None and subject.data_sha256 == data.source_sha256
    if subject.data_sha256 is not None and not same_file:
        raise DataError(f"The real data {data.name!r} is not the data this synthetic set was made from "
                        "(their SHA-256 fingerprints differ); pass the same --data as for 'distill buffer'.")
    if data.size != pre.size and same_file:
        log.info("Resizing the real data to %d px, as the buffer did.", pre.size)
        data = load_data(data_spec, size=pre.size)
    n_syn_classes = len(subject.class_names)
    if data.num_classes != n_syn_classes:
        raise DataError(f"The real data has {data.num_classes} classes but the synthetic set has {n_syn_classes}; "
                        "they cannot come from the same dataset.")
    if data.channels != subject.images.shape[1] or data.size != subject.images.shape[-1]:
        raise DataError(f"The real images are {data.channels}x{data.size}x{data.size} but the synthetic ones are "
                        f"{'x'.join(map(str, subject.images.shape[1:]))}; they cannot come from the same dataset.")
    if list(subject.class_names) != list(data.class_names):
        log.warning("Class names differ (%s vs %s); the audit goes on because counts and geometry match.",
                    ", ".join(subject.class_names), ", ".join(data.class_names))
    how = "sha256" if same_file else "geometry"
    return data, how


def holdout_split(data: RealData, holdout: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Held-out images and labels with (near-)copies of training images removed.

    Returns (images (M, C, H, W) uint8, labels (M,), number of copies removed).
    A copy of a training image is a member, not a non-member, and would pose as
    'two patients' at similarity 1.0 (see :data:`NEAR_DUPLICATE_RATIO`).
    """
    parts = [data.split(s) for s in holdout.split("+")]
    images = torch.cat([p.images for p in parts])
    labels = torch.cat([p.labels for p in parts])
    if len(images) == 0:
        raise DataError(f"The {holdout} split of {data.name} is empty; choose another --holdout.")
    rms = nearest_rms(images, data.train.images)
    keep = rms >= NEAR_DUPLICATE_RATIO * rms.median()
    if int(keep.sum()) < 2:
        raise DataError(f"The {holdout} split of {data.name} has fewer than 2 images that are not copies of "
                        "training images; choose another --holdout.")
    return images[keep], labels[keep], int((~keep).sum())
