"""The ``.h5`` share that one hospital sends another (schema: docs/share-format.md).

This module holds the in-memory :class:`Share`, its writer :func:`write_share`
and the validating reader :func:`load_share`. Names and limits come from
:mod:`.share_schema`. It imports nothing from ``mtt`` or ``buffer``: a share is
readable without the method that made it.

The reader treats every file as if a stranger sent it: it looks at links,
storage and declared sizes before it reads any data, and every way a file can
be wrong ends in one :class:`~distill.errors.FormatError` sentence.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .. import limits as L
from ..data import Preprocessing
from ..errors import DistillError, FormatError
from ..grid import labelled_grid
from ..io import atomic_folder, atomic_path, new_h5
from ..models import check_model_kwargs
from ..text import control_characters, printable
from . import share_schema as S
from .audit import summary_lines
from .common import check_version, utc_now
from .dp_record import DPRecord
from .share_schema import Attr, Key

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: gzip works well and a reader never inflates more than it asked for
GZIP_LEVEL = 4  # higher levels barely shrink float noise and cost time
MAX_GRID_PER_CLASS = 50  # columns of the inspect grid; wider rows are unreadable anyway
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_LICENSE = re.compile(r"^[A-Za-z0-9.+\-() ]{1,200}$")  # the characters of an SPDX license expression


@dataclass
class Recipe:
    """How the recipient should train on the share (the MTT reference's evaluation protocol by default)."""

    model: str  # a name in distill.models' registry
    model_kwargs: dict
    lr: float  # the learned step size
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    lr_decay: str  # "half" = lr x 0.1 after half the epochs; "none"
    augment: str  # distill.augment.Augment.parse syntax, or "none"
    loss: str  # "soft_cross_entropy" (targets softmax(logits / T)) or "cross_entropy"

    # The recipe is data: distill.train.TrainRecipe.following(recipe) is how a trainer reads it.


@dataclass
class Share:
    images: torch.Tensor  # (N, C, H, W) float32, preprocessed (network) space
    labels: torch.Tensor  # (N,) int64 hard class ids
    label_logits: torch.Tensor | None  # (N, K) float32 soft-label logits, or None
    label_temperature: float
    class_names: list[str]
    preprocessing: Preprocessing
    recipe: Recipe
    provenance: dict = field(default_factory=dict)  # method, hyperparameters, experts, dataset fingerprint, software
    # audit verdict, "forced" flag, statement; v1.1: guarantee sentence, DP record (or none), private statistics
    privacy: dict = field(default_factory=dict)
    license: str = "CC-BY-4.0"  # SPDX identifier
    description: str = ""
    citation: str = ""
    created: str = ""
    format_version: str = ""
    payload_sha256: str = ""
    content_sha256: str = ""  # over every field (format 1.1); "" in a 1.0 share
    unverified: tuple[str, ...] = ()  # what no checksum covered (a 1.0 share), for describe()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def targets(self) -> torch.Tensor:
        """Training targets: softmax(logits / T) probabilities (N, K), or the class ids (N,)."""
        if self.label_logits is None:
            return self.labels
        return torch.softmax(self.label_logits / self.label_temperature, dim=1)

    def dp_record(self) -> DPRecord | None:
        """The differential-privacy record the share carries, or None for a share made without DP."""
        return dp_from_privacy(self.privacy)

    def guarantee(self) -> str:
        """The privacy status in one sentence: the DP guarantee, or that there is none."""
        dp = self.dp_record()
        if dp is not None:
            return dp.sentence()
        return str(self.privacy.get(Attr.GUARANTEE) or S.NO_GUARANTEE)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    @property
    def metadata(self) -> dict:
        """Everything but the arrays: licence, text, provenance, privacy, version and checksum."""
        return {"license": self.license, "description": self.description, "citation": self.citation,
                "created": self.created, "format_version": self.format_version,
                "payload_sha256": self.payload_sha256, "content_sha256": self.content_sha256,
                "unverified": list(self.unverified), "provenance": self.provenance, "privacy": self.privacy}

    def dataset(self) -> torch.utils.data.Dataset:
        """A Dataset of (image (C, H, W) float32 preprocessed, target): (K,) probabilities, or an int64 class id."""
        return torch.utils.data.TensorDataset(self.images, self.targets())

    def pixels(self) -> torch.Tensor:
        """(N, C, H, W) uint8 display pixels: preprocessing undone, clamped to [0, 1] and rounded (lossy)."""
        return self.preprocessing.invert(self.images).mul(255).round().to(torch.uint8)

    def to_npz(self, path: str | os.PathLike) -> Path:
        """Write a MedMNIST-layout ``.npz`` (all synthetic images in the train split) and return its path.

        Keys: ``{train,val,test}_images`` uint8 (N, H, W) or (N, H, W, C), ``{split}_labels``
        (N, 1); val and test are empty. Soft labels, when present, go beside them as
        ``train_soft_labels`` (N, K) float32 probabilities, which MedMNIST code ignores.
        Pixels are :meth:`pixels`, so this export is lossy; the share keeps the exact floats.
        """
        px = self.pixels().numpy()
        images = px[:, 0] if px.shape[1] == 1 else px.transpose(0, 2, 3, 1)
        label_dtype = np.uint8 if self.num_classes <= 256 else np.int64  # MedMNIST stores uint8
        arrays = {"train_images": np.ascontiguousarray(images),
                  "train_labels": self.labels.numpy().astype(label_dtype)[:, None]}
        for split in ("val", "test"):
            arrays[f"{split}_images"] = np.zeros((0,) + images.shape[1:], dtype=np.uint8)
            arrays[f"{split}_labels"] = np.zeros((0, 1), dtype=label_dtype)
        if self.label_logits is not None:
            arrays["train_soft_labels"] = self.targets().numpy().astype(np.float32)
        path = Path(path)
        # An open file, because np.savez appends ".npz" to a name that lacks it (the temporary one does).
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        return path

    def to_folder(self, folder: str | os.PathLike) -> Path:
        """Write one PNG per image into ``folder/<kk>_<class>/<index>.png`` and return the folder.

        Class folders are prefixed with their zero-padded id, so sorting them (as
        ``distill.data.load_data`` does) restores the class order. Needs 1 or 3 channels.
        """
        from PIL import Image

        folder = Path(folder)
        if self.preprocessing.channels not in (1, 3):
            raise DistillError(f"PNG holds 1 or 3 channels, but this share has {self.preprocessing.channels}; use to_npz.")
        with atomic_folder(folder) as tmp:
            px = self.pixels()
            width = len(str(self.num_classes - 1))
            dirs = [tmp / f"{k:0{width}d}_{_SAFE_NAME.sub('_', name).strip('._') or 'class'}"
                    for k, name in enumerate(self.class_names)]
            for d in dirs:
                d.mkdir()
            for i, (img, y) in enumerate(zip(px, self.labels.tolist())):
                arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
                Image.fromarray(np.ascontiguousarray(arr)).save(dirs[y] / f"{i:05d}.png", format="PNG")
        return folder

    def summary(self) -> dict:
        """A JSON-able description of the share (what ``distill inspect --json`` prints)."""
        pre = self.preprocessing
        return {
            "guarantee": self.guarantee(),
            "format_version": self.format_version, "created": self.created, "payload_sha256": self.payload_sha256,
            "content_sha256": self.content_sha256, "unverified": list(self.unverified),
            "images": {"count": self.num_images, "shape": list(self.images.shape[1:]), "dtype": "float32",
                       "space": S.IMAGE_SPACE},
            "classes": [{"id": k, "name": n, "images": c}
                        for k, (n, c) in enumerate(zip(self.class_names, self.class_counts()))],
            "labels": {"soft": self.label_logits is not None, "kind": S.LOGITS_KIND if self.label_logits is not None else "hard",
                       "temperature": self.label_temperature if self.label_logits is not None else None},
            "preprocessing": {"channels": pre.channels, "size": pre.size, "mean": pre.mean.tolist(),
                              "std": pre.std.tolist(), "zca": pre.zca, "zca_eps": pre.zca_eps},
            "recipe": asdict(self.recipe),
            "provenance": self.provenance, "privacy": self.privacy,
            "license": self.license, "description": self.description, "citation": self.citation,
        }

    def describe(self) -> str:
        """A human-readable summary, a few lines per section."""
        s, r, pre = self.summary(), self.recipe, self.preprocessing
        method, experts, data = (self.provenance.get(k, {}) for k in (Attr.METHOD, Attr.EXPERTS, Attr.DATASET))
        if self.label_logits is not None:
            labels = f"soft: logits, temperature {self.label_temperature:g}, train with {r.loss}"
        else:
            labels = f"hard class ids, train with {r.loss}"
        audit = (f"audit: {self.privacy.get(Attr.AUDIT_STATUS, 'missing')}"
                 + (" (export forced)" if self.privacy.get(Attr.FORCED) else ""))
        lines = [  # the privacy status first: it is what a data-protection officer reads
            f"privacy: {self.guarantee()}",
            f"  {audit}. {S.AUDIT_OUTSIDE}",
            *([f"  private statistics carried: {', '.join(map(str, self.privacy[Attr.PRIVATE_STATISTICS])) or 'none'}"]
              if isinstance(self.privacy.get(Attr.PRIVATE_STATISTICS), list) else []),
            f"distill share v{self.format_version}, created {self.created}",
            *_checksum_lines(self),
            f"images: {self.num_images} x {tuple(self.images.shape[1:])} float32, preprocessed",
            f"labels: {labels}",
            "classes:",
            *[f"  {c['id']}: {c['name']} ({c['images']} images)" for c in s["classes"]],
            f"preprocessing: {pre.channels}x{pre.size}x{pre.size}, mean {_fmt(pre.mean)}, std {_fmt(pre.std)}, "
            + (f"ZCA (eps {pre.zca_eps:g})" if pre.zca else "no ZCA"),
            f"recipe: {r.model} {json.dumps(r.model_kwargs, sort_keys=True)}, lr {r.lr:.4g}, {r.epochs} epochs, "
            f"batch {r.batch_size}, momentum {r.momentum:g}, weight decay {r.weight_decay:g}, lr decay {r.lr_decay}, "
            f"augment {r.augment}",
            "provenance:",
            "  method: " + (", ".join(f"{k}={v}" for k, v in sorted(method.items())) or "not recorded"),
            "  experts: " + (", ".join(f"{k}={v}" for k, v in sorted(experts.items())) or "not recorded"),
            "  source: " + (f"{data.get('name', '?')}, " + (f"train counts per class {data['counts']['train']}"
                                                             if (data.get("counts") or {}).get("train") else
                                                             "no class counts")
                            if data else "not recorded"),
            "  software: " + ", ".join(f"{k} {v}" for k, v in sorted(self.provenance.get(Attr.SOFTWARE, {}).items())),
            *(["audit (as recorded):", f"  {self.privacy[Attr.STATEMENT]}"] if self.privacy.get(Attr.STATEMENT) else []),
            # Only shares from before v1.1 carry the audit's figures.
            *[f"  {line}" for line in (summary_lines(self.privacy[Attr.SUMMARY])
                                       if self.privacy.get(Attr.SUMMARY) else [])],
            f"license: {self.license}",
        ]
        if self.description:
            lines.append(f"description: {self.description}")
        if self.citation:
            lines.append(f"citation: {self.citation}")
        return "\n".join(printable(line) for line in lines)  # the sender chose this text: no terminal control

    def save_grid(self, path: str | os.PathLike, max_per_class: int = MAX_GRID_PER_CLASS) -> Path:
        """Draw one row per class (preprocessing undone), named on the left, into a PNG; returns its path.

        Shares with neither 1 nor 3 channels are drawn from their first channel.
        """
        disp = self.preprocessing.invert(self.images)
        if disp.shape[1] not in (1, 3):
            disp = disp[:, :1]
        counts = self.class_counts()
        cols = max(1, min(max(counts), max_per_class))
        rows = []
        for k in range(self.num_classes):
            row = disp[self.labels == k][:cols]
            blank = torch.zeros((cols - len(row),) + tuple(disp.shape[1:]))
            rows.append(torch.cat([row, blank]))
        path = Path(path)
        with atomic_path(path) as tmp:
            labelled_grid(torch.cat(rows), cols, self.class_names, pad_value=1.0).save(tmp, format="PNG")
        return path


def _checksum_lines(share: Share) -> list[str]:
    if share.content_sha256:
        return [f"  content sha256 {share.content_sha256} (verified: every field)"]
    return [f"  payload sha256 {share.payload_sha256} (verified: images, labels, label logits, preprocessing arrays)",
            f"  UNVERIFIED (format {share.format_version} has no content checksum): {', '.join(share.unverified)}"]


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in t.tolist()) + "]"


