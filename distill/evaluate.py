"""Recipient evaluation: train fresh networks on shares or on real baselines, test on real data.

Public entry point: :func:`evaluate`. A receiving hospital needs only the
share(s) and its own data, so this module imports nothing from ``mtt`` or
``buffer``. Every *arm* (the distilled union of shares, a random real subset,
the full training split) is trained ``runs`` times under the same protocol and
tested on the same real test split; the protocol and the JSON report are
documented in docs/evaluation.md.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from . import dp
from .checks import check_eval_budget, check_model_builds, device_flops, estimate_eval, free_memory
from .config import FULL_EPOCHS, LABEL_PRIORS, SHARE_WEIGHTS, BufferConfig, EvalConfig, check_ranges
from .data import (SPLIT_CARVED, WHOLE_TEST, Preprocessing, RealData, class_counts, describe_split, draw_random_real,
                   fit_preprocessing, load_data)
from .distributed import resolve_device
from .errors import DataError, DistillError, DivergenceError, FormatError
from .formats.common import utc_now
from .formats.eval_report import (DISTILLED, EvalKey, MetricKey, RecipeKey, RowKey, ScoredSplitKey, TrainedOnKey,
                                   eval_header)
from .formats.provenance import SALT, SALTED_SHA256
from .formats.share import Recipe, Share, load_share, share_targets
from .formats.share_schema import LOSS_HARD, LOSS_SOFT, LR_DECAYS, Attr
from .io import check_writable_file, software_versions, strict_json, write_json
from .metrics import auc_ovr, binary_auc, classification_metrics, summarize  # noqa: F401 (re-exported)
from .models import create_model, list_models
from .precision import autocast, resolve_precision
from .progress import progress
from .reference_defaults import NETWORK_LR, SMALL_SET_EPOCHS
from .seeding import derive_seed, generator, seeded
from .train import EVAL_BATCH, EVAL_MOMENTUM, EVAL_WEIGHT_DECAY, TrainRecipe, predict, train_network
from .testdata import align_test_classes, baselines_for_whole_test
from .workers import resolve_workers, run_jobs

log = logging.getLogger(__name__)


BASELINES = ("random-real", "full", "dp-sgd")
DEFAULT_BASELINES = ("random-real", "full")  # beside a share when none is named; dp-sgd needs an epsilon
DEFAULT_MODEL = BufferConfig.model  # the experts' network (the reference MTT one), when no share names one
REAL_LR = NETWORK_LR  # step size of networks trained on real images
REAL_EPOCHS = SMALL_SET_EPOCHS  # random-real without a share to copy the recipe from
# The dp-sgd baseline's epochs: DP-SGD on one CPU core costs ~30 s per PneumoniaMNIST epoch, and more
# epochs means more noise per step at a fixed epsilon; 5 is the setting of issue 23's first measurement.
DP_EPOCHS = 5
DP_LR = dp.DP_LR  # the dp-sgd baseline's step size: the DP experts' (distill/dp.py says how it was chosen)
DEFAULT_AUGMENT = BufferConfig.augment  # the experts' DSA list: the reference protocol

# Warn before training when the full-data baseline is more than this share of the image passes:
# at 2,400 images of 64 px it took 740 s per run on 2 CPU cores, against seconds for a share.
FULL_DOMINATES = 0.5

# Sub-streams of the user seed. Run r of every arm starts from the same initial weights
# (MODEL_KEY does not depend on the arm), so arms are compared pairwise, not across inits.
MODEL_KEY, DATA_KEY, SUBSET_KEY = 0, 1, 2
# workers = 0 (auto) starts worker processes only for an evaluation estimated to train at least this
# long: each worker's start (importing torch) costs a few seconds.
AUTO_WORKERS_MIN_SECONDS = 30.0


# ----------------------------------------------------------------------------- training sets


def _as_probabilities(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    if targets.ndim == 2:
        return targets.float()
    # One-hot targets make soft cross-entropy equal plain cross-entropy, so hard and soft shares can mix.
    return torch.nn.functional.one_hot(targets.long(), num_classes).float()


def _incompatible(a: Preprocessing, b: Preprocessing) -> str | None:
    """Why images preprocessed by ``b`` cannot join those of ``a``, or None.

    Mean/std normalisations are per-channel affine maps, so a share normalised with
    another hospital's statistics is converted exactly (:func:`renormalise`). ZCA
    whitening is fitted on each hospital's data, and a synthetic image optimised in
    one whitened space has no faithful image in another, so ZCA must match exactly.
    """
    if a.zca or b.zca:
        return a.same_as(b)
    if (a.size, a.channels) != (b.size, b.channels):
        return a.same_as(b)  # names the geometry
    return None


def renormalise(images: torch.Tensor, src: Preprocessing, dst: Preprocessing) -> torch.Tensor:
    """(N, C, H, W) images normalised with ``src``'s mean/std -> the same pixels normalised with ``dst``'s.

    Exact (no clamping): pixel = x * std_src + mean_src, then (pixel - mean_dst) / std_dst.
    """
    if src.zca or dst.zca or (torch.equal(src.mean, dst.mean) and torch.equal(src.std, dst.std)):
        return images
    view = lambda t: t.view(1, -1, 1, 1).to(images)  # noqa: E731
    return (images * view(src.std) + view(src.mean) - view(dst.mean)) / view(dst.std)


# Recipe fields that must agree across shares, and the flag that settles a disagreement (None: no flag).
_MUST_AGREE = {"model": "--model", "epochs": "--epochs", "batch_size": None, "momentum": None,
               "weight_decay": None, "lr_decay": None, "augment": None}


@dataclass
class Union:
    """The shares joined into one training set."""

    images: torch.Tensor  # (N, C, H, W) float32, network space
    targets: torch.Tensor  # (N,) int64 when every share trains on hard labels, else (N, K) probabilities
    labels: torch.Tensor  # (N,) int64 hard class ids
    class_names: list[str]
    preprocessing: Preprocessing
    recipe: Recipe  # lr = the union's step size
    described: list[dict]  # one entry per share for the report
    label_prior: dict | None = None  # what moving the soft labels did (see move_label_prior), for the report
    weights: torch.Tensor | None = None  # (N,) float32 per-image loss weights (see weigh_shares); None: all alike
    share_weights: dict | None = None  # how the weights were set, for the report


def site_counts(share: Share) -> list[int] | None:
    """The training images per class behind a share (its provenance), or None when it does not say."""
    counts = share.provenance.get(Attr.DATASET)
    for key in ("counts", "train"):
        counts = counts.get(key) if isinstance(counts, dict) else None
    ok = (isinstance(counts, list) and len(counts) == share.num_classes
          and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) and sum(counts) > 0)
    return list(counts) if ok else None


def move_label_prior(shares: Sequence[tuple[str, Share]], targets: list[torch.Tensor],
                     prior: str) -> tuple[list[torch.Tensor], dict | None]:
    """Move each soft-labelled share's targets from its site's class mix to ``prior``'s; returns the report entry.

    A share's soft labels start from its experts' outputs and are learned against their
    trajectories, so they carry the class mix of the site's training data: at a site with
    95 % pneumonia even the "normal" images get mostly-pneumonia targets. Joined as they
    are, such shares teach the union that skew. The correction is the prior-shift rule
    of Bayes: ``logits / T - log p_site + log p_target``, with ``p_site`` the site's
    training counts per class from the share's provenance (plus one per class, so a
    class the site lacks does not become infinitely likely) and ``p_target`` the
    federation's (all shares' counts added up; what centralised training would see) or
    equal classes. Hard labels carry no class mix and stay as they are; with one share
    and ``federation`` nothing moves. docs/evaluation.md shows what it does on split
    PneumoniaMNIST.
    """
    if prior not in LABEL_PRIORS:
        raise DistillError(f"--label-prior must be one of {', '.join(LABEL_PRIORS)}; got {prior!r}.")
    soft = [i for i, t in enumerate(targets) if t.ndim == 2 and shares[i][1].label_logits is not None]
    if prior == "shared" or not soft:
        return targets, None
    counts = [site_counts(s) for _, s in shares]
    missing = [shares[i][0] for i in soft if counts[i] is None]
    if missing:
        log.warning("Soft labels are joined as shared (no --label-prior %s): %s do(es) not record the training "
                    "counts per class of its site.", prior, ", ".join(missing))
        return targets, {"prior": "shared", "requested": prior, "reason": "counts not recorded",
                         "shares": missing}
    k = shares[0][1].num_classes
    known = [torch.tensor(c, dtype=torch.float64) for c in counts if c is not None]
    federation = torch.stack(known).sum(0)
    goal = federation + 1 if prior == "federation" else torch.ones(k, dtype=torch.float64)
    log_goal = torch.log(goal / goal.sum())
    out = list(targets)
    for i in soft:
        _, s = shares[i]
        site = torch.tensor(counts[i], dtype=torch.float64) + 1
        shift = log_goal - torch.log(site / site.sum())
        if torch.all(shift.abs() < 1e-12):
            continue  # the site's mix already is the goal (one share under "federation")
        z = s.label_logits.double() / s.label_temperature + shift
        out[i] = torch.softmax(z, dim=1).to(targets[i].dtype)
    moved = sum(1 for i in soft if out[i] is not targets[i])
    if moved:
        log.info("Soft labels of %d share(s) were moved from their site's class mix to %s (--label-prior %s).",
                 moved, "the federation's" if prior == "federation" else "equal classes", prior)
    return out, {"prior": prior, "target_mix": (goal / goal.sum()).tolist(), "shares_moved": moved,
                 "site_counts": counts}


def weigh_shares(shares: Sequence[tuple[str, Share]], how: str) -> tuple[torch.Tensor | None, dict]:
    """Per-image loss weights for the union of ``shares`` (concatenated in order); returns them and the report entry.

    Every share holds about the same number of images per class, whether 20 or 2,000
    real images of that class stood behind them, so joined as they are, a site that
    barely saw a class speaks for it as loudly as the site that saw most of it. Under
    ``"real-images"`` the images of class k from share s weigh in proportion to
    ``n[s, k]``, the site's training images of class k (from its provenance), scaled so
    each class's weights add up to its number of images in the union: the classes keep
    their weight, the sites are weighed within each class. ``"equal"``, a single share,
    or a share that does not record its counts (with a warning) leave every image at one.
    """
    if how not in SHARE_WEIGHTS:
        raise DistillError(f"--share-weights must be one of {', '.join(SHARE_WEIGHTS)}; got {how!r}.")
    if how == "equal" or len(shares) < 2:
        return None, {"weights": "equal"}
    counts = [site_counts(s) for _, s in shares]
    missing = [name for (name, _), c in zip(shares, counts) if c is None]
    if missing:
        log.warning("Every image of the union weighs the same (no --share-weights %s): %s do(es) not record the "
                    "training counts per class of its site.", how, ", ".join(missing))
        return None, {"weights": "equal", "requested": how, "reason": "counts not recorded", "shares": missing}
    labels = [s.labels.long() for _, s in shares]
    y = torch.cat(labels)
    raw = torch.cat([torch.tensor(c, dtype=torch.float64)[lab] for c, lab in zip(counts, labels)])
    w = torch.ones_like(raw)
    for k in range(shares[0][1].num_classes):
        mask = y == k
        total = raw[mask].sum()
        if total > 0:  # no site recorded an image of a class its shares hold: those images stay at one
            w[mask] = raw[mask] * mask.sum() / total
    per_share, start = [], 0
    for lab in labels:
        part = w[start:start + len(lab)]
        per_share.append([float(part[lab == k][0]) if bool((lab == k).any()) else None
                          for k in range(shares[0][1].num_classes)])
        start += len(lab)
    return w.float(), {"weights": how, "site_counts": counts, "per_image_weight": per_share}


def join_shares(shares: Sequence[tuple[str, Share]], *, model: str | None = None, epochs: int | None = None,
                lr: float | None = None, label_prior: str = "shared", share_weights: str = "equal") -> Union:
    """Join ``(name, Share)`` pairs into one training set, or explain in one sentence what differs.

    Images and targets are concatenated. The step size of the union is the geometric
    mean of the shares' learned step sizes (a scale, learned on a log scale) unless
    ``lr`` is given; other recipe fields must agree unless a flag overrides them.
    ``label_prior`` other than ``"shared"`` moves soft labels to a common class mix
    first (:func:`move_label_prior`; ``distill eval`` uses ``"federation"``), and
    ``share_weights="real-images"`` weighs each share's images by the real images behind
    them (:func:`weigh_shares`; ``distill eval``'s default).
    """
    if not shares:
        raise DistillError("No share was given.")
    name0, first = shares[0]
    for name, s in shares[1:]:
        if list(s.class_names) != list(first.class_names):
            raise DataError(f"{name} has classes {list(s.class_names)} but {name0} has {list(first.class_names)}; "
                            "shares must have the same classes in the same order.")
        why = _incompatible(first.preprocessing, s.preprocessing)
        if why:
            raise DataError(f"{name} and {name0} cannot be trained on together: their preprocessing differs ({why}).")
        if tuple(s.images.shape[1:]) != tuple(first.images.shape[1:]):
            raise DataError(f"{name} holds images of shape {tuple(s.images.shape[1:])} but {name0} "
                            f"holds {tuple(first.images.shape[1:])}.")
        for field_name, flag in _MUST_AGREE.items():
            if (flag == "--model" and model is not None) or (flag == "--epochs" and epochs is not None):
                continue  # the flag settles it
            a, b = getattr(first.recipe, field_name), getattr(s.recipe, field_name)
            if a != b:
                fix = f"; pass {flag} to choose" if flag else ""
                raise DataError(f"{name} and {name0} have different recipe {field_name} ({b!r} vs {a!r}){fix}.")
        if s.recipe.model_kwargs != first.recipe.model_kwargs and model is None:
            raise DataError(f"{name} and {name0} build {first.recipe.model} with different arguments "
                            f"({s.recipe.model_kwargs} vs {first.recipe.model_kwargs}); pass --model to choose.")
    k = len(first.class_names)
    targets, moved = move_label_prior(shares, [share_targets(s, name) for name, s in shares], label_prior)
    weights, weighed = weigh_shares(shares, share_weights)
    if all(t.ndim == 1 for t in targets):
        joined = torch.cat([t.long() for t in targets])
    else:
        joined = torch.cat([_as_probabilities(t, k) for t in targets])
    lrs = [float(s.recipe.lr) for _, s in shares]
    step = lr if lr is not None else lrs[0] if len(set(lrs)) == 1 else float(np.exp(np.mean(np.log(lrs))))
    described = [{
        "path": name, "images": len(s.labels), "class_counts": class_counts(s.labels.long(), k),
        "labels": "hard" if t.ndim == 1 else "soft", "label_temperature": float(s.label_temperature),
        "lr": float(s.recipe.lr), "recipe": asdict(s.recipe), "payload_sha256": getattr(s, "payload_sha256", ""),
    } for (name, s), t in zip(shares, targets)]
    images = []
    for name, s in shares:
        x = s.images.float()
        converted = renormalise(x, s.preprocessing, first.preprocessing)
        if converted is not x:
            log.info("%s was normalised with another mean/std; its images were converted to %s's.", name, name0)
        images.append(converted)
    return Union(images=torch.cat(images), targets=joined,
                 labels=torch.cat([s.labels.long() for _, s in shares]), class_names=list(first.class_names),
                 preprocessing=first.preprocessing, recipe=replace(first.recipe, lr=step), described=described,
                 label_prior=moved, weights=weights, share_weights=weighed)


def shares_per_class(described: Sequence[dict], class_names: Sequence[str]) -> list[int]:
    """How many shares hold images of each class; says so when a class is at only some shares, or at none.

    Shares from hospitals that lack a class are joined as they are: the union is trained on every class
    some share covers, and the per-class accuracy shows what coverage bought. A class no share covers is
    still scored (its recall will be near 0), with a warning.
    """
    coverage = [sum(1 for d in described if d["class_counts"][c] > 0) for c in range(len(class_names))]
    partial = [f"{class_names[c]} ({n} of {len(described)})" for c, n in enumerate(coverage) if 0 < n < len(described)]
    if partial:
        log.info("Classes held by only some shares: %s.", ", ".join(partial))
    missing = [class_names[c] for c, n in enumerate(coverage) if n == 0]
    if missing:
        log.warning("No share holds an image of class(es) %s; networks trained on this union learn them only "
                    "from soft labels, if at all.", ", ".join(missing))
    return coverage


def load_shares(paths: Sequence[str]) -> list[tuple[str, Share]]:
    """Read and validate each share file (the reader refuses malformed ones)."""
    return [(str(p), load_share(p)) for p in paths]


def refuse_repeats(shares: Sequence[tuple[str, Share]]) -> None:
    """Refuse a share given twice, by two names of one file or as a copy with the same payload: it would count twice."""
    files: dict[Path, str] = {}
    payloads: dict[str, str] = {}
    for name, s in shares:
        key = Path(name).resolve()
        if key in files:
            said = f"{name} is given twice" if files[key] == name else f"{files[key]} and {name} name the same file"
            raise DistillError(f"{said}; give each share once.")
        if s.payload_sha256 in payloads:
            raise DistillError(f"{payloads[s.payload_sha256]} and {name} hold the same images and labels (equal "
                               "payload checksums); give each share once.")
        files[key] = name
        if s.payload_sha256:
            payloads[s.payload_sha256] = name


# ----------------------------------------------------------------------------- one arm


@dataclass(frozen=True)
class Arm:
    """One training condition: a name for tables, and what to train on in each run."""

    name: str
    kind: str  # "distilled" | "random-real" | "full"
    recipe: TrainRecipe
    recipe_report: dict
    trained_on: dict
    # run index -> (images (N,C,H,W) network space, targets, extra per-run record)
    data_for_run: Callable[[int], tuple[torch.Tensor, torch.Tensor, dict]]
    weights: torch.Tensor | None = None  # (N,) per-image loss weights of every run's data; None: all alike
    train: Callable[..., list[dict]] | None = None  # how to train (train_network's signature); None: train_network


def _train_recipe(r: Recipe, epochs: int | None) -> tuple[TrainRecipe, dict]:
    """A share-style Recipe -> the TrainRecipe to run and its record for the report (``epochs`` overrides)."""
    if r.lr_decay not in LR_DECAYS:
        raise FormatError(f"The recipe's lr_decay {r.lr_decay!r} is unknown; expected one of {', '.join(LR_DECAYS)}.")
    try:
        recipe = replace(TrainRecipe.following(r), epochs=epochs or r.epochs)
    except ValueError as e:
        raise DistillError(str(e)) from None
    report = {"epochs": recipe.epochs, "lr": recipe.lr, "batch_size": recipe.batch_size, "momentum": recipe.momentum,
              "weight_decay": recipe.weight_decay, "lr_decay": r.lr_decay, "augment": r.augment or "none"}
    return recipe, report


def _train_run(model_name: str, model_kwargs: dict, geometry: tuple[int, int, int], images: torch.Tensor,
               targets: torch.Tensor, weights: torch.Tensor | None, recipe: TrainRecipe, seed: int, run: int,
               x_test: torch.Tensor, y_test: torch.Tensor, precision: str, device: torch.device,
               train: Callable[..., list[dict]] | None = None, tick: Callable[[], None] | None = None
               ) -> tuple[float, dict, float]:
    """One network of one arm: (final training loss, test metrics, training seconds). Its randomness is
    (seed, run)'s alone, so it can run in a worker process (distill/workers.py)."""
    k, channels, size = geometry
    with seeded(seed, run, MODEL_KEY):
        model = create_model(model_name, k, channels, size, **model_kwargs)
    model.to(device)
    t0 = time.perf_counter()
    with autocast(precision, device):  # the network's parameters and optimiser state stay fp32
        history = (train or train_network)(model, images.to(device), targets.to(device), recipe,
                                           generator(seed, run, DATA_KEY),
                                           weights=None if weights is None else weights.to(device),
                                           after_epoch=(lambda e, s: tick()) if tick else None)
    seconds = time.perf_counter() - t0
    return history[-1]["loss"], classification_metrics(predict(model, x_test).cpu(), y_test), seconds


def _run_arm(arm: Arm, model_name: str, model_kwargs: dict, geometry: tuple[int, int, int], x_test: torch.Tensor,
             y_test: torch.Tensor, cfg: EvalConfig, device: torch.device, tick: Callable[[], None] | None,
             workers: int = 1) -> dict:
    runs = []
    t_arm = time.perf_counter()
    data = [arm.data_for_run(run) for run in range(cfg.runs)]
    jobs = [(model_name, model_kwargs, geometry, images, targets, arm.weights, arm.recipe, cfg.seed, run, x_test, y_test,
             cfg.precision, device) for run, (images, targets, _) in enumerate(data)]
    if workers > 1 and arm.train is None:  # a custom trainer (DP-SGD) stays in this process
        ticks = (lambda _: [tick() for _ in range(arm.recipe.epochs)]) if tick else None
        trained = run_jobs(_train_run, jobs, workers, on_done=ticks)
    else:
        trained = [_train_run(*job, train=arm.train, tick=tick) for job in jobs]
    for run, ((_, _, extra), (final_loss, metrics, seconds)) in enumerate(zip(data, trained)):
        if not math.isfinite(final_loss):
            raise DivergenceError(f"Training on {arm.name} diverged (loss {final_loss}) in run {run}; "
                                  "try a smaller --lr or fewer --epochs.")
        runs.append({"run": run, "model_seed": derive_seed(cfg.seed, run, MODEL_KEY),
                     "data_seed": derive_seed(cfg.seed, run, DATA_KEY), **extra, **metrics,
                     "final_train_loss": final_loss, "train_seconds": seconds})
        log.info("%s, run %d: accuracy %.2f %%, AUC %.3f (%.1f s)", arm.name, run, 100 * metrics["accuracy"],
                 metrics["auc"], seconds)
    mean, std = summarize(runs)
    return {RowKey.NAME: arm.name, RowKey.KIND: arm.kind, RowKey.TRAINED_ON: arm.trained_on,
            RowKey.RECIPE: arm.recipe_report, RowKey.RUNS: runs, RowKey.MEAN: mean, RowKey.STD: std,
            RowKey.WALL_SECONDS: time.perf_counter() - t_arm}


def _workers(cfg: EvalConfig, device: torch.device, estimated_seconds: float) -> int:
    """Processes for the networks of a row: ``cfg.workers``, or with 0 (auto) one per core where the
    estimated training repays the workers' start (:data:`AUTO_WORKERS_MIN_SECONDS`)."""
    if cfg.workers == 0 and estimated_seconds < AUTO_WORKERS_MIN_SECONDS:
        return 1
    return resolve_workers(cfg.workers, device, cfg.runs)


# ----------------------------------------------------------------------------- the stage


def _validate(cfg: EvalConfig, shares: Sequence) -> tuple[str, ...]:
    check_ranges(cfg)
    if cfg.model is not None and cfg.model not in list_models():
        raise DistillError(f"Unknown model {cfg.model!r}; choose one of {', '.join(list_models())}.")
    baselines = tuple(cfg.baselines) if cfg.baselines is not None else (DEFAULT_BASELINES if shares else ())
    if "none" in baselines:
        if len(baselines) > 1:
            raise DistillError("--baseline none cannot be combined with other baselines.")
        baselines = ()
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise DistillError(f"Unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)} or none.")
    if "dp-sgd" in baselines and cfg.epsilon is None:
        raise DistillError("--baseline dp-sgd needs the privacy budget: add --epsilon E (and optionally --delta D).")
    if not shares and not baselines:
        raise DistillError("Nothing to evaluate: give one or more share files, or --baseline random-real|full.")
    if "random-real" in baselines and not shares and cfg.real_per_class is None:
        raise DistillError("--baseline random-real needs --ipc K (images per class) when no share is given.")
    if not (cfg.test or cfg.train):
        raise DistillError("Give the real data to test on with --test DATA (and --train DATA for baselines).")
    return tuple(dict.fromkeys(baselines))


def _check_real(data: RealData, class_names: list[str], channels: int, what: str, by_position: bool) -> None:
    if data.num_classes != len(class_names):
        raise DataError(f"{what} {data.name} has {data.num_classes} classes but the share has {len(class_names)} "
                        f"({list(class_names)}).")
    if data.channels != channels:
        raise DataError(f"{what} {data.name} has {data.channels}-channel images but the share expects {channels}.")
    ours = [c.strip().lower() for c in data.class_names]
    theirs = [c.strip().lower() for c in class_names]
    unnamed = ours == [str(i) for i in range(len(ours))]  # an npz without class names: only positions exist
    if ours != theirs and not (unnamed or by_position):
        # Scoring a chest X-ray share on ultrasound data gives a number that means nothing.
        raise DataError(f"{what} {data.name} names its classes {list(data.class_names)} but the share "
                        f"{list(class_names)}; if they are the same classes in the same order, pass "
                        "--match-classes-by-position.")
    if ours != theirs:
        log.warning("%s %s names its classes %s, the share %s; they are matched by position.", what, data.name,
                    data.class_names, class_names)


@dataclass(frozen=True)
class _Setup:
    """What every arm of one evaluation shares."""

    pre: Preprocessing
    pre_source: str
    class_names: list[str]
    base_recipe: Recipe  # the union's, or the baseline defaults
    model_name: str
    model_kwargs: dict


def _setup(cfg: EvalConfig, union: Union | None, train_data: RealData, test_data: RealData,
           baselines: tuple[str, ...]) -> _Setup:
    if union is not None:
        pre = union.preprocessing
        _check_real(test_data, union.class_names, pre.channels, "Test data", cfg.match_by_position)
        if baselines:
            _check_real(train_data, union.class_names, pre.channels, "Training data", cfg.match_by_position)
        if test_data.size != pre.size:
            raise DataError(f"Test images are {test_data.size} px but the share's are {pre.size} px; "
                            f"pass --size {pre.size}.")
        model_name = cfg.model or union.recipe.model
        kwargs = dict(union.recipe.model_kwargs) if model_name == union.recipe.model else {}
        return _Setup(pre, "share", union.class_names, union.recipe, model_name,
                      dict(cfg.model_kwargs) if cfg.model_kwargs is not None else kwargs)
    if test_data is not train_data and (test_data.num_classes, test_data.channels, test_data.size) != \
            (train_data.num_classes, train_data.channels, train_data.size):
        raise DataError(f"Test data {test_data.name} and training data {train_data.name} differ in classes, "
                        "channels or image size.")
    # Baselines without a share: the share's recipe type carries the reference protocol.
    recipe = Recipe(model=cfg.model or DEFAULT_MODEL, model_kwargs={}, lr=REAL_LR, epochs=REAL_EPOCHS,
                    batch_size=EVAL_BATCH, momentum=EVAL_MOMENTUM, weight_decay=EVAL_WEIGHT_DECAY,
                    lr_decay="half", augment=DEFAULT_AUGMENT, loss=LOSS_HARD)
    if "dp-sgd" in baselines:  # a DP network must not see statistics of the private images either
        if cfg.zca:
            raise DistillError("--baseline dp-sgd cannot use --zca: the whitening is fitted on the private images.")
        pre, source = dp.fixed_preprocessing(train_data.channels, train_data.size), "by fixed constants (DP)"
    else:
        pre, source = fit_preprocessing(train_data.train.images, zca=cfg.zca), "fit on the train split"
    return _Setup(pre, source, list(train_data.class_names), recipe, recipe.model, dict(cfg.model_kwargs or {}))


def _arms(cfg: EvalConfig, union: Union | None, setup: _Setup, train_spec: str, train_data: RealData,
          baselines: tuple[str, ...], device: torch.device) -> list[Arm]:
    k = len(setup.class_names)
    arms: list[Arm] = []
    if union is not None:
        recipe, rep = _train_recipe(union.recipe, cfg.epochs)
        rep["loss"] = LOSS_HARD if union.targets.ndim == 1 else LOSS_SOFT
        labels = {d["labels"] for d in union.described}
        n = len(union.described)
        coverage = shares_per_class(union.described, setup.class_names)
        arms.append(Arm(
            name=f"distilled ({n} share{'s' if n > 1 else ''}, {'/'.join(sorted(labels))} labels)",
            kind="distilled", recipe=recipe, recipe_report=rep,
            trained_on={"shares": union.described, "images": len(union.labels),
                        "class_counts": class_counts(union.labels, k), "shares_per_class": coverage,
                        "labels": labels.pop() if len(labels) == 1 else "mixed",
                        "label_prior": union.label_prior or {"prior": "shared"},
                        "share_weights": union.share_weights or {"weights": "equal"}},
            data_for_run=lambda run: (union.images, union.targets, {}), weights=union.weights))
    if not baselines:
        return arms
    x_train, y_train = setup.pre(train_data.train.images).to(device), train_data.train.labels
    real = {"data": train_spec, "name": train_data.name, "split": "train"}
    real_recipe = replace(setup.base_recipe, lr=REAL_LR)
    if "random-real" in baselines:
        per_class = cfg.real_per_class or max(class_counts(union.labels, k))
        recipe, rep = _train_recipe(real_recipe, cfg.epochs)

        def random_real(run: int):
            idx = draw_random_real(y_train, k, per_class, generator(cfg.seed, run, SUBSET_KEY), setup.class_names)
            return x_train[idx.to(device)], y_train[idx], {"subset_seed": derive_seed(cfg.seed, run, SUBSET_KEY),
                                                           "indices": idx.tolist()}

        random_real(0)  # refuse a too-small class before any training
        # The report's key stays "ipc" (eval format 1.0): random real images per class.
        arms.append(Arm(name=f"random real ({per_class}/class)", kind="random-real", recipe=recipe,
                        recipe_report=rep | {"loss": LOSS_HARD},
                        trained_on={**real, "ipc": per_class, "images": per_class * k, "class_counts": [per_class] * k},
                        data_for_run=random_real))
    if "full" in baselines:
        recipe, rep = _train_recipe(real_recipe, cfg.epochs or FULL_EPOCHS)
        arms.append(Arm(name="full training split", kind="full", recipe=recipe,
                        recipe_report=rep | {"loss": LOSS_HARD},
                        trained_on={**real, "images": len(y_train), "class_counts": class_counts(y_train, k)},
                        data_for_run=lambda run: (x_train, y_train, {})))
    if "dp-sgd" in baselines:
        arms.append(_dp_sgd_arm(cfg, setup, real, real_recipe, x_train, y_train))
    return arms


def _dp_sgd_arm(cfg: EvalConfig, setup: _Setup, real: dict, real_recipe: Recipe, x_train: torch.Tensor,
                y_train: torch.Tensor) -> Arm:
    """The network a hospital could share instead: trained on all its real images with DP-SGD at (epsilon, delta)."""
    import opacus

    k, n = len(setup.class_names), len(y_train)
    recipe, rep = _train_recipe(replace(real_recipe, lr=DP_LR), cfg.epochs or DP_EPOCHS)
    delta = dp.check_budget(cfg.epsilon, cfg.delta, n)
    plan = dp.plan_budget(epsilon=cfg.epsilon, delta=delta, n=n, batch_size=recipe.batch_size, epochs=recipe.epochs)
    record = plan.record(opacus.__version__)
    try:
        dp.check_model(create_model(setup.model_name, k, setup.pre.channels, setup.pre.size, **setup.model_kwargs),
                       setup.model_name)
    except ValueError as e:
        raise DistillError(str(e)) from None
    return Arm(name=f"DP-SGD on the training split (ε = {record.epsilon:.3g})", kind="dp-sgd", recipe=recipe,
               recipe_report=rep | {"loss": LOSS_HARD},
               trained_on={**real, "images": n, "class_counts": class_counts(y_train, k),
                           "dp": asdict(record)},
               data_for_run=lambda run: (x_train, y_train, {}), train=dp.dp_trainer(plan))


def _source_split(shares: Sequence[tuple[str, Share]], data: RealData) -> dict | None:
    """The split a share's buffer carved, when the share was made from ``data`` itself (its salted hash matches).

    Scoring such a share on a fresh carve of its own source would put images its experts trained
    on into the test split. Returns None when no share comes from ``data`` or nothing was carved.
    """
    for name, share in shares:
        ds = share.provenance.get(Attr.DATASET) or {}
        split, salt, salted = ds.get("split"), ds.get(SALT), ds.get(SALTED_SHA256)
        if not (isinstance(split, dict) and split.get("method") == SPLIT_CARVED and isinstance(salt, str)):
            continue
        try:
            mine = hashlib.sha256(bytes.fromhex(salt) + data.source_sha256.encode("ascii")).hexdigest()
        except ValueError:
            continue
        if mine == salted and any(data.split_record.get(k) != v for k, v in split.items()):
            log.info("%s was made from %s; scoring on the split its buffer carved (%s), so no test image is one "
                     "its experts trained on.", name, data.name, describe_split(split))
            return split
    return None


def plan(arms: Sequence[Arm], runs: int) -> list[tuple[int, str]]:
    """What the evaluation will cost, said before it starts: (log level, line) pairs.

    One line per row: images x epochs x runs = image passes (forward and backward), the
    unit that sets the time; then a warning when the full-data baseline dominates.
    """
    passes = {a.name: int(a.trained_on["images"]) * a.recipe.epochs * runs for a in arms}
    total = sum(passes.values())
    lines = [(logging.INFO, f"Evaluation plan: {len(arms)} row(s), {total:,} image passes in all:")]
    for a in arms:
        lines.append((logging.INFO, f"  {a.name}: {a.trained_on['images']:,} images x {a.recipe.epochs} epochs x "
                                    f"{runs} run(s) = {passes[a.name]:,}"))
    full = sum(n for a, n in zip(arms, passes.values()) if a.kind == "full")
    if total and full / total > FULL_DOMINATES:
        lines.append((logging.WARNING, f"The full-data baseline is {full / total:.0%} of this evaluation's work; "
                                       "drop it with --baseline random-real, or shorten it with --epochs or --runs."))
    return lines


def evaluate(cfg: EvalConfig, *, shares: Sequence[tuple[str, Share]] | None = None) -> dict:
    """Train ``cfg.runs`` fresh networks per arm and score them on the real test split; returns the report.

    ``shares``: already loaded ``(name, Share)`` pairs; by default ``cfg.shares`` is read from disk.
    The report (a JSON-able dict, documented in docs/evaluation.md) is also written to ``cfg.json``.
    """
    if cfg.json:
        check_writable_file(cfg.json)  # before the training, not after it
    if shares is None:
        shares = load_shares(cfg.shares)
    refuse_repeats(shares)
    baselines = _validate(cfg, shares)
    device = resolve_device(cfg.device)
    union = (join_shares(shares, model=cfg.model, epochs=cfg.epochs, lr=cfg.lr, label_prior=cfg.label_prior,
                         share_weights=cfg.share_weights)
             if shares else None)

    # One load when train and test name the same source. A folder without split sub-folders is
    # split with load_data's fixed split seed, not --seed: every seed must score the same test images.
    size = cfg.size or (union.preprocessing.size if union else None)
    test_spec, train_spec = cfg.test or cfg.train, cfg.train or cfg.test
    test_data = load_data(test_spec, size=size, whole_test=True)  # a folder/table without splits is all test
    carve = _source_split(shares, test_data)
    if carve is not None:
        test_data = load_data(test_spec, size=size, split=carve)
    train_data = test_data if train_spec == test_spec else load_data(train_spec, size=size)
    missing_classes: list[str] = []
    if test_data.split_record.get(WHOLE_TEST):
        baselines = baselines_for_whole_test(cfg.baselines, baselines, train_data is not test_data, test_data.name)
        if union is not None:
            test_data, missing_classes = align_test_classes(test_data, union.class_names)
    if len(test_data.test) == 0:
        raise DataError(f"{test_data.name} has an empty test split; there is nothing to score.")
    setup = _setup(cfg, union, train_data, test_data, baselines)
    k = len(setup.class_names)
    geometry = (k, setup.pre.channels, setup.pre.size)
    # Fail before any training: the model's size is estimated before it is built, then the whole run's.
    cost = check_model_builds(setup.model_name, *geometry, setup.model_kwargs,
                              batch_size=setup.base_recipe.batch_size)

    arms = _arms(cfg, union, setup, train_spec, train_data, baselines, device)
    image_bytes = 4 * setup.pre.channels * setup.pre.size ** 2  # float32, network space
    rows = [(int(a.trained_on["images"]), a.recipe.epochs, a.recipe.batch_size) for a in arms]
    data_bytes = image_bytes * (len(test_data.test.labels) + max((n for n, _, _ in rows), default=0))
    estimate = estimate_eval(rows, cfg.runs, cost, data_bytes, device_flops(device))
    check_eval_budget(estimate, cfg.max_hours, free_memory(device))
    for level, line in plan(arms, cfg.runs):
        log.log(level, "%s", line)
    if baselines:
        # A random-real row depends on this, not on the other rows: alone or combined, it is the same.
        log.info("Baselines follow %s.", "the share's recipe and preprocessing, so a `--baseline random-real` run "
                 "without the share (reference recipe, its own preprocessing) gives other numbers" if union else
                 f"the reference recipe, with preprocessing {setup.pre_source}")
    x_test, y_test = setup.pre(test_data.test.images).to(device), test_data.test.labels
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))
    workers = _workers(cfg, device, estimate.hours * 3600)
    if workers > 1:
        log.info("Training the %d network(s) of each row in %d worker processes.", cfg.runs, workers)
    total = sum(cfg.runs * a.recipe.epochs for a in arms)
    results = []
    with progress(range(total), label="eval", length=total) as bar:
        tick = (lambda: bar.update(1)) if hasattr(bar, "update") else None
        for arm in arms:
            results.append(_run_arm(arm, setup.model_name, setup.model_kwargs, geometry, x_test, y_test, cfg,
                                    device, tick, workers))

    report = strict_json({
        **eval_header(), EvalKey.CREATED: utc_now(),
        EvalKey.SOFTWARE: software_versions(), EvalKey.DEVICE: str(device), EvalKey.SEED: cfg.seed,
        EvalKey.RUNS: cfg.runs,
        EvalKey.PRECISION: cfg.precision, EvalKey.WORKERS: workers, EvalKey.MODEL: setup.model_name, EvalKey.MODEL_KWARGS: setup.model_kwargs,
        EvalKey.PREPROCESSING: {"source": setup.pre_source, "zca": setup.pre.zca, "size": setup.pre.size,
                                "channels": setup.pre.channels},
        EvalKey.TEST: {ScoredSplitKey.DATA: test_spec, ScoredSplitKey.NAME: test_data.name,
                       ScoredSplitKey.SPLIT: "test", ScoredSplitKey.IMAGES: len(y_test),
                       ScoredSplitKey.CLASS_NAMES: setup.class_names,
                       ScoredSplitKey.CLASS_COUNTS: class_counts(y_test, k),
                       ScoredSplitKey.MISSING_CLASSES: missing_classes},
        EvalKey.RESULTS: results,
    })
    if cfg.json:
        write_json(cfg.json, report)
    return report


