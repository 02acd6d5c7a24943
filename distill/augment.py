"""Differentiable Siamese-style augmentation (DSA) on kornia, driven by an explicit generator.

Every random number is drawn on the CPU from the ``torch.Generator`` the caller
passes, then moved to the data's device, so the same seed gives the same
augmentation on any device and nothing touches the global RNG. All transforms
are differentiable with respect to the images, which MTT needs: gradients flow
through the augmentation into the synthetic pixels.

Geometry (crop as translation, scale, rotation) is one kornia affine warp.
Colour transforms are three lines of tensor code rather than kornia's colour
functions, because those assume RGB in [0, 1] while our inputs are normalised
(and possibly ZCA-whitened) tensors with any number of channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.geometry.transform import get_affine_matrix2d, warp_affine

TRANSFORMS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_TRANSFORMS = TRANSFORMS  # the reference DSA strategy color_crop_cutout_flip_scale_rotate

# Strengths of the reference DSA (Zhao & Bilen 2021), kept so results are comparable.
BRIGHTNESS = 1.0  # additive shift drawn from [-0.5, 0.5] * BRIGHTNESS
SATURATION = 2.0  # channel-mean blend factor drawn from [0, 2]
CONTRAST = 0.5  # contrast factor drawn from [0.5, 1.5]
CROP = 0.125  # translation of up to 1/8 of the image
CUTOUT = 0.5  # a square of half the image side is zeroed
SCALE = 1.2  # independent x/y scale in [1/1.2, 1.2]
ROTATE = 15.0  # degrees


@dataclass(frozen=True)
class Augment:
    """DSA with switchable transforms.

    ``mode="one"`` applies one transform, chosen at random, per call (the
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

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (N, C, H, W) float. Returns an augmented tensor of the same shape."""
        if not self.transforms or x.shape[0] == 0:
            return x
        if self.mode == "one":
            pick = int(torch.randint(len(self.transforms), (1,), generator=generator))
            chosen = (self.transforms[pick],)
        else:
            chosen = self.transforms
        if "color" in chosen:
            x = _color(x, generator)
        geo = [t for t in chosen if t in ("crop", "scale", "rotate", "flip")]
        if geo:
            x = _affine(x, generator, geo)
        if "cutout" in chosen:
            x = _cutout(x, generator)
        return x


def _rand(n: int, g: torch.Generator, like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(n, *shape, generator=g).to(device=like.device, dtype=like.dtype)


def _color(x, g):
    n = x.shape[0]
    x = x + (_rand(n, g, x, 1, 1, 1) - 0.5) * BRIGHTNESS
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_rand(n, g, x, 1, 1, 1) * SATURATION) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_rand(n, g, x, 1, 1, 1) + CONTRAST) + m


def _affine(x, g, which):
    n, _, h, w = x.shape
    dev, dt = x.device, x.dtype
    shift = torch.zeros(n, 2)
    scale = torch.ones(n, 2)
    angle = torch.zeros(n)
    if "crop" in which:
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * CROP * torch.tensor([w, h], dtype=torch.float32)
    if "scale" in which:
        scale = torch.rand(n, 2, generator=g) * (SCALE - 1 / SCALE) + 1 / SCALE
    if "rotate" in which:
        angle = (torch.rand(n, generator=g) * 2 - 1) * ROTATE
    if "flip" in which:
        flip = torch.rand(n, generator=g) < 0.5
        scale[:, 0] = torch.where(flip, -scale[:, 0], scale[:, 0])
    center = torch.tensor([(w - 1) / 2, (h - 1) / 2]).expand(n, 2)
    mat = get_affine_matrix2d(shift, center, scale, angle)[:, :2].to(device=dev, dtype=dt)
    return warp_affine(x, mat, dsize=(h, w), align_corners=True)


def _cutout(x, g):
    """Zero one square of side CUTOUT * image side per image, centred anywhere in the image."""
    n, _, h, w = x.shape
    ch, cw = max(1, round(h * CUTOUT)), max(1, round(w * CUTOUT))
    top = torch.randint(0, h, (n, 1, 1), generator=g) - ch // 2
    left = torch.randint(0, w, (n, 1, 1), generator=g) - cw // 2
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(device=x.device, dtype=x.dtype)