def dp_from_privacy(privacy: dict) -> DPRecord | None:
    """The DPRecord in a share's privacy group (``dp``), or None; FormatError when it is not a valid record."""
    dp = privacy.get(Attr.DP)
    if dp is None:
        return None
    if isinstance(dp, DPRecord):
        return dp
    if not isinstance(dp, dict):
        raise FormatError("The share's privacy record 'dp' is not a JSON object.")
    return DPRecord.from_json(json.dumps(dp), where="The share's privacy record 'dp'")


# ----------------------------------------------------------------------------- payload hash


def payload_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the datasets of :data:`share_schema.PAYLOAD_ORDER` present in ``arrays``.

    Each contributes its raw bytes, little-endian, in C order, with nothing
    between them; the validated shapes make the boundaries unambiguous.
    """
    h = hashlib.sha256()
    for key in S.PAYLOAD_ORDER:
        if key in arrays:
            a = np.asarray(arrays[key])
            h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes(order="C"))
    return h.hexdigest()


def content_sha256(f: h5py.File, objs: dict[str, h5py.HLObject], read: dict[str, np.ndarray] | None = None) -> str:
    """SHA-256 over every group, dataset and attribute of the share except ``content_sha256`` itself.

    Generic on purpose: a field added later is covered without a change here. ``objs`` maps each
    object's path (no leading slash) to it, as :func:`_walk` returns; ``read`` holds datasets
    already in memory, by path. The byte stream (docs/share-format.md, "Content checksum"):
    objects in order of their UTF-8 path, the root ("") first; each contributes its path, then
    ``group``, or ``dataset``, its dtype, shape and raw little-endian C-order bytes; then its
    attributes in order of their UTF-8 names, each as name, dtype, shape and bytes. Every item
    is prefixed by its length as 8 bytes little-endian, so no two files share a stream.
    """
    h = hashlib.sha256()

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    def put_array(a: np.ndarray) -> None:
        a = np.asarray(a)
        if a.dtype.kind not in "biufS":  # the reader's _walk has refused such datasets already
            raise ValueError(f"a value of dtype {a.dtype} cannot be part of a share")
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        put(a.dtype.str.encode())
        put(json.dumps(list(a.shape)).encode())
        put(a.tobytes(order="C"))

    for path in sorted(["", *objs], key=lambda p: p.encode("utf-8")):
        obj = f if path == "" else objs[path]
        put(path.encode("utf-8"))
        if isinstance(obj, h5py.Dataset):
            put(b"dataset")
            put_array(read[path] if read is not None and path in read else obj[()])
        else:
            put(b"group")
        for name in sorted(obj.attrs.keys(), key=lambda n: n.encode("utf-8")):
            if path == "" and name == Attr.CONTENT_SHA256:
                continue
            put(name.encode("utf-8"))
            put_array(obj.attrs[name])
    return h.hexdigest()


# ----------------------------------------------------------------------------- writer


def _share_arrays(share: Share) -> dict[str, np.ndarray]:
    out = {Key.IMAGES: share.images.detach().cpu().to(torch.float32).contiguous().numpy(),
           Key.LABELS: share.labels.detach().cpu().to(torch.int64).contiguous().numpy()}
    if share.label_logits is not None:
        out[Key.LABEL_LOGITS] = share.label_logits.detach().cpu().to(torch.float32).contiguous().numpy()
    for k, v in share.preprocessing.to_arrays().items():
        out[f"{Key.PREPROCESSING}/{k}"] = np.asarray(v, dtype=np.float32)
    return out


def _set_text(obj: h5py.HLObject, key: str, text: str) -> None:
    # Fixed-length UTF-8, so a reader can bound an attribute's size before reading it
    # (variable-length strings live in a heap whose size is not declared).
    b = text.encode("utf-8")
    if b"\0" in b:
        raise DistillError(f"The share's {key} contains a NUL character; remove it.")
    if len(b) > S.MAX_ATTR_BYTES:
        raise DistillError(f"The share's {key} is longer than {S.MAX_ATTR_BYTES >> 20} MiB; shorten it.")
    obj.attrs.create(key, data=np.bytes_(b), dtype=h5py.string_dtype("utf-8", max(1, len(b))))


def _set_json(obj: h5py.HLObject, key: str, value: Any) -> None:
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DistillError(f"The share's {key} cannot be stored as strict JSON ({e}).") from None
    _set_text(obj, key, text)


def _dataset(group: h5py.Group, key: str, data: np.ndarray) -> h5py.Dataset:
    if data.dtype.kind == "S":
        chunks = data.shape
    else:
        row = max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize)
        chunks = (max(1, min(len(data), CHUNK_BYTES // row)),) + data.shape[1:]
    return group.create_dataset(key, data=data, chunks=chunks, compression="gzip", compression_opts=GZIP_LEVEL,
                                shuffle=True, fletcher32=True)


def share_targets(share: Share, source: str = "share") -> torch.Tensor:
    """The targets a share's recipe asks for: class ids for ``cross_entropy``, ``Share.targets()`` otherwise."""
    loss = share.recipe.loss
    if loss not in S.LOSSES:
        raise FormatError(f"{source} asks for the loss {loss!r}; this version knows {', '.join(S.LOSSES)}.")
    return share.labels.long() if loss == S.LOSS_HARD else share.targets()


