"""Real data in: MedMNIST ``.npz`` files, MedMNIST names, image folders; normalisation and ZCA.

Everything downstream sees a :class:`RealData`: uint8 images ``(N, C, H, W)``
per split, int64 labels ``(N,)``, class names and a fingerprint of the source.
:class:`Preprocessing` turns uint8 images into the float tensors the networks
see, and back, so that every stage (experts, distillation, recipients) applies
exactly the same transform.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DataError
from .io import md5_file, sha256_file
from .medical import ReadOptions
from .tables import read_table, to_8bit

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_DATA_DIR = "../shared/data"  # where this project's machines keep the MedMNIST releases
ZCA_EPS = 0.1  # the reference MTT code's ZCA regulariser (kornia ZCAWhitening eps)
# How a RealData's splits came about: the source's own (npz arrays, or train/ val/ test/ folders),
# or carved per class from a pool (train/, or a folder without split sub-folders) with a seed.
SPLIT_OFFICIAL, SPLIT_CARVED = "official", "carved"
WHOLE_TEST = "whole_test"  # split-record flag: a source without splits of its own, read as all test data


@dataclass(frozen=True)
class MedMNISTInfo:
    file: str
    md5: str  # of the official release, as listed in medmnist/info.py
    classes: tuple[str, ...]


# Only the releases whose checksums we can verify on these machines.
MEDMNIST: dict[str, MedMNISTInfo] = {
    "pneumoniamnist": MedMNISTInfo("pneumoniamnist.npz", "28209eda62fecd6e6a2d98b1501bb15f", ("normal", "pneumonia")),
    "breastmnist": MedMNISTInfo("breastmnist.npz", "750601b1f35ba3300ea97c75c52ff8f6", ("malignant", "normal, benign")),
    "retinamnist": MedMNISTInfo(
        "retinamnist.npz", "bd4c0672f1bba3e3a89f0e4e876791e4", ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4")
    ),
}

# MedMNIST+ (medmnist 3.x, Zenodo record 10519652): the same datasets at 64, 128 and 224 px, each file
# with its own MD5, as listed in medmnist/info.py ("MD5_64", "MD5_128", "MD5_224").
MEDMNIST_PLUS_SIZES = (64, 128, 224)
MEDMNIST_PLUS_MD5: dict[str, str] = {
    "pneumoniamnist_64.npz": "8f4eceb4ccffa70c672198ea285246c6",
    "pneumoniamnist_128.npz": "05b46931834c231683c68f40c47b2971",
    "pneumoniamnist_224.npz": "d6a3c71de1b945ea11211b03746c1fe1",
    "breastmnist_64.npz": "742edef2a1fd1524b2efff4bd7ba9364",
    "breastmnist_128.npz": "363e4b3f8d712e9b5de15470a2aaadf1",
    "breastmnist_224.npz": "b56378a6eefa9fed602bb16d192d4c8b",
    "retinamnist_64.npz": "afda852cc34dcda56f86ad2b2457dbcc",
    "retinamnist_128.npz": "e48e916a24454daf90583d4e6efb1a18",
    "retinamnist_224.npz": "eae7e3b6f3fcbda4ae613ebdcbe35348",
}


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RealData:
    name: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    source_sha256: str  # of the file (npz) or of the sorted file list and bytes (folder)
    # How train/val/test came about (see :func:`split_record`): small, JSON-able, part of the fingerprint.
    split_record: dict = field(default_factory=lambda: {"method": SPLIT_OFFICIAL})
    # For a carved split: split -> (n,) int64 positions in the pool it was carved from; None otherwise.
    split_indices: dict[str, torch.Tensor] | None = None
    # Split -> (n,) int64 anonymous patient numbers, when the source names patients (a table's patient column).
    groups: dict[str, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.train.images.shape[-1])

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise DataError(f"Unknown split {name!r}; choose one of {', '.join(SPLITS)}.")
        return getattr(self, name)

    def fingerprint(self) -> dict:
        """What later stages may know about the source: no image, path or file name."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "channels": self.channels,
            "size": self.size,
            "counts": {s: class_counts(self.split(s).labels, self.num_classes) for s in SPLITS},
            "sha256": self.source_sha256,
            "split": dict(self.split_record),
        }


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def draw_random_real(labels: torch.Tensor, num_classes: int, per_class: int, generator: torch.Generator,
                     class_names: Sequence[str] | None = None) -> torch.Tensor:
    """Indices of exactly ``per_class`` images per class, drawn without replacement; (num_classes * per_class,) int64, class-major."""
    if per_class < 1:
        raise DataError(f"--ipc must be at least 1; got {per_class}.")
    out = []
    for c in range(num_classes):
        pool = torch.nonzero(labels == c).flatten()
        if len(pool) < per_class:
            name = class_names[c] if class_names else str(c)
            raise DataError(f"Class {name!r} has only {len(pool)} training images, fewer than --ipc {per_class}.")
        out.append(pool[torch.randperm(len(pool), generator=generator)[:per_class]])
    return torch.cat(out)


