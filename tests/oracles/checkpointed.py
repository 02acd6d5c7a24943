"""Exact MTT gradients in memory that does not grow with the number of inner steps.

The full unroll (:func:`distill.mtt.unroll.unroll_student`) keeps the double-backward graph
of every inner step alive until the matching loss is differentiated, so its
memory grows linearly with ``syn_steps`` (8.6 GiB for CIFAR-10 IPC 10 in the
reference, 78 GiB for 128x128 chest X-rays). Here the unroll runs twice:

1. forward, without a graph, keeping only the student's parameters θ_k (P floats a step);
2. backward, one step at a time, from the last step to the first. With
   ``g = ∂L/∂θ_{k+1}`` and ``θ_{k+1} = θ_k − lr ∇ℓ_k(θ_k, x_k, y_k)``:

   - ``∂L/∂θ_k  = g − lr · H_k g``        (Hessian-vector product)
   - ``∂L/∂x_k += −lr · ∂⟨∇ℓ_k, g⟩/∂x_k``  (images, through the augmentation)
   - ``∂L/∂y_k += −lr · ∂⟨∇ℓ_k, g⟩/∂y_k``  (soft labels)
   - ``∂L/∂lr  += −⟨∇ℓ_k, g⟩``

   All three products come from one double backward of the scalar ⟨∇ℓ_k, g⟩, so
   only one step's graph is alive at any time. This is the idea behind TESLA
   (Cui et al. 2023); each term here carries its factor exactly once, and
   ``tests/test_checkpointed.py`` checks every one against the full unroll.

Each step replays the plan's augmentation parameters, so step k sees the same
augmented batch in both passes and in the oracle.

This module is the per-step path: a Python loop over steps, each step's network
work optionally one CUDA graph (:class:`CudaGraphSteps`). ``distill run`` uses
:mod:`distill.mtt.engine`, the same algebra in ``torch.func`` form, vmapped over
trajectories and captured as one graph per iteration; the benchmarks keep this
path to compare against, so it lives in tests/oracles/, outside the package.

The θ_k kept between the passes cost ``syn_steps x P x 4`` bytes (1.2 MB a step
for convnet3 at 28x28, 2.4 MB for convnet5 at 128x128), against hundreds of MB
to GBs of activations for one step's double backward. ``store="host"`` keeps
them in (pinned) CPU memory instead, which makes device memory fully
independent of ``syn_steps``; docs/performance.md measures both.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from distill.augment import Augment, AugParams
from distill.models import ParamSpec
from distill.mtt.unroll import UnrollPlan, inner_loss

log = logging.getLogger(__name__)

STORES = ("device", "host")


def _step_grad(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               augment: Augment | None, aug: AugParams | None) -> torch.Tensor:
    """∇ℓ_k(θ_k) without a graph: the forward pass needs only the update, not its derivatives."""
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = inner_loss(model, spec, theta, x, y, augment, aug)
        (g,) = torch.autograd.grad(loss, theta)
    return g


def _step_vjp(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              augment: Augment | None, aug: AugParams | None, g_next: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For one step: (∇ℓ_k, H_k g, ∂⟨∇ℓ_k, g⟩/∂x_k, ∂⟨∇ℓ_k, g⟩/∂y_k or None for class ids).

    The graph built here lives only inside this call.
    """
    theta = theta.detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    soft = y.is_floating_point()
    y = y.detach().requires_grad_(soft)
    with torch.enable_grad():
        loss = inner_loss(model, spec, theta, x, y, augment, aug)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        inputs = [theta, x] + ([y] if soft else [])
        # allow_unused: a parameter can drop out of the second derivative (e.g. the last bias);
        # a missing term is a zero, not an error.
        outs = torch.autograd.grad((grad * g_next).sum(), inputs, allow_unused=True)
    hvp, gx = (o if o is not None else torch.zeros_like(i) for o, i in zip(outs[:2], inputs[:2]))
    gy = None
    if soft:
        gy = outs[2] if outs[2] is not None else torch.zeros_like(y)
    return grad.detach(), hvp, gx, gy


