"""Checks that several stages run before any training, so a mistake costs seconds, not hours.

The cost of a model is estimated on PyTorch's ``meta`` device, where tensors have shapes but no
storage: a recipe that asks for a billion-parameter network is refused before a byte of it is
allocated (docs/share-format.md, "Receiving a share").
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import limits as L
from .errors import DistillError, FormatError
from .models import check_model_kwargs, create_model

log = logging.getLogger(__name__)

FLOAT_BYTES = 4  # float32 everywhere a recipient trains
# Per parameter during training: the weights, their gradient, SGD's momentum buffer and one
# temporary of the update; a rough but safe multiple.
PARAM_COPIES = 4
# Activations: every module's output is kept for the backward pass, which makes a gradient of
# each, so twice the forward outputs.
ACTIVATION_COPIES = 2
# One SGD step costs about three forward passes (forward, and a backward of twice its work).
STEP_FORWARDS = 3


@dataclass(frozen=True)
class ModelCost:
    """What one network costs, estimated from shapes alone."""

    params: int
    activation_bytes: int  # per image, kept for the backward pass (ACTIVATION_COPIES x the forward outputs)
    flops: int  # per image, one forward pass (2 per multiply-add of the convolutions and linear layers)


def estimate_model(name: str, num_classes: int, channels: int, size: int, model_kwargs: dict | None = None) -> ModelCost:
    """Parameters, activation memory and forward FLOPs of a registered model, built on the meta device.

    Raises ``ValueError`` for an unknown name, an argument outside the model's allow-list, or a
    model that cannot take these images.
    """
    kwargs = dict(model_kwargs or {})
    check_model_kwargs(name, kwargs)
    with torch.device("meta"):
        model = create_model(name, num_classes, channels, size, **kwargs)
    outputs, flops = [0], [0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            outputs[0] += output.numel()
            if isinstance(module, nn.Conv2d):
                k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                flops[0] += 2 * output.numel() * k
            elif isinstance(module, nn.Linear):
                flops[0] += 2 * output.numel() * module.in_features

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model(torch.empty(1, channels, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(params=params, activation_bytes=ACTIVATION_COPIES * FLOAT_BYTES * outputs[0], flops=flops[0])


def check_model_cost(cost: ModelCost, batch_size: int, what: str) -> None:
    """Refuse a model above :data:`limits.MAX_PARAMS` or a batch above :data:`limits.MAX_ACTIVATION_BYTES`."""
    if cost.params > L.MAX_PARAMS:
        raise DistillError(f"{what} builds a network of {cost.params:,} parameters, more than the limit of "
                           f"{L.MAX_PARAMS:,}; the recipe's model or model_kwargs are too large.")
    if cost.activation_bytes * batch_size > L.MAX_ACTIVATION_BYTES:
        raise DistillError(f"{what} needs about {_gib(cost.activation_bytes * batch_size)} of activations per batch "
                           f"of {batch_size}, more than the limit of {_gib(L.MAX_ACTIVATION_BYTES)}; the recipe's "
                           "batch_size or model_kwargs are too large.")


def check_model_builds(name: str, num_classes: int, channels: int, size: int, model_kwargs: dict | None = None, *,
                       what: str | None = None, batch_size: int = 1) -> ModelCost:
    """Estimate the model's cost, refuse it above the limits, then build it once and throw it away.

    An unknown name, bad arguments, too small images or a build that runs out of memory raise
    :class:`DistillError` with one sentence, prefixed by ``what`` (default: the model's name).
    Returns the estimated cost.
    """
    what = what or f"Model {name}"
    try:
        cost = estimate_model(name, num_classes, channels, size, model_kwargs)
    except (ValueError, TypeError) as e:
        raise DistillError(f"{what} cannot be built for these images: {str(e).rstrip('.')}.") from None
    check_model_cost(cost, batch_size, what)
    try:
        create_model(name, num_classes, channels, size, **(model_kwargs or {}))
    except (ValueError, TypeError) as e:
        raise DistillError(f"{what} cannot be built for these images: {e}") from None
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_out_of_memory(e):
            raise
        raise DistillError(f"{what} ran out of memory while being built ({cost.params:,} parameters); choose a "
                           "smaller model or free some memory.") from None
    return cost


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "failed to allocate" in text \
        or "can't allocate memory" in text or "not enough memory" in text


def check_share_recipe(share, where: str) -> ModelCost:
    """A received share's recipe against the cost limits, before anything is built (``distill inspect``).

    ``share``: a loaded :class:`distill.formats.share.Share`, whose reader has checked the recipe's
    epochs, batch size, model name and model arguments already. Over a limit is a
    :class:`FormatError` that says the share is invalid.
    """
    r, pre = share.recipe, share.preprocessing
    try:
        cost = estimate_model(r.model, share.num_classes, pre.channels, pre.size, r.model_kwargs)
        check_model_cost(cost, min(r.batch_size, share.num_images), f"{where}: its recipe")
    except (ValueError, TypeError) as e:
        raise FormatError(f"{where}: its recipe cannot build {r.model} for its images ({str(e).rstrip('.')}); "
                          "the share is invalid.") from None
    except DistillError as e:
        raise FormatError(f"{str(e).rstrip('.')}; the share is invalid (limits: docs/share-format.md).") from None
    return cost


# ----------------------------------------------------------------------------- time and memory of an evaluation


def free_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on ``device`` (MemAvailable on a CPU), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


BENCH_SIDE = 256  # matmul side of the speed probe: small enough for any device, large enough to be timed
BENCH_SECONDS = 0.05


def device_flops(device: torch.device) -> float:
    """Float32 multiply-add speed of ``device`` in FLOP/s, from a short matmul probe (about 0.05 s).

    Convolutions of small images rarely run faster than a dense matmul, so a time estimated from
    this is on the short side: a refusal based on it is safe.
    """
    a = torch.randn(BENCH_SIDE, BENCH_SIDE, device=device)
    n, t0 = 0, time.perf_counter()
    while True:
        a @ a
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if dt >= BENCH_SECONDS:
            return 2 * BENCH_SIDE ** 3 * n / dt


@dataclass(frozen=True)
class EvalEstimate:
    hours: float  # training time at the probed speed: a lower bound (see device_flops)
    bytes: int  # peak memory of one training run: data, network, optimiser and one batch's activations


def estimate_eval(rows: list[tuple[int, int, int]], runs: int, cost: ModelCost, data_bytes: int,
                  flops_per_second: float) -> EvalEstimate:
    """Time and memory of training ``runs`` networks per row; each row is (images, epochs, batch_size)."""
    work = sum(runs * epochs * images * STEP_FORWARDS * cost.flops for images, epochs, _ in rows)
    batch = max((min(images, b) for images, _, b in rows), default=1)
    peak = data_bytes + PARAM_COPIES * FLOAT_BYTES * cost.params + cost.activation_bytes * batch
    return EvalEstimate(hours=work / max(flops_per_second, 1.0) / 3600, bytes=peak)


def check_eval_budget(est: EvalEstimate, max_hours: float, free: int | None) -> None:
    """Refuse, with the estimate, an evaluation above ``max_hours`` or the free memory."""
    if est.hours > max_hours:
        raise DistillError(f"This evaluation would train for at least {_hours(est.hours)} on this device (estimated from "
                           f"its speed), more than "
                           f"--max-hours {max_hours:g}; lower --epochs or --runs, drop a baseline, or raise --max-hours.")
    if free is not None and est.bytes > free:
        raise DistillError(f"This evaluation needs about {_gib(est.bytes)} of memory but {_gib(free)} is free; "
                           "lower --size, choose a smaller model or free some memory.")
    log.info("Estimated: %s of training, %s of memory (%s free).", _hours(est.hours), _gib(est.bytes),
             _gib(free) if free is not None else "unknown")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def _hours(h: float) -> str:
    return f"{h:.3g} h" if h >= 0.1 else f"{h * 3600:.3g} s"
