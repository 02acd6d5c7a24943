"""Real data from a labels table: ``--data table.csv`` (or ``.tsv``).

Two layouts are read:

- a table with a header row holding ``path`` and ``label``, and optionally ``split``
  (train/val/test) and ``patient``; paths are relative to the table's folder;
- MedMNIST's own ``save()`` layout: no header, rows ``SPLIT,file,label``, files
  relative to the table's folder or to the folder named after the table.

Labels may be class names or integers (integers 0..K-1 keep their order).
Images may be PNG/JPEG (as an image folder's), DICOM or NIfTI
(:mod:`distill.medical`). The patient column's values never leave this module:
downstream code sees anonymous group numbers only.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .medical import BadFile, ReadOptions, is_dicom, is_nifti, read_dicom, read_nifti

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
COLUMNS = ("path", "label", "split", "patient")


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line in the table, for messages
    file: str  # as written in the table (relative)
    path: Path
    label: str
    split: str | None
    patient: str | None


@dataclass
class TableImages:
    """What a table holds once read: one entry per kept row, in table order."""

    images: list[np.ndarray]  # (H, W) or (H, W, 3) uint8 each
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    splits: list[str] | None  # per image, when the table has a split column
    groups: np.ndarray | None  # (N,) int64 anonymous patient numbers, when it has a patient column
    sha256: str  # of the table's bytes and each kept file's relative name and bytes
    skipped: int


def is_table(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in TABLE_SUFFIXES


def read_rows(table: Path) -> list[Row]:
    """Parse and check the table (not the images): one sentence for the first problem found."""
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            raw = [r for r in csv.reader(f, delimiter=delimiter)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{table.name} cannot be read as a {'TSV' if delimiter == chr(9) else 'CSV'} table ({e}).") from None
    numbered = [(i + 1, [c.strip() for c in r]) for i, r in enumerate(raw) if any(c.strip() for c in r)]
    if not numbered:
        raise DataError(f"{table.name} is empty; it needs columns path,label (and optionally split, patient).")
    header = [c.lower() for c in numbered[0][1]]
    if "path" in header and "label" in header:
        rows = _header_rows(table, header, numbered[1:])
    elif len(numbered[0][1]) == 3 and numbered[0][1][0].lower() in SPLIT_NAMES:
        rows = _medmnist_rows(table, numbered)
    else:
        raise DataError(f"{table.name} has neither a header with path and label columns nor MedMNIST's "
                        "header-less SPLIT,file,label rows.")
    if not rows:
        raise DataError(f"{table.name} has a header but no rows.")
    missing = next((r for r in rows if not r.path.is_file()), None)
    if missing is not None:
        raise DataError(f"{table.name} line {missing.line}: the file {missing.file} does not exist "
                        f"(paths are relative to the table's folder).")
    _check_patients(table, rows)
    return rows


def _header_rows(table: Path, header: list[str], body) -> list[Row]:
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        log.info("%s: ignoring column(s) %s.", table.name, ", ".join(unknown))
    col = {c: header.index(c) for c in COLUMNS if c in header}
    rows = []
    for line, cells in body:
        get = lambda c: cells[col[c]] if c in col and col[c] < len(cells) else ""  # noqa: E731
        file, label = get("path"), get("label")
        if not file or not label:
            raise DataError(f"{table.name} line {line}: path and label must both be filled in.")
        split = None
        if "split" in col:
            split = SPLIT_NAMES.get(get("split").lower())
            if split is None:
                raise DataError(f"{table.name} line {line}: split {get('split')!r} is not one of train, val, test.")
        patient = get("patient") if "patient" in col else None
        if patient == "":
            raise DataError(f"{table.name} line {line}: the patient column is empty; fill it in for every row.")
        rows.append(Row(line, file, table.parent / file, label, split, patient))
    return rows


def _medmnist_rows(table: Path, numbered) -> list[Row]:
    # medmnist's save() writes the CSV beside a folder named after it, holding the images.
    beside = table.parent / table.stem
    rows = []
    for line, cells in numbered:
        if len(cells) != 3 or cells[0].lower() not in SPLIT_NAMES:
            raise DataError(f"{table.name} line {line}: expected SPLIT,file,label with SPLIT train, val or test.")
        split, file, label = SPLIT_NAMES[cells[0].lower()], cells[1], cells[2]
        path = table.parent / file
        if not path.is_file() and (beside / file).is_file():
            path = beside / file
        rows.append(Row(line, file, path, label, split, None))
    return rows


def _check_patients(table: Path, rows: list[Row]) -> None:
    """A user-given split must keep each patient on one side, or validation and the audit would be wrong."""
    if rows[0].split is None or rows[0].patient is None:
        return
    seen: dict[str, str] = {}
    for r in rows:
        first = seen.setdefault(r.patient, r.split)
        if first != r.split:
            raise DataError(f"{table.name} line {r.line}: a patient has images in both {first} and {r.split}; "
                            "keep every patient's images in one split.")


def class_names_of(labels: list[str], where: str) -> tuple[list[str], np.ndarray]:
    """Labels as written -> (class names, (N,) int64). Integers 0..K-1 keep their order; names are sorted."""
    unique = sorted(set(labels))
    if len(unique) < 2:
        raise DataError(f"{where}'s label column has only one class ({unique[0]!r}); classification needs at least two.")
    if all(_is_int(v) for v in unique):
        ids = np.array([int(v) for v in labels], dtype=np.int64)
        if ids.min() < 0:
            raise DataError(f"{where}: integer labels must be 0 or more.")
        names = [str(i) for i in range(int(ids.max()) + 1)]
        return names, ids
    index = {name: i for i, name in enumerate(unique)}
    return unique, np.array([index[v] for v in labels], dtype=np.int64)


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def read_table(table: Path, size: int | None, options: ReadOptions) -> TableImages:
    """Read every image the table lists, resized to ``size`` (None: keep; then all must share one size)."""
    rows = read_rows(table)
    names, ids = class_names_of([r.label for r in rows], table.name)
    h = hashlib.sha256(table.read_bytes())
    images, kept, skipped = [], [], 0
    for i, r in enumerate(rows):
        try:
            img = read_image(r.path, r.file, size, options)
        except BadFile as e:
            if options.on_bad_file == "stop":
                raise DataError(f"{e} Pass --on-bad-file skip to leave such files out.") from None
            skipped += 1
            log.debug("skipped: %s", e)
            continue
        h.update(r.file.encode())
        h.update(r.path.read_bytes())
        images.append(img)
        kept.append(i)
    if skipped:
        log.warning("%s: skipped %d unreadable file(s) of %d (--on-bad-file skip).", table.name, skipped, len(rows))
    if not images:
        raise DataError(f"{table.name}: none of its {len(rows)} files could be read.")
    shapes = {a.shape[:2] for a in images}
    if len(shapes) > 1:
        raise DataError(f"The images {table.name} lists have different sizes {sorted(shapes)[:3]}; "
                        "pass --size to resize them.")
    kept_rows = [rows[i] for i in kept]
    groups = None
    if kept_rows[0].patient is not None:
        number: dict[str, int] = {}
        groups = np.array([number.setdefault(r.patient, len(number)) for r in kept_rows], dtype=np.int64)
    return TableImages(images=images, labels=ids[kept], class_names=names,
                       splits=[r.split for r in kept_rows] if kept_rows[0].split is not None else None,
                       groups=groups, sha256=h.hexdigest(), skipped=skipped)


def read_image(path: Path, name: str, size: int | None, options: ReadOptions) -> np.ndarray:
    """Any supported image file -> (H, W) or (H, W, 3) uint8, resized (bilinear) to ``size`` when given."""
    from PIL import Image

    if is_dicom(path):
        arr = read_dicom(path, name)
    elif is_nifti(path):
        arr = read_nifti(path, name, options)
    else:
        try:
            with Image.open(path) as im:
                arr = np.asarray(to_8bit(im), dtype=np.uint8)
        except OSError:
            raise BadFile(f"{name} cannot be read as an image (PNG, JPEG, DICOM .dcm or NIfTI .nii/.nii.gz).") from None
    if size is not None and arr.shape[:2] != (size, size):
        mode = "L" if arr.ndim == 2 else "RGB"
        arr = np.asarray(Image.fromarray(arr, mode=mode).resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return arr


GREY_MODES = ("L", "LA", "1")
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit PNGs open as one of these


def to_8bit(im):
    """A PIL image as 8-bit grey ("L") or "RGB"; 16-bit grey is scaled, not clipped.

    PIL's own ``convert("L")`` clips 16-bit values at 255, which turns most
    16-bit medical images white, so the full 0-65535 range is mapped to 0-255.
    """
    from PIL import Image

    if im.mode in WIDE_GREY_MODES:
        wide = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    return im.convert("L") if im.mode in GREY_MODES else im.convert("RGB")