def write_share(path: str | os.PathLike, share: Share) -> Path:
    """Validate ``share`` and write it atomically as a v1 share; returns the path.

    The ``created``, ``format_version`` and ``payload_sha256`` fields of ``share``
    are ignored: the file gets the current time, this writer's version and the
    hash of what it holds. The written file is read back with :func:`load_share`
    before it takes its final name, so a file that exists always validates.
    """
    path = Path(path)
    arrays = _share_arrays(share)
    names = [str(n) for n in share.class_names]
    encoded = [n.encode("utf-8") for n in names]
    if not _LICENSE.match(share.license or ""):
        raise DistillError(f"License {share.license!r} is not an SPDX identifier such as CC-BY-4.0 or CC0-1.0.")
    if any(b"\0" in b or not b for b in encoded):
        raise DistillError("Class names must be non-empty and contain no NUL character.")
    for what, text, allow in (("class name", " ".join(names), ""), ("--description", share.description or "", "\n\t"),
                              ("--cite", share.citation or "", "\n\t"), ("--license", share.license or "", "")):
        bad = control_characters(text, allow)
        if bad:
            raise DistillError(f"The share's {what} contains the control character(s) {', '.join(bad)}, which a "
                               "terminal would obey when the share is inspected; remove them.")
    privacy = _normalised_privacy(share.privacy)
    _check_content(str(path), arrays, len(names), share.recipe, share.label_temperature, privacy)
    with atomic_path(path) as tmp:
        with new_h5(tmp) as f:
            _set_text(f, Attr.FORMAT, S.SHARE_FORMAT)
            _set_text(f, Attr.FORMAT_VERSION, S.FORMAT_VERSION)
            _set_text(f, Attr.CREATED, utc_now())
            _set_text(f, Attr.PAYLOAD_SHA256, payload_sha256(arrays))
            f.attrs[Attr.NUM_IMAGES] = np.int64(len(arrays[Key.IMAGES]))
            f.attrs[Attr.NUM_CLASSES] = np.int64(len(names))
            _set_text(f, Attr.LICENSE, share.license)
            _set_text(f, Attr.DESCRIPTION, share.description or "")
            _set_text(f, Attr.CITATION, share.citation or "")

            images = _dataset(f, Key.IMAGES, arrays[Key.IMAGES])
            _set_text(images, Attr.SPACE, S.IMAGE_SPACE)
            labels = _dataset(f, Key.LABELS, arrays[Key.LABELS])
            labels.attrs[Attr.IMAGES_PER_CLASS] = np.bincount(arrays[Key.LABELS], minlength=len(names)).astype(np.int64)
            if Key.LABEL_LOGITS in arrays:
                logits = _dataset(f, Key.LABEL_LOGITS, arrays[Key.LABEL_LOGITS])
                _set_text(logits, Attr.KIND, S.LOGITS_KIND)
                logits.attrs[Attr.TEMPERATURE] = np.float64(share.label_temperature)
                _set_text(logits, Attr.TARGET, S.SOFT_TARGET)
            width = max(len(b) for b in encoded)
            _dataset(f, Key.CLASS_NAMES, np.array(encoded, dtype=h5py.string_dtype("utf-8", width)))

            g = f.create_group(Key.PREPROCESSING)
            for k in S.PRE_ARRAYS:
                if f"{Key.PREPROCESSING}/{k}" in arrays:
                    _dataset(g, k, arrays[f"{Key.PREPROCESSING}/{k}"])
            pre = share.preprocessing
            g.attrs[Attr.SIZE] = np.int64(pre.size)
            g.attrs[Attr.CHANNELS] = np.int64(pre.channels)
            g.attrs[Attr.ZCA] = np.bool_(pre.zca)
            g.attrs[Attr.ZCA_EPS] = np.float64(pre.zca_eps if pre.zca_eps is not None else -1.0)
            _set_text(g, Attr.PIPELINE, S.PIPELINE)

            g = f.create_group(Key.RECIPE)
            r = share.recipe
            for k in ("model", "lr_decay", "augment", "loss"):
                _set_text(g, k, getattr(r, k))
            _set_json(g, Attr.MODEL_KWARGS, r.model_kwargs)
            for k in ("lr", "momentum", "weight_decay"):
                g.attrs[k] = np.float64(getattr(r, k))
            for k in ("epochs", "batch_size"):
                g.attrs[k] = np.int64(getattr(r, k))

            g = f.create_group(Key.PROVENANCE)
            for k in S.PROVENANCE_KEYS:
                _set_json(g, k, share.provenance.get(k, {}))

            g = f.create_group(Key.PRIVACY)
            _set_text(g, Attr.AUDIT_STATUS, privacy[Attr.AUDIT_STATUS])
            g.attrs[Attr.FORCED] = np.bool_(privacy[Attr.FORCED])
            _set_json(g, Attr.SUMMARY, privacy[Attr.SUMMARY])
            _set_text(g, Attr.STATEMENT, privacy[Attr.STATEMENT])
            _set_text(g, Attr.AUDIT_CREATED, privacy[Attr.AUDIT_CREATED])
            _set_text(g, Attr.GUARANTEE, privacy[Attr.GUARANTEE])
            _set_json(g, Attr.PRIVATE_STATISTICS, privacy[Attr.PRIVATE_STATISTICS])
            if privacy[Attr.DP] is not None:
                _set_json(g, Attr.DP, privacy[Attr.DP])
            _set_text(f, Attr.CONTENT_SHA256, content_sha256(f, _walk(f, str(path))))  # last: it covers the rest
        load_share(tmp)
    log.info("Share written to %s (%d images, %d classes).", path, len(arrays[Key.IMAGES]), len(names))
    return path


