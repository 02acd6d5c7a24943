"""The DSA augmentation as it was before the one-pass rewrite of distill/augment.py, kept for comparison only.

tests/test_augment.py checks the new draws and outputs against it, and benchmarks/opcount.py counts its
operator calls. Parameters are drawn on the CPU, copied to the device, and each transform is its own pass
(kornia warp_affine). Not part of the installed package: nothing in distill/ uses it.
"""
from __future__ import annotations

import torch

from distill.augment import BRIGHTNESS, CONTRAST, CROP, CUTOUT, GEOMETRIC, ROTATE, SATURATION, SCALE, Augment

def reference_call(aug: Augment, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The pre-rewrite ``Augment.__call__``: x (N, C, H, W), a CPU generator."""
    if not aug.transforms or x.shape[0] == 0:
        return x
    if aug.mode == "one":
        pick = int(torch.randint(len(aug.transforms), (1,), generator=generator))
        chosen = (aug.transforms[pick],)
    else:
        chosen = aug.transforms
    if "color" in chosen:
        x = reference_color(x, generator)
    geo = [t for t in chosen if t in GEOMETRIC]
    if geo:
        from kornia.geometry.transform import warp_affine

        n, _, h, w = x.shape
        mat = reference_matrix(n, h, w, generator, geo).to(device=x.device, dtype=x.dtype)
        x = warp_affine(x, mat, dsize=(h, w), align_corners=True)
    if "cutout" in chosen:
        x = reference_cutout(x, generator)
    return x


def reference_rand(n: int, g: torch.Generator, like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(n, *shape, generator=g).to(device=like.device, dtype=like.dtype)


def reference_color(x, g):
    n = x.shape[0]
    x = x + (reference_rand(n, g, x, 1, 1, 1) - 0.5) * BRIGHTNESS
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (reference_rand(n, g, x, 1, 1, 1) * SATURATION) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (reference_rand(n, g, x, 1, 1, 1) + CONTRAST) + m


def reference_matrix(n: int, h: int, w: int, g: torch.Generator, which) -> torch.Tensor:
    """(n, 2, 3) forward affine matrices in pixels, for kornia's ``warp_affine``; drawn on the CPU."""
    from kornia.geometry.transform import get_affine_matrix2d

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
    return get_affine_matrix2d(shift, center, scale, angle)[:, :2]


def reference_cutout(x, g):
    """Zero one square of side CUTOUT * image side per image, centred anywhere in the image."""
    n, _, h, w = x.shape
    ch, cw = max(1, round(h * CUTOUT)), max(1, round(w * CUTOUT))
    top = torch.randint(0, h, (n, 1, 1), generator=g) - ch // 2
    left = torch.randint(0, w, (n, 1, 1), generator=g) - cw // 2
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(device=x.device, dtype=x.dtype)
