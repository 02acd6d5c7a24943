"""Typed, frozen configuration per stage, with TOML load/save.

Defaults live here and only here; the CLI's flags override a ``--config``
TOML file, which overrides these defaults. Every run writes its fully resolved
config next to its outputs.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from .errors import DistillError
from .io import atomic_path
from .limits import INT_LIMIT, MAX_EPOCHS, MAX_HOURS, MAX_SIZE, SEED_LIMIT
from .reference_defaults import BATCH, NETWORK_LR, SMALL_SET_EPOCHS

T = TypeVar("T")


@dataclass(frozen=True)
class BufferConfig:
    """Expert (teacher) training. Defaults are the MTT reference's buffer.py settings."""

    data: str = ""
    out: str = "buffers"
    model: str = "convnet"  # a ConvNet whose depth follows the image size: convnet3 at 28 px (models.convnet_depth_for)
    experts: int = 10
    epochs: int = 50  # reference train_epochs
    # None: the reference's lr_teacher (reference_defaults.NETWORK_LR), or dp.DP_LR for DP-SGD experts,
    # whose clipped gradients are 20-30x shorter (chosen on RetinaMNIST's validation split: docs/privacy.md).
    lr: float | None = None
    momentum: float = 0.0  # reference mom
    weight_decay: float = 0.0  # reference l2
    batch_size: int = BATCH  # reference batch_train
    augment: str = "color,crop,cutout,flip,scale,rotate"  # reference DSA strategy; "none" turns it off
    zca: bool = False
    size: int | None = None
    # Snapshots every N optimiser steps; 0 = once per epoch (the reference). Small datasets
    # (BreastMNIST: 3 steps an epoch) want a few steps per snapshot: see docs/method.md.
    snapshot_every: int = 0
    snapshot_dtype: str = "float32"  # or float16 / bfloat16 (halves disk; effect measured in docs/performance.md)
    # Experts trained at once by one vmapped network (distill/batched.py); 1 = one at a time, as the reference.
    # 0 = auto: groups of up to 16 on CUDA (for an instance-norm model), 1 elsewhere, so that CPU runs stay
    # bit-for-bit one-at-a-time. The resolved number is what the buffer's files record.
    batch_experts: int = 0
    bf16: bool = False  # bf16 autocast for the experts' forward pass (batched path); changes trajectories
    precision: str = "auto"  # auto | fp32 | bf16: autocast of the one-at-a-time experts (distill/precision.py)
    # Experts trained side by side in worker processes on a CPU (distill/workers.py); 0 = auto, one per core
    # (buffer.AUTO_WORKERS_MIN_PASSES); 1 = one after another in this process. The experts record what ran.
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    # How DICOM/NIfTI files of a labels table are read (distill/medical.py); recorded in the buffer's split record.
    on_bad_file: str = "stop"  # or "skip" unreadable files, with a count
    nifti_axis: str | None = None  # slice 3-D NIfTI volumes along sagittal|coronal|axial
    nifti_slice: int | None = None  # that slice's index; None = the middle one
    # Differential privacy (distill/dp.py): None = experts trained without DP. With an epsilon the whole
    # buffer (every expert, and the class means of dp_init) spends at most (dp_epsilon, dp_delta).
    dp_epsilon: float | None = None
    dp_delta: float | None = None  # None = 1 / (10 n), below 1/n for the n training images
    dp_clip: float = 1.0  # per-image gradient L2 bound (dp.DEFAULT_CLIP)
    dp_shards: int = 1  # experts train on this many disjoint shards of the data (parallel composition)
    dp_accountant: str = "prv"  # prv | rdp (Opacus)
    dp_init: str = "none"  # none | class-means: also release per-class mean images (a part of the budget)
    # With class-means: the part of dp_epsilon planned for the means. 0.3 was chosen on RetinaMNIST's validation split,
    # outside the DP table, by benchmarks/dp_stats_fraction.py (of 0.1, 0.3, 0.6 and 0.85; docs/privacy.md).
    dp_stats_fraction: float = 0.3


