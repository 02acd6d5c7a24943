"""Differentiable, seeded DSA augmentation: each transform on its own, seeding, gradients."""
from __future__ import annotations

import pytest
import torch

from distill.augment import TRANSFORMS, Augment


def _x(n=6, c=1, s=8, dtype=torch.float32, seed=0):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_parse():
    assert Augment.parse("none") is None and Augment.parse("") is None and Augment.parse(None) is None
    assert Augment.parse("color_crop_cutout_flip_scale_rotate").transforms == TRANSFORMS
    assert Augment.parse(" flip , crop ").transforms == ("flip", "crop")
    with pytest.raises(ValueError, match="Unknown augmentation blur"):
        Augment.parse("flip,blur")
    with pytest.raises(ValueError, match="mode"):
        Augment(mode="some")


@pytest.mark.parametrize("mode", ["one", "all"])
def test_same_generator_state_same_output_and_global_rng_untouched(mode, device, dtype):
    aug = Augment(mode=mode)
    x = _x(dtype=dtype).to(device)
    state = torch.get_rng_state()
    a, b = aug(x, _g(1)), aug(x, _g(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == dtype
    outs = [aug(x, _g(s)) for s in range(2, 6)]
    assert any(not torch.allclose(a, o) for o in outs)


def test_device_does_not_change_the_draws(device):
    x = _x()
    assert torch.allclose(Augment(mode="all")(x, _g(3)), Augment(mode="all")(x.to(device), _g(3)).cpu(), atol=1e-5)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_transform_is_differentiable_gradcheck(name):
    aug = Augment(transforms=(name,))
    x = _x(n=2, s=6, dtype=torch.float64).requires_grad_(True)
    # A fresh generator per call: gradcheck evaluates the same random transform many times.
    assert torch.autograd.gradcheck(lambda t: aug(t, _g(7)), (x,))


def test_all_transforms_pass_gradient_to_every_image():
    x = _x().requires_grad_(True)
    Augment(mode="all")(x, _g(0)).square().sum().backward()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_flip_mirrors_or_keeps_each_image():
    x = _x(n=16)
    y = Augment(transforms=("flip",))(x, _g(0))
    kept = [torch.allclose(y[i], x[i], atol=1e-5) for i in range(16)]
    flipped = [torch.allclose(y[i], x[i].flip(-1), atol=1e-5) for i in range(16)]
    assert all(k != f for k, f in zip(kept, flipped))  # exactly one of the two per image
    assert any(kept) and any(flipped)  # 16 fair coins all equal: p = 2 ** -15


def test_crop_translates_with_zero_fill():
    # A shift of up to 1/8 of 16 px = 2 px: content leaves the frame, nothing is created, the centre stays.
    x = _x(n=8, s=16)
    y = Augment(transforms=("crop",))(x, _g(0))
    assert not torch.allclose(y, x)
    assert y.abs().sum() <= x.abs().sum() + 1e-4  # content can only leave the frame
    centre = slice(3, 13)
    assert torch.isfinite(y).all() and (y[..., centre, centre].abs().sum((1, 2, 3)) > 0).all()


def test_cutout_zeroes_one_square_and_keeps_the_rest():
    x = _x(n=8, s=8).abs() + 1  # no zeros of its own
    y = Augment(transforms=("cutout",))(x, _g(0))
    zeroed = y == 0
    assert zeroed.any(1).any() and (zeroed.flatten(1).sum(1) <= 16).all()  # at most a 4x4 square (half the side)
    assert torch.equal(y[~zeroed], x[~zeroed])


def test_color_on_grey_changes_brightness_and_contrast_only():
    x = _x(n=8)
    y = Augment(transforms=("color",))(x, _g(0))
    # Per image, colour is an affine map of the pixel values: a line fit explains it exactly.
    for xi, yi in zip(x.flatten(1), y.flatten(1)):
        a = torch.stack([xi, torch.ones_like(xi)], 1)
        coef = torch.linalg.lstsq(a, yi[:, None]).solution
        assert torch.allclose(a @ coef, yi[:, None], atol=1e-4)


def test_scale_and_rotate_keep_the_centre_pixel_value_for_a_constant_image():
    x = torch.ones(4, 1, 9, 9)
    for name in ("scale", "rotate"):
        y = Augment(transforms=(name,))(x, _g(0))
        assert torch.allclose(y[..., 4, 4], torch.ones(4, 1), atol=1e-5)


def test_mode_one_uses_a_single_transform_per_call():
    x = _x(n=4, s=8).abs() + 1
    aug = Augment(transforms=("flip", "cutout"))
    kinds = set()
    for seed in range(12):
        y = aug(x, _g(seed))
        has_zero = bool((y == 0).any())
        same_values = torch.allclose(torch.sort(y.flatten(1)).values, torch.sort(x.flatten(1)).values, atol=1e-5)
        assert has_zero != same_values  # cutout zeroes; a flip only permutes pixels
        kinds.add(has_zero)
    assert kinds == {True, False}


def test_empty_batch_and_empty_transform_list():
    assert Augment()(torch.zeros(0, 1, 8, 8), _g()).shape == (0, 1, 8, 8)
    x = _x()
    assert torch.equal(Augment(transforms=())(x, _g()), x)
