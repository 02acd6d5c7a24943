"""One MTT iteration's gradients as one pure function: vmapped over trajectories, captured on CUDA.

At 28x28 an inner step is a few hundred tiny kernels, and the GPU waits on
Python and on kernel launches, not on arithmetic. So the whole iteration (every
trajectory's unroll and its derivative) is written as one function of tensors,
in ``torch.func`` form, with no host synchronisation and no random draw inside:

- :func:`_student_step` is one SGD step of the student,
  ``θ - exp(log_lr) · ∇ℓ(θ; aug(x[idx]), y[idx])``, with ``torch.func.grad``;
- :func:`_trajectory` differentiates the matching loss of one trajectory, either
  through the whole unroll (``gradient="full"``, ``torch.func.grad`` of the
  unrolled loss) or by walking back one step at a time (``"checkpoint"``:
  ``torch.func.vjp`` of each step at the kept θ_k; memory independent of the
  number of steps, the same algebra as tests/oracles/checkpointed.py);
- :func:`_iteration` runs T trajectories at once through ``torch.func.vmap``
  (starts, targets ``(T, P)``, batch indices ``(T, S, B)``, augmentation
  parameters with leading dims ``(T, S, B)``) and sums them.

:class:`MatchingEngine` calls that function eagerly (any device; the CPU tests
run this path), or on CUDA captures it once per input shape as a CUDA graph
(optionally after ``torch.compile``) and replays the graph every iteration.
The full unroll with ``create_graph=True`` (:func:`.unroll.unroll_student`)
stays the oracle; tests/test_checkpointed.py compares every path with it.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..augment import Augment, AugParams, select
from ..config import FAST_MODES, GRADIENTS
from ..models import ParamSpec
from ..train import soft_cross_entropy
from .synthetic import soft_targets
from .unroll import UnrollPlan

log = logging.getLogger(__name__)

WARMUP = 3  # eager runs on a side stream before capture, as torch.cuda.graphs asks (cuDNN autotuning, lazy init)


class Matched(NamedTuple):
    """What :class:`MatchingEngine` returns for T trajectories; sums over them, all detached."""

    loss: torch.Tensor  # () sum of the normalised matching losses
    movement: torch.Tensor  # () sum of the movement ratios ||θ_S - θ_0|| / ||θ* - θ_0||
    images: torch.Tensor  # (N, C, H, W) d loss_sum / d images
    labels: torch.Tensor | None  # (N, K) d loss_sum / d logits; None with class ids
    log_lr: torch.Tensor  # () d loss_sum / d log step size
    ends: torch.Tensor  # (T, P) each student's final parameters


def _student_step(model: nn.Module, spec: ParamSpec, augment: Augment | None, temperature: float, idx: torch.Tensor,
                  aug: AugParams | None, theta: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                  log_lr: torch.Tensor) -> torch.Tensor:
    """θ_{k+1} for the batch ``idx`` (B,); ``labels`` are class ids (N,) or logits (N, K)."""
    # index_select, not images[idx]: its backward is an index_add, which needs no host synchronisation.
    x = images.index_select(0, idx)
    if augment is not None:
        x = augment.apply(x, aug)
    y = labels.index_select(0, idx)
    if y.is_floating_point():
        y = soft_targets(y, temperature)  # row-wise, so the same numbers as softmax over all logits, then indexing
    grad = torch.func.grad(lambda t: soft_cross_entropy(_forward(model, spec, t, x), y))(theta)
    return theta - log_lr.exp() * grad


def _forward(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network with parameters ``theta``; running statistics (batch norm) are updated on copies.

    A transform may not mutate a tensor from outside it, and a training-mode forward pass does not
    read the running statistics, so updating copies changes no output. Without buffers this is
    :func:`distill.models.flat_forward`.
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return torch.func.functional_call(model, {**spec.unflatten(theta), **buffers}, (x,))


def _trajectory(model: nn.Module, spec: ParamSpec, augment: Augment | None, temperature: float, gradient: str,
                start: torch.Tensor, target: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                log_lr: torch.Tensor, batches: torch.Tensor, aug: AugParams | None) -> tuple[torch.Tensor, ...]:
    """(loss, movement, d/d images, [d/d logits,] d/d log_lr, θ_S) of one trajectory; batches (S, B)."""
    soft = labels.is_floating_point()
    steps = batches.shape[0]

    def step(k: int, theta, x, z, a):
        return _student_step(model, spec, augment, temperature, batches[k], None if aug is None else select(aug, k),
                             theta, x, z, a)

    denom = (start - target).pow(2).sum()
    if gradient == "full":
        def objective(x, z, a):
            theta = start
            for k in range(steps):
                theta = step(k, theta, x, z, a)
            return (theta - target).pow(2).sum() / denom, theta

        if soft:
            grads, (loss, end) = torch.func.grad_and_value(objective, argnums=(0, 1, 2), has_aux=True)(
                images, labels, log_lr)
        else:
            grads, (loss, end) = torch.func.grad_and_value(lambda x, a: objective(x, labels, a), argnums=(0, 1),
                                                           has_aux=True)(images, log_lr)
    else:
        # Forward without keeping any graph, only θ_k; then back one step at a time: the pullback of
        # step k at θ_k turns g = ∂L/∂θ_{k+1} into ∂L/∂θ_k and adds step k's share to the learned inputs.
        kept = []
        theta = start
        for k in range(steps):
            kept.append(theta)
            theta = step(k, theta, images, labels, log_lr)
        end = theta
        loss = (end - target).pow(2).sum() / denom
        g = 2 * (end - target) / denom
        grads = None
        for k in range(steps - 1, -1, -1):
            if soft:
                _, pullback = torch.func.vjp(partial(step, k), kept[k], images, labels, log_lr)
            else:
                _, pullback = torch.func.vjp(lambda t, x, a, k=k: step(k, t, x, labels, a), kept[k], images, log_lr)
            g, *parts = pullback(g)
            grads = parts if grads is None else [s + p for s, p in zip(grads, parts)]
    movement = (end - start).norm() / (target - start).norm()
    return (loss, movement, *grads, end)


def _iteration(model: nn.Module, spec: ParamSpec, augment: Augment | None, temperature: float, gradient: str,
               vmapped: bool, starts: torch.Tensor, targets: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
               log_lr: torch.Tensor, batches: torch.Tensor, aug: AugParams | None) -> tuple[torch.Tensor, ...]:
    """Sums over T trajectories of :func:`_trajectory`'s outputs (and the stacked θ_S); starts (T, P), batches (T, S, B)."""
    fn = partial(_trajectory, model, spec, augment, temperature, gradient)
    if vmapped and len(starts) > 1:
        outs = torch.func.vmap(fn, in_dims=(0, 0, None, None, None, 0, None if aug is None else 0))(
            starts, targets, images, labels, log_lr, batches, aug)
    else:
        each = [fn(starts[j], targets[j], images, labels, log_lr, batches[j], None if aug is None else select(aug, j))
                for j in range(len(starts))]
        outs = [torch.stack(parts) for parts in zip(*each)]
    *sums, ends = outs
    return (*(s.sum(0) for s in sums), ends)


