"""DSA in one pass: the draw against today's path (distribution), outputs for fixed parameters,
gradients, seeding, vmap, and no host synchronisation."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill import augment as A
from distill.augment import TRANSFORMS, Augment, AugParams, select
from oracles import augment_reference as R


def _x(n=6, c=1, s=8, dtype=torch.float32, seed=0):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _g(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _neutral(n, h, w, dtype=torch.float32):
    return AugParams(torch.eye(2, 3, dtype=dtype).expand(n, 2, 3), torch.tensor([0.0, 1.0, 1.0], dtype=dtype).expand(n, 3),
                     torch.zeros(n, 4, dtype=dtype))


def _pixel_forward(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(…, 2, 3) forward matrices in pixels (kornia's warp_affine convention) from affine_grid thetas."""
    th = torch.cat([theta.double(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(*theta.shape[:-2], 1, 3)],
                   dim=-2)
    to_norm = torch.tensor([[2 / (w - 1), 0, -1], [0, 2 / (h - 1), -1], [0, 0, 1]], dtype=torch.float64)
    return torch.linalg.inv(torch.linalg.inv(to_norm) @ th @ to_norm)[..., :2, :]


def _decompose(m: torch.Tensor, h: int, w: int) -> dict[str, torch.Tensor]:
    """shift (x, y) px, |scale| (x, y), angle in degrees and mirrored, from forward pixel matrices R S u + shift."""
    a, c = m[..., :2], torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=m.dtype)
    shift = m[..., 2] - c + a @ c
    sx, sy = a[..., :, 0].norm(dim=-1), a[..., :, 1].norm(dim=-1)
    sign = a[..., 1, 1].sign()  # cos(angle) > 0 for |angle| <= 15 degrees; a mirror negates column 0 only
    mirrored = a[..., 0, 0] * sign < 0
    angle = torch.atan2(a[..., 1, 0] * torch.where(mirrored, -1.0, 1.0), a[..., 0, 0] * torch.where(mirrored, -1.0, 1.0))
    return {"shift": shift, "sx": sx, "sy": sy, "angle": angle * 180 / math.pi, "mirrored": mirrored}


def _uniform_moments(values: torch.Tensor, lo: float, hi: float, tol: float):
    """Mean and std of a uniform [lo, hi], within ``tol`` of the range; every value inside it."""
    values = values.double().flatten()
    span = hi - lo
    assert values.min() >= lo - 1e-5 and values.max() <= hi + 1e-5
    assert values.min() < lo + 0.01 * span and values.max() > hi - 0.01 * span  # the whole range is used
    assert abs(float(values.mean()) - (lo + hi) / 2) < tol * span
    assert abs(float(values.std()) - span / math.sqrt(12)) < tol * span


# --- the API -------------------------------------------------------------------------------------------


def test_parse():
    assert Augment.parse("none") is None and Augment.parse("") is None and Augment.parse(None) is None
    assert Augment.parse("color_crop_cutout_flip_scale_rotate").transforms == TRANSFORMS
    assert Augment.parse(" flip , crop ").transforms == ("flip", "crop")
    with pytest.raises(ValueError, match="Unknown augmentation blur"):
        Augment.parse("flip,blur")
    with pytest.raises(ValueError, match="mode"):
        Augment(mode="some")


@pytest.mark.parametrize("steps", [None, 4])
def test_draw_shapes_device_dtype_and_select(steps, device):
    p = Augment().draw(5, _g(0, device), (8, 10), steps=steps, dtype=torch.float64)
    lead = (5,) if steps is None else (steps, 5)
    assert [tuple(t.shape) for t in p] == [(*lead, 2, 3), (*lead, 3), (*lead, 4)]
    assert all(t.device.type == device.type and t.dtype == torch.float64 for t in p)
    if steps is not None:
        row = select(p, 2)
        assert all(torch.equal(r, t[2]) for r, t in zip(row, p))


def test_transforms_that_are_off_get_neutral_values():
    h, w = 8, 8
    flip = Augment(transforms=("flip",), mode="all").draw(64, _g(0), (h, w))
    neutral = _neutral(64, h, w)
    assert torch.equal(flip.color, neutral.color) and torch.equal(flip.cutout, neutral.cutout)
    mirrored = flip.matrix[:, 0, 0] < 0
    assert mirrored.any() and (~mirrored).any()
    assert torch.allclose(flip.matrix[~mirrored], neutral.matrix[~mirrored])
    assert torch.allclose(flip.matrix[mirrored], torch.tensor([[-1.0, 0, 0], [0, 1, 0]]).expand(int(mirrored.sum()), 2, 3))
    colour = Augment(transforms=("color", "cutout"), mode="all").draw(64, _g(0), (h, w))
    assert torch.equal(colour.matrix, neutral.matrix)
    assert not torch.equal(colour.color, neutral.color) and not torch.equal(colour.cutout, neutral.cutout)


