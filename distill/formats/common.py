"""Pieces shared by every HDF5 schema: JSON attributes, preprocessing groups, version checks."""
from __future__ import annotations

import datetime as _dt
import json
import warnings
from typing import Any

import h5py
import numpy as np

from ..data import Preprocessing
from ..errors import FormatError


# Every file distill writes names its format and version under these two keys (HDF5 attributes, JSON and
# TOML keys, torch.save dicts alike).
FORMAT_KEY = "format"
VERSION_KEY = "format_version"
# Each stage writes its fully resolved settings beside its outputs under this name (the buffer's and the run's).
CONFIG_FILE = "config.toml"


def format_header(fmt: str, version: str) -> dict[str, str]:
    """The two keys a JSON document (or a dict written otherwise) starts with: its format and version."""
    return {FORMAT_KEY: fmt, VERSION_KEY: version}


def set_json(obj: h5py.HLObject, key: str, value: Any) -> None:
    obj.attrs[key] = json.dumps(value, sort_keys=True)


def get_json(obj: h5py.HLObject, key: str, default: Any = ...) -> Any:
    if key not in obj.attrs:
        if default is ...:
            raise FormatError(f"{obj.file.filename}: attribute {key!r} is missing at {obj.name}.")
        return default
    try:
        return json.loads(_str(obj.attrs[key]))
    except (TypeError, ValueError):
        raise FormatError(f"{obj.file.filename}: attribute {key!r} at {obj.name} is not valid JSON.") from None


def get_attr(obj: h5py.HLObject, key: str, default: Any = ...) -> Any:
    if key not in obj.attrs:
        if default is ...:
            raise FormatError(f"{obj.file.filename}: attribute {key!r} is missing at {obj.name}.")
        return default
    v = obj.attrs[key]
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _str(v) -> str:
    return v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def check_version(filename: str, found: str, expected_major: int, current_minor: int, kind: str) -> None:
    """Reject another major version; warn on a newer minor one."""
    try:
        major, minor = (int(p) for p in str(found).split(".")[:2])
    except ValueError:
        raise FormatError(f"{filename}: {kind} format version {found!r} is not of the form MAJOR.MINOR.") from None
    if major != expected_major:
        raise FormatError(f"{filename}: {kind} format version {found} is not supported (this reader reads {expected_major}.x).")
    if minor > current_minor:
        warnings.warn(f"{filename}: {kind} format {found} is newer than this reader ({expected_major}.{current_minor}); "
                      "unknown fields are ignored.", stacklevel=3)


def open_checked(path, fmt: str, major: int, minor: int, kind: str, *, unreadable: str | None = None,
                 foreign: str | None = None) -> h5py.File:
    """Open ``path`` read-only and check its ``format`` and major version; the caller closes it (``with``).

    Every exchanged HDF5 file carries ``format`` and ``format_version``; this is the one place that checks
    them, with one sentence for a file that is not HDF5, is another kind of file, or has another major version.
    """
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise FormatError(unreadable or f"{path} is not a readable HDF5 file.") from None
    try:
        if get_attr(f, FORMAT_KEY, None) != fmt:
            raise FormatError(foreign or f"{path} is not a {fmt} file.")
        check_version(str(path), get_attr(f, VERSION_KEY, ""), major, minor, kind)
    except BaseException:
        f.close()
        raise
    return f


def write_preprocessing(group: h5py.Group, pre: Preprocessing, **dataset_kw) -> None:
    for k, v in pre.to_arrays().items():
        group.create_dataset(k, data=np.asarray(v, dtype=np.float32), **dataset_kw)
    for k, v in pre.to_attrs().items():
        group.attrs[k] = v


def read_preprocessing(group: h5py.Group) -> Preprocessing:
    try:
        arrays = {k: group[k][()] for k in ("mean", "std", "zca_matrix", "zca_inverse", "zca_mean") if k in group}
        attrs = {k: get_attr(group, k) for k in ("size", "channels", "zca", "zca_eps") if k in group.attrs}
        return Preprocessing.from_arrays(arrays, attrs)
    except KeyError as e:
        raise FormatError(f"{group.file.filename}: preprocessing group lacks {e}.") from None