def _func_grad(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`_step_grad` without augmentation, in torch.func form (which torch.compile can trace)."""
    return torch.func.grad(lambda t: inner_loss(model, spec, t, x, y, None, None))(theta)


def _func_vjp(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              g_next: torch.Tensor):
    """:func:`_step_vjp` without augmentation, in torch.func form."""
    if y.is_floating_point():
        grad, pullback = torch.func.vjp(lambda t, xs, ys: _func_grad(model, spec, t, xs, ys), theta, x, y)
        return (grad, *pullback(g_next))
    grad, pullback = torch.func.vjp(lambda t, xs: _func_grad(model, spec, t, xs, y), theta, x)
    return (grad, *pullback(g_next), None)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    # One warm-up stream per device for every capture: libraries keep per-stream workspaces
    # (cuBLAS), so a fresh stream per capture would leave memory behind each time.
    return torch.cuda.Stream(device=device)


class CudaGraphSteps:
    """CUDA graphs of one inner step's gradient and of its vector-Jacobian product, captured once per shape.

    The small cases are latency-bound: a 28x28 step is ~200 tiny kernels whose launch costs more
    than their arithmetic. A captured graph launches them all at once. The augmentation stays
    eager, outside the graphs; the graphs take the augmented batch as input, and its gradient is
    carried back through the augmentation by autograd. :class:`.engine.MatchingEngine` captures a
    whole iteration instead.

    Keep one instance per model for a whole run and pass it to every :func:`matching_grads` call:
    capturing costs a few warm-up steps, replaying costs one launch. ``channels_last`` feeds the
    network NHWC images; ``compile`` runs the step through torch.compile before capturing it.

    All graphs of one instance share one memory pool. That is safe because every output of a
    replay is consumed (by kernels queued on the same stream) before the next replay of any of
    them, which is how :func:`matching_grads` uses them; don't hold on to a returned tensor.
    """

    WARMUP = 3  # eager runs on a side stream before capture, as torch.cuda.graphs asks (cuDNN autotuning, lazy init)

    def __init__(self, model: nn.Module, spec: ParamSpec, *, channels_last: bool = False, compile: bool = False):
        self.model, self.spec, self.channels_last = model, spec, channels_last
        self._grad: dict[tuple, tuple] = {}
        self._vjp: dict[tuple, tuple] = {}
        self._pool = None
        if compile:
            # The torch.func spelling of the same step, which torch.compile traces as a whole.
            self._grad_fn = torch.compile(functools.partial(_func_grad, model, spec), dynamic=False)
            self._vjp_fn = torch.compile(functools.partial(_func_vjp, model, spec), dynamic=False)
        else:
            self._grad_fn = lambda t, x, y: _step_grad(model, spec, t, x, y, None, None)
            self._vjp_fn = lambda t, x, y, g: _step_vjp(model, spec, t, x, y, None, None, g)

    @staticmethod
    def _key(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple:
        # A graph keeps the kernels it captured, so the TF32 switches are part of what it is.
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        return (theta.shape, theta.dtype, x.shape, x.dtype, y.shape, y.dtype, x.device, tf32)

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        # The graph reads its inputs from fixed addresses; copy_ into these converts the layout too.
        layout = torch.channels_last if self.channels_last and x.ndim == 4 else torch.contiguous_format
        return x.detach().clone(memory_format=layout)

    def _capture(self, fn, device: torch.device):
        """A callable that runs ``fn``'s kernels again and returns its (reused) outputs."""
        if device.type != "cuda":
            return fn  # no graphs off CUDA: the same code runs eagerly (this is how the CPU tests cover it)
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outs = fn()

        def replay():
            graph.replay()
            return outs

        return replay

    def _run(self, table: dict, fn, inputs: tuple[torch.Tensor, ...]):
        key = self._key(*inputs[:3])
        if key not in table:
            st = [self._static(t) for t in inputs]
            table[key] = (self._capture(lambda: fn(*st), inputs[1].device), st)
        run, st = table[key]
        for dst, src in zip(st, inputs):
            dst.copy_(src)
        return run()

    def grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇ℓ(θ) on the already augmented batch ``x``; the result is overwritten by the next call."""
        return self._run(self._grad, self._grad_fn, (theta, x, y))

    def vjp(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, g_next: torch.Tensor):
        """:func:`_step_vjp` on the already augmented batch ``x``; the results are overwritten by the next call."""
        return self._run(self._vjp, self._vjp_fn, (theta, x, y, g_next))


def matching_grads(model: nn.Module, spec: ParamSpec, start: torch.Tensor, target: torch.Tensor,
                   images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor, plan: UnrollPlan,
                   augment: Augment | None, *, store: str = "device", graphs: CudaGraphSteps | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The normalised matching loss and its exact gradients, in memory independent of ``plan.steps``.

    start, target: (P,) expert parameters θ*_t and θ*_{t+M}.
    images: (N, C, H, W) synthetic images in network space.
    targets: (N,) int64 class ids, or (N, K) float probabilities (then their gradient is returned).
    lr: scalar tensor, the student's step size.
    store: where the forward pass keeps θ_k ("device": fastest; "host": no device memory per step).
    graphs: a :class:`CudaGraphSteps` for ``model``: each step runs as a captured CUDA graph (eagerly off CUDA).

    Returns ``(loss, grad_images, grad_targets or None, grad_lr, student_end)``, all detached;
    the same numbers as differentiating :func:`distill.mtt.unroll.matching_loss` of the full unroll.
    """
    if store not in STORES:
        raise ValueError(f"store must be one of {', '.join(STORES)}; got {store!r}.")
    images, targets, lr = images.detach(), targets.detach(), lr.detach()
    soft = targets.is_floating_point()
    offload = store == "host" and start.device.type != "cpu"
    kept: list[torch.Tensor] = []
    theta = start.detach()
    for k in range(plan.steps):
        idx, aug = plan.step(k)
        if offload:
            # Pinned memory lets the copy overlap with the next step's kernels.
            buf = torch.empty(theta.shape, dtype=theta.dtype, pin_memory=True)
            kept.append(buf.copy_(theta, non_blocking=True))
        else:
            kept.append(theta)
        x, y = images[idx], targets[idx]
        if graphs is None:
            grad_k = _step_grad(model, spec, theta, x, y, augment, aug)
        else:
            with torch.no_grad():
                xa = augment.apply(x, aug) if augment is not None else x
            grad_k = graphs.grad(theta, xa, y)
        theta = theta - lr * grad_k
    student_end = theta

    denom = (start - target).pow(2).sum()
    loss = (student_end - target).pow(2).sum() / denom
    g = 2 * (student_end - target) / denom  # ∂L/∂θ_M

    grad_images = torch.zeros_like(images)
    grad_targets = torch.zeros_like(targets) if soft else None
    grad_lr = torch.zeros((), dtype=g.dtype, device=g.device)
    for k in range(plan.steps - 1, -1, -1):
        idx, aug = plan.step(k)
        theta_k = kept.pop().to(start.device, non_blocking=True)
        x, y = images[idx], targets[idx]
        if graphs is None:
            grad_k, hvp, gx, gy = _step_vjp(model, spec, theta_k, x, y, augment, aug, g)
        elif augment is None:
            grad_k, hvp, gx, gy = graphs.vjp(theta_k, x, y, g)
        else:
            # The graph stops at the augmented batch; autograd carries its gradient through the augmentation.
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                xa = augment.apply(x, aug)
            grad_k, hvp, gxa, gy = graphs.vjp(theta_k, xa.detach(), y, g)
            (gx,) = torch.autograd.grad(xa, x, gxa)
        grad_lr -= (grad_k * g).sum()
        # index_add_ rather than a full-size scatter through autograd: one batch's worth of memory.
        grad_images.index_add_(0, idx, gx, alpha=-1.0)
        if soft:
            grad_targets.index_add_(0, idx, gy, alpha=-1.0)
        g = g - lr * hvp
    # -lr was factored out of the per-step image and label terms above; apply it once.
    grad_images.mul_(lr)
    if grad_targets is not None:
        grad_targets.mul_(lr)
    return loss.detach(), grad_images, grad_targets, grad_lr, student_end.detach()