# ----------------------------------------------------------------------------- human output


def _pm(mean, std, scale: float, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{scale * mean:.{digits}f} ± {scale * (std or 0.0):.{digits}f}"


def format_report(report: dict) -> str:
    """A short plain-text table: one row per arm (mean ± std over runs), per-class accuracy, pooled confusion."""
    t, results = report[EvalKey.TEST], report[EvalKey.RESULTS]
    lines = [f"Test: {t[ScoredSplitKey.NAME]} {t[ScoredSplitKey.SPLIT]} split, {t[ScoredSplitKey.IMAGES]} images; "
             f"model {report[EvalKey.MODEL]}; {report[EvalKey.RUNS]} run(s) per row, seed {report[EvalKey.SEED]}; "
             "mean ± std (n-1)."]
    if t.get(ScoredSplitKey.MISSING_CLASSES):  # whole test data without some of the share's classes
        lines.append("The accuracy covers only the classes with test images; none of "
                     f"{', '.join(t[ScoredSplitKey.MISSING_CLASSES])}.")
    rows = [("trained on", "images", "epochs", "lr", "accuracy %", "AUC")]
    for r in results:
        mean, std, recipe = r[RowKey.MEAN], r[RowKey.STD], r[RowKey.RECIPE]
        rows.append((r[RowKey.NAME], str(r[RowKey.TRAINED_ON][TrainedOnKey.IMAGES]), str(recipe[RecipeKey.EPOCHS]),
                     f"{recipe[RecipeKey.LR]:.3g}", _pm(mean[MetricKey.ACCURACY], std[MetricKey.ACCURACY], 100, 1),
                     _pm(mean[MetricKey.AUC], std[MetricKey.AUC], 1, 3)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for r in results:
        trained_on = r[RowKey.TRAINED_ON]
        moved = trained_on.get(TrainedOnKey.LABEL_PRIOR, {}).get(TrainedOnKey.PRIOR, "shared")
        weighed = trained_on.get(TrainedOnKey.SHARE_WEIGHTS, {}).get(TrainedOnKey.WEIGHTS, "equal")
        if r[RowKey.KIND] == DISTILLED and (moved != "shared" or weighed != "equal"):
            lines.append(f"Union: soft labels moved to the {moved} class mix (--label-prior), images weighed "
                         f"{'by the real images behind them' if weighed == 'real-images' else 'alike'} "
                         "(--share-weights).")
    if not any(r[RowKey.KIND] != DISTILLED for r in results):
        lines.append("No baseline was run: compare with `distill eval --baseline random-real --ipc K` and "
                     "`--baseline full` under the same protocol.")
    names = t[ScoredSplitKey.CLASS_NAMES]
    name_w = max(len(r[RowKey.NAME]) for r in results)
    col_w = [max(len(n), 5) for n in names]
    lines.append("Per-class accuracy %, mean over runs:")
    lines.append(f"  {''.ljust(name_w)}  " + "  ".join(n.rjust(w) for n, w in zip(names, col_w)))
    for r in results:
        vals = ["n/a" if v is None else f"{100 * v:.1f}" for v in r[RowKey.MEAN][MetricKey.PER_CLASS_ACCURACY]]
        lines.append(f"  {r[RowKey.NAME].ljust(name_w)}  " + "  ".join(v.rjust(w) for v, w in zip(vals, col_w)))
    lines.append("Confusion matrix summed over runs (rows true, columns predicted):")
    for r in results:
        pooled = np.sum([run[MetricKey.CONFUSION] for run in r[RowKey.RUNS]], axis=0).tolist()
        lines.append(f"  {r[RowKey.NAME].ljust(name_w)}  "
                     + " | ".join(" ".join(str(v) for v in row) for row in pooled))
    return "\n".join(lines)