def _normalised_privacy(p: dict) -> dict:
    dp = dp_from_privacy(p)
    return {Attr.AUDIT_STATUS: str(p.get(Attr.AUDIT_STATUS, "missing")), Attr.FORCED: bool(p.get(Attr.FORCED, False)),
            Attr.SUMMARY: dict(p.get(Attr.SUMMARY) or {}), Attr.STATEMENT: str(p.get(Attr.STATEMENT) or ""),
            Attr.AUDIT_CREATED: str(p.get(Attr.AUDIT_CREATED) or ""),
            Attr.GUARANTEE: dp.sentence() if dp is not None else str(p.get(Attr.GUARANTEE) or S.NO_GUARANTEE),
            Attr.PRIVATE_STATISTICS: [str(x) for x in p.get(Attr.PRIVATE_STATISTICS) or []],
            Attr.DP: None if dp is None else json.loads(dp.to_json())}


# ----------------------------------------------------------------------------- checks shared by writer and reader


def _check_recipe(where: str, r: Recipe, has_logits: bool) -> None:
    bad = None
    if not r.model:
        bad = "names no model"
    elif not isinstance(r.model_kwargs, dict):
        bad = "has model_kwargs that are not a JSON object"
    elif not (math.isfinite(r.lr) and r.lr > 0):
        bad = f"has learning rate {r.lr}; it must be positive and finite"
    elif r.epochs < 1 or r.batch_size < 1:
        bad = f"has {r.epochs} epochs and batch size {r.batch_size}; both must be at least 1"
    elif r.epochs > L.MAX_EPOCHS:
        bad = f"asks for {r.epochs} epochs, more than the limit of {L.MAX_EPOCHS}"
    elif r.batch_size > L.MAX_BATCH_SIZE:
        bad = f"asks for batch size {r.batch_size}, more than the limit of {L.MAX_BATCH_SIZE}"
    elif not (math.isfinite(r.momentum) and 0 <= r.momentum < 1):
        bad = f"has momentum {r.momentum}; it must lie in [0, 1)"
    elif not (math.isfinite(r.weight_decay) and r.weight_decay >= 0):
        bad = f"has weight decay {r.weight_decay}; it must be finite and non-negative"
    elif r.lr_decay not in S.LR_DECAYS:
        bad = f"has lr_decay {r.lr_decay!r}; expected one of {', '.join(S.LR_DECAYS)}"
    elif r.loss not in S.LOSSES:
        bad = f"has loss {r.loss!r}; expected one of {', '.join(S.LOSSES)}"
    elif r.loss == S.LOSS_SOFT and not has_logits:
        bad = "asks for soft_cross_entropy but the share has no soft labels"
    else:
        try:
            check_model_kwargs(r.model, r.model_kwargs)
        except ValueError as e:
            bad = str(e)
    if bad is None:
        try:
            S.augment_transforms(r.augment)
        except (ValueError, AttributeError):
            bad = f"has augmentation {r.augment!r}, which distill.augment cannot parse"
    if bad:
        raise FormatError(f"{where}: the training recipe {bad}; the share is invalid (limits: docs/share-format.md).")


