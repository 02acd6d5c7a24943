"""``distill run`` on a differentially private buffer: post-processing of the DP experts only.

A buffer is a DP buffer iff it holds a :class:`~distill.formats.dp_record.DPRecord`
(``dp.json``, written by ``distill buffer --dp-epsilon``). Its experts, and any DP
statistics released beside them (``dp_stats.h5``), are (epsilon, delta)-DP; whatever is
computed from them alone inherits that guarantee (post-processing). So on such a buffer
the run reads no private file at all: no real initial images, no validation split, no
labels computed on real images. What may start the synthetic images:

- ``noise``: standard normal pixels (no data at all);
- ``dp-means``: the buffer's DP per-class means (``dp_stats.h5``) plus a little noise per
  image, so that the ``ipc`` images of a class differ (their epsilon is in the record);
- ``public:PATH``: images from a MedMNIST-layout ``.npz`` or an image folder that the
  user asserts is public; its SHA-256 is recorded in the run and the share.

The last two are registered with :func:`~.synthetic.register_init` like the others and
work on any buffer; only ``real`` and ``real-or-noise`` are refused on a DP buffer.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from ..data import Preprocessing, RealData, Split, load_data
from ..errors import DistillError, FormatError
from ..formats.common import open_checked
from ..formats.dp_record import (DP_STATS_CLASS_MEANS, DP_STATS_FILE, DP_STATS_FORMAT, DP_STATS_VERSION, DPRecord,
                                 read_dp_record)
from .synthetic import _draw_real, class_labels, list_inits, needs_real_data, register_init

log = logging.getLogger(__name__)

# Standard deviation of the noise added to each copy of a DP class mean, in network space (normalised
# pixels, unit variance). Why: the ipc images of a class would otherwise start identical, receive
# near-identical gradients and stay near-copies; 0.2 keeps the mean's shape visible (the noise init
# is 1.0) while letting them drift apart. Measured against noise in docs/privacy.md.
DP_MEANS_JITTER = 0.2
PUBLIC = "public"  # --init public:PATH
NO_PRIVATE_READ = ("the buffer is differentially private, so this run reads no private file "
                   "(no real initial images, no validation split)")


def init_name(init: str) -> tuple[str, str]:
    """(registered name, argument): ``"public:x.npz"`` -> ``("public", "x.npz")``, ``"noise"`` -> ``("noise", "")``."""
    name, _, arg = init.partition(":")
    return name, arg


def allowed_on_dp() -> list[str]:
    """The starts a DP run accepts, as the user types them."""
    return [f"{PUBLIC}:PATH" if n == PUBLIC else n for n in list_inits() if not needs_real_data(n)]


def check_dp_init(init: str, record: DPRecord, folder: str | os.PathLike) -> None:
    """Refuse, in one sentence, a start that reads the private training images on a DP buffer."""
    name, _ = init_name(init)
    if needs_real_data(name):
        raise DistillError(f"{folder} is a differentially private buffer (ε = {record.epsilon:.3g}), and --init {name} "
                           f"would start from patient images outside that guarantee; use --init "
                           f"{', '.join(allowed_on_dp())}.")


def dp_buffer(folder: str | os.PathLike) -> DPRecord | None:
    """The buffer's DP record, or None for an ordinary buffer."""
    return read_dp_record(folder)


def read_dp_class_means(folder: str | os.PathLike) -> torch.Tensor:
    """The DP per-class means ``(K, M, C, H, W)`` float32 from ``FOLDER/dp_stats.h5`` (network space)."""
    path = Path(folder) / DP_STATS_FILE
    if not path.exists():
        raise DistillError(f"--init dp-means needs DP class means, but {Path(folder)} released none ({DP_STATS_FILE} "
                           "is missing); rebuild the buffer with DP statistics, or use --init noise.")
    major, minor = (int(p) for p in DP_STATS_VERSION.split("."))
    with open_checked(path, DP_STATS_FORMAT, major, minor, "DP statistics") as f:
        if DP_STATS_CLASS_MEANS not in f:
            raise FormatError(f"{path} holds no {DP_STATS_CLASS_MEANS!r} dataset.")
        means = torch.from_numpy(f[DP_STATS_CLASS_MEANS][()]).float()
    if means.ndim != 5 or not torch.isfinite(means).all():
        raise FormatError(f"{path}: {DP_STATS_CLASS_MEANS} must be finite with shape (classes, m, C, H, W); "
                          f"it has {tuple(means.shape)}.")
    return means


@register_init("dp-means")
def init_dp_means(ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
                  train: Split | None, preprocessing: Preprocessing, prefer: torch.Tensor | None = None, *,
                  buffer: str | os.PathLike | None = None, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i of class c: DP mean ``i mod M`` of class c plus N(0, DP_MEANS_JITTER^2) per pixel."""
    if buffer is None:
        raise DistillError("--init dp-means needs the buffer folder that holds the DP class means.")
    means = read_dp_class_means(buffer)
    if tuple(means.shape[0:1] + means.shape[2:]) != (num_classes, channels, size, size):
        raise FormatError(f"The DP class means in {buffer} have shape {tuple(means.shape)}; the experts need "
                          f"({num_classes}, m, {channels}, {size}, {size}).")
    pick = torch.arange(ipc) % means.shape[1]
    images = means[:, pick].reshape(num_classes * ipc, channels, size, size)
    images = images + DP_MEANS_JITTER * torch.randn(images.shape, generator=generator)
    return images, class_labels(ipc, num_classes)


@functools.lru_cache(maxsize=2)
def load_public(path: str, size: int) -> RealData:
    """The public images the user named (MedMNIST-layout .npz, a MedMNIST name or an image folder)."""
    if not path:
        raise DistillError("--init public needs the public images: --init public:PATH (a MedMNIST-layout .npz or a "
                           "folder with one sub-folder per class).")
    return load_data(path, size=size)


@register_init(PUBLIC)
def init_public(ipc: int, num_classes: int, channels: int, size: int, generator: torch.Generator,
                train: Split | None, preprocessing: Preprocessing, prefer: torch.Tensor | None = None, *,
                arg: str = "", **_) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` images per class from the public set's training split, preprocessed as the buffer's images are."""
    public = load_public(arg, size)
    if public.num_classes != num_classes or public.train.images.shape[1] != channels:
        raise DistillError(f"The public images {arg} have {public.num_classes} classes of {public.train.images.shape[1]} "
                           f"channel(s); the experts need {num_classes} classes of {channels}.")
    log.info("Starting from public images %s (SHA-256 %s), which the user asserts are public.", arg,
             public.source_sha256)
    return _draw_real(ipc, num_classes, generator, public.train, preprocessing, None, scarce="refuse", source="public")


def public_record(init: str, size: int) -> dict:
    """What the run and the share record about a public start: its SHA-256 (no path, no file name)."""
    name, arg = init_name(init)
    if name != PUBLIC:
        return {}
    return {"init_public_sha256": load_public(arg, size).source_sha256}
