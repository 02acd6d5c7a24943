"""The constant-memory MTT gradient against the full-unroll oracle: every term, in fp32, and its memory."""
from __future__ import annotations

import pytest
import torch

from distill.augment import Augment
from distill.models import create_model, flatten_params, param_spec
from distill.mtt.checkpointed import CudaGraphSteps, matching_grads
from distill.mtt.unroll import make_plan, matching_loss, unroll_student
from distill.seeding import generator, seeded

N, CLASSES, SIZE = 20, 2, 8  # 2 classes x 10 images x 1x8x8
TOL = 1e-4  # the bound on the relative error against the full unroll in fp32
DSA = Augment.parse("color,crop,cutout,flip,scale,rotate")


def _setup(soft: bool, steps: int = 6, batch: int = 8):
    with seeded(0, 1):
        model = create_model("convnet", CLASSES, 1, SIZE, width=8, depth=2)
    spec = param_spec(model)
    g = generator(0, 2)
    start = flatten_params(model)
    target = start + 0.02 * torch.randn(start.shape, generator=g)
    images = torch.randn(N, 1, SIZE, SIZE, generator=g)
    if soft:
        targets = torch.softmax(2 * torch.randn(N, CLASSES, generator=g), dim=1)
    else:
        targets = torch.arange(N) % CLASSES
    # A mini-batch smaller than the set, so steps see different, overlapping subsets.
    plan = make_plan(N, steps, batch, g)
    return model, spec, start, target, images, targets, torch.tensor(0.05), plan


def _oracle(model, spec, start, target, images, targets, lr, plan, augment):
    x = images.clone().requires_grad_(True)
    y = targets.clone().requires_grad_(targets.is_floating_point())
    lr = lr.clone().requires_grad_(True)
    end = unroll_student(model, spec, start, x, y, lr, plan, augment)
    loss = matching_loss(end, start, target)
    inputs = [x, lr] + ([y] if y.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), grads[0], grads[2] if y.requires_grad else None, grads[1], end.detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("soft", [False, True], ids=["class-ids", "soft-labels"])
@pytest.mark.parametrize("augment", [None, DSA], ids=["no-aug", "dsa"])
def test_every_gradient_matches_the_full_unroll(soft, augment):
    args = _setup(soft)
    want = _oracle(*args, augment)
    loss, g_img, g_y, g_lr, end = matching_grads(*args, augment)
    assert _rel(loss, want[0]) < TOL and _rel(end, want[4]) < TOL
    assert _rel(g_img, want[1]) < TOL
    assert _rel(g_lr, want[3]) < TOL
    if soft:
        assert g_y.shape == want[2].shape and _rel(g_y, want[2]) < TOL
    else:
        assert g_y is None
    # Every synthetic image appears in some step, so every image gets a gradient.
    assert bool((g_img.flatten(1).abs().sum(1) > 0).all())
    assert all(t.grad_fn is None and not t.requires_grad for t in (loss, g_img, g_lr, end))


def test_a_wrong_factor_in_any_term_would_be_caught():
    """The oracle comparison is sharp enough to see a factor-2 slip (TESLA's reported bug) in any one term."""
    args = _setup(True)
    want = _oracle(*args, DSA)
    _, g_img, g_y, g_lr, _ = matching_grads(*args, DSA)
    for got, ref in ((g_img, want[1]), (g_y, want[2]), (g_lr, want[3])):
        assert _rel(2 * got, ref) > 0.5


def test_step_size_enters_as_a_tensor_and_is_not_mutated():
    model, spec, start, target, images, targets, lr, plan = _setup(False)
    lr = lr.clone().requires_grad_(True)
    before = (start.clone(), images.clone())
    matching_grads(model, spec, start, target, images, targets, lr, plan, None)
    assert torch.equal(start, before[0]) and torch.equal(images, before[1]) and lr.grad is None


@pytest.mark.parametrize("soft", [False, True], ids=["class-ids", "soft-labels"])
def test_graph_path_and_host_store_give_the_same_numbers(soft):
    """The CUDA-graph path (run eagerly off CUDA) splits the augmentation from the network step and
    carries the image gradient back through it by hand; that split must not change a number."""
    args = _setup(soft)
    plain = matching_grads(*args, DSA)
    graphs = CudaGraphSteps(args[0], args[1])
    for _ in range(2):  # the second call reuses what the first one built
        split = matching_grads(*args, DSA, graphs=graphs, store="host")
        for a, b in zip(plain, split):
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unknown_store_is_refused():
    with pytest.raises(ValueError, match="store must be one of"):
        matching_grads(*_setup(False), None, store="disk")


class _SavedBytes:
    """Peak bytes that autograd holds for backward at any moment (CPU stand-in for max_memory_allocated)."""

    def __init__(self):
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor):
        owner = self

        class Handle:
            def __init__(self, tensor):
                self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
                owner.now += self.size
                owner.peak = max(owner.peak, owner.now)

            def __del__(self):
                owner.now -= self.size

        return Handle(t)

    @staticmethod
    def unpack(h):
        return h.tensor


def _peak_saved(fn) -> int:
    meter = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        fn()
    return meter.peak


def test_graph_memory_does_not_grow_with_the_number_of_steps():
    short, long = _setup(True, steps=3), _setup(True, steps=12)
    ck = [_peak_saved(lambda a=a: matching_grads(*a, DSA)) for a in (short, long)]
    full = [_peak_saved(lambda a=a: _oracle(*a, DSA)) for a in (short, long)]
    # The measure can tell: the full unroll holds every step's graph, 4x the steps -> ~4x the bytes.
    assert full[1] > 3 * full[0]
    # One step's graph at a time, whatever the number of steps (every step has the same batch shape).
    assert ck[0] > 0 and ck[1] == ck[0]
    assert ck[1] < full[1] / 4