def _check_content(where: str, a: dict[str, np.ndarray], num_classes: int, recipe: Recipe,
                   temperature: float, privacy: dict) -> None:
    """Shapes, ranges, finiteness and consistency of a share's arrays and settings (writer and reader)."""
    images, labels = a[Key.IMAGES], a[Key.LABELS]
    if images.ndim != 4 or images.shape[0] < 1:
        raise FormatError(f"{where}: images must have shape (N, C, H, W) with N >= 1; got {images.shape}.")
    n, c, h, w = images.shape
    if not 2 <= num_classes <= S.MAX_CLASSES:
        raise FormatError(f"{where}: a share needs 2 to {S.MAX_CLASSES} class names; it has {num_classes}.")
    if labels.shape != (n,):
        raise FormatError(f"{where}: labels have shape {labels.shape}, but there are {n} images.")
    if not np.isfinite(images).all():
        raise FormatError(f"{where}: images contain NaN or Inf.")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise FormatError(f"{where}: labels must be class ids in 0..{num_classes - 1}; found {labels.min()}..{labels.max()}.")
    logits = a.get(Key.LABEL_LOGITS)
    if logits is not None:
        if logits.shape != (n, num_classes):
            raise FormatError(f"{where}: label_logits have shape {logits.shape}; expected ({n}, {num_classes}).")
        if not np.isfinite(logits).all():
            raise FormatError(f"{where}: label_logits contain NaN or Inf.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise FormatError(f"{where}: the soft-label temperature is {temperature}; it must be positive and finite.")
    mean, std = a.get(f"{Key.PREPROCESSING}/mean"), a.get(f"{Key.PREPROCESSING}/std")
    if mean is None or std is None or mean.shape != (c,) or std.shape != (c,):
        raise FormatError(f"{where}: preprocessing mean and std must each have shape ({c},) for {c}-channel images.")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise FormatError(f"{where}: preprocessing mean/std must be finite with std > 0.")
    zca = [a.get(f"{Key.PREPROCESSING}/{k}") for k in ("zca_matrix", "zca_inverse", "zca_mean")]
    if any(z is not None for z in zca):
        d = c * h * w
        if any(z is None for z in zca) or zca[0].shape != (d, d) or zca[1].shape != (d, d) or zca[2].shape != (d,):
            raise FormatError(f"{where}: ZCA needs zca_matrix and zca_inverse of shape ({d}, {d}) and zca_mean of ({d},).")
        if not all(np.isfinite(z).all() for z in zca):
            raise FormatError(f"{where}: the ZCA transform contains NaN or Inf.")
    if h != w:
        raise FormatError(f"{where}: images are {h}x{w}; shares hold square images.")
    _check_recipe(where, recipe, logits is not None)
    if privacy[Attr.AUDIT_STATUS] not in S.AUDIT_STATUSES:
        raise FormatError(f"{where}: privacy audit_status {privacy[Attr.AUDIT_STATUS]!r} is not one of "
                          f"{', '.join(S.AUDIT_STATUSES)}.")


# ----------------------------------------------------------------------------- validating reader


def load_share(path: str | os.PathLike) -> Share:
    """Read and validate a share; any defect raises :class:`FormatError` with one sentence.

    A newer minor version is read with a warning (unknown fields ignored); another major
    version is refused. See docs/share-format.md for what is checked.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path} does not exist.")
    if not path.is_file():
        raise FormatError(f"{path} is not a file.")
    # Not common.open_checked: a share may come from anyone, so _read bounds the format attributes before it
    # reads them (a hostile file can declare a huge one), then checks them as open_checked does.
    try:
        f = h5py.File(path, "r")
    except Exception:  # h5py raises OSError for most damage, other types for some; all mean the same here
        raise FormatError(f"{path} is not a readable HDF5 file (not HDF5 at all, or truncated).") from None
    with f:
        try:
            return _read(f, str(path))
        except FormatError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            # HDF5 reports damage (a failed fletcher32 checksum, a cut-off chunk) as these.
            raise FormatError(f"{path} is damaged and cannot be read ({str(e).rstrip('.')}).") from None


def _walk(f: h5py.File, where: str) -> dict[str, h5py.HLObject]:
    """Every object reachable by hard links, by path; refuses links and storage that point outside the file."""
    found: dict[str, h5py.HLObject] = {}
    seen_groups = set()
    stack = [("", f)]
    count = total = 0
    _check_attrs(f, where)
    while stack:
        prefix, group = stack.pop()
        for name in group:
            count += 1
            if not isinstance(name, str):
                raise FormatError(f"{where}: an object name in /{prefix} is not valid UTF-8 ({printable(name)}).")
            if count > S.MAX_OBJECTS:
                raise FormatError(f"{where} holds more than {S.MAX_OBJECTS} objects; a share has about 15.")
            p = f"{prefix}{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.SoftLink):
                raise FormatError(f"{where}: /{p} is a soft link; shares may not contain links.")
            if isinstance(link, h5py.ExternalLink):
                raise FormatError(f"{where}: /{p} is an external link to another file; shares must be self-contained.")
            if not isinstance(link, h5py.HardLink):
                raise FormatError(f"{where}: /{p} is a link of an unsupported kind.")
            obj = group[name]
            _check_attrs(obj, where)
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    raise FormatError(f"{where}: /{p} is a virtual dataset; shares must hold their data themselves.")
                if obj.external:
                    raise FormatError(f"{where}: /{p} keeps its data in external files; shares must be self-contained.")
                # Every dataset is read for the content checksum, so every one is bounded, known or not.
                if obj.shape is None or obj.dtype.kind not in "biufS":
                    raise FormatError(f"{where}: /{p} has dtype {obj.dtype} or no shape; shares hold numbers and "
                                      "fixed-length text.")
                declared = obj.size * obj.dtype.itemsize
                total += declared
                if declared > S.MAX_ARRAY_BYTES or total > S.MAX_TOTAL_BYTES:
                    raise FormatError(f"{where}: /{p} declares {obj.shape}, outside the sane limits "
                                      f"({S.MAX_ARRAY_BYTES >> 30} GiB per dataset, {S.MAX_TOTAL_BYTES >> 30} GiB "
                                      "per share).")
            elif isinstance(obj, h5py.Group):
                addr = h5py.h5o.get_info(obj.id).addr
                if addr in seen_groups:  # a group hard-linked twice (or into itself): visit once
                    continue
                seen_groups.add(addr)
                stack.append((p + "/", obj))
            found[p] = obj
    return found


_ATTR_CLASSES = (h5py.h5t.INTEGER, h5py.h5t.FLOAT, h5py.h5t.STRING, h5py.h5t.ENUM)


def _check_attrs(obj: h5py.HLObject, where: str) -> None:
    """Bound every attribute's size and type without reading its value."""
    names = list(obj.attrs.keys())
    if len(names) > S.MAX_ATTRS:
        raise FormatError(f"{where}: {obj.name} has {len(names)} attributes; more than {S.MAX_ATTRS} is not a share.")
    for name in names:
        if not isinstance(name, str):  # h5py hands back the raw bytes of a name that is not UTF-8
            raise FormatError(f"{where}: an attribute name at {obj.name} is not valid UTF-8 ({printable(name)}).")
        aid = h5py.h5a.open(obj.id, name.encode("utf-8"))
        tid = aid.get_type()
        if tid.get_class() not in _ATTR_CLASSES or (isinstance(tid, h5py.h5t.TypeStringID) and tid.is_variable_str()):
            raise FormatError(f"{where}: attribute {name!r} at {obj.name} has an unsupported type; "
                              "shares use numbers and fixed-length UTF-8 text.")
        if aid.get_storage_size() > S.MAX_ATTR_BYTES:
            raise FormatError(f"{where}: attribute {name!r} at {obj.name} is larger than {S.MAX_ATTR_BYTES >> 20} MiB.")


def _is_small_text(obj: h5py.HLObject, key: str) -> bool:
    tid = h5py.h5a.open(obj.id, key.encode("utf-8")).get_type()
    return isinstance(tid, h5py.h5t.TypeStringID) and not tid.is_variable_str() and tid.get_size() <= 64


def _attr(obj: h5py.HLObject, key: str, kind: str, where: str):
    """Read one scalar attribute of ``kind`` text|json|int|float|bool, or raise a sentence."""
    if key not in obj.attrs:
        raise FormatError(f"{where}: attribute {key!r} is missing at {obj.name}.")
    v = obj.attrs[key]
    shape = getattr(v, "shape", ())
    ok = shape == ()
    if ok and kind in ("text", "json"):
        ok = isinstance(v, (bytes, np.bytes_))
        if ok:
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                ok = False
        if ok and kind == "json":
            try:
                v = json.loads(v)
            except ValueError:
                raise FormatError(f"{where}: attribute {key!r} at {obj.name} is not valid JSON.") from None
    elif ok and kind == "int":
        ok = isinstance(v, np.integer) and not isinstance(v, np.bool_)
        v = int(v) if ok else v
    elif ok and kind == "float":
        ok = isinstance(v, (np.floating, np.integer)) and not isinstance(v, np.bool_)
        v = float(v) if ok else v
    elif ok and kind == "bool":
        ok = isinstance(v, np.bool_)
        v = bool(v) if ok else v
    if not ok:
        raise FormatError(f"{where}: attribute {key!r} at {obj.name} is not a single {kind} value.")
    return v


def _declared(objs: dict, key: str, dtype, shape: tuple, where: str, required: bool = True) -> h5py.Dataset | None:
    """Check a dataset's dtype and shape from its header; no data is read."""
    ds = objs.get(key)
    if ds is None:
        if required:
            raise FormatError(f"{where}: the dataset /{key} is missing.")
        return None
    if not isinstance(ds, h5py.Dataset) or ds.shape is None:
        raise FormatError(f"{where}: /{key} must be a dataset with a shape.")
    if dtype == "text":
        info = h5py.check_string_dtype(ds.dtype)
        if info is None or info.length is None or info.length > S.MAX_CLASS_NAME_BYTES:
            raise FormatError(f"{where}: /{key} must hold fixed-length UTF-8 text of at most "
                              f"{S.MAX_CLASS_NAME_BYTES} bytes; it has dtype {ds.dtype}.")
    elif ds.dtype != np.dtype(dtype):
        raise FormatError(f"{where}: /{key} has dtype {ds.dtype}; expected {np.dtype(dtype)}.")
    if len(ds.shape) != len(shape) or any(e is not None and e != s for e, s in zip(shape, ds.shape)):
        want = "(" + ", ".join("?" if e is None else str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"
        raise FormatError(f"{where}: /{key} has shape {ds.shape}; expected {want}.")
    if ds.size * ds.dtype.itemsize > S.MAX_ARRAY_BYTES:
        raise FormatError(f"{where}: /{key} declares {ds.shape}, more than {S.MAX_ARRAY_BYTES >> 30} GiB; "
                          "that is not a sane share.")
    return ds


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = (int(p) for p in version.split(".")[:2])  # check_version has accepted its form
    return major, minor


def _group(objs: dict, key: str, where: str) -> h5py.Group:
    g = objs.get(key)
    if g is None:
        raise FormatError(f"{where}: the group /{key} is missing.")
    if not isinstance(g, h5py.Group):
        raise FormatError(f"{where}: /{key} must be a group.")
    return g


def _read(f: h5py.File, where: str) -> Share:
    # What the file claims to be comes first, so a wrong file or version is named as such.
    if Attr.FORMAT not in f.attrs or not _is_small_text(f, Attr.FORMAT):
        raise FormatError(f"{where} is not a distill share (it has no fixed-length 'format' attribute).")
    fmt = _attr(f, Attr.FORMAT, "text", where)
    if fmt != S.SHARE_FORMAT:
        raise FormatError(f"{where} is a {fmt!r} file, not a distill share.")
    if Attr.FORMAT_VERSION not in f.attrs or not _is_small_text(f, Attr.FORMAT_VERSION):
        raise FormatError(f"{where}: the share has no fixed-length 'format_version' attribute.")
    version = _attr(f, Attr.FORMAT_VERSION, "text", where)
    check_version(where, version, S.VERSION_MAJOR, S.VERSION_MINOR, "share")
    objs = _walk(f, where)

    # 1. Headers only: dtypes, shapes and sizes, before any data is read.
    img = objs.get(Key.IMAGES)
    if img is None:
        raise FormatError(f"{where}: the dataset /{Key.IMAGES} is missing.")
    if not isinstance(img, h5py.Dataset) or img.shape is None or img.ndim != 4:
        raise FormatError(f"{where}: /{Key.IMAGES} must be a 4-D dataset (N, C, H, W).")
    n, c, h, w = img.shape
    if not (1 <= n <= S.MAX_IMAGES and 1 <= c <= S.MAX_CHANNELS and 1 <= h <= S.MAX_SIDE and 1 <= w <= S.MAX_SIDE):
        raise FormatError(f"{where}: /{Key.IMAGES} declares shape {img.shape}, outside the sane limits "
                          f"(N <= {S.MAX_IMAGES}, C <= {S.MAX_CHANNELS}, H, W <= {S.MAX_SIDE}).")
    if h != w:
        raise FormatError(f"{where}: /{Key.IMAGES} are {h}x{w}; shares hold square images.")
    _declared(objs, Key.IMAGES, np.float32, (n, c, h, w), where)
    names_ds = _declared(objs, Key.CLASS_NAMES, "text", (None,), where)
    k = names_ds.shape[0]
    if not 2 <= k <= S.MAX_CLASSES:
        raise FormatError(f"{where}: /{Key.CLASS_NAMES} lists {k} classes; a share has 2 to {S.MAX_CLASSES}.")
    datasets = {Key.IMAGES: img, Key.LABELS: _declared(objs, Key.LABELS, np.int64, (n,), where),
                Key.LABEL_LOGITS: _declared(objs, Key.LABEL_LOGITS, np.float32, (n, k), where, required=False)}
    pre_g = _group(objs, Key.PREPROCESSING, where)
    zca = _attr(pre_g, Attr.ZCA, "bool", where)
    d = c * h * w
    pre_shapes = {"mean": (c,), "std": (c,)} | ({"zca_matrix": (d, d), "zca_inverse": (d, d), "zca_mean": (d,)} if zca else {})
    for name, shape in pre_shapes.items():
        datasets[f"{Key.PREPROCESSING}/{name}"] = _declared(objs, f"{Key.PREPROCESSING}/{name}", np.float32, shape, where)
    datasets = {key: ds for key, ds in datasets.items() if ds is not None}
    total = sum(ds.size * ds.dtype.itemsize for ds in datasets.values())
    if total > S.MAX_TOTAL_BYTES:
        raise FormatError(f"{where}: the datasets declare {total >> 20} MiB together, more than the "
                          f"{S.MAX_TOTAL_BYTES >> 30} GiB a sane share holds.")

    # 2. Attributes (bounded in size by _walk).
    if _attr(f, Attr.NUM_IMAGES, "int", where) != n:
        raise FormatError(f"{where}: num_images says {f.attrs[Attr.NUM_IMAGES]} but /{Key.IMAGES} holds {n}.")
    if _attr(f, Attr.NUM_CLASSES, "int", where) != k:
        raise FormatError(f"{where}: num_classes says {f.attrs[Attr.NUM_CLASSES]} but /{Key.CLASS_NAMES} lists {k}.")
    pre_size, pre_channels = _attr(pre_g, Attr.SIZE, "int", where), _attr(pre_g, Attr.CHANNELS, "int", where)
    if (pre_channels, pre_size, pre_size) != (c, h, w):
        raise FormatError(f"{where}: preprocessing is for {pre_channels}x{pre_size}x{pre_size} images but the images "
                          f"are {c}x{h}x{w}.")
    zca_eps = _attr(pre_g, Attr.ZCA_EPS, "float", where)
    rg = _group(objs, Key.RECIPE, where)
    recipe = Recipe(model=_attr(rg, "model", "text", where), model_kwargs=_attr(rg, Attr.MODEL_KWARGS, "json", where),
                    lr=_attr(rg, "lr", "float", where), epochs=_attr(rg, "epochs", "int", where),
                    batch_size=_attr(rg, "batch_size", "int", where), momentum=_attr(rg, "momentum", "float", where),
                    weight_decay=_attr(rg, "weight_decay", "float", where),
                    lr_decay=_attr(rg, "lr_decay", "text", where), augment=_attr(rg, "augment", "text", where),
                    loss=_attr(rg, "loss", "text", where))
    temperature = 1.0
    if Key.LABEL_LOGITS in datasets:
        logit_ds = datasets[Key.LABEL_LOGITS]
        kind = _attr(logit_ds, Attr.KIND, "text", where)
        if kind != S.LOGITS_KIND:
            raise FormatError(f"{where}: /{Key.LABEL_LOGITS} has kind {kind!r}; this reader knows {S.LOGITS_KIND!r}.")
        temperature = _attr(logit_ds, Attr.TEMPERATURE, "float", where)
    pg = _group(objs, Key.PROVENANCE, where)
    provenance = {key: _attr(pg, key, "json", where) for key in S.PROVENANCE_KEYS}
    vg = _group(objs, Key.PRIVACY, where)
    privacy = {Attr.AUDIT_STATUS: _attr(vg, Attr.AUDIT_STATUS, "text", where),
               Attr.FORCED: _attr(vg, Attr.FORCED, "bool", where), Attr.SUMMARY: _attr(vg, Attr.SUMMARY, "json", where),
               Attr.STATEMENT: _attr(vg, Attr.STATEMENT, "text", where),
               Attr.AUDIT_CREATED: _attr(vg, Attr.AUDIT_CREATED, "text", where)}
    # v1.1 states the guarantee; a v1.0 share made none (DP did not exist), which is what it reads as.
    privacy[Attr.DP] = _attr(vg, Attr.DP, "json", where) if Attr.DP in vg.attrs else None
    try:
        dp = dp_from_privacy(privacy)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    privacy[Attr.GUARANTEE] = (dp.sentence() if dp is not None else
                               _attr(vg, Attr.GUARANTEE, "text", where) if Attr.GUARANTEE in vg.attrs else S.NO_GUARANTEE)
    stats = _attr(vg, Attr.PRIVATE_STATISTICS, "json", where) if Attr.PRIVATE_STATISTICS in vg.attrs else None
    if stats is not None and not (isinstance(stats, list) and all(isinstance(x, str) for x in stats)):
        raise FormatError(f"{where}: the privacy attribute {Attr.PRIVATE_STATISTICS!r} must be a JSON list of text.")
    privacy[Attr.PRIVATE_STATISTICS] = stats  # None: not recorded (a v1.0 share)
    per_class = objs[Key.LABELS].attrs.get(Attr.IMAGES_PER_CLASS)
    if per_class is None or np.shape(per_class) != (k,) or np.asarray(per_class).dtype.kind not in "iu":
        raise FormatError(f"{where}: /{Key.LABELS} needs an images_per_class attribute of {k} integers.")

    # 3. Data, then its values.
    arrays = {key: ds[()] for key, ds in datasets.items()}
    try:
        class_names = [bytes(b).decode("utf-8") for b in names_ds[()]]
    except UnicodeDecodeError:
        raise FormatError(f"{where}: /{Key.CLASS_NAMES} is not valid UTF-8.") from None
    _check_content(where, arrays, k, recipe, temperature, privacy)
    counts = np.bincount(arrays[Key.LABELS], minlength=k)
    if not np.array_equal(counts, np.asarray(per_class)):
        raise FormatError(f"{where}: images_per_class says {np.asarray(per_class).tolist()} but the labels count "
                          f"{counts.tolist()}.")
    stored = _attr(f, Attr.PAYLOAD_SHA256, "text", where)
    actual = payload_sha256(arrays)
    if stored != actual:
        raise FormatError(f"{where}: the payload checksum does not match (stored {stored[:16]}..., computed "
                          f"{actual[:16]}...); the file was altered or damaged.")
    content, unverified = "", S.UNVERIFIED_IN_1_0
    if _version_tuple(version) >= S.CONTENT_SINCE or Attr.CONTENT_SHA256 in f.attrs:
        content = _attr(f, Attr.CONTENT_SHA256, "text", where)
        computed = content_sha256(f, objs, arrays)
        if content != computed:
            raise FormatError(f"{where}: the content checksum does not match (stored {content[:16]}..., computed "
                              f"{computed[:16]}...); a field was altered or damaged.")
        unverified = ()

    pre_arrays = {name[len(Key.PREPROCESSING) + 1:]: v for name, v in arrays.items() if name.startswith(Key.PREPROCESSING)}
    pre = Preprocessing.from_arrays(pre_arrays, {"size": pre_size, "channels": pre_channels, "zca": zca,
                                                 "zca_eps": zca_eps})
    logits = arrays.get(Key.LABEL_LOGITS)
    return Share(images=torch.from_numpy(arrays[Key.IMAGES]), labels=torch.from_numpy(arrays[Key.LABELS]),
                 label_logits=torch.from_numpy(logits) if logits is not None else None, label_temperature=temperature,
                 class_names=class_names, preprocessing=pre, recipe=recipe, provenance=provenance, privacy=privacy,
                 license=_attr(f, Attr.LICENSE, "text", where), description=_attr(f, Attr.DESCRIPTION, "text", where),
                 citation=_attr(f, Attr.CITATION, "text", where), created=_attr(f, Attr.CREATED, "text", where),
                 format_version=version, payload_sha256=stored, content_sha256=content, unverified=unverified)
