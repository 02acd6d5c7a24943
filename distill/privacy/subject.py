"""What the audit looks at: the synthetic set (from a run folder or a share) and the real data it came from.

:func:`load_subject` reads either file into one :class:`Subject`;
:func:`load_matching_data` loads the real data and refuses data that cannot be
the subject's; :func:`holdout_split` picks the real non-members.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch

from ..data import SPLIT_CARVED, Preprocessing, RealData, describe_split, load_data
from ..errors import DataError, DistillError, FormatError
from ..formats.buffer_config import read_buffer_config
from ..formats.common import FORMAT_KEY
from ..formats.dp_record import DPRecord, read_dp_record
from ..formats.share import load_share, share_targets
from ..formats.share_schema import Attr
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
    split: dict | None = None  # the split the experts trained on (RealData.split_record), when the source records it
    # Where it does not (a share, an older run): the experts' seed, which was the carve seed, and per-split counts.
    split_hint: dict | None = None
    method: dict | None = None  # the run's settings (RunConfig fields), where the source keeps them
    # The epsilon budget of the DP buffer that made it (its experts and DP statistics), or None without DP.
    dp_epsilon: float | None = None


def load_subject(source: str | os.PathLike) -> Subject:
    """Read a run folder, its ``synthetic.h5``, or a share ``.h5`` into one :class:`Subject`."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path} does not exist; give a run folder or a share .h5 file.")
    if path.is_dir():
        return _from_synset(path / SYNSET_FILE, path)
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get(FORMAT_KEY)
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
    hint = {"seed": _buffer_seed(s.method or {}), "counts": fp.get("counts"), "what": "run"}
    buffer = (s.method or {}).get("buffer")
    try:
        record = read_dp_record(buffer) if isinstance(buffer, str) and buffer and Path(buffer).is_dir() else None
    except DistillError:
        record = None
    return _subject(share, sha256_file(path), rundir, fp.get("sha256"), str(path), fp.get("split"), hint, record)


def _buffer_seed(method: dict) -> int | None:
    """The seed of the buffer a run names (its config.toml), which was the carve seed; None if unknown."""
    buffer = method.get("buffer")
    try:
        cfg = read_buffer_config(buffer) if isinstance(buffer, str) and buffer else None
    except DistillError:
        return None
    return cfg.seed if cfg is not None else None


def _from_share(path: Path) -> Subject:
    # A share keeps only a salted hash of its data, so it cannot prove which data made it, nor its split.
    share = load_share(path)
    experts, dataset = (share.provenance.get(k) or {} for k in (Attr.EXPERTS, Attr.DATASET))
    split = dataset.get("split") if isinstance(dataset.get("split"), dict) else {}
    hint = {"seed": split.get("seed", experts.get("seed")), "counts": dataset.get("counts"), "what": "share",
            "record": split or None}
    return _subject(share, sha256_file(path), None, None, str(path), None, hint, share.dp_record())


def _dp_budget(record: DPRecord | None) -> float | None:
    if record is None:
        return None
    asked = record.extra.get("epsilon_budget") if isinstance(record.extra, dict) else None
    ok = isinstance(asked, (int, float)) and not isinstance(asked, bool) and math.isfinite(asked) and asked > 0
    return float(asked) if ok else float(record.epsilon)  # a record from elsewhere may carry anything in extra


def _subject(share, file_sha: str, rundir: Path | None, data_sha: str | None, where: str, split: dict | None = None,
             split_hint: dict | None = None, dp: DPRecord | None = None) -> Subject:
    try:
        recipe = TrainRecipe.following(share.recipe)
    except ValueError as e:
        raise FormatError(f"{where}: its training recipe is not usable ({str(e).rstrip('.')}).") from None
    if not torch.isfinite(share.images).all():
        # NaN compares as 'not similar' and would pass the nearest-neighbour check unseen.
        raise FormatError(f"{where} holds NaN or infinite pixels; it cannot be audited or shared.")
    method = share.provenance.get(Attr.METHOD)
    return Subject(images=share.images.float(), labels=share.labels.long(), targets=share_targets(share, where),
                   preprocessing=share.preprocessing, class_names=tuple(share.class_names), model=share.recipe.model,
                   model_kwargs=dict(share.recipe.model_kwargs or {}), recipe=recipe, data_sha256=data_sha,
                   file_sha256=file_sha, rundir=rundir, split=split, split_hint=split_hint,
                   method=method if isinstance(method, dict) else None, dp_epsilon=_dp_budget(dp))


def load_matching_data(subject: Subject, data_spec: str | os.PathLike) -> tuple[RealData, str]:
    """Load the real data and refuse data that cannot be the subject's; returns (data, how it was checked).

    The splits are the ones the experts trained on when the subject records them; otherwise the
    assumed split is said, with the reason (:func:`_say_assumed_split`).
    """
    split_kw = _split_arguments(subject)
    data = load_data(data_spec, **split_kw)
    pre = subject.preprocessing
    same_file = subject.data_sha256 is not None and subject.data_sha256 == data.source_sha256
    if subject.data_sha256 is not None and not same_file:
        raise DataError(f"The real data {data.name!r} is not the data this synthetic set was made from "
                        "(their SHA-256 fingerprints differ); pass the same --data as for 'distill buffer'.")
    if data.size != pre.size and same_file:
        log.info("Resizing the real data to %d px, as the buffer did.", pre.size)
        data = load_data(data_spec, size=pre.size, **split_kw)
    if subject.split is None:
        _say_assumed_split(subject, data)
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


def _split_arguments(subject: Subject) -> dict:
    """load_data's split arguments: the recorded split, else a carve with the experts' seed (the buffer's)."""
    if subject.split is not None:
        return {"split": subject.split}
    hint = subject.split_hint or {}
    seed = hint.get("seed")
    # A share's record says how the split was made but not which images: it is redone, not checked.
    record = {k: v for k, v in (hint.get("record") or {}).items() if k != "members_sha256"} or None
    return {"split_seed": int(seed) if isinstance(seed, int) else 0, "split": record}


def _say_assumed_split(subject: Subject, data: RealData) -> None:
    """Say which split the audit assumes for a subject that does not record one, and why."""
    hint = subject.split_hint or {}
    what = "A share" if hint.get("what") == "share" else "This run, made before splits were recorded,"
    used = describe_split(data.split_record)
    if data.split_record.get("method") != SPLIT_CARVED:
        why = "nothing needs carving, so it is the split the experts trained on"
    elif isinstance(hint.get("seed"), int):
        why = (f"the share records that its buffer carved it with seed {hint['seed']}" if hint.get("what") == "share"
               else f"the run's buffer (its config.toml) was built with seed {hint['seed']}")
    else:
        why = f"the default seed 0, since the {hint.get('what', 'source')} records no carve seed"
    counts = data.fingerprint()["counts"]
    recorded = hint.get("counts") or {}
    agree = [s for s in ("train", "val", "test") if recorded.get(s) == counts[s]]
    if recorded and len(agree) == 3:
        check = "per-class counts of every split match the ones it records"
    elif recorded:
        check = ("its per-class counts differ from the ones it records, so some non-members may have been "
                 "training images: audit the run folder instead")
    else:
        check = "it records no counts to check against"
    log.warning("%s does not record which images its experts trained on; assuming %s: %s; %s.", what, used, why, check)


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
