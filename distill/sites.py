"""Several hospitals: split one dataset's training set across sites, and the federated baselines.

Public entry point: :func:`split_dataset` (``distill split``). Each site gets
a MedMNIST-layout ``.npz`` whose train split is its part of the source's
training set and whose val and test splits are the source's, untouched, plus
one JSON (format ``distill-split``) with every site's class counts and source
indices. Each site then runs the normal pipeline (buffer, run, audit, export)
on its own file; docs/hospitals.md explains the choices.

The federated baselines a union of shares is compared with live here too, as
pure functions on models: :func:`fedavg` (one round of federated averaging)
and :func:`average_predictions` (the soft labels of ensemble distillation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .config import RunConfig, SplitConfig, check_ranges
from .data import SPLITS, RealData, class_counts, load_data
from .errors import DistillError
from .formats.common import utc_now
from .formats.sites_split import SITE_FILES, SPLIT_JSON, split_header
from .io import atomic_path, output_lock, remove_stale_temps, sha256_file, software_versions, write_json
from .lifecycle import stage
from .train import predict

IID = "iid"


# ----------------------------------------------------------------------------- the split


def parse_alpha(alpha: str | float) -> float | None:
    """``"iid"`` -> None; a positive number -> the Dirichlet concentration."""
    if isinstance(alpha, str) and alpha.strip().lower() == IID:
        return None
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise DistillError(f"--alpha must be a positive number or iid; got {alpha!r}.") from None
    if not (math.isfinite(value) and value > 0):
        raise DistillError(f"--alpha must be a positive number or iid; got {alpha!r}.")
    return value


def split_indices(labels: torch.Tensor, sites: int, alpha: float | None, seed: int,
                  min_per_class: int = 0, class_names: Sequence[str] | None = None,
                  groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Disjoint index sets, one per site, that together cover ``labels`` exactly once; sorted int64 each.

    Class by class, the class's images are shuffled, ``min_per_class`` go to every site, and the rest
    are cut in proportions drawn from Dirichlet(alpha, ..., alpha) over the sites (``alpha=None``:
    equal proportions, the IID split). Small alpha gives each class to few sites, as in FedISCA's
    ``dirichlet_N_alpha`` splits. All draws come from one numpy generator seeded with ``seed``.

    ``groups``: (N,) int64 patient numbers. Then whole patients are dealt out (each counted under
    their most frequent label, ``min_per_class`` counting patients), so no patient is at two sites.
    """
    if groups is not None:
        ids, inverse = torch.unique(groups, return_inverse=True)
        counts = torch.zeros(len(ids), int(labels.max()) + 1, dtype=torch.int64)
        counts.index_put_((inverse, labels.long()), torch.ones_like(labels.long()), accumulate=True)
        per_patient = split_indices(counts.argmax(1), sites, alpha, seed, min_per_class, class_names)
        return [torch.nonzero(torch.isin(inverse, p)).flatten() for p in per_patient]
    if sites < 2:
        raise DistillError(f"--sites must be at least 2; got {sites}.")
    if min_per_class < 0:
        raise DistillError(f"--min-per-class must be 0 or more; got {min_per_class}.")
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    parts: list[list[np.ndarray]] = [[] for _ in range(sites)]
    for c in np.unique(labels_np):
        idx = rng.permutation(np.flatnonzero(labels_np == c))
        floor = min_per_class * sites
        if len(idx) < floor:
            name = repr(class_names[int(c)]) if class_names else str(int(c))
            raise DistillError(f"Class {name} has {len(idx)} training images, too few to give each of {sites} "
                               f"sites {min_per_class}; lower --min-per-class or --sites.")
        for s in range(sites):
            parts[s].append(idx[s * min_per_class:(s + 1) * min_per_class])
        rest = idx[floor:]
        share = np.full(sites, 1.0 / sites) if alpha is None else rng.dirichlet(np.full(sites, alpha))
        cuts = np.round(np.cumsum(share)[:-1] * len(rest)).astype(int)
        for s, piece in enumerate(np.split(rest, cuts)):
            parts[s].append(piece)
    return [torch.from_numpy(np.sort(np.concatenate(p)).astype(np.int64)) for p in parts]


def _medmnist_arrays(images: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) uint8 and (N,) -> MedMNIST's (N, H, W) or (N, H, W, C) uint8 and (N, 1) labels."""
    x = images.numpy()
    x = x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)
    y = labels.numpy()
    dtype = np.uint8 if int(y.max(initial=0)) < 256 else np.int64  # MedMNIST stores uint8
    return np.ascontiguousarray(x), y.astype(dtype).reshape(-1, 1)


def _write_site(path: Path, data: RealData, train_idx: torch.Tensor) -> None:
    arrays = {}
    for s in SPLITS:
        split = data.split(s)
        images, labels = (split.images[train_idx], split.labels[train_idx]) if s == "train" else (split.images, split.labels)
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = _medmnist_arrays(images, labels)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
        np.savez(f, **arrays)


@dataclass(frozen=True)
class SiteSummary:
    site: int
    path: Path
    class_counts: list[int]
    lacks: list[str]  # classes with no training image at this site
    scarce: list[str]  # classes with fewer than ``scarce_below`` images (but at least one)