@dataclass(frozen=True)
class RunConfig:
    """MTT distillation (``distill run``); docs/method.md explains every field.

    Reference values in comments are from the MTT reference (Cazenavette et al.
    2022, github.com/GeorgeCazenavette/mtt-distillation): "ref" is the default of
    its distill.py, "README" its CIFAR-100 1-image-per-class command. "Epochs"
    here count snapshot intervals of the buffer (one epoch, or ``snapshot_every``
    optimiser steps when the buffer was built with ``--snapshot-every``).
    """

    buffer: str = "buffers"
    out: str = "runs/run"
    data: str = ""  # real data for --init real and validation; "" = the data named in the buffer's config.toml
    ipc: int = 10  # images per class
    iterations: int = 1000  # ref 5000
    syn_steps: int = 20  # student SGD steps per iteration; ref 20, README 20
    expert_epochs: int = 2  # M: snapshot intervals spanned by the target; ref 3, README 3
    min_start_epoch: int = 0
    # Latest start snapshot, inclusive; ref 25 (exclusive), README 20. None = auto: a fraction of the
    # latest legal start that grows with ipc (distiller.auto_max_start; docs/method.md, "the start window").
    max_start_epoch: int | None = None
    trajectories_per_iter: int = 1  # expert segments matched (and averaged) per iteration; ref 1
    # Processes matching an iteration's segments side by side on a CPU (one gloo group, distill/workers.py):
    # 0 = auto, one per core but never more than trajectories_per_iter; 1 = this process. GPUs: torchrun.
    workers: int = 0
    # real | real-or-noise | noise | dp-means | public:PATH; ref default noise (the paper starts from real images).
    # A DP buffer refuses the real ones (distill/mtt/dpmode.py).
    init: str = "real"
    # With soft labels, --init real draws only images the labelling expert classifies correctly (as DATM).
    init_correct_only: bool = True
    # True = class ids, as the reference; False = learned soft labels; None = auto by ipc
    # (distiller.auto_hard_labels: hard below SOFT_LABELS_FROM_IPC; docs/method.md, "hard or soft").
    hard_labels: bool | None = None
    label_temperature: float = 1.0  # targets = softmax(logits / T)
    # Snapshot of expert 0 whose logits start the soft labels; -1 = its last (the most trained).
    label_snapshot: int = -1
    lr_img: float = 100.0  # ref 1000 (CIFAR, ZCA); 100 suits un-whitened 28x28 greyscale (NOTES-MTT)
    # Learning rate on log(step size). The reference's lr_lr 1e-5 acts on the raw step size; at a
    # step size a, a raw-space rate r moves log(a) as much as a log-space rate of r / a^2 (0.1 at
    # a = 0.01). We take 10x less and let max_log_lr_step catch the bursts (docs/method.md).
    lr_lr: float = 1e-2
    # Soft-label logits, per 2 classes: the rate used is lr_label * K / 2 for K classes (docs/method.md).
    # Soft-label MTT (Li et al. 2022) uses 2 to 10; on BreastMNIST (K = 2) at 1 image per class
    # 2 drove the matching loss from 1.1 up to 5 in 30 iterations, 0.2 brought it down.
    lr_label: float = 0.2
    # Initial student step size; ref lr_teacher. Not the DP experts' 0.3 (dp.DP_LR): clipping shrinks their per-image
    # gradients about 30-fold, and a student starting at 0.3 without clipping overshot (first move 1.7x the
    # expert's) and learned images that teach one class only (PneumoniaMNIST, epsilon 1: docs/privacy.md).
    syn_lr_init: float = NETWORK_LR
    max_log_lr_step: float = 0.1  # bound on |change of log step size| per iteration (~10 %)
    # Floor on the step size, as a fraction of syn_lr_init; 0 = none. At 1 image per class the step
    # size fell from 0.01 to 0.0007 (0.07) on PneumoniaMNIST and to 3e-5 on BreastMNIST, where the
    # recipe's networks no longer trained; a quarter keeps them moving (docs/method.md).
    min_syn_lr_fraction: float = 0.25
    momentum: float = 0.5  # SGD momentum on images, step size and labels; ref 0.5
    batch_syn: int = 0  # 0 = the whole synthetic set each inner step (ref default)
    augment: str = "expert"  # "expert" = the buffer's own augmentation; or color,crop,... | none
    # full (through the whole unroll; faster on a CPU) | checkpoint (memory independent of syn_steps) | auto:
    # full where its estimated memory fits max_memory, else checkpoint (distill/memory.py); config.toml records the choice.
    gradient: str = "auto"
    max_memory: float | None = None  # GiB the matching gradient may take; None = memory.MEMORY_FRACTION of the available
    precision: str = "auto"  # auto | fp32 | bf16: autocast of the student unrolls (distill/precision.py); config.toml records the choice
    # How each iteration runs: auto = one captured CUDA graph per iteration on CUDA, eager elsewhere;
    # graphs | compile (torch.compile, then captured) | eager. Same numbers up to rounding (docs/performance.md).
    fast: str = "auto"
    eval_every: int = 100  # iterations between evaluations (0 = only at the end); ref 100
    eval_models: int = 2  # fresh networks trained per evaluation (0 = no evaluation); ref 5
    eval_epochs: int = SMALL_SET_EPOCHS  # epochs each (MTT's distill.py: 1000; fewer keeps the periodic check cheap)
    checkpoint_every: int = 50  # iterations between checkpoints
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    """Recipient evaluation (``distill eval``). ``baselines=None`` means both baselines beside a share, none without."""

    shares: tuple[str, ...] = ()
    test: str | None = None  # real data whose test split is scored; defaults to ``train``
    train: str | None = None  # real data whose train split feeds the baselines; defaults to ``test``
    baselines: tuple[str, ...] | None = None  # subset of evaluate.BASELINES; ("none",) for none
    real_per_class: int | None = None  # random-real images per class (--ipc); default: the share's largest class
    model: str | None = None  # default: the shares' recipe model, else evaluate.DEFAULT_MODEL
    model_kwargs: dict | None = None  # arguments of --model (TOML config only); default: the share's, else none
    runs: int = 5
    epochs: int | None = None  # overrides every arm's epochs
    lr: float | None = None  # overrides the distilled arm's step size (baselines keep evaluate.REAL_LR)
    zca: bool = False  # baselines without a share: fit ZCA on the train split as `distill buffer --zca`
    size: int | None = None  # resize real images (default: the share's geometry, else the source's)
    match_by_position: bool = False  # accept real data whose class names differ from the share's
    precision: str = "auto"  # auto | fp32 | bf16: autocast of the networks trained here (distill/precision.py)
    workers: int = 0  # processes training a row's networks side by side on a CPU; 0 = auto (one per core), 1 = in turn
    label_prior: str = "federation"  # LABEL_PRIORS: the class mix a union's soft labels are moved to
    share_weights: str = "real-images"  # SHARE_WEIGHTS: how a union weighs one share's images against another's
    seed: int = 0
    device: str = "auto"
    json: str | None = None  # where to write the JSON report
    max_hours: float = MAX_HOURS  # refuse to start when the estimated training time is longer (distill/checks.py)
    epsilon: float | None = None  # --baseline dp-sgd: the (epsilon, delta) of its DP-SGD training
    delta: float | None = None  # None = 1 / (10 n) for the n training images


