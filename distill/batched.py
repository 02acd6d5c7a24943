"""Train K networks of one architecture at once: one vmapped forward and backward for all of them.

Expert networks are small (convnet3 has 0.3 M parameters) and a batch of 256
tiny images does not fill a GPU; one expert at a time spends most of its time
launching kernels. Here the K experts' parameters are stacked along a new
leading dimension (``torch.func.stack_module_state``) and one
``vmap(functional_call)`` trains them together: each layer becomes one grouped
kernel for all K, and SGD updates all K with one foreach update.

The math per expert is that of :func:`distill.train.train_network` with the
same generator: the same batch order, the same augmentation, SGD with the same
momentum and weight decay (SGD is elementwise, so one optimiser over stacked
tensors is K independent optimisers). Only floating-point summation order
differs (a grouped convolution sums in another order than a plain one), so
trajectories agree to rounding, which then grows slowly through training;
tests/test_batched.py states and checks the tolerance.

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
from .train import TrainRecipe, soft_cross_entropy

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
    after_step: Callable[[int, StackedModels], None] | None = None,
    after_epoch: Callable[[int, list[dict], StackedModels], None] | None = None,
) -> tuple[StackedModels, list[list[dict]]]:
    """Train ``len(models)`` networks with SGD at once, model i drawing its randomness from ``generators[i]``.

    images: (N, C, H, W) float32, preprocessed, on the models' device. targets: (N,) int64 or (N, K) float.
    The models are copied into a :class:`StackedModels` (the inputs are left untouched).
    ``after_step(step, stacked)`` runs after each optimiser step (1-based); ``after_epoch(epoch, stats, stacked)``
    after each epoch with one ``{"loss", "acc"}`` dict per model. Returns the trained stack and, per epoch,
    the list of per-model stats.
    """
    if len(generators) != len(models):
        raise ValueError(f"Need one generator per model; got {len(generators)} for {len(models)} models.")
    stacked = StackedModels(models)
    k, n = stacked.k, len(images)
    opt = torch.optim.SGD(stacked.params.values(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    sched = None
    if recipe.decay_at_half and recipe.epochs > 1:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[recipe.epochs // 2], gamma=0.1)
    hard = targets if targets.ndim == 1 else targets.argmax(1)

    def losses(p, x, y):
        out = stacked._forward_one(p, x)
        return soft_cross_entropy(out, y), out

    vloss = torch.vmap(losses)
    step, history = 0, []
    stacked.train(True)
    for epoch in range(1, recipe.epochs + 1):
        # The same draws, in the same order per generator, as train_network: randperm first, then
        # one augmentation per batch.
        orders = [torch.randperm(n, generator=g) for g in generators]
        orders = torch.stack(orders).to(images.device)
        # Loss and accuracy stay on the device until the epoch ends: a .item() per step would make the
        # CPU wait for the GPU at every step.
        tot_loss = torch.zeros(k, device=images.device)
        tot_correct = torch.zeros(k, device=images.device)
        for start in range(0, n, recipe.batch_size):
            idx = orders[:, start:start + recipe.batch_size]  # (K, B)
            x = images[idx]  # (K, B, C, H, W)
            if recipe.augment is not None:
                x = torch.stack([recipe.augment(x[i], generators[i]) for i in range(k)])
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, out = vloss(stacked.params, x, targets[idx])
            opt.zero_grad(set_to_none=True)
            # The experts' losses are independent, so d(sum)/d(params of i) = d(loss_i)/d(params of i).
            loss.sum().backward()
            opt.step()
            step += 1
            with torch.no_grad():
                tot_loss += loss.detach().float() * idx.shape[1]
                tot_correct += (out.argmax(2) == hard[idx]).sum(1).float()
            if after_step is not None:
                after_step(step, stacked)
        if sched is not None:
            sched.step()
        stats = [{"loss": float(lo) / n, "acc": float(c) / n} for lo, c in zip(tot_loss.tolist(), tot_correct.tolist())]
        history.append(stats)
        if after_epoch is not None:
            after_epoch(epoch, stats, stacked)
    return stacked, history


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