def test_one_mode_shares_the_choice_within_a_step_and_changes_it_across_steps():
    p = Augment().draw(8, _g(0), (8, 8), steps=60)
    color_on = (p.color != torch.tensor([0.0, 1.0, 1.0])).any(-1)  # (60, 8)
    cut_on = (p.cutout != 0).any(-1)
    assert ((color_on == color_on[:, :1]).all() and (cut_on == cut_on[:, :1]).all())
    assert 0 < int(color_on[:, 0].sum()) < 60 and 0 < int(cut_on[:, 0].sum()) < 60
    assert not (color_on & cut_on).any()
    # Each image of a step has its own parameters.
    rows = color_on[:, 0]
    assert (p.color[rows][:, 0] != p.color[rows][:, 1]).all()


# --- (a) the draw follows today's distribution ---------------------------------------------------------


def test_geometric_draws_match_todays_ranges_and_matrices():
    n, h, w = 20000, 8, 12
    aug = Augment(transforms=("crop", "flip", "scale", "rotate"), mode="all")
    new = _pixel_forward(aug.draw(n, _g(0), (h, w)).matrix, h, w)
    old = R.reference_matrix(n, h, w, _g(1), aug.transforms).double()
    # Today's path and the new one: every matrix entry has the same mean and spread.
    # 20000 draws: the standard error of a mean is std / 141, so 5% of a std is a 5-sigma margin.
    assert ((new.mean(0) - old.mean(0)).abs() <= 0.05 * old.std(0)).all()
    assert ((new.std(0) / old.std(0) - 1).abs() < 0.05).all()
    p = _decompose(new, h, w)
    _uniform_moments(p["shift"][:, 0], -A.CROP * w, A.CROP * w, 0.01)
    _uniform_moments(p["shift"][:, 1], -A.CROP * h, A.CROP * h, 0.01)
    _uniform_moments(p["sx"], 1 / A.SCALE, A.SCALE, 0.01)
    _uniform_moments(p["sy"], 1 / A.SCALE, A.SCALE, 0.01)
    _uniform_moments(p["angle"], -A.ROTATE, A.ROTATE, 0.01)
    assert abs(float(p["mirrored"].double().mean()) - 0.5) < 0.015
    # The decomposition reads today's matrices the same way.
    q = _decompose(old, h, w)
    _uniform_moments(q["angle"], -A.ROTATE, A.ROTATE, 0.01)
    _uniform_moments(q["sx"], 1 / A.SCALE, A.SCALE, 0.01)


def test_colour_and_cutout_draws_are_within_todays_ranges():
    n, h, w = 20000, 8, 10
    p = Augment(transforms=("color", "cutout"), mode="all").draw(n, _g(0), (h, w))
    _uniform_moments(p.color[:, 0], -0.5 * A.BRIGHTNESS, 0.5 * A.BRIGHTNESS, 0.01)
    _uniform_moments(p.color[:, 1], 0.0, A.SATURATION, 0.01)
    _uniform_moments(p.color[:, 2], A.CONTRAST, A.CONTRAST + 1, 0.01)
    ch, cw = round(h * A.CUTOUT), round(w * A.CUTOUT)
    assert torch.equal(p.cutout[:, 2] - p.cutout[:, 0], torch.full((n,), float(ch)))
    assert torch.equal(p.cutout[:, 3] - p.cutout[:, 1], torch.full((n,), float(cw)))
    cy, cx = p.cutout[:, 0] + ch // 2, p.cutout[:, 1] + cw // 2
    # Today: the centre is randint(0, side), every pixel equally likely.
    for centre, side in ((cy, h), (cx, w)):
        assert torch.equal(centre, centre.round()) and centre.min() == 0 and centre.max() == side - 1
        freq = torch.bincount(centre.long(), minlength=side).double() / n
        assert torch.allclose(freq, torch.full((side,), 1 / side, dtype=torch.float64), atol=0.01)


@pytest.mark.parametrize("transforms", [("color",), ("cutout",), TRANSFORMS])
def test_output_statistics_match_todays_path(transforms):
    """Per pixel, mean and spread of many augmentations of one image: today's path against the new one."""
    n = 4000
    x = _x(n=1, c=3, s=8, seed=5).expand(n, 3, 8, 8)
    aug = Augment(transforms=transforms, mode="all")
    new = aug(x, _g(0))
    old = R.reference_call(aug, x, _g(1))
    # Per pixel, 5 standard errors of the difference of two means of n draws (192 pixels: no false alarms).
    stderr = ((new.var(0) + old.var(0)) / n).sqrt()
    assert ((new.mean(0) - old.mean(0)).abs() <= 5 * stderr + 1e-6).all()
    scale = float(old.std(0).mean())
    assert (new.std(0) - old.std(0)).abs().max() < 0.1 * scale
    assert torch.allclose((new == 0).double().mean(0), (old == 0).double().mean(0), atol=0.04)


