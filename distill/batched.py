"""Train K networks of one architecture at once: one vmapped forward and backward for all of them.

Expert networks are small (convnet3 has 0.3 M parameters) and a batch of 256
tiny images does not fill a GPU; one expert at a time spends most of its time
launching kernels. Here the K experts' parameters are stacked along a new
leading dimension (``torch.func.stack_module_state``) and one
``vmap(functional_call)`` trains them together: each layer becomes one grouped
kernel for all K, and SGD updates all K with one foreach update.

The math per expert is that of :func:`distill.train.train_network` with the
same generator: the same batch order, the same augmentation, SGD with the same
momentum and weight decay (SGD is elementwise, so one update over stacked
tensors is K independent optimisers). Only floating-point summation order
differs (a grouped convolution sums in another order than a plain one), so
trajectories agree to rounding, which then grows slowly through training;
tests/test_batched.py states and checks the tolerance.

On CUDA the whole step (gather, augmentation with pre-drawn parameters, forward,
backward, SGD update) is one captured CUDA graph replayed every step
(:class:`BatchedStep`); elsewhere the same code runs eagerly. This module turns
on no reduced precision of its own: the TF32 switches keep torch's defaults (as
one expert at a time does), because the effect of more TF32 on the trajectories
has not been measured.

Optional bf16 autocast runs the forward pass in bfloat16 (the update stays in
fp32); that changes trajectories by far more than rounding and is off by default.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from .errors import DistillError
from .augment import AugParams, device_generator, select
from .train import TrainRecipe, epoch_augmentation, soft_cross_entropy

log = logging.getLogger(__name__)


class StackedModels:
    """K copies of one architecture with stacked parameters: ``params[name]`` is (K, *shape)."""

    def __init__(self, models: Sequence[nn.Module]):
        if not models:
            raise ValueError("StackedModels needs at least one model.")
        if any(True for m in models for _ in m.buffers()):
            # Running statistics (batch norm) would be updated in place inside vmap, which it cannot do.
            raise DistillError(
                f"Training experts in batches needs a model without buffers such as batch-norm statistics; "
                f"{type(models[0]).__name__} has some. Use --batch-experts 1 or an instance-norm model (e.g. convnet3)."
            )
        self.k = len(models)
        params, _ = stack_module_state(list(models))
        self.params: dict[str, torch.Tensor] = params
        # A parameter-less skeleton on the meta device: it supplies only the forward code.
        self._base = copy.deepcopy(models[0]).to("meta")

    def _forward_one(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._base, p, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (K, B, C, H, W), one batch per model -> logits (K, B, classes)."""
        return torch.vmap(self._forward_one)(self.params, x)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), the same batch for every model -> logits (K, B, classes)."""
        return torch.vmap(self._forward_one, in_dims=(0, None))(self.params, x)

    def flat(self) -> torch.Tensor:
        """(K, P) detached parameters, each row flat in ``named_parameters`` order (as :func:`flatten_params`)."""
        return torch.cat([p.detach().reshape(self.k, -1) for p in self.params.values()], dim=1)

    def train(self, mode: bool = True) -> None:
        self._base.train(mode)


def train_batched(
    models: Sequence[nn.Module],
    images: torch.Tensor,
    targets: torch.Tensor,
    recipe: TrainRecipe,
    generators: Sequence[torch.Generator],
    *,
    bf16: bool = False,
    capture: bool | None = None,
    after_step: Callable[[int, StackedModels], None] | None = None,
    after_epoch: Callable[[int, list[dict], StackedModels], None] | None = None,
) -> tuple[StackedModels, list[list[dict]]]:
    """Train ``len(models)`` networks with SGD at once, model i drawing its randomness from ``generators[i]``.

    images: (N, C, H, W) float32, preprocessed, on the models' device. targets: (N,) int64 or (N, K) float.
    The models are copied into a :class:`StackedModels` (the inputs are left untouched).
    ``capture``: run the step as a CUDA graph; None = on CUDA only (see :class:`BatchedStep`).
    ``after_step(step, stacked)`` runs after each optimiser step (1-based); ``after_epoch(epoch, stats, stacked)``
    after each epoch with one ``{"loss", "acc"}`` dict per model. Returns the trained stack and, per epoch,
    the list of per-model stats.
    """
    if len(generators) != len(models):
        raise ValueError(f"Need one generator per model; got {len(generators)} for {len(models)} models.")
    stacked = StackedModels(models)
    n = len(images)
    step_fn = BatchedStep(stacked, images, targets, recipe, bf16=bf16,
                          capture=images.device.type == "cuda" if capture is None else capture)
    # The same draws, in the same order per generator, as train_network: the augmentation's device
    # generator first, then per epoch a randperm and one augmentation draw for all its batches.
    aug_gens = [device_generator(g, images.device) for g in generators] if recipe.augment is not None else None
    step, history = 0, []
    stacked.train(True)
    for epoch in range(1, recipe.epochs + 1):
        orders = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(images.device)
        aug = None
        if aug_gens is not None:
            draws = [epoch_augmentation(recipe, g, images) for g in aug_gens]
            aug = AugParams(*(torch.stack(field) for field in zip(*draws)))  # (K, steps, batch, ...)
        decayed = recipe.decay_at_half and recipe.epochs > 1 and epoch > recipe.epochs // 2
        step_fn.start_epoch(recipe.lr * 0.1 if decayed else recipe.lr)  # as MultiStepLR(gamma=0.1) at epochs // 2
        for k, start in enumerate(range(0, n, recipe.batch_size)):
            idx = orders[:, start:start + recipe.batch_size]  # (K, B)
            step_fn(idx, select(aug, (slice(None), k, slice(0, idx.shape[1]))) if aug is not None else None)
            step += 1
            if after_step is not None:
                after_step(step, stacked)
        loss, correct = step_fn.totals()
        stats = [{"loss": lo / n, "acc": c / n} for lo, c in zip(loss, correct)]
        history.append(stats)
        if after_epoch is not None:
            after_epoch(epoch, stats, stacked)
    return stacked, history


class BatchedStep:
    """One SGD step of all K models: gather, augment, forward, backward, update, in place.

    SGD is written out (weight decay, momentum, step, as ``torch.optim.SGD`` with dampening 0 and no
    Nesterov) so that the whole step, update included, is tensor code with the learning rate in a
    device tensor: then one CUDA graph holds it. With ``capture`` the step is captured once per batch
    shape (the full batch and, when N is not a multiple of it, the short last one: a second graph, so
    no image is dropped or padded) after warm-up runs on a side stream whose effects are undone; each
    later step is a copy of the batch's indices and augmentation parameters into the graph's inputs and
    one replay. If capture fails, one warning and the same step runs eagerly. Off CUDA, ``capture``
    does the warm-up and undo but runs the eager step (there are no graphs): tests cover the logic there.
    """

    WARMUP = 2  # eager runs before capture, as torch.cuda.graphs asks (cuDNN autotuning, lazy init)

    def __init__(self, stacked: StackedModels, images: torch.Tensor, targets: torch.Tensor, recipe: TrainRecipe,
                 *, bf16: bool = False, capture: bool = False):
        self.stacked, self.images, self.targets, self.recipe, self.bf16 = stacked, images, targets, recipe, bf16
        self.hard = targets if targets.ndim == 1 else targets.argmax(1)
        self.names = list(stacked.params)
        self.params = [stacked.params[name] for name in self.names]
        self.momenta = [torch.zeros_like(p) for p in self.params] if recipe.momentum else []
        dev = images.device
        self.lr = torch.zeros((), device=dev)
        self.loss = torch.zeros(stacked.k, device=dev)
        self.correct = torch.zeros(stacked.k, device=dev)
        self.capture = capture
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None

        def losses(p, x, y):
            out = stacked._forward_one(p, x)
            return soft_cross_entropy(out, y), out

        self._vloss = torch.vmap(losses)
        self._vaug = torch.vmap(recipe.augment.apply) if recipe.augment is not None else None

    def start_epoch(self, lr: float) -> None:
        self.lr.fill_(lr)
        self.loss.zero_()
        self.correct.zero_()

    def totals(self) -> tuple[list[float], list[float]]:
        """Per model: the epoch's summed loss (over images) and number correct; reads the device once."""
        return self.loss.tolist(), self.correct.tolist()

    def _eager(self, idx: torch.Tensor, aug: AugParams | None) -> None:
        x = self.images[idx]  # (K, B, C, H, W)
        if aug is not None:
            x = self._vaug(x, aug)
        # No autocast cache: inside a captured graph it would keep casts of the weights of the capture.
        with torch.autocast(self.images.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            loss, out = self._vloss(dict(zip(self.names, self.params)), x, self.targets[idx])
        # The models' losses are independent, so d(sum)/d(params of i) = d(loss_i)/d(params of i).
        grads = torch.autograd.grad(loss.sum(), self.params)
        with torch.no_grad():
            r = self.recipe
            if r.weight_decay:
                grads = torch._foreach_add(grads, self.params, alpha=r.weight_decay)
            if r.momentum:
                torch._foreach_mul_(self.momenta, r.momentum)
                torch._foreach_add_(self.momenta, grads)
                grads = self.momenta
            torch._foreach_sub_(self.params, torch._foreach_mul(grads, self.lr))
            self.loss.add_(loss.detach().float() * idx.shape[1])
            self.correct.add_((out.argmax(2) == self.hard[idx]).sum(1))

    def __call__(self, idx: torch.Tensor, aug: AugParams | None) -> None:
        """idx: (K, B) image indices per model; aug: parameters with leading dims (K, B), or None."""
        if not self.capture:
            return self._eager(idx, aug)
        key = tuple(idx.shape)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(idx, aug)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to the same step, eagerly
                log.warning("CUDA graph capture of the expert step failed (%s: %s); training eagerly.",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.capture = False
                return self._eager(idx, aug)
        run, static_idx, static_aug = self._graphs[key]
        static_idx.copy_(idx)
        if aug is not None:
            for dst, src in zip(static_aug, aug):
                dst.copy_(src)
        run()

    def _state(self) -> list[torch.Tensor]:
        return [*self.params, *self.momenta, self.loss, self.correct]

    def _capture(self, idx: torch.Tensor, aug: AugParams | None):
        """Warm up on copies of this step's inputs, undo the warm-up's updates, capture; returns (run, inputs)."""
        static_idx = idx.clone()
        static_aug = AugParams(*(t.clone() for t in aug)) if aug is not None else None
        saved = [t.detach().clone() for t in self._state()]
        dev = self.images.device
        try:
            if dev.type != "cuda":
                for _ in range(self.WARMUP):
                    self._eager(static_idx, static_aug)
                return (lambda: self._eager(static_idx, static_aug)), static_idx, static_aug
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    self._eager(static_idx, static_aug)
            torch.cuda.current_stream(dev).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._eager(static_idx, static_aug)
            return graph.replay, static_idx, static_aug
        finally:
            # The warm-up trained for real: put every parameter, momentum and total back (after the side
            # stream's work, should a warm-up step have failed before the streams were joined).
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            with torch.no_grad():
                for t, s in zip(self._state(), saved):
                    t.copy_(s)


@torch.no_grad()
def predict_batched(stacked: StackedModels, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities (K, N, classes) of every model on the same images, in eval mode (as :func:`predict`)."""
    stacked.train(False)
    try:
        chunks = [torch.softmax(stacked.forward_shared(images[i:i + batch_size]), dim=2)
                  for i in range(0, len(images), batch_size)]
    finally:
        stacked.train(True)
    if not chunks:
        return torch.empty(stacked.k, 0, 0, device=images.device)
    return torch.cat(chunks, dim=1)
