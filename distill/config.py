"""Typed, frozen configuration per stage, with TOML load/save.

Defaults live here and only here; the CLI's flags override a ``--config``
TOML file, which overrides these defaults. Every run writes its fully resolved
config next to its outputs.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from .errors import DistillError

T = TypeVar("T")


@dataclass(frozen=True)
class BufferConfig:
    """Expert (teacher) training. Defaults are the MTT reference's buffer.py settings."""

    data: str = ""
    out: str = "buffers"
    model: str = "convnet3"
    experts: int = 10
    epochs: int = 50  # reference train_epochs
    lr: float = 0.01  # reference lr_teacher
    momentum: float = 0.0  # reference mom
    weight_decay: float = 0.0  # reference l2
    batch_size: int = 256  # reference batch_train
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
    seed: int = 0
    device: str = "auto"


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
    max_start_epoch: int = 20  # inclusive; ref 25 (exclusive), README 20
    trajectories_per_iter: int = 1  # expert segments matched (and averaged) per iteration; ref 1
    init: str = "real"  # real | noise; ref default noise (the paper starts from real images)
    hard_labels: bool = False  # True = class ids, as the reference; False = learned soft labels
    label_temperature: float = 1.0  # targets = softmax(logits / T)
    lr_img: float = 100.0  # ref 1000 (CIFAR, ZCA); 100 suits un-whitened 28x28 greyscale (NOTES-MTT)
    # Learning rate on log(step size). The reference's lr_lr 1e-5 acts on the raw step size; at a
    # step size a, a raw-space rate r moves log(a) as much as a log-space rate of r / a^2 (0.1 at
    # a = 0.01). We take 10x less and let max_log_lr_step catch the bursts (docs/method.md).
    lr_lr: float = 1e-2
    # Soft-label logits. Soft-label MTT (Li et al. 2022) uses 2 to 10; on BreastMNIST at 1
    # image per class 2 drove the matching loss from 1.1 up to 5 in 30 iterations, 0.2 brought it down.
    lr_label: float = 0.2
    syn_lr_init: float = 0.01  # initial student step size; ref lr_teacher 0.01
    max_log_lr_step: float = 0.1  # bound on |change of log step size| per iteration (~10 %)
    momentum: float = 0.5  # SGD momentum on images, step size and labels; ref 0.5
    batch_syn: int = 0  # 0 = the whole synthetic set each inner step (ref default)
    augment: str = "expert"  # "expert" = the buffer's own augmentation; or color,crop,... | none
    gradient: str = "full"  # full (through the whole unroll; faster on a CPU) | checkpoint (memory independent of syn_steps)
    # How each iteration runs: auto = one captured CUDA graph per iteration on CUDA, eager elsewhere;
    # graphs | compile (torch.compile, then captured) | eager. Same numbers up to rounding (docs/performance.md).
    fast: str = "auto"
    eval_every: int = 100  # iterations between evaluations (0 = only at the end); ref 100
    eval_models: int = 2  # fresh networks trained per evaluation (0 = no evaluation); ref 5
    eval_epochs: int = 300  # epochs each; ref 1000 (fewer keeps the periodic check cheap)
    checkpoint_every: int = 50  # iterations between checkpoints
    seed: int = 0
    device: str = "auto"


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise DistillError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise DistillError(f"Config file {path} is not valid TOML: {e}.") from None


def build(cls: type[T], *layers: dict[str, Any]) -> T:
    """Merge layers of settings (later wins, None means 'not given') into a frozen config."""
    names = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            k = k.replace("-", "_")
            if k not in names:
                raise DistillError(f"Unknown setting {k!r} for {cls.__name__}; valid: {', '.join(names)}.")
            if v is not None:
                values[k] = v
    return cls(**values)


def to_toml(cfg) -> str:
    """Serialise a flat config dataclass (str/int/float/bool/None values) as TOML."""
    lines = []
    for k, v in dataclasses.asdict(cfg).items():
        if v is None:
            continue  # TOML has no null; absence means the default
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {_toml_str(str(v))}")
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def save_toml(cfg, path: str | Path) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(to_toml(cfg))
