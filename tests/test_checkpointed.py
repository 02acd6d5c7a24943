"""The constant-memory MTT gradient against the full-unroll oracle: every term, in fp32, and its memory."""
from __future__ import annotations

import pytest
import torch

from distill.augment import Augment
from distill.models import create_model, flatten_params, param_spec
from distill.mtt.engine import MatchingEngine
from distill.mtt.unroll import make_plan, matching_loss, stack_plans, unroll_student
from distill.seeding import generator, seeded
from oracles.checkpointed import CudaGraphSteps, matching_grads

N, CLASSES, SIZE = 20, 2, 8  # 2 classes x 10 images x 1x8x8
TOL = 1e-4  # the bound on the relative error against the full unroll in fp32
DSA = Augment.parse("color,crop,cutout,flip,scale,rotate")


def _setup(soft: bool, steps: int = 6, batch: int = 8, augment: Augment | None = DSA, dtype=torch.float32):
    with seeded(0, 1):
        model = create_model("convnet", CLASSES, 1, SIZE, width=8, depth=2).to(dtype)
    spec = param_spec(model)
    g = generator(0, 2)
    start = flatten_params(model)
    target = start + 0.02 * torch.randn(start.shape, generator=g, dtype=dtype)
    images = torch.randn(N, 1, SIZE, SIZE, generator=g, dtype=dtype)
    if soft:
        targets = torch.softmax(2 * torch.randn(N, CLASSES, generator=g, dtype=dtype), dim=1)
    else:
        targets = torch.arange(N) % CLASSES
    # A mini-batch smaller than the set, so steps see different, overlapping subsets.
    # The plan draws the augmentation (when there is one) from a generator seeded by g.
    plan = make_plan(N, steps, batch, g, augment=augment, size=(SIZE, SIZE), dtype=dtype)
    return model, spec, start, target, images, targets, torch.tensor(0.05, dtype=dtype), plan


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
    args = _setup(soft, augment=augment)
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
    model, spec, start, target, images, targets, lr, plan = _setup(False, augment=None)
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
        matching_grads(*_setup(False, augment=None), None, store="disk")


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


# ----------------------------------------------------------------------------- the engine distill run uses


def _oracle_logits(model, spec, start, target, images, labels, log_lr, plan, augment):
    """The oracle in the engine's variables: d/d images, d/d logits (soft) and d/d log step size."""
    x = images.clone().requires_grad_(True)
    z = labels.clone().requires_grad_(labels.is_floating_point())
    a = log_lr.clone().requires_grad_(True)
    targets = torch.softmax(z, dim=1) if z.requires_grad else z
    end = unroll_student(model, spec, start, x, targets, a.exp(), plan, augment)
    loss = matching_loss(end, start, target)
    inputs = [x, a] + ([z] if z.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), grads[0], grads[2] if z.requires_grad else None, grads[1], end.detach()


def _engine_problem(soft: bool, augment, trajectories: int, dtype=torch.float32, steps: int = 5):
    """One model and synthetic set; ``trajectories`` different (start, target, plan) triples."""
    model, spec, start, _, images, _, lr, _ = _setup(soft, augment=None, dtype=dtype)
    g = generator(0, 3)
    labels = 2 * torch.randn(N, CLASSES, generator=g, dtype=dtype) if soft else torch.arange(N) % CLASSES
    starts = torch.stack([start + 0.01 * torch.randn(start.shape, generator=g, dtype=dtype) for _ in range(trajectories)])
    targets = starts + 0.02 * torch.randn(starts.shape, generator=g, dtype=dtype)
    plans = [make_plan(N, steps, 8, g, augment=augment, size=(SIZE, SIZE), dtype=dtype) for _ in range(trajectories)]
    return model, spec, starts, targets, images, labels, lr.log(), plans


@pytest.mark.parametrize("gradient", ["full", "checkpoint"])
@pytest.mark.parametrize("soft", [False, True], ids=["class-ids", "soft-labels"])
@pytest.mark.parametrize("augment", [None, DSA], ids=["no-aug", "dsa"])
def test_engine_matches_the_full_unroll(gradient, soft, augment):
    model, spec, starts, targets, images, labels, log_lr, plans = _engine_problem(soft, augment, 1)
    want = _oracle_logits(model, spec, starts[0], targets[0], images, labels, log_lr, plans[0], augment)
    engine = MatchingEngine(model, spec, augment, gradient=gradient, fast="graphs")
    assert engine.mode(images.device) == "eager"  # off CUDA the function that would be captured runs eagerly
    got = engine(starts, targets, images, labels, log_lr, stack_plans(plans))
    assert _rel(got.loss, want[0]) < TOL and _rel(got.ends[0], want[4]) < TOL
    assert _rel(got.images, want[1]) < TOL and _rel(got.log_lr, want[3]) < TOL
    if soft:
        assert _rel(got.labels, want[2]) < TOL
    else:
        assert got.labels is None
    for t in got:
        assert t is None or (t.grad_fn is None and not t.requires_grad)


