"""Differentiable Siamese augmentation (DSA) in one pass, with its randomness drawn on the device.

Design
------
At 28x28 the arithmetic of an augmentation is negligible; what costs is the
number of kernel launches and every wait of the CPU for the GPU. So the work is
split in two:

- :meth:`Augment.draw` draws the parameters of a whole batch (or of a whole
  unroll, ``steps=S``) at once, on the device of the ``torch.Generator`` it is
  given, with two random calls and no host synchronisation. It returns an
  :class:`AugParams`, a tuple of tensors.
- :meth:`Augment.apply` applies them with a fixed sequence of tensor operations:
  colour (three affine maps of the pixel values), one warp that does crop, scale,
  rotation and flip at once (one affine matrix per image, one ``grid_sample``),
  and cutout (a mask from the box compared with index grids). Which operations
  run depends only on the configured transforms, never on what was drawn: a
  transform that is off for an image (in ``"one"`` mode, say) gets neutral
  values — the identity matrix, colour (0, 1, 1), an empty box — instead of a
  skipped branch. So ``apply`` can be captured in a CUDA graph, compiled by
  ``torch.compile``, and vmapped over a leading trajectory dimension, and it is
  differentiable with respect to the images, which MTT needs.

Siamese: parameters are values, not a seed replayed through Python, so every use
of one :class:`AugParams` (the forward unroll and its backward replay, or the
same batch seen by several models) sees exactly the same transform.

``mode="one"`` picks one transform per draw (per step row with ``steps=S``): all
images of that draw share the choice, each image has its own parameters, as the
reference DSA does for MTT. ``mode="all"`` applies every configured transform.

Reproducibility: the draw follows the generator's device. The same seed gives
the same augmentation on the same device type; CPU and CUDA generators produce
different streams, so a CUDA run is reproducible on CUDA but differs from the
CPU run with that seed.

Colour is plain tensor code rather than kornia's colour functions, because those
assume RGB in [0, 1] while our inputs are normalised (possibly ZCA-whitened)
tensors with any number of channels. The warp is the same bilinear, zero-padded,
``align_corners=True`` resampling that kornia's ``warp_affine`` performs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

TRANSFORMS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_TRANSFORMS = TRANSFORMS  # the reference DSA strategy color_crop_cutout_flip_scale_rotate
GEOMETRIC = ("crop", "flip", "scale", "rotate")  # the transforms folded into the one affine warp

# Strengths of the reference DSA (Zhao & Bilen 2021), kept so results are comparable.
BRIGHTNESS = 1.0  # additive shift drawn from [-0.5, 0.5] * BRIGHTNESS
SATURATION = 2.0  # channel-mean blend factor drawn from [0, 2]
CONTRAST = 0.5  # contrast factor drawn from [0.5, 1.5]
CROP = 0.125  # translation of up to 1/8 of the image
CUTOUT = 0.5  # a square of half the image side is zeroed
SCALE = 1.2  # independent x/y scale in [1/1.2, 1.2]
ROTATE = 15.0  # degrees

# The one uniform draw per image has a column per scalar parameter. Each column belongs to a transform
# and maps u in [0, 1) to lo + span * u when its transform is on, or to its neutral value when it is off.
_COLUMNS = (  # name, transform, neutral
    ("shift_x", "crop", 0.0), ("shift_y", "crop", 0.0),  # pixels
    ("scale_x", "scale", 1.0), ("scale_y", "scale", 1.0),
    ("angle", "rotate", 0.0),  # degrees
    ("flip", "flip", 1.0),  # mirrored where < 0.5
    ("brightness", "color", 0.0), ("saturation", "color", 1.0), ("contrast", "color", 1.0),
    ("cut_y", "cutout", None), ("cut_x", "cutout", None),  # centre pixel = floor; neutral: the box at 0
    ("cut_on", "cutout", 0.0),  # 1 (lo 1, span 0) where cutout is on: it scales the box's side
)
_COL = {name: i for i, (name, _, _) in enumerate(_COLUMNS)}


class AugParams(NamedTuple):
    """The drawn parameters of one batch; all on one device, leading dimensions = the batch shape.

    matrix: (..., 2, 3) ``theta`` for :func:`torch.nn.functional.affine_grid` with ``align_corners=True``:
        it maps an output pixel's normalised coordinates ([-1, 1], x then y) to the input position
        sampled. Composes crop (translation), scale, rotation and flip; the identity where all are off.
    color: (..., 3) brightness shift, saturation factor, contrast factor; (0, 1, 1) where colour is off.
    cutout: (..., 4) box (y0, x0, y1, x1) in pixels, rows y0 <= y < y1 and columns x0 <= x < x1 are
        zeroed; the empty box (0, 0, 0, 0) where cutout is off.
    """

    matrix: torch.Tensor
    color: torch.Tensor
    cutout: torch.Tensor


def select(p: AugParams, k) -> AugParams:
    """``p[k]`` on every field, e.g. ``select(p, step)`` for one row of a ``steps=S`` draw."""
    return AugParams(*(t[k] for t in p))


def device_generator(seed_source: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` for :meth:`Augment.draw`, seeded by one draw from ``seed_source``.

    Callers hold a CPU generator per run (distill.seeding); one seed from it per training run keeps a
    CPU run bit-reproducible from the user's seed. A CUDA generator's stream differs from the CPU's,
    so the same seed gives another (equally reproducible) augmentation on CUDA.
    """
    seed = int(torch.randint(2**62, (1,), generator=seed_source, device=seed_source.device))
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class Augment:
    """DSA with switchable transforms.

    ``mode="one"`` applies one transform, chosen at random, per draw (the
    reference's behaviour for MTT); ``mode="all"`` applies every enabled one.
    Each image gets its own parameters.
    """

    transforms: tuple[str, ...] = DEFAULT_TRANSFORMS
    mode: str = "one"

    def __post_init__(self):
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            raise ValueError(f"Unknown augmentation {', '.join(bad)}; choose from {', '.join(TRANSFORMS)}.")
        if self.mode not in ("one", "all"):
            raise ValueError(f"Augmentation mode must be 'one' or 'all'; got {self.mode!r}.")

    @classmethod
    def parse(cls, text: str | None) -> "Augment | None":
        """'none' or '' -> None; 'color,crop,...' (or '_'-joined, as the reference) -> Augment."""
        if text is None or text.strip().lower() in ("", "none", "off"):
            return None
        parts = tuple(p.strip() for p in text.replace("_", ",").split(",") if p.strip())
        return cls(transforms=parts)

    def spec(self) -> str:
        return ",".join(self.transforms) + f";{self.mode}"

    def draw(self, n: int, generator: torch.Generator, size: tuple[int, int], *, steps: int | None = None,
             dtype: torch.dtype = torch.float32) -> AugParams:
        """Parameters for ``n`` images of ``size`` (H, W), on ``generator.device``.

        ``steps=None``: leading dimension (n,) and one ``"one"``-mode choice for the whole call.
        ``steps=S``: leading dimensions (S, n), one choice per step (row).
        Always two random calls, whatever the configuration, so the generator advances the same way.
        """
        h, w = int(size[0]), int(size[1])
        lead = (n,) if steps is None else (steps, n)
        dev = generator.device
        k = _constants(self.transforms, self.mode, h, w, dev, dtype)
        u = torch.rand(*lead, len(_COLUMNS), generator=generator, device=dev, dtype=dtype)
        # One "one"-mode choice per row, drawn whatever the mode, so the generator always advances alike.
        pick = torch.rand(*lead[:-1], 1, 1, generator=generator, device=dev, dtype=dtype)
        v = torch.addcmul(k.lo, u, k.span)
        if k.owner is not None:  # "one" mode: the columns of the chosen transform keep their values
            t = len(self.transforms)
            # floor(u * t), clamped because u * t can round up to t in low precision.
            choice = (pick * t).floor().clamp_(max=t - 1).long()
            on = k.kind[choice] == k.owner
            v = torch.where(on, v, k.neutral)
        elif k.static_on is not None:  # "all" mode with some transforms left out
            v = torch.where(k.static_on, v, k.neutral)

        c = _COL
        sx = torch.where(v[..., c["flip"]] < 0.5, -v[..., c["scale_x"]], v[..., c["scale_x"]])
        matrix = _normalised_inverse(v[..., c["shift_x"]:c["shift_y"] + 1], sx, v[..., c["scale_y"]],
                                     v[..., c["angle"]], h, w)
        color = v[..., c["brightness"]:c["contrast"] + 1]
        # Cutout: a square of side CUTOUT * side centred on a uniformly drawn pixel (as randint(0, side)).
        top_left = torch.minimum(v[..., c["cut_y"]:c["cut_x"] + 1].floor(), k.last_pixel) - k.half_side
        cutout = torch.cat([top_left, torch.addcmul(top_left, v[..., c["cut_on"], None], k.side)], dim=-1)
        return AugParams(matrix, color, cutout)

    def apply(self, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        """x: (n, C, H, W) float; ``p`` with leading dimension (n,), drawn for this (H, W). Same shape out.

        A fixed sequence of tensor operations for a given configuration, whatever was drawn.
        """
        if not self.transforms or x.shape[0] == 0:
            return x
        n, _, h, w = x.shape
        if "color" in self.transforms:
            bright, sat, con = p.color.to(x.dtype).view(n, 3, 1, 1, 1).unbind(1)
            x = x + bright
            m = x.mean(dim=1, keepdim=True)
            x = (x - m) * sat + m
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * con + m
        if any(t in self.transforms for t in GEOMETRIC):
            x = F.grid_sample(x, _grid(p.matrix.to(x.dtype), n, h, w), mode="bilinear", padding_mode="zeros",
                              align_corners=True)
        if "cutout" in self.transforms:
            y0, x0, y1, x1 = p.cutout.to(x.dtype).view(n, 4, 1, 1, 1).unbind(1)
            ys = torch.arange(h, device=x.device, dtype=x.dtype).view(h, 1)
            xs = torch.arange(w, device=x.device, dtype=x.dtype)
            x = x.masked_fill((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1), 0.0)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (N, C, H, W) float. Draws on ``generator.device`` and applies.

        Pass a generator on ``x``'s device: one from another device (a CPU generator for CUDA images,
        say) still works, at the price of one copy of the parameters per call.
        """
        if not self.transforms or x.shape[0] == 0:
            return x
        p = self.draw(len(x), generator, tuple(x.shape[-2:]), dtype=x.dtype)
        if p.matrix.device != x.device:
            p = AugParams(*(t.to(x.device) for t in p))
        return self.apply(x, p)


def _normalised_inverse(shift: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, angle: torch.Tensor,
                        h: int, w: int) -> torch.Tensor:
    """The ``affine_grid`` theta of kornia's ``get_affine_matrix2d(shift, centre, (sx, sy), angle)`` warp.

    That forward map, in pixels about the image centre c, is ``u -> R(angle) S(sx, sy) u + shift``.
    ``grid_sample`` needs the inverse, in coordinates normalised so that c is 0 and the borders are
    ±1 (``align_corners=True``): with D = diag((W-1)/2, (H-1)/2), theta = [D⁻¹ A⁻¹ D | −D⁻¹ A⁻¹ shift]
    where A⁻¹ = S⁻¹ R(−angle).
    """
    rad = angle * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    # As kornia's normalisation: a one-pixel side would divide by zero.
    dw, dh = max(w - 1, 1e-14) / 2, max(h - 1, 1e-14) / 2
    a00, a01 = cos / sx, sin / sx * (dh / dw)
    a10, a11 = -sin / sy * (dw / dh), cos / sy
    tx, ty = shift[..., 0] / dw, shift[..., 1] / dh
    row0 = torch.stack([a00, a01, -(a00 * tx + a01 * ty)], dim=-1)
    row1 = torch.stack([a10, a11, -(a10 * tx + a11 * ty)], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def _grid(theta: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (n, C, h, w), align_corners=True)`` as plain tensor code.

    ``affine_grid`` has no vmap batching rule (vmap falls back to a slow loop with a warning); a
    product with the base grid is the same arithmetic and vmaps, compiles and captures cleanly.
    """
    xs = torch.linspace(-1, 1, w, device=theta.device, dtype=theta.dtype)
    ys = torch.linspace(-1, 1, h, device=theta.device, dtype=theta.dtype)
    base = torch.stack([xs.expand(h, w), ys.view(h, 1).expand(h, w), torch.ones_like(xs).expand(h, w)], dim=-1)
    return (base.view(1, h * w, 3) @ theta.transpose(-1, -2)).view(n, h, w, 2)