# The full-data baseline's epochs: 300 epochs over PneumoniaMNIST's 4,708 images is about 3.5 h per
# network on one CPU core; 30 epochs is past the plateau of its validation accuracy.
FULL_EPOCHS = 30

HOLDOUTS = ("val", "test", "val+test")

# What class mix the soft labels of a union of shares assume (docs/evaluation.md, "Several shares"):
# the federation's (every site's training counts added up), each site's own as shared, or equal classes.
LABEL_PRIORS = ("federation", "shared", "balanced")

# How a union of shares weighs its images (docs/evaluation.md, "Several shares"): within each class, in
# proportion to the real training images of that class behind each share, or every image alike.
SHARE_WEIGHTS = ("real-images", "equal")


@dataclass(frozen=True)
class AuditSettings:
    """What the privacy audit does (``distill audit``); recorded in its summary so a result can be repeated."""

    holdout: str = "val"  # MedMNIST's val is split from the same pool as train; its test may differ in distribution
    networks: int = 2  # networks per side of the membership attack
    epochs: int | None = None  # None: the share's own recipe
    expert_epochs: int = 2  # of the feature network trained here: enough for discriminative features
    bootstrap: int = 200  # resamples per confidence interval
    pairs: int = 16  # rows in the side-by-side PNG
    seed: int = 0
    # loss: the quick loss-threshold attacks; rmia: also offline RMIA with reference pipelines (docs/privacy.md).
    attack: str = "loss"
    references: int = 2  # RMIA reference pipelines, in complementary pairs
    reference_experts: int = 2  # experts per reference buffer: fewer than a real run, to keep R pipelines affordable
    reference_epochs: int = 10  # epochs per reference expert
    reference_iterations: int = 100  # distillation iterations per reference run
    canaries: int = 0  # with rmia: mislabeled held-out images put into one more pipeline, to measure the worst case

    def __post_init__(self):
        check_ranges(self)  # the audit is also called from Python, without build()