# ----------------------------------------------------------------------------- loading


def data_dir() -> Path:
    return Path(os.environ.get("DISTILL_DATA", DEFAULT_DATA_DIR))


def load_data(spec: str | os.PathLike, *, size: int | None = None, split_seed: int = 0,
              val_fraction: float = 0.1, test_fraction: float = 0.2, split: dict | None = None,
              split_indices: dict[str, torch.Tensor] | None = None, read: dict | None = None,
              whole_test: bool = False) -> RealData:
    """Load real data from a MedMNIST name, a MedMNIST-layout ``.npz``, an image folder or a labels table.

    ``size`` resizes images (bilinear, antialiased) to ``size x size``; ``None``
    keeps the source size (folders need it unless all images share one size).
    A folder without ``train/`` is split with ``split_seed``; one with ``train/`` but no
    ``val/`` or ``test/`` has the missing split(s) carved from ``train/`` the same way.

    ``split``: a recorded :attr:`RealData.split_record` (from a buffer, a run): its seed and
    fractions replace the arguments, ``split_indices`` (the buffer's exact positions) replace
    the carve, and a result whose members differ from the record's is refused.

    ``read``: how DICOM/NIfTI files are read (:class:`distill.medical.ReadOptions`'s record); by
    default the one in ``split``, so that later stages read the files as the buffer did. A MedMNIST
    name with ``size`` 64, 128 or 224 reads that MedMNIST+ release (``NAME_SIZE.npz``).

    ``whole_test``: a folder or table without splits of its own is all test data (train and val
    empty, split record ``whole_test``), not carved: ``distill eval --test``'s reading.
    """
    if read is None and split is not None:
        read = split.get("read")
    if split is not None and split.get("method") == SPLIT_CARVED:
        split_seed = int(split.get("seed", split_seed))
        val_fraction = float(split.get("val_fraction", val_fraction))
        test_fraction = float(split.get("test_fraction", test_fraction))
    data = _load_any(spec, size, split_seed, val_fraction, test_fraction, split_indices, read, whole_test)
    if split is not None:
        _check_recorded_split(data, split)
    return data


def _check_recorded_split(data: RealData, recorded: dict) -> None:
    ours, theirs = data.split_record, recorded
    if ours.get("method") != theirs.get("method") or (
            theirs.get("members_sha256") and ours.get("members_sha256") != theirs.get("members_sha256")):
        raise DataError(f"{data.name}'s train/val/test split is not the one recorded with the experts "
                        f"({describe_split(ours)} now, {describe_split(theirs)} then); pass the data the buffer "
                        "was built from, unchanged.")


def describe_split(record: dict) -> str:
    """One phrase saying how a split came about, e.g. 'val and test carved from train/ with seed 1'."""
    if record.get("method") == SPLIT_CARVED:
        pool = "train/" if record.get("pool") == "train" else "the whole folder"
        grouped = ", patient-grouped" if record.get("patient_grouped") else ""
        return f"{' and '.join(record.get('carved', []))} carved from {pool} with seed {record.get('seed')}{grouped}"
    return "the source's own train/val/test split"


def _load_any(spec, size, split_seed, val_fraction, test_fraction, split_indices, read, whole_test=False) -> RealData:
    spec_str = str(spec)
    if spec_str.lower() in MEDMNIST and not Path(spec_str).exists():
        data = _load_medmnist_name(spec_str.lower(), size)
    else:
        path = Path(spec_str)
        if not path.exists():
            names = ", ".join(MEDMNIST)
            raise DataError(f"Data {spec_str!r} is neither an existing path nor a known MedMNIST name ({names}).")
        if path.is_dir():
            data = _load_folder(path, size, split_seed, val_fraction, test_fraction, split_indices, whole_test)
        elif path.suffix == ".npz":
            data = _load_npz(path, path.stem)
        elif path.suffix.lower() in (".csv", ".tsv"):
            data = _load_table(path, size, split_seed, val_fraction, test_fraction, split_indices,
                              ReadOptions.from_record(read), whole_test)
        else:
            raise DataError(f"{path.name} is not a .npz file or a folder of class sub-folders, nor a .csv/.tsv labels table.")
    if size is not None and size != data.size:
        for s in SPLITS:
            data.split(s).images = resize_uint8(data.split(s).images, size)
    if data.split_record.get(WHOLE_TEST):
        _validate_test_only(data)
    else:
        _validate(data)
    return data


