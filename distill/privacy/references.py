"""RMIA's reference models: whole pipelines (buffer, run, a network on the share) on halves of the candidate pool.

This module is the cache and the bookkeeping; the pipeline itself is
:func:`distill.reference_pipeline.train_reference`, passed in as ``train``, so that the
audit package still needs neither the buffer nor the distiller (docs/STYLE walls) and an
audit whose references are all cached needs no pipeline at all.

The attacked share is a network's training data once removed: experts learn the real
data, the distiller learns images from the experts, a recipient learns from the
images. A reference model must be made the same way to calibrate the attack, so each
reference runs ``distill buffer`` and ``distill run`` (their Python entry points) on a
random half of the candidate pool (members plus non-members), then trains one network
on its share with that share's recipe, and keeps that network's probability of the
true label for every pool point.

References come in complementary pairs (reference 2j trains on one half, 2j+1 on the
other), so every point is left out by exactly half of them: offline RMIA uses those.

They are cached under ``CACHE/<key>/ref_NNN/`` where the key hashes the data
fingerprint, the pool, the pipeline settings and the seed; a finished reference is
``signals.npz`` there and is never retrained, an unfinished one resumes its buffer and
run like ``distill buffer`` and ``distill run --resume`` do. The cache holds real
images (each reference's ``data.npz``): it stays inside the hospital, as buffers do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from typing import Callable

import numpy as np
import torch

from ..errors import DistillError
from ..formats.common import format_header
from ..io import atomic_path, write_json
from ..seeding import generator
from .streams import REFERENCE
from .subject import load_subject

log = logging.getLogger(__name__)

SIGNALS_FILE = "signals.npz"  # per reference: probs (P, K) float64 class probabilities, members (P,) bool
KEY_FILE = "key.json"  # per cache folder: what the key hashes, for a person looking at the folder
CACHE_FORMAT = "distill-rmia-references"
CACHE_VERSION = "1.1"  # 1.1 keeps every class probability (canaries need other labels than the true one)


@dataclass(frozen=True)
class ReferenceSettings:
    """How each reference pipeline is made; recorded in audit.json. Fewer experts and iterations than a
    real run keep R pipelines affordable; the review page says so."""

    references: int = 2
    experts: int = 2
    epochs: int = 10  # of each expert
    iterations: int = 100
    syn_steps: int = 10
    expert_epochs: int = 2
    ipc: int = 10
    init: str = "real"
    hard_labels: bool | None = None
    model: str = "convnet3"
    augment: str = "color,crop,cutout,flip,scale,rotate"
    seed: int = 0
    # The attacked share came from a DP buffer of this epsilon budget: each reference's buffer is DP too, at the
    # same budget (and releases DP class means where the share started from them), so it is made the same way.
    dp_epsilon: float | None = None

    def __post_init__(self):
        if self.references < 2 or self.references % 2:
            raise DistillError(f"--references must be an even number of at least 2 (complementary halves); "
                               f"got {self.references}.")


def pool_halves(n: int, references: int, seed: int) -> np.ndarray:
    """(R, n) bool: which pool points reference r trains on; pairs (2j, 2j+1) split the pool in complementary halves."""
    mask = np.zeros((references, n), dtype=bool)
    for j in range(references // 2):
        perm = torch.randperm(n, generator=generator(seed, REFERENCE, j)).numpy()
        mask[2 * j, perm[: n // 2]] = True
        mask[2 * j + 1] = ~mask[2 * j]
    return mask


def cache_key(fingerprint: dict, pool_u8: torch.Tensor, pool_y: torch.Tensor, settings: ReferenceSettings) -> dict:
    """What a cache folder is for: data fingerprint, the pool's hash, the pipeline settings (seed included)."""
    h = hashlib.sha256()
    h.update(pool_u8.contiguous().numpy().tobytes())
    h.update(pool_y.contiguous().numpy().tobytes())
    settings_d = dataclasses.asdict(settings)
    settings_d.pop("references")  # more references reuse the first ones
    if settings_d.get("dp_epsilon") is None:
        settings_d.pop("dp_epsilon")  # caches made before DP references keep their key
    return {**format_header(CACHE_FORMAT, CACHE_VERSION), "data_sha256": fingerprint.get("sha256"),
            "split": fingerprint.get("split"), "pool_sha256": h.hexdigest(), "pool_size": len(pool_y),
            "settings": settings_d}


def cache_folder(root: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / digest


def reference_share(ref: Path) -> torch.Tensor | None:
    """A reference pipeline's synthetic images in display space [0, 1], (N, C, H, W); None if not on disk."""
    run = ref / "run"
    if not run.is_dir():
        return None
    try:
        subject = load_subject(run)
    except DistillError:
        return None
    return subject.preprocessing.invert(subject.images)


# train(folder, index, pool_u8, pool_y, half, class_names, settings, device) -> (P, K) class probabilities on the pool
ReferenceTrainer = Callable[..., np.ndarray]


def reference_signals(pool_u8: torch.Tensor, pool_y: torch.Tensor, class_names: list[str], fingerprint: dict,
                      settings: ReferenceSettings, cache: str | os.PathLike, device: torch.device,
                      train: ReferenceTrainer | None = None) -> dict:
    """Every reference's class probabilities on every pool point, training the references not cached yet.

    pool_u8: (P, C, H, W) uint8 members then non-members; pool_y: (P,). Returns {"probs": (R, P) float64
    p(true label), "probs_all": (R, P, K), "members": (R, P) bool, "shares": each reference's synthetic
    images in display space [0, 1] (None where its run folder is gone), "trained": references trained now,
    "seconds": time spent training them, "folder": the cache folder}.
    """
    key = cache_key(fingerprint, pool_u8, pool_y, settings)
    folder = cache_folder(cache, key)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / KEY_FILE, key)
    halves = pool_halves(len(pool_y), settings.references, settings.seed)
    probs, trained, t0 = [], 0, time.perf_counter()
    for r in range(settings.references):
        ref = folder / f"ref_{r:03d}"
        signals = ref / SIGNALS_FILE
        if signals.exists():
            with np.load(signals) as f:
                if f["probs"].ndim == 2 and np.array_equal(f["members"], halves[r]):
                    probs.append(f["probs"])
                    continue
        if train is None:
            raise DistillError(f"RMIA reference {r} is not in the cache {folder}; 'distill audit --attack rmia' "
                               "trains it (from Python: pass distill.reference_pipeline.train_reference).")
        log.info("RMIA reference %d of %d: buffer and run on %d pool images (%s).", r + 1, settings.references,
                 int(halves[r].sum()), ref)
        p = train(ref, r, pool_u8, pool_y, halves[r], class_names, settings, device)
        with atomic_path(signals) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, probs=p, members=halves[r])
        probs.append(p)
        trained += 1
    probs_all = np.stack(probs)
    shares = [reference_share(folder / f"ref_{r:03d}") for r in range(settings.references)]
    true = np.take_along_axis(probs_all, pool_y.numpy()[None, :, None], axis=2)[..., 0]
    return {"probs": true, "probs_all": probs_all, "members": halves, "trained": trained, "shares": shares,
            "seconds": time.perf_counter() - t0 if trained else 0.0, "folder": folder}