@dataclass(frozen=True)
class SplitResult:
    json_path: Path
    class_names: list[str]
    sites: list[SiteSummary]

    def describe(self) -> str:
        """One line per site: its class counts, and the classes it lacks or holds few of."""
        lines = []
        for s in self.sites:
            counts = ", ".join(f"{n} {c}" for c, n in zip(self.class_names, s.class_counts))
            line = f"site {s.site}: {sum(s.class_counts)} training images ({counts}) -> {s.path}"
            if s.lacks:
                line += f"; lacks {', '.join(s.lacks)}: `distill buffer` refuses a class without images"
            if s.scarce:
                line += f"; few {', '.join(s.scarce)}: use `distill run --init noise` or a lower --ipc"
            lines.append(line)
        return "\n".join(lines + [f"Class counts per site written to {self.json_path}"])


def split_dataset(cfg: SplitConfig, scarce_below: int = RunConfig.ipc) -> SplitResult:
    """Write one ``.npz`` per site and ``split.json`` into ``cfg.out``; returns where, and per-site summaries.

    Site ``i``'s file is ``OUT/site-i/NAME.npz``, named after the source so that a MedMNIST source keeps
    its class names. ``scarce_below``: classes with fewer images are listed as scarce (by default
    ``distill run``'s images per class, below which ``--init real`` cannot start).
    """
    with stage(check=lambda: check_ranges(cfg)) as st:
        alpha = parse_alpha(cfg.alpha)
        data = load_data(cfg.data)  # checked before anything is written
        out = Path(cfg.out)
        st.locks.enter_context(output_lock(out))  # one writer per output folder, as buffer, run and export
        for folder in [out, *out.glob("site-*")]:
            remove_stale_temps(folder)
        if (out / SPLIT_JSON).exists():
            raise DistillError(f"{out} already holds a split ({SPLIT_JSON}); choose another --out folder.")
        return _write_split(cfg, data, alpha, out, scarce_below)


def _write_split(cfg: SplitConfig, data, alpha, out: Path, scarce_below: int) -> SplitResult:
    groups = data.groups["train"] if data.groups else None
    parts = split_indices(data.train.labels, cfg.sites, alpha, cfg.seed, cfg.min_per_class, data.class_names, groups)
    k, names = data.num_classes, list(data.class_names)
    summaries, records = [], []
    for i, idx in enumerate(parts):
        path = out / f"site-{i}" / f"{data.name}.npz"
        _write_site(path, data, idx)
        counts = class_counts(data.train.labels[idx], k)
        summary = SiteSummary(i, path, counts, [names[c] for c in range(k) if counts[c] == 0],
                              [names[c] for c in range(k) if 0 < counts[c] < scarce_below])
        summaries.append(summary)
        records.append({"site": i, "path": str(path.relative_to(out)), "images": len(idx), "class_counts": counts,
                        "lacks": summary.lacks, "scarce": summary.scarce, "sha256": sha256_file(path),
                        "train_indices": idx.tolist()})
    report = {
        **split_header(), "created": utc_now(),
        "software": software_versions(),
        "source": {"data": cfg.data, "name": data.name, "sha256": data.source_sha256, "class_names": names,
                   "class_counts": {s: class_counts(data.split(s).labels, k) for s in SPLITS}},
        "sites": cfg.sites, "alpha": IID if alpha is None else alpha, "min_per_class": cfg.min_per_class,
        "seed": cfg.seed, "scarce_below": scarce_below, "patient_grouped": groups is not None,
        "val": "the source's val split, the same at every site", "test": "the source's test split, the same at every site",
        SITE_FILES: records,
    }
    write_json(out / SPLIT_JSON, report)  # written last: its presence means every site file is complete
    return SplitResult(out / SPLIT_JSON, names, summaries)


# ----------------------------------------------------------------------------- federated baselines


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """One round of federated averaging: the weighted mean of the sites' state dicts.

    ``weights`` (one per site, e.g. its number of training images; default equal) are normalised to sum
    to 1. Floating tensors are averaged in float64 and cast back; integer counters (batch norm's
    ``num_batches_tracked``, which differs between sites that took different numbers of steps) take
    their largest value.
    """
    if not states:
        raise ValueError("fedavg needs at least one state dict.")
    w = np.full(len(states), 1.0) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(states) or not (w >= 0).all() or w.sum() <= 0:
        raise ValueError(f"fedavg needs one non-negative weight per state dict, not all zero; got {list(w)}.")
    w = w / w.sum()
    keys = list(states[0])
    out = {}
    for key in keys:
        tensors = [s[key] for s in states]
        if any(set(s) != set(keys) for s in states):
            raise ValueError("fedavg needs state dicts of the same model (the keys differ).")
        if tensors[0].is_floating_point():
            mean = sum(float(wi) * t.detach().double() for wi, t in zip(w, tensors))
            out[key] = mean.to(tensors[0].dtype)
        else:
            out[key] = torch.stack([t.detach() for t in tensors]).amax(0)
    return out


def average_predictions(models: Sequence[torch.nn.Module], images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The ensemble's soft labels: the mean over models of their class probabilities, (N, K).

    ``images``: one (N, C, H, W) tensor for every model, or one tensor per model (each in its model's
    input space, when the sites preprocess differently).
    """
    if not models:
        raise ValueError("average_predictions needs at least one model.")
    per_model = [images] * len(models) if isinstance(images, torch.Tensor) else list(images)
    if len(per_model) != len(models):
        raise ValueError(f"average_predictions got {len(per_model)} image tensors for {len(models)} models.")
    return torch.stack([predict(m, x) for m, x in zip(models, per_model)]).mean(0)