def test_one_mode_picks_each_transform_equally_often():
    s = 12000
    p = Augment().draw(1, _g(0), (8, 8), steps=s)
    m = _pixel_forward(p.matrix[:, 0], 8, 8)
    d = _decompose(m, 8, 8)
    seen = Counter()
    seen["color"] = int((p.color[:, 0] != torch.tensor([0.0, 1.0, 1.0])).any(-1).sum())
    seen["cutout"] = int((p.cutout[:, 0] != 0).any(-1).sum())
    seen["crop"] = int((d["shift"].abs() > 1e-4).any(-1).sum())
    seen["scale"] = int(((d["sx"] - 1).abs() > 1e-4).sum())
    seen["rotate"] = int((d["angle"].abs() > 1e-4).sum())
    seen["mirrored"] = int(d["mirrored"].sum())
    # A drawn flip that keeps the image (half of them) looks like nothing at all.
    seen["identity"] = s - sum(seen.values())
    for name, count in seen.items():
        want = 1 / 12 if name in ("mirrored", "identity") else 1 / 6
        assert abs(count / s - want) < 0.02, (name, count / s)


def test_one_mode_counts_a_transform_listed_twice_twice():
    p = Augment(transforms=("crop", "crop")).draw(1, _g(0), (8, 8), steps=200)
    assert (p.matrix[:, 0, :, 2].abs().sum(-1) > 0).all()  # crop every time, as the reference's pick
    p = Augment(transforms=("crop", "crop", "color")).draw(1, _g(0), (8, 8), steps=3000)
    crop_rate = float((p.matrix[:, 0, :, 2].abs().sum(-1) > 0).double().mean())
    assert abs(crop_rate - 2 / 3) < 0.04


# --- (b) outputs for fixed parameters equal today's per-transform outputs -------------------------------


def test_colour_equals_todays_for_the_same_numbers():
    x = _x(n=5, c=3)
    g = _g(3)
    draws = torch.Generator().manual_seed(3)
    b, s, c = (torch.rand(5, 1, 1, 1, generator=draws).flatten() for _ in range(3))
    color = torch.stack([(b - 0.5) * A.BRIGHTNESS, s * A.SATURATION, c + A.CONTRAST], dim=-1)
    p = _neutral(5, 8, 8)._replace(color=color)
    got = Augment(transforms=("color",)).apply(x, p)
    assert torch.equal(got, R.reference_color(x, g))


def test_cutout_equals_todays_for_the_same_numbers():
    x = _x(n=7, s=8).abs() + 1
    draws = torch.Generator().manual_seed(4)
    top = torch.randint(0, 8, (7,), generator=draws) - 2
    left = torch.randint(0, 8, (7,), generator=draws) - 2
    box = torch.stack([top, left, top + 4, left + 4], dim=-1).float()
    got = Augment(transforms=("cutout",)).apply(x, _neutral(7, 8, 8)._replace(cutout=box))
    assert torch.equal(got, R.reference_cutout(x, _g(4)))


@pytest.mark.parametrize("which", [("crop",), ("scale",), ("rotate",), ("flip",), ("crop", "flip", "scale", "rotate")])
def test_one_warp_equals_kornias_for_the_same_numbers(which):
    from kornia.geometry.transform import warp_affine

    n, c, h, w = 6, 2, 9, 12
    x = _x(n=n, c=c, s=12)[..., :h, :]
    want = warp_affine(x, R.reference_matrix(n, h, w, _g(5), which), dsize=(h, w), align_corners=True)
    # The same numbers, in today's draw order.
    draws = _g(5)
    shift, scale, angle = torch.zeros(n, 2), torch.ones(n, 2), torch.zeros(n)
    if "crop" in which:
        shift = (torch.rand(n, 2, generator=draws) * 2 - 1) * A.CROP * torch.tensor([w, h])
    if "scale" in which:
        scale = torch.rand(n, 2, generator=draws) * (A.SCALE - 1 / A.SCALE) + 1 / A.SCALE
    if "rotate" in which:
        angle = (torch.rand(n, generator=draws) * 2 - 1) * A.ROTATE
    if "flip" in which:
        scale[:, 0] = torch.where(torch.rand(n, generator=draws) < 0.5, -scale[:, 0], scale[:, 0])
    theta = A._normalised_inverse(shift, scale[:, 0], scale[:, 1], angle, h, w)
    got = Augment(transforms=which).apply(x, _neutral(n, h, w)._replace(matrix=theta))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(A._grid(theta, n, h, w), torch.nn.functional.affine_grid(theta, [n, c, h, w], align_corners=True),
                          atol=1e-6)


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


