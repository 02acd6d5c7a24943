"""Arithmetic precision of the networks' work: ``--precision auto|fp32|bf16`` (buffer, run, eval).

bf16 runs the convolutions and matrix products under ``torch.autocast(..., dtype=torch.bfloat16)``.
Everything that is learned or accumulated stays float32: the networks' parameters (autocast casts
copies), the synthetic images, the label logits and the step size, the matching loss (computed on
float32 parameter vectors) and every optimiser state. On a CPU bf16 pays only where the processor
has it natively (AVX-512 BF16 or AMX: one conv double-backward at the ConvNet's shape took 65 ms
against 118 ms in fp32 on this project's Xeon, issue 28); elsewhere it is emulated and slower, so it
is refused there.

``auto`` is fp32 everywhere: bf16 is picked by default only where docs/performance.md shows that it
loses no accuracy on the CPU results rows, and those rows have not been measured in bf16 yet.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .config import PRECISIONS
from .errors import DistillError

CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
# What "auto" picks. fp32 until the CPU results rows are measured in bf16 at equal settings
# (docs/performance.md, "Precision"); then True where they show no accuracy loss.
AUTO_BF16 = False


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic in hardware (CUDA: compute capability 8 or later)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in CPU_BF16_FLAGS)


def resolve_precision(asked: str, device: torch.device, *, dp: bool = False) -> str:
    """``asked`` made concrete for ``device``: "fp32" or "bf16"; one sentence where bf16 cannot be had.

    ``dp``: DP experts (Opacus) train in float32; its per-sample gradients are not checked under autocast.
    """
    if asked not in PRECISIONS:
        raise DistillError(f"--precision must be one of {', '.join(PRECISIONS)}; got {asked!r}.")
    if asked == "fp32" or (asked == "auto" and (dp or not AUTO_BF16)):
        return "fp32"
    if dp:
        raise DistillError("DP experts (--dp-epsilon) train in float32: Opacus' per-sample gradients are not "
                           "checked under bf16 autocast; leave out --precision bf16.")
    if not native_bf16(device):
        if asked == "auto":
            return "fp32"
        raise DistillError(f"This {device.type.upper()} has no native bf16 arithmetic (on a CPU: no avx512_bf16 or "
                           "amx_bf16 flag), so bf16 would be emulated and slower; use --precision fp32.")
    return "bf16"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the networks' work runs in: bf16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