@dataclass(frozen=True)
class ExportConfig:
    """What ``distill export`` writes into the share besides the run's own record."""

    license: str = "CC-BY-4.0"  # SPDX identifier
    description: str = ""
    citation: str = ""
    force: bool = False  # export although the audit is missing or failed; the share records it
    overwrite: bool = False  # replace an existing share file at --out


@dataclass(frozen=True)
class InspectConfig:
    """How ``distill inspect`` prints a share."""

    json: bool = False  # the summary as JSON instead of text
    grid: str | None = None  # also draw the images into this PNG


@dataclass(frozen=True)
class ReportConfig:
    """What ``distill report`` puts on the review page (docs/report.md)."""

    share: str | None = None  # with a run folder: the share exported from it (its checksum and text)
    eval_json: str | None = None  # a `distill eval --json` report: accuracy against random real and full data
    data: str | None = None  # real data for the nearest-neighbour pairs; None = the run's own
    public: bool = False  # the receiving side's page: only the share's content, no real image


# ----------------------------------------------------------------------------- allowed values

GRADIENTS = ("full", "checkpoint")  # full: the reference unroll (the oracle); checkpoint: constant memory, exact
PRECISIONS = ("auto", "fp32", "bf16")  # --precision of buffer, run and eval (distill/precision.py)
GRADIENT_MODES = ("auto",) + GRADIENTS  # auto: full where it fits --max-memory, else checkpoint (distill/memory.py)
FAST_MODES = ("auto", "graphs", "compile", "eager")  # auto = graphs on CUDA, eager elsewhere (distill/mtt/engine.py)
ATTACKS = ("loss", "rmia")  # distill audit --attack
SNAPSHOT_DTYPES = ("float32", "float16", "bfloat16")  # storage precision of expert snapshots
DP_ACCOUNTANTS = ("prv", "rdp")  # Opacus' accountants (distill/dp.py)
DP_INITS = ("none", "class-means")  # DP statistics a DP buffer may release beside its experts