class MatchingEngine:
    """The matching loss and its gradients for T trajectories at once; one instance per run.

    ``fast``: "eager" calls the function; "graphs" captures it as one CUDA graph per input shape
    and replays it; "compile" runs it through torch.compile, then captures that; "auto" is
    "graphs" on CUDA and "eager" elsewhere. Off CUDA every mode runs eagerly. Where capturing
    fails the engine says so in one warning and stays eager.

    ``vmap``: run the trajectories through one ``torch.func.vmap`` (True) or a loop (False);
    None = vmap on CUDA, where it saves launches, and loop elsewhere, where the batched kernels
    are slower than a loop (docs/performance.md). Models with running statistics always loop.
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, augment: Augment | None, *, gradient: str = "full",
                 temperature: float = 1.0, fast: str = "auto", vmap: bool | None = None):
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}; got {gradient!r}.")
        if fast not in FAST_MODES:
            raise ValueError(f"fast must be one of {', '.join(FAST_MODES)}; got {fast!r}.")
        # vmap cannot update running statistics (batch norm) in place; such models loop over trajectories.
        self._can_vmap = next(model.buffers(), None) is None
        self.fast, self.vmap = fast, vmap
        self._fn = partial(_iteration, model, spec, augment, temperature, gradient)
        self._graphs: dict[tuple, tuple] = {}
        self._failed = False

    def mode(self, device: torch.device) -> str:
        """The mode this engine runs on ``device`` now ("eager" after a failed capture)."""
        if device.type != "cuda" or self._failed:
            return "eager"
        return "graphs" if self.fast == "auto" else self.fast

    def __call__(self, starts: torch.Tensor, targets: torch.Tensor, images: torch.Tensor, labels_or_logits: torch.Tensor,
                 log_lr: torch.Tensor, plans: UnrollPlan) -> Matched:
        """starts, targets: (T, P); images (N, C, H, W); class ids (N,) or logits (N, K); log_lr (); plans: T stacked."""
        args = (starts.detach(), targets.detach(), images.detach(), labels_or_logits.detach(), log_lr.detach(),
                plans.batches, plans.aug)
        device = images.device
        vmapped = self._can_vmap and (self.vmap if self.vmap is not None else device.type == "cuda")
        fn = partial(self._fn, vmapped)
        mode = self.mode(device)
        if mode != "eager":
            try:
                return self._pack(self._replay(fn, mode, args), labels_or_logits)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to the same math, eagerly
                self._failed = True
                self._graphs.clear()
                log.warning("Capturing the MTT iteration (%s) failed, so it runs eagerly (slower, same results): %s",
                            mode, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return self._pack(fn(*args), labels_or_logits)

    @staticmethod
    def _pack(outs, labels: torch.Tensor) -> Matched:
        if labels.is_floating_point():
            loss, movement, g_images, g_labels, g_log_lr, ends = outs
        else:
            (loss, movement, g_images, g_log_lr, ends), g_labels = outs, None
        return Matched(loss, movement, g_images, g_labels, g_log_lr, ends)

    def _replay(self, fn, mode: str, args: tuple) -> tuple[torch.Tensor, ...]:
        leaves, spec = tree_flatten(args)
        # A graph keeps the kernels it captured, so the TF32 switches are part of what it is.
        key = (tuple((t.shape, t.dtype, t.device) for t in leaves), str(spec), fn.args,
               torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if key not in self._graphs:
            self._graphs[key] = self._capture(fn, mode, args)
        graph, static_in, static_out = self._graphs[key]
        for dst, src in zip(tree_flatten(static_in)[0], leaves):
            dst.copy_(src)
        graph.replay()
        # Copies: the next replay overwrites the graph's outputs, and the caller keeps these (momentum, logs).
        return tuple(t.clone() for t in static_out)

    def _capture(self, fn, mode: str, args: tuple):
        fn = torch.compile(fn, dynamic=False) if mode == "compile" else fn
        static_in = tuple(None if a is None else type(a)(*(t.clone() for t in a)) if isinstance(a, tuple) else a.clone()
                          for a in args)
        device = args[2].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                fn(*static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(*static_in)
        return graph, static_in, static_out
