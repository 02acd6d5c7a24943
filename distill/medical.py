"""DICOM and NIfTI images in: one file -> one 8-bit image, with the intensity pipeline a radiologist expects.

Behind the optional extra ``distill[medical]`` (pydicom, nibabel), imported
only when such a file is read. Nothing read here (tag, file name, path) leaves
this module except the pixels and, in error messages, the file's name.

DICOM (PS3.3 C.11, "Grayscale Image Transformations"): stored values -> modality
LUT (Rescale Slope/Intercept, or a Modality LUT Sequence) -> VOI LUT (a VOI LUT
Sequence, else Window Center/Width) -> 0..255, with MONOCHROME1 inverted so that
bone is always bright. Without a VOI transform the image's own min..max is used.

NIfTI: a 2-D image, or one slice of a 3-D volume along a named axis of the
closest canonical (RAS+) orientation; intensities min..max -> 0..255.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

MEDICAL_EXTRA = "pip install 'distill[medical]'"
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ON_BAD_FILE = ("stop", "skip")
# Axes of a canonical (RAS+) NIfTI volume, by name and by number.
NIFTI_AXES = {"sagittal": 0, "coronal": 1, "axial": 2, "0": 0, "1": 1, "2": 2}

# Transfer syntaxes pydicom cannot decode alone, and the plugin that decodes them (pydicom 3's
# "pixel data handlers" table). RLE and deflate need nothing extra.
_DECODERS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
}


class BadFile(DataError):
    """A file that exists but cannot be read as an image; ``--on-bad-file skip`` may pass over it."""


@dataclass(frozen=True)
class ReadOptions:
    """How medical files are read; recorded with the buffer so that every later stage reads them alike."""

    on_bad_file: str = "stop"  # or "skip": leave out unreadable files, and say how many
    nifti_axis: str | None = None  # a volume's slicing axis: sagittal|coronal|axial or 0|1|2
    nifti_slice: int | None = None  # index along that axis; None = the middle slice

    def __post_init__(self):
        if self.on_bad_file not in ON_BAD_FILE:
            raise DataError(f"--on-bad-file must be one of {', '.join(ON_BAD_FILE)}; got {self.on_bad_file!r}.")
        if self.nifti_axis is not None and str(self.nifti_axis).lower() not in NIFTI_AXES:
            raise DataError(f"--nifti-axis must be one of sagittal, coronal, axial (or 0, 1, 2); got {self.nifti_axis!r}.")

    def record(self) -> dict:
        """The JSON-able record (only what differs from the defaults)."""
        out = {}
        if self.on_bad_file != "stop":
            out["on_bad_file"] = self.on_bad_file
        if self.nifti_axis is not None:
            out["nifti_axis"] = str(self.nifti_axis).lower()
            out["nifti_slice"] = self.nifti_slice
        return out

    @classmethod
    def from_record(cls, record: dict | None) -> "ReadOptions":
        record = record or {}
        return cls(on_bad_file=record.get("on_bad_file", "stop"), nifti_axis=record.get("nifti_axis"),
                   nifti_slice=record.get("nifti_slice"))


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def _import(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"Reading DICOM and NIfTI files needs pydicom and nibabel: {MEDICAL_EXTRA}.") from None


def to_uint8(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map [lo, hi] (default: the image's own min..max) linearly to 0..255, clipping outside."""
    x = np.asarray(x, dtype=np.float64)
    lo = float(np.min(x)) if lo is None else lo
    hi = float(np.max(x)) if hi is None else hi
    if not np.isfinite([lo, hi]).all():
        raise ValueError("non-finite intensities")
    scaled = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- DICOM


