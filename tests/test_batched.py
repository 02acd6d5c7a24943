"""K experts in one vmapped network against one at a time: same trajectories, same files, same CLI errors."""
from __future__ import annotations

import sys

import pytest
import torch

from distill.augment import Augment
from distill.batched import StackedModels, predict_batched, train_batched
from distill.buffer import build_buffer
from distill.config import BufferConfig
from distill.errors import DistillError
from distill.formats.trajectory import expert_path, read_expert
from distill.models import create_model, flatten_params
from distill.seeding import generator, seeded
from distill.train import TrainRecipe, predict, train_network

K = 3
# Batched and one-at-a-time sum in different orders (a grouped convolution), so trajectories agree to
# rounding, which training then amplifies a little; a ReLU input that rounds to the other side of zero
# gives a visible jump. Measured on this CPU: ~1e-6 of the expert's movement on this task, up to 1e-3 on
# BreastMNIST. A wrong generator or init is O(1).
TOL = 1e-3


def _task():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(20) % 2
    x = torch.randn(20, 1, 8, 8, generator=g) + 1.5 * y.view(-1, 1, 1, 1)
    return x, y


def _model(i: int):
    with seeded(0, i):
        return create_model("convnet", 2, 1, 8, width=8, depth=2)


RECIPE = TrainRecipe(epochs=3, lr=0.05, batch_size=8, momentum=0.5, weight_decay=5e-4, decay_at_half=True,
                     augment=Augment.parse("color,crop,cutout,flip,scale,rotate"))


def _singles(x, y, recipe):
    flats, histories, probs = [], [], []
    for i in range(K):
        m = _model(i)
        snaps = [flatten_params(m)]
        histories.append(train_network(m, x, y, recipe, generator(0, i),
                                       after_epoch=lambda e, s, m=m, snaps=snaps: snaps.append(flatten_params(m))))
        flats.append(torch.stack(snaps))
        probs.append(predict(m, x))
    return torch.stack(flats), histories, torch.stack(probs)


def test_batched_trajectories_equal_one_at_a_time():
    x, y = _task()
    want, want_hist, want_probs = _singles(x, y, RECIPE)
    snaps = [[] for _ in range(K)]

    def keep(epoch, stats, stacked):
        for row, flat in zip(snaps, stacked.flat()):
            row.append(flat)

    models = [_model(i) for i in range(K)]
    before = [flatten_params(m) for m in models]
    stacked, history = train_batched(models, x, y, RECIPE, [generator(0, i) for i in range(K)], after_epoch=keep)
    got = torch.stack([torch.stack([b] + s) for b, s in zip(before, snaps)])
    assert got.shape == want.shape == (K, RECIPE.epochs + 1, want.shape[-1])
    for i in range(K):
        movement = (want[i, -1] - want[i, 0]).norm()
        assert movement > 0.1  # it trained
        assert float((got[i] - want[i]).norm() / movement) < TOL
        for h_got, h_want in zip([h[i] for h in history], want_hist[i]):
            assert h_got["loss"] == pytest.approx(h_want["loss"], rel=1e-4)
            assert h_got["acc"] == pytest.approx(h_want["acc"])
    assert torch.allclose(predict_batched(stacked, x), want_probs, atol=1e-4)
    # The input models are untouched: the stack holds copies.
    assert all(torch.equal(flatten_params(m), b) for m, b in zip(models, before))


def test_bf16_autocast_runs_and_changes_trajectories_by_a_little():
    x, y = _task()
    recipe = TrainRecipe(epochs=2, lr=0.05, batch_size=8, momentum=0.0, weight_decay=0.0, decay_at_half=False)
    fp32, _ = train_batched([_model(i) for i in range(2)], x, y, recipe, [generator(0, i) for i in range(2)])
    bf16, _ = train_batched([_model(i) for i in range(2)], x, y, recipe, [generator(0, i) for i in range(2)], bf16=True)
    start = torch.stack([flatten_params(_model(i)) for i in range(2)])
    rel = (bf16.flat() - fp32.flat()).norm(dim=1) / (fp32.flat() - start).norm(dim=1)
    assert bool((rel > 1e-5).all()) and bool((rel < 0.2).all())


def test_models_with_buffers_are_refused_with_a_sentence():
    models = [torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)) for _ in range(2)]
    with pytest.raises(DistillError, match="--batch-experts 1"):
        StackedModels(models)


def test_buffer_with_batch_experts_writes_the_same_experts(tiny_npz, tmp_path):
    base = dict(data=str(tiny_npz), experts=3, epochs=2, device="cpu", batch_size=8, snapshot_every=2)
    one = BufferConfig(out=str(tmp_path / "one"), **base)
    two = BufferConfig(out=str(tmp_path / "two"), batch_experts=2, **base)  # 3 experts: a batch of 2, then 1
    assert build_buffer(one) == [expert_path(one.out, i) for i in range(3)]
    assert build_buffer(two) == [expert_path(two.out, i) for i in range(3)]
    for i in range(3):
        a, b = read_expert(expert_path(one.out, i)), read_expert(expert_path(two.out, i))
        assert a.snapshot_steps.tolist() == b.snapshot_steps.tolist() and len(a.snapshot_steps) > 3
        sa, sb = a.snapshots(), b.snapshots()
        assert torch.equal(sa[0], sb[0])  # the same initialisation
        assert float((sa - sb).norm() / (sa[-1] - sa[0]).norm()) < TOL
        assert b.train["batch_experts"] == 2 and a.train["batch_experts"] == 1 and b.train["bf16"] is False
        assert b.history()["val_acc"] == pytest.approx(a.history()["val_acc"])
    # A finished buffer is skipped on a rerun, batched or not.
    assert build_buffer(two) == []


def test_cli_refuses_a_batch_of_zero(tmp_path, tiny_npz, monkeypatch, capsys):
    from distill.cli import main

    monkeypatch.setattr(sys, "argv", ["distill", "buffer", "--data", str(tiny_npz), "--out", str(tmp_path / "b"),
                                      "--batch-experts", "0", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "Error: --batch-experts must be at least 1; got 0." and "Traceback" not in err
