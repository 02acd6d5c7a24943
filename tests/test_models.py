"""Invariants over the whole model registry (as timm's tests/test_models.py) and the flat-vector path MTT uses."""
from __future__ import annotations

import copy

import pytest
import torch

from distill.models import ParamSpec, create_model, flat_forward, flatten_params, list_models, load_flat, param_spec
from distill.seeding import seeded

MEDMNIST_SIZE = 28
BATCH = 3  # > 1 so batch norm has statistics to compute


def _size_for(name: str) -> int:
    """MedMNIST's 28 px where the model accepts it; a depth-5 ConvNet needs 32 px."""
    return 32 if name == "convnet5" else MEDMNIST_SIZE


def _model(name: str, channels: int = 1, **kw):
    with seeded(0, 0):
        return create_model(name, 3, channels, _size_for(name), **kw)


def _input(name, channels=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = _size_for(name)
    return torch.randn(BATCH, channels, s, s, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_invariants(name, device):
    model = _model(name).to(device)
    x = _input(name).to(device).requires_grad_(True)
    out = model(x)
    assert out.shape == (BATCH, 3)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    # The prediction must depend on the image: a degenerate normalisation (instance norm over a
    # 1x1 map) makes the output constant and every gradient upstream of it zero.
    assert x.grad.abs().sum() > 0, f"{name}: the output does not depend on the input"
    with torch.no_grad():
        model.eval()
        other = model(_input(name, seed=1).to(device))
        same = model(x.detach())
    assert not torch.allclose(same, other, atol=1e-4), f"{name}: different images give the same logits"


@pytest.mark.parametrize("name", list_models())
def test_flat_vector_call_equals_module_call(name, device):
    model = _model(name).to(device)
    spec = param_spec(model)
    flat = flatten_params(model)
    assert flat.shape == (spec.total,) == (sum(p.numel() for p in model.parameters()),)
    x = _input(name).to(device)
    for train in (True, False):
        a, b = copy.deepcopy(model).train(train), copy.deepcopy(model).train(train)
        assert torch.allclose(flat_forward(a, spec, flat, x), b(x), atol=1e-5, rtol=1e-5)


def test_flat_forward_is_differentiable_and_load_flat_round_trips():
    model = create_model("convnet3", 2, 1, 8, width=8)
    spec = param_spec(model)
    flat = flatten_params(model).clone().requires_grad_(True)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    flat_forward(model, spec, flat, x).sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    moved = flat.detach() + 0.01
    load_flat(model, moved)
    assert torch.equal(flatten_params(model), moved)
    assert torch.allclose(model(x), flat_forward(model, spec, moved, x))
    assert spec.unflatten(moved)[spec.names[0]].shape == spec.shapes[0]
    assert isinstance(spec, ParamSpec) and len(spec.names) == len(list(model.parameters()))


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("depth", [3, 4, 5])
def test_convnet_family(norm, depth):
    size = 2 ** depth
    model = create_model(f"convnet{depth}", 2, 3, size, width=8, norm=norm)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert len(convs) == len(pools) == depth and all(c.out_channels == 8 for c in convs)
    norms = {"instance": torch.nn.GroupNorm, "batch": torch.nn.BatchNorm2d, "none": torch.nn.Identity}
    assert sum(isinstance(m, norms[norm]) for m in model.features) == depth
    assert model(torch.randn(2, 3, size, size)).shape == (2, 2)
    assert create_model("convnet", 2, 1, 8).features[0].out_channels == 128  # the reference width by default


def test_same_seed_same_initialisation():
    with seeded(3, 1):
        a = flatten_params(create_model("convnet3", 2, 1, 8, width=8))
    with seeded(3, 1):
        b = flatten_params(create_model("convnet3", 2, 1, 8, width=8))
    with seeded(3, 2):
        c = flatten_params(create_model("convnet3", 2, 1, 8, width=8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradcheck_float64_tiny_convnet():
    model = create_model("convnet3", 2, 1, 8, width=2).double()
    spec = param_spec(model)
    flat = flatten_params(model).clone().requires_grad_(True)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, i: flat_forward(model, spec, f, i), (flat, x))


@pytest.mark.parametrize("call, message", [
    (lambda: create_model("convnet7", 2, 1, 28), "Unknown model 'convnet7'; choose one of convnet, convnet3"),
    (lambda: create_model("convnet4", 2, 1, 8), "at least 16 pixels"),
    (lambda: create_model("convnet3", 1, 1, 28), "num_classes >= 2"),
    (lambda: create_model("convnet3", 2, 1, 28, norm="layer"), "Unknown norm 'layer'"),
    (lambda: create_model("resnet18", 2, 1, 8, norm="instance"), "at least 9 pixels"),
    (lambda: create_model("vgg11", 2, 1, 1), "at least 2 pixels"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_registry_lists_the_issue_models():
    assert {"convnet3", "convnet4", "convnet5", "resnet18", "vgg11"} <= set(list_models())
