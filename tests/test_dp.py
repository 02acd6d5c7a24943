"""DP experts (distill/dp.py, ``distill buffer --dp-epsilon``, ``distill eval --baseline dp-sgd``).

The accounting is checked against Opacus' own accountant, the clipping against a hand-made gradient,
and the buffer's refusals through the command line (one sentence, exit 1).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from distill import buffer as buffer_mod
from distill import dp
from distill.buffer import build_buffer
from distill.cli import main
from distill.config import BufferConfig
from distill.errors import DistillError
from distill.formats.dp_record import DP_STATS_CLASS_MEANS, DP_STATS_FILE, DPRecord, read_dp_record
from distill.formats.trajectory import expert_path, read_buffer_preprocessing, read_expert
from distill.train import TrainRecipe

from test_cli_errors import assert_one_sentence, run_main


def _cfg(data, out, **kw) -> BufferConfig:
    return BufferConfig(**{"data": str(data), "out": str(out), "experts": 2, "epochs": 2, "batch_size": 8,
                           "device": "cpu", "augment": "none", "dp_epsilon": 8.0, "dp_accountant": "rdp", **kw})


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_agrees_with_opacus_and_solved_sigma_meets_it(accountant):
    from opacus.accountants import create_accountant

    sigma, q, steps, delta = 1.1, 0.05, 200, 1e-5
    acc = create_accountant(mechanism=accountant)
    for _ in range(steps):  # Opacus' own bookkeeping, step by step, as its optimiser hook does it
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert dp.epsilon_spent([(sigma, q, steps)], delta, accountant) == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
    # The solved sigma spends at most epsilon, and a little less noise would spend more.
    s = dp.solve_sigma(2.0, delta, q, steps, accountant)
    assert dp.epsilon_spent([(s, q, steps)], delta, accountant) <= 2.0
    assert dp.epsilon_spent([(0.97 * s, q, steps)], delta, accountant) > 2.0


def test_whole_buffer_composes_experts_and_shards_compose_in_parallel():
    kw = dict(epsilon=4.0, delta=1e-5, n=2000, batch_size=100, epochs=2, accountant="rdp")
    one = dp.plan_budget(experts=1, **kw)
    four = dp.plan_budget(experts=4, **kw)
    # Four experts on the same data compose: each needs more noise for the same total.
    assert four.noise_multiplier > one.noise_multiplier
    assert four.record("x").epsilon <= 4.0 and four.experts_per_shard * four.steps == 4 * one.steps
    # Shards compose in parallel: 2 experts on 2 disjoint shards spend less than 2 experts on all data.
    two = dp.plan_budget(experts=2, **kw)
    sharded = dp.plan_budget(experts=2, shards=2, **kw)
    assert sharded.experts_per_shard == 1 and sharded.shard_size == 1000 and sharded.steps == two.steps
    assert sharded.noise_multiplier < two.noise_multiplier and sharded.record("x").epsilon <= 4.0
    at_same_noise = dataclasses.replace(sharded, noise_multiplier=two.noise_multiplier)
    assert at_same_noise.record("x").epsilon < two.record("x").epsilon
    # Stats take a part of the same budget: the total stays within it.
    with_stats = dp.plan_budget(experts=2, stats=True, **kw)
    rec = with_stats.record("x")
    assert rec.epsilon <= 4.0 and 0 < rec.stats_epsilon < rec.epsilon and rec.sgd_epsilon < rec.epsilon
    assert with_stats.noise_multiplier > dp.plan_budget(experts=2, **kw).noise_multiplier


def test_stats_fraction_moves_the_budget_between_means_and_dp_sgd():
    kw = dict(epsilon=2.0, delta=1e-5, n=2000, batch_size=100, epochs=2, experts=2, accountant="rdp", stats=True)
    small, large = dp.plan_budget(stats_fraction=0.1, **kw), dp.plan_budget(stats_fraction=0.6, **kw)
    # A larger part for the means: less noise on them, more on DP-SGD, and the whole still within epsilon.
    assert large.stats_noise_multiplier < small.stats_noise_multiplier
    assert large.noise_multiplier > small.noise_multiplier
    for plan, fraction in ((small, 0.1), (large, 0.6)):
        rec = plan.record("x")
        assert rec.epsilon <= 2.0 and rec.extra["stats_fraction"] == fraction
    assert large.record("x").stats_epsilon > small.record("x").stats_epsilon
    with pytest.raises(DistillError, match="between 0 and 1"):
        dp.plan_budget(stats_fraction=0.0, **kw)


def test_dp_record_round_trips():
    rec = dp.plan_budget(epsilon=2.0, delta=1e-4, n=500, batch_size=50, epochs=1, experts=2,
                         accountant="rdp").record("1.6.0")
    back = DPRecord.from_json(rec.to_json())
    assert back == rec and back.accountant == "rdp" and back.steps == 10 and back.experts == 2


# ----------------------------------------------------------------------------- clipping


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2, bias=False)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x):
        return self.fc(x)


def test_per_sample_clipping_bounds_one_examples_contribution():
    """One image with a huge gradient moves the step by at most lr * clip / expected batch (noise ~0)."""
    n, clip, lr = 8, 0.5, 1.0
    images = torch.zeros(n, 4)  # no gradient (a bias-free linear layer on zeros)...
    images[0] = 1e4  # ...but one image's is huge
    targets = torch.zeros(n, dtype=torch.long)
    plan = dp.DPPlan(epsilon=1.0, delta=1e-5, accountant="rdp", clip=clip, noise_multiplier=1e-12, sample_rate=1.0,
                     steps=1, steps_per_epoch=1, experts=1, shards=1, experts_per_shard=1, train_size=n, shard_size=n)
    recipe = TrainRecipe(epochs=1, lr=lr, batch_size=n, momentum=0.0, weight_decay=0.0, decay_at_half=False)

    def step(x):
        model = _Linear()
        dp.train_dp(model, x, targets, recipe, torch.Generator().manual_seed(0), plan=plan)
        return model.fc.weight.detach().clone()

    with_big, without = step(images), step(torch.zeros(n, 4))
    moved = (with_big - without).norm()
    assert moved <= lr * clip / n * (1 + 1e-4)
    assert moved > 0.99 * lr * clip / n  # the huge gradient is clipped, not dropped
    # Without clipping (plain SGD) the same image would move the weights by orders of magnitude more.
    model = _Linear()
    nn.functional.cross_entropy(model(images), targets).backward()
    assert model.fc.weight.grad.norm() * lr > 100 * lr * clip / n


# ----------------------------------------------------------------------------- the buffer


def test_dp_buffer_writes_its_record_fixed_normalisation_and_noised_class_means(tiny_npz, tmp_path):
    cfg = _cfg(tiny_npz, tmp_path / "buf", dp_init="class-means", snapshot_every=1, dp_delta=1e-3)
    written = build_buffer(cfg)
    out = Path(cfg.out)
    assert len(written) == 2
    rec = read_dp_record(out)
    assert rec is not None and rec.epsilon <= 8.0 and rec.delta == 1e-3 and rec.experts == 2
    assert rec.stats == "class_means" and 0 < rec.stats_epsilon < rec.epsilon and rec.normalisation == "fixed"
    assert json.loads((out / "dp.json").read_text())["format"] == "distill-dp-record"
    assert "dp_epsilon = 8.0" in (out / "config.toml").read_text()
    pre, _, _ = read_buffer_preprocessing(out)
    assert pre.mean.tolist() == [dp.DP_MEAN] and pre.std.tolist() == [dp.DP_STD] and not pre.zca
    e = read_expert(written[0])
    # Poisson batches vary in size; the snapshots still fall every step.
    assert e.snapshot_steps.tolist() == list(range(rec.steps + 1))
    assert e.train["dp_noise_multiplier"] == rec.noise_multiplier
    # No --lr: DP experts take the DP step size (clipping shortens their gradients), recorded as it ran.
    assert e.train["lr"] == dp.DP_LR != 0.01 and f"lr = {dp.DP_LR}" in (out / "config.toml").read_text()
    # Nothing measured on private images without noise: no training loss or accuracy, no validation accuracy.
    assert all(np.isnan(v).all() for v in e.history().values())
    with h5py.File(out / DP_STATS_FILE) as f:
        assert f.attrs["format"] == "distill-dp-stats"
        means = f[DP_STATS_CLASS_MEANS][()]
    assert means.shape == (2, 1, 1, 8, 8)
    exact = torch.stack([pre(torch.as_tensor(np.load(tiny_npz)["train_images"][:, None]))[
        torch.as_tensor(np.load(tiny_npz)["train_labels"][:, 0]) == k].mean(0) for k in range(2)]).numpy()
    assert not np.allclose(means[:, 0], exact, atol=1e-3)  # noised
    assert np.all(np.abs(means) <= 1.0)
    assert rec.extra["stats_fraction"] == BufferConfig().dp_stats_fraction
    # The split is part of the plan: resuming the buffer with another one is refused, not silently re-planned.
    with pytest.raises(DistillError, match="holds DP experts planned"):
        build_buffer(dataclasses.replace(cfg, dp_stats_fraction=0.6))


def test_dp_buffer_resumed_after_a_kill_reports_the_same_epsilon(tiny_npz, tmp_path, monkeypatch):
    cfg = _cfg(tiny_npz, tmp_path / "buf", dp_delta=1e-3)
    real = dp.train_dp
    calls = []

    def killed_in_second_expert(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kw)

    monkeypatch.setattr(dp, "train_dp", killed_in_second_expert)
    with pytest.raises(RuntimeError, match="killed"):
        build_buffer(cfg)
    first = read_dp_record(cfg.out)
    assert first is not None and expert_path(cfg.out, 0).exists() and not expert_path(cfg.out, 1).exists()
    monkeypatch.setattr(dp, "train_dp", real)
    assert build_buffer(cfg) == [expert_path(cfg.out, 1)]
    assert read_dp_record(cfg.out) == first and first.experts == 2
    # More experts than planned would spend more than the budget fixed at the start.
    with pytest.raises(Exception, match="planned as 2 expert"):
        build_buffer(dataclasses.replace(cfg, experts=3))


def test_dp_and_non_dp_experts_never_share_a_folder(tiny_npz, tmp_path):
    plain = dataclasses.replace(_cfg(tiny_npz, tmp_path / "plain", experts=1, epochs=1), dp_epsilon=None,
                                dp_accountant="prv")
    build_buffer(plain)
    assert read_expert(expert_path(plain.out, 0)).train["lr"] == 0.01  # without DP: the reference's step size
    with pytest.raises(Exception, match="without DP"):
        build_buffer(dataclasses.replace(plain, dp_epsilon=8.0, dp_delta=1e-3, dp_accountant="rdp"))
    dpb = _cfg(tiny_npz, tmp_path / "dp", experts=1, epochs=1, dp_delta=1e-3, lr=0.05)
    build_buffer(dpb)
    assert read_expert(expert_path(dpb.out, 0)).train["lr"] == 0.05  # a given --lr wins in DP mode too
    with pytest.raises(Exception, match="holds DP experts"):
        build_buffer(dataclasses.replace(dpb, dp_epsilon=None, dp_delta=None, dp_accountant="prv"))


@pytest.mark.parametrize("extra, fragment", [
    (["--zca"], "ZCA"),
    (["--model", "resnet18"], "batch norm"),
    (["--dp-delta", "0.05"], "below 1/n"),
    (["--dp-epsilon", "0"], "--dp-epsilon must be positive"),
    (["--dp-epsilon", "-1"], "--dp-epsilon must be positive"),
    (["--dp-stats-fraction", "0.5"], "--dp-init class-means"),
    (["--dp-init", "class-means", "--dp-stats-fraction", "1"], "--dp-stats-fraction"),
])
def test_dp_buffer_refuses_with_one_sentence(tiny_npz, tmp_path, monkeypatch, capsys, extra, fragment):
    args = ["buffer", "--data", str(tiny_npz), "--out", str(tmp_path / "buf"), "--experts", "1", "--epochs", "1",
            "--device", "cpu", "--dp-epsilon", "4"]
    code, _, err = run_main(args + extra, monkeypatch, capsys)
    assert code == 1
    assert_one_sentence(code, err, fragment)
    assert not (tmp_path / "buf").exists()


def test_dp_settings_without_epsilon_are_refused(tiny_npz, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(["buffer", "--data", str(tiny_npz), "--out", str(tmp_path / "b"), "--dp-shards", "2"],
                            monkeypatch, capsys)
    assert_one_sentence(code, err, "--dp-shards", "--dp-epsilon")


def test_eval_dp_sgd_baseline_runs_and_reports(tiny_npz, tmp_path, monkeypatch, capsys):
    report = tmp_path / "r.json"
    code, out, err = run_main(["eval", "--train", str(tiny_npz), "--baseline", "dp-sgd", "--epsilon", "4",
                               "--delta", "1e-3", "--runs", "1", "--epochs", "1", "--device", "cpu",
                               "--json", str(report)], monkeypatch, capsys)
    assert code == 0, err
    arms = json.loads(report.read_text())["results"]
    assert [a["kind"] for a in arms] == ["dp-sgd"]
    assert arms[0]["trained_on"]["dp"]["epsilon"] <= 4.0 and "DP-SGD" in out
    code, _, err = run_main(["eval", "--train", str(tiny_npz), "--baseline", "dp-sgd", "--device", "cpu"],
                            monkeypatch, capsys)
    assert_one_sentence(code, err, "--epsilon")


def test_class_means_are_exact_without_noise_and_noised_per_pixel_as_the_mechanism_says():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.arange(400) % 2
    exact = torch.stack([x[y == k].mean(0) for k in range(2)])
    means, counts = dp.noised_class_means(x, y, 2, 0.0, pool=1)
    assert means.shape == (2, 1, 1, 8, 8) and counts.tolist() == [200.0, 200.0]
    assert torch.allclose(means[:, 0], exact, atol=1e-5)
    sigma = 0.05
    noisy, _ = dp.noised_class_means(x, y, 2, sigma, noise_generator=torch.Generator().manual_seed(1), pool=1)
    # Each pixel of a sum gets noise of std sigma * sqrt(2) * B, B = sqrt(64); divided by ~200 images.
    expected = sigma * math.sqrt(2) * 8 / 200
    residual = (noisy[:, 0] - exact).std().item()
    assert 0.7 * expected < residual < 1.3 * expected


def test_class_means_released_on_a_coarse_grid_carry_less_noise_and_come_back_full_size():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.arange(400) % 2
    # Without noise: the exact means of the 2 x 2 block averages, enlarged back to 8 x 8.
    small = torch.stack([torch.nn.functional.avg_pool2d(x[y == k], 4).mean(0) for k in range(2)])
    want = torch.nn.functional.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    means, _ = dp.noised_class_means(x, y, 2, 0.0, pool=4)
    assert means.shape == (2, 1, 1, 8, 8) and torch.allclose(means[:, 0], want, atol=1e-5)
    # The noise follows the grid's bound, B = sqrt(2 * 2) = 2, a quarter of the full-size release's 8.
    sigma = 0.5
    resid = []
    for pool in (1, 4):
        noisy, _ = dp.noised_class_means(x, y, 2, sigma, noise_generator=torch.Generator().manual_seed(1), pool=pool)
        exact, _ = dp.noised_class_means(x, y, 2, 0.0, pool=pool)
        resid.append((noisy - exact).pow(2).mean().sqrt().item())
    assert resid[1] < 0.4 * resid[0]
    assert dp.STATS_POOL == 4