@dataclass(frozen=True)
class Allowed:
    """What one setting may be: a range (``low``, strictly above it if ``strict``, below ``high``) or ``choices``.

    ``zero`` says what 0 means where 0 is a special value ("auto", "the whole set"); ``flag`` is
    False for settings that only a --config file sets, so the message names the key, not a flag.
    """

    low: float | None = None
    strict: bool = False
    high: float | None = None  # exclusive
    zero: str = ""
    choices: tuple[str, ...] = ()
    flag: bool = True

    def ok(self, v: Any) -> bool:
        if self.choices:
            return v in self.choices
        if isinstance(v, float) and not math.isfinite(v):
            return False  # inf passes every lower bound: --lr inf trained NaN experts
        above = self.low is None or (v > self.low if self.strict else v >= self.low)
        if self.high is not None:
            return above and v < self.high
        return above and (v < INT_LIMIT if isinstance(v, int) else True)

    def phrase(self, v: Any) -> str:
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if isinstance(v, float) and not math.isfinite(v):
            return "a finite number"
        if self.high is not None:
            if self.high == SEED_LIMIT:
                return "in [0, 2^63)"
            if isinstance(v, int) and not isinstance(v, bool):
                return f"at most {self.high - 1}" if v >= self.high else f"at least {self.low:g}"
            return f"in [{self.low:g}, {self.high:g})"
        if isinstance(v, int) and v >= INT_LIMIT:
            return "below 2^63"
        if self.strict and self.low == 0:
            return "positive"
        if self.zero:
            return f"0 ({self.zero}) or {'at least 1' if isinstance(v, int) else 'positive'}"
        return "0 or more" if self.low == 0 else f"at least {self.low:g}"


AT_LEAST_1, ZERO_OR_MORE, POSITIVE = Allowed(low=1), Allowed(low=0), Allowed(low=0, strict=True)
SEED = Allowed(low=0, high=SEED_LIMIT)  # every seed: [0, 2^63)
SIZE = Allowed(low=1, high=MAX_SIZE + 1)  # --size: a resize target, in pixels per side
EPOCHS = Allowed(low=1, high=MAX_EPOCHS + 1)
FRACTION = Allowed(low=0, high=1)  # momentum
KEY_ONLY = dict(flag=False)

# Every setting with a range or a fixed set of values, per stage; checked by check_ranges in one style.
# Settings whose valid values depend on something else (a registry, the buffer, another setting) are
# checked by their stage.
ALLOWED: dict[type, dict[str, Allowed]] = {
    BufferConfig: {
        "experts": AT_LEAST_1, "epochs": EPOCHS, "lr": POSITIVE, "batch_size": AT_LEAST_1,
        "momentum": Allowed(low=0, high=1, **KEY_ONLY), "weight_decay": Allowed(low=0, **KEY_ONLY),
        "size": SIZE, "seed": SEED, "snapshot_every": Allowed(low=0, zero="once per epoch"),
        "snapshot_dtype": Allowed(choices=SNAPSHOT_DTYPES),
        "batch_experts": Allowed(low=0, zero="auto"),
        "dp_epsilon": POSITIVE, "dp_delta": POSITIVE, "dp_clip": POSITIVE,
        "dp_shards": AT_LEAST_1, "dp_accountant": Allowed(choices=DP_ACCOUNTANTS), "dp_init": Allowed(choices=DP_INITS),
        "dp_stats_fraction": Allowed(low=0.01, high=0.99),
        "precision": Allowed(choices=PRECISIONS), "workers": Allowed(low=0, zero="one per core"),
    },
    RunConfig: {
        "ipc": AT_LEAST_1, "iterations": ZERO_OR_MORE, "syn_steps": AT_LEAST_1, "expert_epochs": AT_LEAST_1,
        "min_start_epoch": Allowed(low=0, **KEY_ONLY), "trajectories_per_iter": AT_LEAST_1,
        "workers": Allowed(low=0, zero="one per core, at most one per trajectory"),
        "label_temperature": Allowed(low=0, strict=True, **KEY_ONLY), "lr_img": Allowed(low=0, strict=True, **KEY_ONLY),
        "lr_lr": Allowed(low=0, zero="fixed step size", **KEY_ONLY), "lr_label": Allowed(low=0, zero="fixed labels", **KEY_ONLY),
        "syn_lr_init": Allowed(low=0, strict=True, **KEY_ONLY), "max_log_lr_step": Allowed(low=0, strict=True, **KEY_ONLY),
        "min_syn_lr_fraction": Allowed(low=0, high=1, **KEY_ONLY), "max_start_epoch": Allowed(low=0),
        "momentum": Allowed(low=0, high=1, **KEY_ONLY), "batch_syn": Allowed(low=0, zero="the whole set"),
        "gradient": Allowed(choices=GRADIENT_MODES), "max_memory": POSITIVE, "precision": Allowed(choices=PRECISIONS), "fast": Allowed(choices=FAST_MODES),
        "eval_every": Allowed(low=0, zero="only at the end"), "eval_models": Allowed(low=0, zero="no evaluation", **KEY_ONLY),
        "eval_epochs": Allowed(low=1, **KEY_ONLY), "checkpoint_every": Allowed(low=1, **KEY_ONLY), "seed": SEED,
    },
    EvalConfig: {"epsilon": POSITIVE, "delta": POSITIVE, "runs": AT_LEAST_1, "epochs": EPOCHS, "lr": POSITIVE,
                 "real_per_class": AT_LEAST_1, "size": SIZE, "seed": SEED, "max_hours": POSITIVE,
                 "label_prior": Allowed(choices=LABEL_PRIORS), "precision": Allowed(choices=PRECISIONS),
                 "workers": Allowed(low=0, zero="one per core"), "share_weights": Allowed(choices=SHARE_WEIGHTS)},
    AuditSettings: {
        "holdout": Allowed(choices=HOLDOUTS), "networks": AT_LEAST_1, "epochs": EPOCHS, "expert_epochs": AT_LEAST_1,
        "bootstrap": AT_LEAST_1, "pairs": ZERO_OR_MORE, "seed": SEED, "attack": Allowed(choices=ATTACKS),
        "references": Allowed(low=2), "reference_experts": AT_LEAST_1, "reference_epochs": EPOCHS,
        "reference_iterations": ZERO_OR_MORE, "canaries": ZERO_OR_MORE,
    },
}