def _load_medmnist_name(name: str, size: int | None = None) -> RealData:
    info = MEDMNIST[name]
    file, expected = info.file, info.md5
    if size in MEDMNIST_PLUS_SIZES:
        file = f"{name}_{size}.npz"
        expected = MEDMNIST_PLUS_MD5.get(file)
        if expected is None:  # a release we cannot verify is not read by name; its path still works
            raise DataError(f"No checksum is known for MedMNIST+ {file}; pass its path as --data to use it unverified.")
    path = data_dir() / file
    if not path.exists():
        raise DataError(
            f"MedMNIST {name!r} was not found at {path}; set DISTILL_DATA to the folder holding {file}."
        )
    md5 = md5_file(path)
    if md5 != expected:
        raise DataError(f"{path} does not match the official {name} release (MD5 {md5}, expected {expected}).")
    data = _load_npz(path, name)
    data.class_names = list(info.classes)
    return data


def _load_npz(path: Path, name: str) -> RealData:
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile/pickle errors have many types
        raise DataError(f"{path.name} cannot be read as a .npz file ({e}).") from None
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise DataError(
                f"{path.name} lacks the MedMNIST keys {', '.join(missing)} (it has {', '.join(npz.files) or 'none'})."
            )
        try:
            arrays = {k: npz[k] for k in NPZ_KEYS}
        except ValueError:  # object arrays, which allow_pickle=False refuses: they could run code
            raise DataError(f"{path.name} holds object arrays; MedMNIST files hold plain uint8 arrays.") from None
    splits = {s: _npz_split(arrays[f"{s}_images"], arrays[f"{s}_labels"], s, path.name) for s in SPLITS}
    # An all-empty file gets 0 classes here and a clear "empty training split" from _validate.
    num_classes = int(max((int(sp.labels.max()) for sp in splits.values() if len(sp)), default=-1) + 1)
    known = MEDMNIST.get(name.lower())
    classes = list(known.classes) if known and len(known.classes) == num_classes else [str(i) for i in range(num_classes)]
    return RealData(name=name, class_names=classes, source_sha256=sha256_file(path), **splits)


