"""A share as plain files, for code that does not know distill: ``distill export --format folder|npz``.

folder (format ``distill-share-folder`` 1.0)::

    images/00000.png ...   one PNG per synthetic image, in the share's order
    labels.csv             path,label,class_id: path relative to the folder, label the class name
                           (so the folder is also valid ``distill --data labels.csv`` input)
    soft_labels.npy        (N, K) float32 training targets: softmax(logits / T), or one-hot for hard labels
    recipe.json            the training recipe, the normalisation and how to turn PNG values back into pixels
    preprocessing.npz      only with ZCA: zca_matrix, zca_mean (network input = (normalised - zca_mean) @ zca_matrix)

PNG values ``v`` (``bits`` 8 or 16) decode to display intensities ``x = low + v / (2**bits - 1) * (high - low)``;
the network input is ``(x - mean) / std`` per channel (then ZCA when present). Synthetic images may leave
[0, 1] after distillation: then grey images are written as 16-bit PNGs over their own range
(``low``/``high``), so nothing is clipped; RGB PNGs stay 8-bit (PIL writes no 16-bit RGB) over that range.

npz: MedMNIST's layout (:meth:`Share.to_npz`), 8-bit and clamped to [0, 1] as MedMNIST files are.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import DistillError
from ..io import atomic_folder
from .share import Share

PLAIN_FORMATS = ("h5", "folder", "npz")
FOLDER_FORMAT = "distill-share-folder"
FOLDER_FORMAT_VERSION = "1.0"
HALF_STEP = 0.5 / 255  # overshoot of [0, 1] that 8-bit rounding absorbs anyway
RECIPE_JSON, LABELS_CSV, SOFT_LABELS, ZCA_NPZ = "recipe.json", "labels.csv", "soft_labels.npy", "preprocessing.npz"


def display_values(share: Share) -> torch.Tensor:
    """(N, C, H, W) float64 display intensities, preprocessing undone, not clamped (unlike Share.pixels)."""
    pre = share.preprocessing
    x = share.images.detach().double()
    if pre.zca:
        shape = x.shape
        x = (x.flatten(1) @ pre.zca_inverse.double() + pre.zca_mean.double()).view(shape)
    return x * pre.std.double().view(1, -1, 1, 1) + pre.mean.double().view(1, -1, 1, 1)


def write_folder(share: Share, folder: str | os.PathLike) -> Path:
    """Write the folder form of ``share`` (module docstring); built beside ``folder`` and renamed into place."""
    from PIL import Image

    folder = Path(folder)
    channels = share.preprocessing.channels
    if channels not in (1, 3):
        raise DistillError(f"PNG holds 1 or 3 channels, but this share has {channels}; export --format npz or h5.")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DistillError(f"{folder} already exists and is not an empty folder; choose another --out.")
    x = display_values(share)
    low, high = min(0.0, float(x.min())), max(1.0, float(x.max()))
    if low >= -HALF_STEP and high <= 1.0 + HALF_STEP:  # float rounding of an in-range image: plain 8-bit
        low, high = 0.0, 1.0
    bits = 16 if channels == 1 and (low, high) != (0.0, 1.0) else 8
    top = 2 ** bits - 1
    values = ((x - low) / (high - low) * top).round().clamp(0, top).numpy().astype(np.uint16 if bits == 16 else np.uint8)
    with atomic_folder(folder) as tmp:
        (tmp / "images").mkdir()
        rows = []
        for i, (arr, y) in enumerate(zip(values, share.labels.tolist())):
            name = f"images/{i:05d}.png"
            img = Image.fromarray(arr[0]) if channels == 1 else Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)))
            img.save(tmp / name, format="PNG")
            rows.append([name, share.class_names[y], y])
        with open(tmp / LABELS_CSV, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "class_id"])
            w.writerows(rows)
        targets = share.targets()
        if targets.ndim == 1:
            targets = torch.nn.functional.one_hot(targets, share.num_classes)
        np.save(tmp / SOFT_LABELS, targets.float().numpy())
        pre = share.preprocessing
        if pre.zca:
            np.savez(tmp / ZCA_NPZ, zca_matrix=pre.zca_matrix.numpy(), zca_mean=pre.zca_mean.numpy())
        recipe = {
            "format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION,
            "images": share.num_images, "class_names": list(share.class_names),
            "labels": {"file": SOFT_LABELS, "loss": share.recipe.loss,
                       "temperature": share.label_temperature if share.label_logits is not None else None},
            "recipe": asdict(share.recipe),
            "pixels": {"bits": bits, "low": low, "high": high,
                       "decode": "x = low + png / (2**bits - 1) * (high - low)"},
            "normalisation": {"mean": pre.mean.tolist(), "std": pre.std.tolist(), "size": pre.size,
                              "channels": pre.channels, "zca": pre.zca,
                              "zca_file": ZCA_NPZ if pre.zca else None,
                              "apply": "(x - mean) / std per channel, then (flat - zca_mean) @ zca_matrix with ZCA"},
            "share": {"format_version": share.format_version, "payload_sha256": share.payload_sha256,
                      "license": share.license, "description": share.description, "citation": share.citation},
        }
        (tmp / RECIPE_JSON).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    return folder


def read_folder_recipe(folder: str | os.PathLike) -> dict:
    """recipe.json of a folder export, checked for its format name and a readable version."""
    path = Path(folder) / RECIPE_JSON
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{path} cannot be read ({e}).") from None
    if doc.get("format") != FOLDER_FORMAT or str(doc.get("format_version", "")).split(".")[0] != "1":
        raise DistillError(f"{path} is not a {FOLDER_FORMAT} 1.x recipe.")
    return doc


def write_plain(share: Share, out: str | os.PathLike, fmt: str) -> Path:
    """Write ``share`` as ``fmt`` (folder or npz) at ``out``; returns ``out``."""
    if fmt == "folder":
        return write_folder(share, out)
    if fmt == "npz":
        out = Path(out)
        if out.is_dir():
            raise DistillError(f"{out} is a folder; give the .npz file's name, e.g. {out / 'share.npz'}.")
        return share.to_npz(out)
    raise DistillError(f"--format must be one of {', '.join(PLAIN_FORMATS)}; got {fmt!r}.")