# Settings known by another name on the command line and in TOML files (that name -> the field). EvalConfig's
# random real images per class are --ipc, as in the reference baselines, but ipc elsewhere is synthetic images.
ALIASES: dict[type, dict[str, str]] = {EvalConfig: {"ipc": "real_per_class"}}


def check_ranges(cfg: Any) -> None:
    """Refuse the first setting of ``cfg`` outside what :data:`ALLOWED` says, in one sentence; None means unset."""
    shown_as = {field: alias for alias, field in ALIASES.get(type(cfg), {}).items()}
    for name, allowed in ALLOWED.get(type(cfg), {}).items():
        v = getattr(cfg, name)
        if v is None or allowed.ok(v):
            continue
        flag = shown_as.get(name, name)
        who = f"--{flag.replace('_', '-')}" if allowed.flag else flag
        shown = repr(v) if isinstance(v, str) else v
        raise DistillError(f"{who} must be {allowed.phrase(v)}; got {shown}.")


def default_text(cls: type, name: str) -> str:
    """"(default X)" for a field of a config dataclass, for help texts that must not retype defaults."""
    value = {f.name: f for f in fields(cls)}[name].default
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f"(default {value})"


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise DistillError(f"Config file {path} does not exist.") from None
    except UnicodeDecodeError as e:
        raise DistillError(f"Config file {path} is not UTF-8 text (byte {e.start} cannot be decoded); "
                           "save it as UTF-8.") from None
    except tomllib.TOMLDecodeError as e:
        raise DistillError(f"Config file {path} is not valid TOML: {str(e).rstrip('.')}.") from None
    except OSError as e:
        raise DistillError(f"Config file {path} cannot be read ({e.strerror or e}).") from None


