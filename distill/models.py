"""Model registry: ConvNet family, ResNet-18 and VGG-11 for small medical images.

``create_model(name, num_classes, channels, size, **kw)`` builds any registered
model. Every model works with a flat parameter vector through
``torch.func.functional_call`` (see :func:`flat_forward`), which MTT needs.
Models know shapes, not files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# name -> {argument: allowed values}: the model arguments a share's recipe or a config may pass.
# A (low, high) pair of ints is an inclusive range; a tuple of strings lists the choices.
_KWARGS: dict[str, dict[str, tuple]] = {}

CONVNET_WIDTH = 128  # the reference MTT width; Li et al. use 128 for chest X-rays as well
NORMS = ("instance", "batch", "none")
# 16x the reference width: wide enough for any experiment we know of; a 28 px depth-3 ConvNet of
# this width holds about 0.4 billion parameters, which the cost check (distill/checks.py) bounds anyway.
MAX_CONVNET_WIDTH = 2048
MAX_CONVNET_DEPTH = 8  # halves the image 8 times: 256 px and up


def register_model(name: str, kwargs: dict[str, tuple] | None = None):
    """Register a model builder under ``name``; ``kwargs`` lists the arguments it accepts from a file."""
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"Model {name!r} is registered twice.")
        _REGISTRY[name] = fn
        _KWARGS[name] = dict(kwargs or {})
        return fn

    return deco


def check_model_kwargs(name: str, kwargs: object) -> None:
    """Refuse a model name outside the registry, or an argument outside its allow-list, with ``ValueError``.

    For arguments that come from a file (a share's recipe, a config): ``create_model`` itself
    accepts whatever the builder takes, including sizes that would exhaust the memory.
    """
    if name not in _REGISTRY:
        raise ValueError(f"names the unknown model {name!r}; this version knows {', '.join(list_models())}")
    if not isinstance(kwargs, dict):
        raise ValueError("has model_kwargs that are not a JSON object")
    allowed = _KWARGS[name]
    for key, value in kwargs.items():
        spec = allowed.get(key)
        if spec is None:
            known = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"passes model_kwargs.{key} to {name}, which accepts {known}")
        if isinstance(spec[0], int):
            low, high = spec
            if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
                raise ValueError(f"has model_kwargs.{key} = {value!r}; {name} takes an integer in {low}..{high}")
        elif value not in spec:
            raise ValueError(f"has model_kwargs.{key} = {value!r}; {name} takes one of {', '.join(spec)}")


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, channels: int, size: int, **kw) -> nn.Module:
    """Build a registered model. Unknown names raise ``ValueError`` listing the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(list_models())}.")
    if num_classes < 2 or channels < 1 or size < 1:
        raise ValueError(f"A model needs num_classes >= 2, channels >= 1 and size >= 1; got {num_classes}, {channels}, {size}.")
    return _REGISTRY[name](num_classes=num_classes, channels=channels, size=size, **kw)


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "instance":
        # GroupNorm with one group per channel is instance norm with affine weights, as in the MTT reference.
        return nn.GroupNorm(ch, ch, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Unknown norm {kind!r}; choose one of {', '.join(NORMS)}.")


class ConvNet(nn.Module):
    """depth x [conv3x3(width) -> norm -> ReLU -> avgpool2], then one linear layer."""

    def __init__(self, num_classes: int, channels: int, size: int, width: int = CONVNET_WIDTH, depth: int = 3,
                 norm: str = "instance"):
        super().__init__()
        if size >> depth < 1:
            raise ValueError(
                f"A depth-{depth} ConvNet halves the image {depth} times and needs images of at least "
                f"{2 ** depth} pixels; got {size}. Use a shallower ConvNet or a larger --size."
            )
        layers, ch = [], channels
        for _ in range(depth):
            layers += [nn.Conv2d(ch, width, 3, padding=1), _norm(norm, width), nn.ReLU(), nn.AvgPool2d(2)]
            # Not in place: Opacus' per-sample hooks (distill/dp.py) need the activations intact; same numbers.
            ch = width
        self.features = nn.Sequential(*layers)
        feat = size
        for _ in range(depth):
            feat //= 2
        self.classifier = nn.Linear(width * feat * feat, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def convnet_depth_for(size: int) -> int:
    """The ConvNet depth for ``size`` px images: 3 below 64 (28 px, the MTT reference), 4 below 128,
    5 from 128 on (Li et al.'s chest X-rays at 128 px use depth 5); 224 px keeps 5."""
    return 3 if size < 64 else 4 if size < 128 else 5


def resolve_model(name: str, size: int) -> str:
    """``convnet`` (depth by image size) -> ``convnetD``; any other name unchanged."""
    return f"convnet{convnet_depth_for(size)}" if name == "convnet" else name


_CONVNET_KWARGS = {"width": (1, MAX_CONVNET_WIDTH), "norm": NORMS}


@register_model("convnet", {**_CONVNET_KWARGS, "depth": (1, MAX_CONVNET_DEPTH)})
def convnet(num_classes, channels, size, **kw):
    kw.setdefault("depth", convnet_depth_for(size))
    return ConvNet(num_classes, channels, size, **kw)


for _d in (3, 4, 5):
    register_model(f"convnet{_d}", _CONVNET_KWARGS)(lambda num_classes, channels, size, _d=_d, **kw: ConvNet(num_classes, channels, size, depth=_d, **kw))


@register_model("resnet18", {"norm": ("batch", "instance")})
def resnet18(num_classes, channels, size, norm: str = "batch"):
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 28-128 px inputs."""
    import torchvision

    norm_layer = {"batch": nn.BatchNorm2d, "instance": lambda c: nn.GroupNorm(c, c)}.get(norm)
    if norm_layer is None:
        raise ValueError(f"resnet18 supports norm 'batch' or 'instance'; got {norm!r}.")
    # Three stride-2 stages shrink the map to ceil(size / 8); instance norm over a 1x1 map outputs
    # a constant, which would make the network ignore its input.
    if norm == "instance" and -(-size // 8) < 2:
        raise ValueError(f"resnet18 with instance norm needs images of at least 9 pixels; got {size}.")
    net = torchvision.models.resnet18(num_classes=num_classes, norm_layer=norm_layer)
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


MIN_NORM_MAP = 2  # instance norm needs more than one pixel per map to normalise anything
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 for small inputs: pooling stops before the map would drop below 2 pixels, then global average pooling.

    Why 2: instance norm over a 1x1 map subtracts the only value there and outputs a
    constant, so at 28 px (28-14-7-3-1) plain VGG pooling would make the last two
    blocks, and so the whole network, ignore the image.
    """

    def __init__(self, num_classes: int, channels: int, size: int, norm: str = "instance"):
        super().__init__()
        if norm == "instance" and size < MIN_NORM_MAP:
            raise ValueError(f"vgg11 with instance norm needs images of at least {MIN_NORM_MAP} pixels; got {size}.")
        layers, ch, s = [], channels, size
        for v in _VGG11:
            if v == "M":
                if s // 2 >= MIN_NORM_MAP:
                    layers.append(nn.MaxPool2d(2))
                    s //= 2
                continue
            layers += [nn.Conv2d(ch, v, 3, padding=1), _norm(norm, v), nn.ReLU()]
            ch = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg11", {"norm": NORMS})
def vgg11(num_classes, channels, size, **kw):
    return VGG11(num_classes, channels, size, **kw)


# ----------------------------------------------------------------------------- flat parameters


@dataclass(frozen=True)
class ParamSpec:
    """Order, names and shapes of a model's parameters inside a flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def total(self) -> int:
        return sum(self.numels)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: p.view(s) for n, p, s in zip(self.names, flat.split(self.numels), self.shapes)}


def param_spec(model: nn.Module) -> ParamSpec:
    named = list(model.named_parameters())
    return ParamSpec(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))


def flatten_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat vector into the model's parameters (in place)."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), flat.split([p.numel() for p in model.parameters()])):
            p.copy_(v.view_as(p))
    return model


def flat_forward(model: nn.Module, spec: ParamSpec, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` with parameters taken from ``flat`` (differentiably); buffers stay the module's."""
    return functional_call(model, spec.unflatten(flat), (x,))