@pytest.mark.parametrize("gradient", ["full", "checkpoint"])
def test_engine_in_float64_equals_the_oracle_to_rounding(gradient):
    """Without fp32 rounding noise the two gradient modes and the oracle agree to 1e-10: the algebra is exact."""
    model, spec, starts, targets, images, labels, log_lr, plans = _engine_problem(True, DSA, 1, dtype=torch.float64)
    want = _oracle_logits(model, spec, starts[0], targets[0], images, labels, log_lr, plans[0], DSA)
    got = MatchingEngine(model, spec, DSA, gradient=gradient)(starts, targets, images, labels, log_lr, stack_plans(plans))
    for a, b in ((got.images, want[1]), (got.labels, want[2]), (got.log_lr, want[3])):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("gradient", ["full", "checkpoint"])
@pytest.mark.parametrize("soft", [False, True], ids=["class-ids", "soft-labels"])
def test_vmapped_trajectories_equal_the_sum_of_single_ones(gradient, soft):
    """T trajectories in one vmapped call give the sum of T one-trajectory calls, each equal to the oracle."""
    T = 3
    model, spec, starts, targets, images, labels, log_lr, plans = _engine_problem(soft, DSA, T)
    engine = MatchingEngine(model, spec, DSA, gradient=gradient, fast="eager", vmap=True)  # off CUDA it loops by default
    together = engine(starts, targets, images, labels, log_lr, stack_plans(plans))
    singles = [engine(starts[j:j + 1], targets[j:j + 1], images, labels, log_lr, stack_plans([plans[j]]))
               for j in range(T)]
    for j in range(T):
        want = _oracle_logits(model, spec, starts[j], targets[j], images, labels, log_lr, plans[j], DSA)
        assert _rel(singles[j].images, want[1]) < TOL and _rel(singles[j].log_lr, want[3]) < TOL
        assert _rel(together.ends[j], singles[j].ends[0]) < 1e-6
    fields = ["loss", "movement", "images", "log_lr"] + (["labels"] if soft else [])
    for name in fields:
        summed = sum(getattr(s, name) for s in singles)
        assert _rel(getattr(together, name), summed) < 1e-5, name
    # The trajectories differ, so a sum of T copies of one of them would not pass.
    assert _rel(together.images, T * singles[0].images) > 0.05


def test_a_model_with_running_statistics_loops_instead_of_vmapping():
    """Batch norm updates buffers in place, which vmap cannot; such a model still gets the summed gradients."""
    with seeded(0, 1):
        model = create_model("convnet", CLASSES, 1, SIZE, width=8, depth=2, norm="batch")
    assert next(model.buffers(), None) is not None
    _, _, starts, targets, images, labels, log_lr, plans = _engine_problem(False, None, 2)
    spec = param_spec(model)
    starts = torch.stack([flatten_params(model)] * 2)
    targets = starts + 0.01
    got = MatchingEngine(model, spec, None)(starts, targets, images, labels, log_lr, stack_plans(plans))
    want = [_oracle_logits(model, spec, starts[j], targets[j], images, labels, log_lr, plans[j], None) for j in range(2)]
    assert _rel(got.images, want[0][1] + want[1][1]) < TOL and _rel(got.log_lr, want[0][3] + want[1][3]) < TOL


def test_a_failed_capture_warns_once_and_runs_the_same_math_eagerly(monkeypatch, caplog):
    model, spec, starts, targets, images, labels, log_lr, plans = _engine_problem(True, DSA, 2)
    args = (starts, targets, images, labels, log_lr, stack_plans(plans))
    want = MatchingEngine(model, spec, DSA, fast="eager")(*args)
    engine = MatchingEngine(model, spec, DSA, fast="graphs")
    # Pretend to be on CUDA, where capturing is attempted, and let the capture fail.
    monkeypatch.setattr(engine, "mode", lambda device: "eager" if engine._failed else "graphs")

    def no_capture(fn, mode, a):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine, "_capture", no_capture)
    with caplog.at_level("WARNING", logger="distill.mtt.engine"):
        got = [engine(*args) for _ in range(3)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "runs eagerly" in warnings[0] and "not permitted" in warnings[0]
    for g in got:
        for a, b in zip(g, want):
            assert torch.equal(a, b)
