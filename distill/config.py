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
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class RunConfig:
    """MTT distillation. Reference values (Cazenavette et al. 2022, CIFAR-10 IPC 10) are in comments."""

    buffer: str = "buffers"
    out: str = "runs/run"
    ipc: int = 10
    iterations: int = 1000  # reference 5000
    syn_steps: int = 20  # reference 30
    expert_epochs: int = 2  # snapshot intervals spanned by the target; reference 2 epochs
    min_start_epoch: int = 0
    max_start_epoch: int = 20  # reference 20
    init: str = "real"  # real | noise
    hard_labels: bool = False
    label_temperature: float = 1.0
    lr_img: float = 100.0  # reference 1000 with ZCA on CIFAR; 100 suits un-whitened 28x28 greyscale
    lr_lr: float = 1e-5  # reference 1e-5 (on the raw step size; ours acts on its log, see mtt/distiller.py)
    lr_label: float = 2.0  # soft-label logits (Li et al. 2022 soft-label MTT: 2 to 10)
    syn_lr_init: float = 0.01  # reference lr_teacher
    max_log_lr_step: float = 0.1  # bound on |change of log step size| per iteration (~10 %)
    momentum: float = 0.5  # reference
    batch_syn: int = 0  # 0 = the whole synthetic set each inner step (reference default)
    augment: str = "color,crop,cutout,flip,scale,rotate"
    gradient: str = "full"  # full (reference unroll, the oracle) | checkpoint (constant memory, exact)
    eval_every: int = 100
    eval_models: int = 2
    eval_epochs: int = 300
    checkpoint_every: int = 50
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
