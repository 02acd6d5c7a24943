"""Operator calls per MTT iteration and per expert step: a measure of overhead that needs no GPU.

At 28x28 the time of an MTT iteration is mostly the cost of dispatching small
operators (Python, the dispatcher, one kernel launch each), not their
arithmetic. :class:`OpCounter` counts the aten operators that reach the
dispatcher's backends (a ``TorchDispatchMode`` sees every one, including those
that autograd runs in the backward pass), so the count falls when the overhead
does, on any machine.

*Today's path* is the code of git 5bd3815: a Python loop over inner steps, each
step's augmentation drawn on the CPU by kornia-based DSA (kept here, frozen, as
:func:`_old_augment`) and copied to the device. *The new path* is
:class:`distill.mtt.engine.MatchingEngine`, eagerly. On CUDA the new path runs
as one replayed CUDA graph: a replay dispatches no aten operator for the work
inside the graph, only the copies of the inputs into the graph and of its
outputs out of it (:func:`captured_host_ops`).

Used by benchmarks/speed.py (``--sections opcount``) and tests/test_opcount.py.
"""
from __future__ import annotations

import collections
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The reference implementations live with the tests, outside the package (tests/oracles/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from distill.augment import Augment  # noqa: E402
from distill.models import create_model, flatten_params, param_spec  # noqa: E402
from distill.mtt.engine import MatchingEngine  # noqa: E402
from distill.mtt.unroll import make_plan, matching_loss, stack_plans, unroll_student  # noqa: E402
from distill.seeding import generator, seeded  # noqa: E402
from distill.train import TrainRecipe, soft_cross_entropy, train_network  # noqa: E402
from oracles.augment_reference import reference_call  # noqa: E402

DSA = "color,crop,cutout,flip,scale,rotate"


class OpCounter(TorchDispatchMode):
    """Counts aten operator calls dispatched while it is active; ``by_name`` per operator."""

    def __init__(self):
        super().__init__()
        self.by_name: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


def count_ops(fn) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


# ----------------------------------------------------------------------------- today's path (git 5bd3815), frozen

def _old_augment(transforms: tuple[str, ...], x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """distill/augment.py's ``Augment.__call__`` (mode "one") as of 5bd3815: CPU draws, kornia warp.

    tests/oracles/augment_reference.py keeps that implementation, unchanged, as ``reference_call``.
    """
    return reference_call(Augment(transforms=transforms), x, g)


class _OldAugment:
    """Today's augmentation behind the plan interface: ``apply(x, seed)`` draws with a generator seeded per step."""

    def __init__(self, transforms: tuple[str, ...]):
        self.transforms = transforms

    def apply(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return _old_augment(self.transforms, x, torch.Generator().manual_seed(seed))

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _old_augment(self.transforms, x, g)


@dataclass(frozen=True)
class _OldPlan:
    """5bd3815's plan: one (B,) index tensor on the CPU and one augmentation seed per step."""

    batches: tuple[torch.Tensor, ...]
    seeds: tuple[int, ...]

    @property
    def steps(self) -> int:
        return len(self.batches)

    def step(self, k: int):
        return self.batches[k], self.seeds[k]


def _old_plan(num_images: int, syn_steps: int, batch_syn: int, g: torch.Generator) -> _OldPlan:
    b = num_images if batch_syn <= 0 or batch_syn >= num_images else batch_syn
    batches, order = [], torch.empty(0, dtype=torch.long)
    while len(batches) < syn_steps:
        if len(order) < b:
            order = torch.cat([order, torch.randperm(num_images, generator=g)])
        batches.append(order[:b])
        order = order[b:]
    seeds = torch.randint(0, 2**62, (syn_steps,), generator=g).tolist()
    return _OldPlan(tuple(batches), tuple(int(s) for s in seeds))


# ----------------------------------------------------------------------------- the fixed small plan


@dataclass(frozen=True)
class Setting:
    """ConvNet-3 on 1x28x28, 2 classes x 10 images per class, 20 student steps, the whole set each step."""

    depth: int = 3
    width: int = 8  # the count does not depend on the width; 8 keeps the CPU work small
    channels: int = 1
    size: int = 28
    classes: int = 2
    ipc: int = 10
    syn_steps: int = 20
    batch_syn: int = 0
    expert_batch: int = 256


class Problem:
    """Model, synthetic set and T expert segments for one :class:`Setting`, on ``device``."""

    def __init__(self, s: Setting, trajectories: int, device: torch.device | str = "cpu", vmap: bool | None = True):
        self.s, self.device = s, torch.device(device)
        with seeded(0, 1):
            self.model = create_model("convnet", s.classes, s.channels, s.size, width=s.width,
                                      depth=s.depth).to(self.device)
        self.spec = param_spec(self.model)
        g = generator(0, 2)
        n = s.classes * s.ipc
        start = flatten_params(self.model)
        self.starts = torch.stack([start] * trajectories)
        self.targets = self.starts + 0.01 * torch.randn(self.starts.shape, generator=g).to(self.device)
        self.images = torch.randn(n, s.channels, s.size, s.size, generator=g).to(self.device)
        self.labels = (torch.arange(n) % s.classes).to(self.device)
        self.log_lr = torch.tensor(math.log(0.01), device=self.device)
        self.augment = Augment.parse(DSA)
        # By default vmapped over trajectories, as distill run does on CUDA (on a CPU it loops: vmap=None).
        self.engines = {mode: MatchingEngine(self.model, self.spec, self.augment, gradient=mode, fast="eager", vmap=vmap)
                        for mode in ("full", "checkpoint")}

    def old_iteration(self, it: int = 0) -> None:
        """One iteration of 5bd3815's default (``--gradient full``): T unrolls in a Python loop."""
        g = generator(0, 9, it)
        old_aug = _OldAugment(self.augment.transforms)
        for j in range(len(self.starts)):
            plan = _old_plan(len(self.images), self.s.syn_steps, self.s.batch_syn, g)
            x = self.images.detach().requires_grad_(True)
            log_lr = self.log_lr.detach().requires_grad_(True)
            end = unroll_student(self.model, self.spec, self.starts[j], x, self.labels, log_lr.exp(), plan, old_aug)
            torch.autograd.grad(matching_loss(end, self.starts[j], self.targets[j]), (x, log_lr))

    def new_iteration(self, gradient: str = "full", it: int = 0) -> None:
        """One iteration as ``distill run`` now runs it, eagerly: plans drawn on the device, one engine call."""
        g = generator(0, 9, it)
        plans = [make_plan(len(self.images), self.s.syn_steps, self.s.batch_syn, g, augment=self.augment,
                           size=(self.s.size, self.s.size), device=self.device) for _ in range(len(self.starts))]
        self.engines[gradient](self.starts, self.targets, self.images, self.labels, self.log_lr, stack_plans(plans))

    def captured_host_ops(self) -> int:
        """Operators a CUDA replay of :meth:`new_iteration`'s engine call dispatches on the host (by construction).

        One ``copy_`` per input tensor into the graph and one ``clone`` per output; the replay itself
        dispatches none. Counted from the engine's inputs and outputs, not measured (no GPU here).
        """
        g = generator(0, 9, 0)
        plans = [make_plan(len(self.images), self.s.syn_steps, self.s.batch_syn, g, augment=self.augment,
                           size=(self.s.size, self.s.size), device=self.device) for _ in range(len(self.starts))]
        plan = stack_plans(plans)
        inputs = tree_flatten((self.starts, self.targets, self.images, self.labels, self.log_lr, plan.batches,
                               plan.aug))[0]
        outputs = [t for t in self.engines["full"](self.starts, self.targets, self.images, self.labels, self.log_lr,
                                                   plan) if t is not None]
        return len(inputs) + len(outputs)

    def expert_step(self, old: bool) -> None:
        """One optimiser step on a batch of ``expert_batch`` images with DSA.

        New: ``train_network`` for one epoch of one batch (its per-epoch draw included). Old: 5bd3815's
        loop body, with the augmentation drawn on the CPU for the batch.
        """
        s = self.s
        g = generator(0, 5)
        x = torch.randn(s.expert_batch, s.channels, s.size, s.size, generator=g).to(self.device)
        y = (torch.arange(s.expert_batch) % s.classes).to(self.device)
        with seeded(0, 6):
            net = create_model("convnet", s.classes, s.channels, s.size, width=s.width, depth=s.depth).to(self.device)
        if not old:
            train_network(net, x, y, TrainRecipe(epochs=1, lr=0.01, batch_size=s.expert_batch, augment=self.augment), g)
            return
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        order = torch.randperm(len(x), generator=g).to(self.device)
        idx = order[:s.expert_batch]
        out = net(_OldAugment(self.augment.transforms)(x[idx], g))
        loss = soft_cross_entropy(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.item()), int((out.argmax(1) == y[idx]).sum())  # 5bd3815 read both every step


def opcounts(s: Setting = Setting(), trajectories: tuple[int, ...] = (1, 4)) -> list[dict]:
    """Rows ``{what, T, old, new_full, new_checkpoint, ...}`` of aten calls per iteration and per trajectory."""
    rows = []
    for t in trajectories:
        p = Problem(s, t)
        old = count_ops(p.old_iteration).total
        new = {mode: count_ops(lambda m=mode: p.new_iteration(m)).total for mode in ("full", "checkpoint")}
        rows.append({"what": "mtt_iteration", "T": t, "old": old, "new_full": new["full"],
                     "new_checkpoint": new["checkpoint"], "captured_host": p.captured_host_ops()})
    p = Problem(s, 1)
    rows.append({"what": "expert_step", "T": 1, "old": count_ops(lambda: p.expert_step(True)).total,
                 "new": count_ops(lambda: p.expert_step(False)).total})
    return rows