def _npz_split(images: np.ndarray, labels: np.ndarray, split: str, fname: str) -> Split:
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{fname}: {split}_images has shape {images.shape}; expected (N,H,W) or (N,H,W,C) with C 1 or 3.")
    if images.dtype != np.uint8:
        raise DataError(f"{fname}: {split}_images has dtype {images.dtype}; expected uint8.")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{fname}: {split}_labels has shape {labels.shape}; expected (N,) or (N,1).")
    if len(labels) != len(images):
        raise DataError(f"{fname}: {split} has {len(images)} images but {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{fname}: {split}_labels must be non-negative integers.")
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def _load_folder(root: Path, size: int | None, seed: int, val_fraction: float, test_fraction: float,
                 indices: dict[str, torch.Tensor] | None = None, whole_test: bool = False) -> RealData:
    from PIL import Image

    # A train/ folder means the user split the data; a missing val/ or test/ is carved from train/ below.
    presplit = (root / "train").is_dir()
    split_roots = {s: root / s for s in SPLITS if (root / s).is_dir()} if presplit else {"all": root}

    def class_dirs(folder: Path) -> list[str]:
        return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))

    classes = class_dirs(split_roots.get("train", root))
    if len(classes) < 2:
        raise DataError(f"{split_roots.get('train', root)} must hold at least two class sub-folders; found {len(classes)}.")
    for s, sroot in split_roots.items():
        unknown = sorted(set(class_dirs(sroot)) - set(classes))
        if unknown:
            raise DataError(f"{sroot} has class folder(s) {', '.join(unknown)} that {root / 'train'} lacks.")
    files: dict[str, list[tuple[Path, int]]] = {}
    for s, sroot in split_roots.items():
        files[s] = []
        for idx, c in enumerate(classes):
            cdir = sroot / c
            if cdir.is_dir():
                files[s] += [(p, idx) for p in sorted(cdir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not any(files.values()):
        raise DataError(f"{root} holds no PNG or JPEG images in its class sub-folders.")

    # The source hash covers names relative to root and bytes, never absolute paths.
    h = hashlib.sha256()
    for s in sorted(files):
        for p, _ in files[s]:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())

    def read(items):
        imgs = []
        for p, _ in items:
            try:
                with Image.open(p) as im:
                    im = to_8bit(im)
                    if size is not None and im.size != (size, size):
                        im = im.resize((size, size), Image.BILINEAR)
                    imgs.append(np.asarray(im, dtype=np.uint8))
            except OSError:
                raise DataError(f"{p.relative_to(root)} cannot be read as an image.") from None
        shapes = {a.shape for a in imgs}
        if len(shapes) > 1:
            raise DataError(f"Images under {root} have different sizes {sorted(shapes)[:3]}; pass --size to resize them.")
        return imgs

    all_imgs = {s: read(items) for s, items in files.items()}
    modes = {a.ndim for imgs in all_imgs.values() for a in imgs}
    as_rgb = 3 in modes
    height, width = next(a.shape[:2] for imgs in all_imgs.values() for a in imgs)

    def to_split(imgs, items) -> Split:
        if not imgs:  # an empty split still has the image geometry, so preprocessing accepts it
            empty = torch.zeros(0, 3 if as_rgb else 1, height, width, dtype=torch.uint8)
            return Split(empty, torch.zeros(0, dtype=torch.int64))
        arr = np.stack([np.repeat(a[..., None], 3, -1) if (as_rgb and a.ndim == 2) else a for a in imgs])
        arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
        return Split(torch.from_numpy(np.ascontiguousarray(arr)), torch.tensor([y for _, y in items], dtype=torch.int64))

    carved: list[str] = []
    if presplit:
        splits = {s: to_split(all_imgs[s], files[s]) for s in split_roots}
        carved = [s for s in ("val", "test") if s not in splits]
        pool = splits["train"]
    else:
        carved = ["val", "test"]
        pool = to_split(all_imgs["all"], files["all"])
        if whole_test:
            return whole_test_data(root.name, classes, h.hexdigest(), pool)
    splits, record, parts = carve_splits(splits if presplit else {}, pool, carved, seed, val_fraction, test_fraction,
                                         indices, root, pool_name="train" if presplit else "all")
    return RealData(name=root.name, class_names=classes, source_sha256=h.hexdigest(), split_record=record,
                    split_indices=parts, **splits)


def _load_table(table: Path, size: int | None, seed: int, val_fraction: float, test_fraction: float,
               indices, options: ReadOptions, whole_test: bool = False) -> RealData:
    """A labels table (:mod:`distill.tables`) as a :class:`RealData`.

    Without a split column every image is in one pool and val/test are carved from it; with one,
    a missing val or test is carved from train. Either carve keeps patients whole when the table
    has a patient column.
    """
    t = read_table(table, size, options)
    as_rgb = any(a.ndim == 3 for a in t.images)
    arr = np.stack([np.repeat(a[..., None], 3, -1) if (as_rgb and a.ndim == 2) else a for a in t.images])
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    images, labels = torch.from_numpy(np.ascontiguousarray(arr)), torch.from_numpy(t.labels)
    groups = torch.from_numpy(t.groups) if t.groups is not None else None
    if whole_test and not t.splits:
        return whole_test_data(table.stem, t.class_names, t.sha256, Split(images, labels))
    where = {s: np.array([x == s for x in t.splits]) for s in SPLITS} if t.splits else {"train": np.ones(len(labels), bool)}
    given = {s: Split(images[torch.from_numpy(m)], labels[torch.from_numpy(m)]) for s, m in where.items() if m.any()}
    given_groups = {s: groups[torch.from_numpy(m)] for s, m in where.items() if m.any()} if groups is not None else None
    if "train" not in given:
        raise DataError(f"{table.name} has no train rows; mark some rows train in its split column.")
    carved = [s for s in ("val", "test") if s not in given]
    pool_name = "train" if t.splits else "all"
    splits, record, parts = carve_splits(given, given["train"], carved, seed, val_fraction, test_fraction, indices,
                                         table.name, pool_name, given_groups["train"] if given_groups else None,
                                         noun="%s rows" if t.splits else "split column (so no %s rows)")
    split_groups = None
    if given_groups is not None:
        split_groups = {s: given_groups["train"][parts[s]] if parts is not None and (s == "train" or s in carved)
                        else given_groups.get(s, torch.zeros(0, dtype=torch.int64)) for s in SPLITS}
        if not carved:
            record = {**record, "patient_grouped": True}
    if options.record():
        record = {**record, "read": options.record()}
    for s in SPLITS:
        if s not in splits:  # an empty split keeps the geometry, so preprocessing accepts it
            splits[s] = Split(images[:0], labels[:0])
    return RealData(name=table.stem, class_names=t.class_names, source_sha256=t.sha256, split_record=record,
                    split_indices=parts, groups=split_groups, **splits)


def carve_splits(given: dict[str, Split], pool: Split, carved: list[str], seed: int, val_fraction: float,
                 test_fraction: float, indices: dict[str, torch.Tensor] | None, where, pool_name: str,
                 groups: torch.Tensor | None = None, noun: str = "%s folder") -> tuple[dict[str, Split], dict, dict | None]:
    """Carve the ``carved`` splits from ``pool``; returns (all three splits, the split record, positions or None).

    ``groups``: (len(pool),) int64 patient numbers; every patient's images then land in one part.
    """
    if not carved:
        return given, {"method": SPLIT_OFFICIAL}, None
    fractions = {"val": val_fraction if "val" in carved else 0.0, "test": test_fraction if "test" in carved else 0.0}
    if indices is not None:
        parts = indices
    elif groups is not None:
        parts = grouped_indices(pool.labels, groups, seed, fractions["val"], fractions["test"])
    else:
        parts = stratified_indices(pool.labels, seed, fractions["val"], fractions["test"])
    _check_indices(parts, len(pool), where)
    record = {"method": SPLIT_CARVED, "pool": pool_name, "carved": carved, "seed": seed,
              "val_fraction": fractions["val"], "test_fraction": fractions["test"],
              "members_sha256": {s: _indices_sha256(parts[s]) for s in SPLITS}}
    if groups is not None:
        record["patient_grouped"] = True
    # It changes the per-class counts the user sees, so it is said at WARNING level.
    sizes = ", ".join(f"{s} {len(parts[s])}" for s in ("train", *carved))
    how = (f", patient-grouped: each of {len(torch.unique(groups))} patients on one side" if groups is not None
           else "")
    log.warning("%s has no %s; carved %s from %s with seed %d (%s images%s).", where, noun % " or ".join(carved),
                " and ".join(carved), "train/" if pool_name == "train" else "all its images", seed, sizes, how)
    made = {s: Split(pool.images[parts[s]], pool.labels[parts[s]]) for s in SPLITS}
    return {s: made[s] if s == "train" or s in carved else given[s] for s in SPLITS}, record, parts


def whole_test_data(name: str, class_names: list[str], sha256: str, pool: Split) -> RealData:
    """A source without splits of its own as all test data: empty train and val of the same geometry."""
    empty = Split(pool.images[:0], pool.labels[:0])
    return RealData(name=name, class_names=class_names, source_sha256=sha256,
                    split_record={"method": SPLIT_OFFICIAL, WHOLE_TEST: True}, train=empty, val=empty, test=pool)


def _validate_test_only(data: RealData) -> None:
    if len(data.test) == 0:
        raise DataError(f"{data.name} holds no test images.")
    if int(data.test.labels.max()) >= data.num_classes:
        raise DataError(f"{data.name}: a test label is {int(data.test.labels.max())} but there are {data.num_classes} classes.")
    if data.test.images.shape[-1] != data.test.images.shape[-2]:
        raise DataError(f"{data.name}: images must be square; pass --size to resize them.")


def _indices_sha256(idx: torch.Tensor) -> str:
    """SHA-256 of sorted int64 positions (little-endian bytes): compares two splits without storing them."""
    arr = np.ascontiguousarray(torch.sort(idx.long()).values.numpy().astype("<i8"))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _check_indices(parts: dict[str, torch.Tensor], n: int, root: Path) -> None:
    every = torch.cat([parts[s].long() for s in SPLITS])
    if len(every) != n or len(torch.unique(every)) != n or (n and (every.min() < 0 or every.max() >= n)):
        raise DataError(f"The split recorded with the experts does not fit the {n} images now under {root}; "
                        "pass the data the buffer was built from, unchanged.")


def stratified_indices(labels: torch.Tensor, seed: int, val_fraction: float,
                       test_fraction: float) -> dict[str, torch.Tensor]:
    """Positions of each split, per class with a seeded permutation, so class balance is kept in every part.

    Returns split name -> sorted (n,) int64 positions in ``labels``.
    """
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test, n_val = int(round(len(idx) * test_fraction)), int(round(len(idx) * val_fraction))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    empty = torch.zeros(0, dtype=torch.int64)
    return {s: torch.sort(torch.cat(parts[s] or [empty])).values for s in SPLITS}


def grouped_indices(labels: torch.Tensor, groups: torch.Tensor, seed: int, val_fraction: float,
                    test_fraction: float) -> dict[str, torch.Tensor]:
    """As :func:`stratified_indices`, but whole patients move: no group has images in two parts.

    ``groups``: (N,) int64 patient numbers. Patients are stratified by their most frequent label,
    shuffled with ``seed``, and taken into test, then val, until each holds its fraction of that
    stratum's images (rounded), so class balance is kept as far as whole patients allow.
    """
    g = torch.Generator().manual_seed(seed)
    ids, inverse = torch.unique(groups, return_inverse=True)
    counts = torch.zeros(len(ids), int(labels.max()) + 1 if len(labels) else 1, dtype=torch.int64)
    counts.index_put_((inverse, labels), torch.ones_like(labels), accumulate=True)
    majority, sizes = counts.argmax(1), counts.sum(1)
    side = torch.zeros(len(ids), dtype=torch.int64)  # 0 train, 1 val, 2 test
    for c in torch.unique(majority).tolist():
        members = torch.nonzero(majority == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        total = int(sizes[members].sum())
        want = {2: int(round(total * test_fraction)), 1: int(round(total * val_fraction))}
        taken = {2: 0, 1: 0}
        for p in members.tolist():
            for part in (2, 1):
                if taken[part] < want[part]:
                    side[p], taken[part] = part, taken[part] + int(sizes[p])
                    break
    where = side[inverse]
    return {s: torch.nonzero(where == k).flatten() for k, s in ((0, "train"), (1, "val"), (2, "test"))}


def stratified_split(data: Split, seed: int, val_fraction: float, test_fraction: float) -> tuple[Split, Split, Split]:
    """Split per class with a seeded permutation (:func:`stratified_indices`)."""
    idx = stratified_indices(data.labels, seed, val_fraction, test_fraction)
    return tuple(Split(data.images[idx[s]], data.labels[idx[s]]) for s in SPLITS)


def _validate(data: RealData) -> None:
    if len(data.train) == 0:
        raise DataError(f"{data.name} has an empty training split.")
    present = torch.unique(data.train.labels)
    if len(present) < 2:
        raise DataError(f"{data.name} has only one class in its training split; classification needs at least two.")
    counts = class_counts(data.train.labels, data.num_classes)
    empty = [data.class_names[c] for c, n in enumerate(counts) if n == 0]
    if empty:
        # Experts could never learn such a class, and distillation initialises each class from real images.
        raise DataError(f"{data.name}: class(es) {', '.join(empty)} have no training images; every class needs at least one.")
    for s in SPLITS:
        sp = data.split(s)
        if len(sp) and int(sp.labels.max()) >= data.num_classes:
            raise DataError(f"{data.name}: a {s} label is {int(sp.labels.max())} but there are {data.num_classes} classes.")
        if len(sp) and sp.images.shape[1:] != data.train.images.shape[1:]:
            raise DataError(f"{data.name}: {s} images have shape {tuple(sp.images.shape[1:])}, train has "
                            f"{tuple(data.train.images.shape[1:])}; pass --size to resize them.")
    if data.train.images.shape[-1] != data.train.images.shape[-2]:
        raise DataError(f"{data.name}: images must be square; pass --size to resize them.")


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if len(images) == 0:
        return images.new_zeros(0, images.shape[1], size, size)
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- preprocessing


@dataclass
class Preprocessing:
    """uint8 -> network input: scale to [0, 1], per-channel mean/std, then optional ZCA.

    ``mean``/``std``: (C,) float32 in [0, 1] units. ZCA, when used, acts on the
    normalised image flattened to ``C*H*W``: ``z = (x - zca_mean) @ zca_matrix``,
    and ``x = z @ zca_inverse + zca_mean`` undoes it.
    """

    mean: torch.Tensor
    std: torch.Tensor
    size: int
    channels: int
    zca_matrix: torch.Tensor | None = None
    zca_inverse: torch.Tensor | None = None
    zca_mean: torch.Tensor | None = None
    zca_eps: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def zca(self) -> bool:
        return self.zca_matrix is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, C, H, W) uint8 -> float32 network input."""
        if tuple(images.shape[1:]) != (self.channels, self.size, self.size):
            raise DataError(
                f"Images of shape {'x'.join(map(str, images.shape[1:]))} do not fit preprocessing fitted on "
                f"{self.channels}x{self.size}x{self.size} images; pass --size {self.size} (and images with "
                f"{self.channels} channel(s)) so that every stage sees the same geometry."
            )
        x = images.float().div(255.0)
        x = (x - self.mean.view(1, -1, 1, 1).to(x.device)) / self.std.view(1, -1, 1, 1).to(x.device)
        if self.zca:
            shape = x.shape
            x = (x.flatten(1) - self.zca_mean.to(x.device)) @ self.zca_matrix.to(x.device)
            x = x.view(shape)
        return x

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Network-space float (N, C, H, W) -> display space [0, 1], clamped."""
        x = x.detach().float()
        if self.zca:
            shape = x.shape
            x = (x.flatten(1) @ self.zca_inverse.to(x.device) + self.zca_mean.to(x.device)).view(shape)
        x = x * self.std.view(1, -1, 1, 1).to(x.device) + self.mean.view(1, -1, 1, 1).to(x.device)
        return x.clamp(0, 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean.numpy(), "std": self.std.numpy()}
        if self.zca:
            out |= {"zca_matrix": self.zca_matrix.numpy(), "zca_inverse": self.zca_inverse.numpy(),
                    "zca_mean": self.zca_mean.numpy()}
        return out

    def to_attrs(self) -> dict:
        return {"size": self.size, "channels": self.channels, "zca": self.zca,
                "zca_eps": float(self.zca_eps) if self.zca_eps is not None else -1.0}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], attrs: dict) -> "Preprocessing":
        t = lambda k: torch.as_tensor(np.asarray(arrays[k], dtype=np.float32))  # noqa: E731
        zca = bool(attrs.get("zca", False))
        eps = float(attrs.get("zca_eps", -1.0))
        return cls(mean=t("mean"), std=t("std"), size=int(attrs["size"]), channels=int(attrs["channels"]),
                   zca_matrix=t("zca_matrix") if zca else None, zca_inverse=t("zca_inverse") if zca else None,
                   zca_mean=t("zca_mean") if zca else None, zca_eps=eps if zca else None)

    def same_as(self, other: "Preprocessing", atol: float = 1e-6) -> str | None:
        """Return None when equal, else a sentence saying what differs."""
        if (self.size, self.channels) != (other.size, other.channels):
            return f"image geometry differs ({self.channels}x{self.size}x{self.size} vs {other.channels}x{other.size}x{other.size})"
        if not (torch.allclose(self.mean, other.mean, atol=atol) and torch.allclose(self.std, other.std, atol=atol)):
            return "mean/std normalisation differs"
        if self.zca != other.zca:
            return "one uses ZCA whitening and the other does not"
        if self.zca and not (torch.allclose(self.zca_matrix, other.zca_matrix, atol=1e-5)
                             and torch.allclose(self.zca_mean, other.zca_mean, atol=atol)):
            return "ZCA transforms differ"
        return None


def fit_preprocessing(train_images: torch.Tensor, *, zca: bool = False, zca_eps: float = ZCA_EPS) -> Preprocessing:
    """Fit mean/std (and ZCA, with kornia) on the training split only."""
    x = train_images.double().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)  # a constant channel must not divide by zero
    pre = Preprocessing(mean=mean.float(), std=std.float(), size=int(train_images.shape[-1]),
                        channels=int(train_images.shape[1]))
    if zca:
        import kornia

        xn = pre(train_images)
        whitener = kornia.enhance.ZCAWhitening(eps=zca_eps, compute_inv=True, detach_transforms=True)
        whitener.fit(xn.double())
        pre.zca_matrix = whitener.transform_matrix.float()
        pre.zca_inverse = whitener.transform_inv.float()
        pre.zca_mean = whitener.mean_vector.flatten().float()
        pre.zca_eps = zca_eps
    return pre