def read_dicom(path: Path, name: str) -> np.ndarray:
    """One single-frame DICOM image -> (H, W) or (H, W, 3) uint8; ``name`` is how errors call the file."""
    pydicom = _import("pydicom")
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise BadFile(f"{name} cannot be read as a DICOM file ({_short(e)}).") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{name} is a DICOM file without pixel data (an RT plan or report, say); "
                        "list only image files in the table.")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(f"{name} is a multi-frame DICOM ({int(ds.NumberOfFrames)} frames); distill takes one "
                        "2-D image per file: export the frames as separate files.")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        stored = ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError, NotImplementedError, ValueError... by handler
        plugin = _DECODERS.get(str(syntax)) if syntax is not None else None
        if plugin is not None and getattr(syntax, "is_compressed", False):
            raise DataError(f"{name} uses the compressed transfer syntax {syntax.name}, which needs a decoder "
                            f"that is not installed: pip install {plugin}.") from None
        raise BadFile(f"{name}'s pixel data cannot be decoded ({_short(e)}).") from None
    if stored.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:  # colour (e.g. a photograph): no LUTs apply
        return to_uint8(stored, 0, 2 ** int(ds.get("BitsStored", 8)) - 1)
    if stored.ndim != 2:
        raise DataError(f"{name} holds pixel data of shape {stored.shape}; distill takes 2-D grey or RGB images.")
    values = apply_modality_lut(stored, ds)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    try:
        if has_voi:
            lo, hi = _voi_range(ds, apply_voi_lut)
            values = apply_voi_lut(values, ds)
            image = to_uint8(values, lo, hi)
        else:
            image = to_uint8(values)
    except ValueError as e:
        raise BadFile(f"{name}'s intensities cannot be mapped to grey levels ({_short(e)}).") from None
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = 255 - image  # MONOCHROME1: low values are bright; MONOCHROME2 is the display convention
    return image


def _voi_range(ds, apply_voi_lut) -> tuple[float, float]:
    """The output range of pydicom's VOI transform: a VOI LUT's entry range, or what a window maps
    the lowest and highest inputs to (pydicom picks it from the stored bits and the rescale)."""
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    ends = apply_voi_lut(np.array([-1e12, 1e12], dtype=np.float64), ds)
    return float(np.min(ends)), float(np.max(ends))


# ----------------------------------------------------------------------------- NIfTI


def read_nifti(path: Path, name: str, options: ReadOptions) -> np.ndarray:
    """A 2-D NIfTI image, or one slice of a volume (``options``) -> (H, W) uint8."""
    nib = _import("nibabel")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.get_fdata(dtype=np.float64))  # applies scl_slope/scl_inter
    except Exception as e:  # nibabel's errors (ImageFileError, EOFError, zlib errors...) have many types
        raise BadFile(f"{name} cannot be read as a NIfTI file ({_short(e)}).") from None
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3:
        if options.nifti_axis is None:
            raise DataError(f"{name} is a 3-D volume of shape {data.shape}; pass --nifti-axis (sagittal, coronal "
                            "or axial) and optionally --nifti-slice to take one 2-D slice of it.")
        axis = NIFTI_AXES[str(options.nifti_axis).lower()]
        index = data.shape[axis] // 2 if options.nifti_slice is None else int(options.nifti_slice)
        if not 0 <= index < data.shape[axis]:
            raise DataError(f"{name} has {data.shape[axis]} slices along axis {options.nifti_axis}; "
                            f"--nifti-slice {index} is outside 0..{data.shape[axis] - 1}.")
        data = np.take(data, index, axis=axis)
    elif data.ndim != 2:
        raise DataError(f"{name} has {data.ndim} dimensions {data.shape}; distill takes 2-D images or one slice "
                        "of a 3-D volume.")
    elif options.nifti_axis is not None and NIFTI_AXES[str(options.nifti_axis).lower()] > 1:
        raise DataError(f"{name} is a 2-D image; --nifti-axis {options.nifti_axis} names an axis it lacks.")
    # Canonical arrays are (x: left->right, y: posterior->anterior); rows top-down for display.
    try:
        return to_uint8(np.flipud(data.T))
    except ValueError as e:
        raise BadFile(f"{name}'s intensities cannot be mapped to grey levels ({_short(e)}).") from None


def _short(e: Exception) -> str:
    text = " ".join(str(e).split()).rstrip(".") or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