# --- (c) gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_transform_is_differentiable_gradcheck(name):
    aug = Augment(transforms=(name,))
    x = _x(n=2, s=6, dtype=torch.float64).requires_grad_(True)
    # A fresh generator per call: gradcheck evaluates the same random transform many times.
    assert torch.autograd.gradcheck(lambda t: aug(t, _g(7)), (x,))


def test_apply_with_every_transform_is_differentiable_gradcheck():
    aug = Augment(mode="all")
    p = aug.draw(3, _g(2), (6, 6), dtype=torch.float64)
    x = _x(n=3, c=2, s=6, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, p), (x,))


def test_all_transforms_pass_gradient_to_every_image():
    x = _x().requires_grad_(True)
    Augment(mode="all")(x, _g(0)).square().sum().backward()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()


# --- (d) seeding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["one", "all"])
def test_same_generator_state_same_output_and_global_rng_untouched(mode, device, dtype):
    aug = Augment(mode=mode)
    x = _x(dtype=dtype).to(device)
    state = torch.get_rng_state()
    a, b = aug(x, _g(1, device)), aug(x, _g(1, device))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == dtype and a.device == x.device
    outs = [aug(x, _g(s, device)) for s in range(2, 6)]
    assert any(not torch.allclose(a, o) for o in outs)


def test_a_steps_draw_is_reproducible_and_seed_dependent():
    aug = Augment()
    a, b, c = (aug.draw(4, _g(s), (8, 8), steps=5) for s in (1, 1, 2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


# --- (e) vmap over a leading trajectory dimension -------------------------------------------------------


def test_vmap_over_steps_equals_a_loop():
    aug = Augment(mode="all")
    s, n = 3, 4
    p = aug.draw(n, _g(0), (8, 8), steps=s)
    xs = torch.randn(s, n, 2, 8, 8, generator=_g(1))
    loop = torch.stack([aug.apply(xs[i], select(p, i)) for i in range(s)])
    assert torch.allclose(torch.vmap(aug.apply)(xs, p), loop, atol=1e-6)
    # The same images under every step's parameters (the unroll's case).
    shared = torch.stack([aug.apply(xs[0], select(p, i)) for i in range(s)])
    assert torch.allclose(torch.vmap(aug.apply, in_dims=(None, 0))(xs[0], p), shared, atol=1e-6)


# --- (f) no host synchronisation, a fixed operator sequence ---------------------------------------------


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")


def _ops(fn) -> Counter:
    with _Ops() as mode:
        fn()
    return mode.ops


@pytest.mark.parametrize("mode", ["one", "all"])
def test_draw_and_apply_never_read_a_value_back_to_the_host(mode):
    aug = Augment(mode=mode)
    x = _x().requires_grad_(True)
    ops = _ops(lambda: aug.apply(x, aug.draw(len(x), _g(0), (8, 8), steps=None)).sum().backward())
    assert sum(ops.values()) > 20 and not any(ops[o] for o in SYNC_OPS)
    # The counter does see a host read: today's path has one (its int() of the drawn choice).
    assert _ops(lambda: R.reference_call(Augment(mode="one"), x, _g(0)))["aten._local_scalar_dense"] >= 1


def test_apply_runs_the_same_operators_whatever_was_drawn():
    aug = Augment()
    x = _x()
    counts = {frozenset(_ops(lambda s=s: aug.apply(x, aug.draw(len(x), _g(s), (8, 8)))).items()) for s in range(8)}
    assert len(counts) == 1


def test_apply_traces_with_fake_tensors_so_graphs_and_compile_can_take_it():
    """Tracing with fake tensors fails on any op that needs a value (an .item(), a data-dependent shape)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    aug = Augment()
    x, p = _x(), aug.draw(6, _g(0), (8, 8))
    graph = make_fx(lambda x, m, c, b: aug.apply(x, AugParams(m, c, b)), tracing_mode="fake")(x, *p)
    assert any("grid_sampler" in str(node.target) for node in graph.graph.nodes)


def test_apply_replays_in_a_cuda_graph(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device (pytest --device cuda)")
    aug = Augment()
    x = _x().to(device)
    p = aug.draw(len(x), _g(0, device), (8, 8), steps=2)
    static = AugParams(*(t[0].clone() for t in p))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        aug.apply(x, static)  # warm-up, as torch.cuda.graph asks
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = aug.apply(x, static)
    for k in range(2):
        for dst, src in zip(static, select(p, k)):
            dst.copy_(src)
        graph.replay()
        assert torch.allclose(out, aug.apply(x, select(p, k)), atol=1e-6)