class _Constants(NamedTuple):
    lo: torch.Tensor  # (columns,)
    span: torch.Tensor
    neutral: torch.Tensor
    kind: torch.Tensor | None  # "one" mode: the index in TRANSFORMS of each configured transform
    owner: torch.Tensor | None  # "one" mode: the index in TRANSFORMS of each column's transform
    static_on: torch.Tensor | None  # "all" mode: which columns are on, None when all are
    last_pixel: torch.Tensor  # (2,) H - 1, W - 1
    half_side: torch.Tensor  # (2,) the cutout square's half side, rounded down, in pixels
    side: torch.Tensor  # (2,) the cutout square's side


@functools.lru_cache(maxsize=64)
def _constants(transforms: tuple[str, ...], mode: str, h: int, w: int, device: torch.device,
               dtype: torch.dtype) -> _Constants:
    """The draw's constant tensors, made once per configuration and device (no host copy per draw)."""
    ch, cw = max(1, round(h * CUTOUT)), max(1, round(w * CUTOUT))
    ranges = {"shift_x": (-CROP * w, 2 * CROP * w), "shift_y": (-CROP * h, 2 * CROP * h),
              "scale_x": (1 / SCALE, SCALE - 1 / SCALE), "scale_y": (1 / SCALE, SCALE - 1 / SCALE),
              "angle": (-ROTATE, 2 * ROTATE), "flip": (0.0, 1.0),
              "brightness": (-0.5 * BRIGHTNESS, BRIGHTNESS), "saturation": (0.0, SATURATION),
              "contrast": (CONTRAST, 1.0), "cut_y": (0.0, float(h)), "cut_x": (0.0, float(w)), "cut_on": (1.0, 0.0)}
    # An off cutout keeps the empty box (0, 0, 0, 0): its centre sits at the half side, its side is 0.
    neutral_cut = {"cut_y": float(ch // 2), "cut_x": float(cw // 2)}

    def tensor(values):
        return torch.tensor(values, device=device, dtype=dtype)

    kind = owner = static_on = None
    if mode == "one" and len(transforms) > 1:
        # Through TRANSFORMS rather than positions in the configuration, so that a transform listed
        # twice is chosen twice as often, as the reference's pick among the list does.
        kind = torch.tensor([TRANSFORMS.index(t) for t in transforms], device=device)
        owner = torch.tensor([TRANSFORMS.index(t) for _, t, _ in _COLUMNS], device=device)
    elif not all(t in transforms for _, t, _ in _COLUMNS):
        static_on = torch.tensor([t in transforms for _, t, _ in _COLUMNS], device=device)
    return _Constants(
        lo=tensor([ranges[name][0] for name, _, _ in _COLUMNS]),
        span=tensor([ranges[name][1] for name, _, _ in _COLUMNS]),
        neutral=tensor([neutral_cut.get(name, value) for name, _, value in _COLUMNS]),
        kind=kind, owner=owner, static_on=static_on,
        last_pixel=tensor([h - 1.0, w - 1.0]), half_side=tensor([float(ch // 2), float(cw // 2)]),
        side=tensor([float(ch), float(cw)]))