def build(cls: type[T], *layers: dict[str, Any]) -> T:
    """Merge layers of settings (later wins, None means 'not given') into a frozen config.

    Every value, from a TOML file or a flag, is checked against its field's type here.
    """
    names = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        _check_file_version(cls, layer)
        for k, v in layer.items():
            if k in FILE_KEYS:
                continue  # what file this is, not a setting
            k = k.replace("-", "_")
            k = ALIASES.get(cls, {}).get(k, k)
            if k not in names:
                raise DistillError(f"Unknown setting {k!r} for {cls.__name__}; valid: {', '.join(names)}.")
            if v is not None:
                values[k] = _checked(k, v, hints[k])
    cfg = cls(**values)
    check_ranges(cfg)
    return cfg


def _check_file_version(cls: type, layer: dict[str, Any]) -> None:
    """A config file written by a newer major version, or for another stage, is refused in one sentence."""
    version, kind = layer.get("format_version"), layer.get("format")
    if version is not None and str(version).split(".")[0] != CONFIG_FORMAT_VERSION.split(".")[0]:
        raise DistillError(f"This config file has format version {version}; this version of distill reads "
                           f"{CONFIG_FORMAT_VERSION.split('.')[0]}.x. Upgrade distill.")
    if kind is not None and kind != config_format(cls):
        raise DistillError(f"This config file is a {kind}, not a {config_format(cls)}.")


def _checked(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` asks for (int -> float, list -> tuple), or a DistillError naming all three."""
    options = [h for h in typing.get_args(hint) if h is not type(None)] if _is_union(hint) else [hint]
    for h in options:
        ok, converted = _as_type(value, h)
        if ok:
            return converted
    raise DistillError(f"Setting {key} = {value!r} is {_describe(type(value))}, "
                       f"but it must be {' or '.join(_describe(h) for h in options)}.")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _as_type(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if hint is dict or typing.get_origin(hint) is dict:
        return isinstance(value, dict), value
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)) and all(_as_type(v, item)[0] for v in value):
            return True, tuple(value)
        return False, value
    raise TypeError(f"config field type {hint!r} is not supported by build()")  # a programming error


def _describe(t: Any) -> str:
    if typing.get_origin(t) is tuple:
        return f"a list of {_describe(typing.get_args(t)[0]).split(' ', 1)[1]}s"
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string",
             dict: "a table", list: "a list", tuple: "a list", type(None): "nothing"}
    return names.get(t, names.get(typing.get_origin(t), f"a {getattr(t, '__name__', t)}"))


# A config.toml that distill writes starts with these two keys; build() reads past them, so
# such a file can be passed back as --config. Files without them (before 1.0) read the same.
CONFIG_FORMAT_VERSION = "1.0"
FILE_KEYS = ("format", "format_version")


def config_format(cls: type) -> str:
    """``distill-buffer-config`` for BufferConfig, ``distill-run-config`` for RunConfig, and so on."""
    name = cls.__name__.removesuffix("Config").removesuffix("Settings")
    return "distill-" + "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-") + "-config"


def to_toml(cfg) -> str:
    """Serialise a config dataclass (str/int/float/bool/None values, lists and flat tables) as TOML,
    headed by its format name and version."""
    lines = [f"format = {_toml_str(config_format(type(cfg)))}", f"format_version = {_toml_str(CONFIG_FORMAT_VERSION)}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(cfg).items()
              if v is not None]  # TOML has no null; absence means the default
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return _toml_str(str(v))


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def save_toml(cfg, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(to_toml(cfg))


@dataclass(frozen=True)
class SplitConfig:
    """Splitting one dataset's training set across hospitals (``distill split``; docs/hospitals.md)."""

    data: str = ""
    out: str = "sites"
    sites: int = 3
    alpha: str | float = "iid"  # Dirichlet concentration over classes (e.g. "0.3"), or "iid" for equal proportions
    # Images of every class each site gets before the Dirichlet draw: 1 lets every site run `distill buffer`,
    # which refuses a class without training images; 0 is the plain Dirichlet split.
    min_per_class: int = 1
    seed: int = 0


ALLOWED[SplitConfig] = {"sites": Allowed(low=2), "min_per_class": ZERO_OR_MORE, "seed": SEED}
