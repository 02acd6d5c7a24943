"""K experts in one vmapped network against one at a time: same trajectories, same files, same CLI errors."""
from __future__ import annotations

import sys

import pytest
import torch

from distill.augment import Augment
from distill.batched import BatchedStep, StackedModels, predict_batched, train_batched
from distill.buffer import AUTO_BATCH_EXPERTS, build_buffer, resolve_batch_experts
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


def test_cli_refuses_a_negative_batch(tmp_path, tiny_npz, monkeypatch, capsys):
    # 0 now means auto (it was refused before the auto default existed).
    from distill.cli import main

    monkeypatch.setattr(sys, "argv", ["distill", "buffer", "--data", str(tiny_npz), "--out", str(tmp_path / "b"),
                                      "--batch-experts", "-1", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "Error: --batch-experts must be 0 (auto) or at least 1; got -1." and "Traceback" not in err


def test_auto_batch_experts_is_one_off_cuda_and_a_group_on_cuda():
    cfg = BufferConfig(experts=20)
    assert cfg.batch_experts == 0  # auto is the default
    plain, normed = _model(0), torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert resolve_batch_experts(cfg, torch.device("cpu"), plain) == 1
    assert resolve_batch_experts(cfg, torch.device("cuda"), plain) == AUTO_BATCH_EXPERTS
    assert resolve_batch_experts(BufferConfig(experts=3), torch.device("cuda"), plain) == 3
    assert resolve_batch_experts(cfg, torch.device("cuda"), normed) == 1  # batch norm cannot be vmapped
    assert resolve_batch_experts(BufferConfig(batch_experts=4), torch.device("cpu"), plain) == 4  # asked for


def test_auto_default_on_cpu_trains_one_at_a_time_and_records_it(tiny_npz, tmp_path):
    cfg = BufferConfig(data=str(tiny_npz), out=str(tmp_path / "b"), experts=2, epochs=1, device="cpu", batch_size=8)
    build_buffer(cfg)
    assert all(read_expert(expert_path(cfg.out, i)).train["batch_experts"] == 1 for i in range(2))


# 20 images in batches of 8: two full batches and a short one, so the step has two shapes (two graphs on CUDA).
CAPTURE_RECIPE = TrainRecipe(epochs=4, lr=0.05, batch_size=8, momentum=0.9, weight_decay=5e-4, decay_at_half=True,
                             augment=Augment.parse("color,crop,cutout,flip,scale,rotate"))


def _train(capture, **kw):
    x, y = _task()
    return train_batched([_model(i) for i in range(2)], x, y, CAPTURE_RECIPE, [generator(0, i) for i in range(2)],
                         capture=capture, **kw)


def test_capture_path_undoes_its_warm_up_exactly():
    # Off CUDA, capture=True runs the warm-up and the undo, then the eager step: bit-for-bit the eager run.
    (eager, eager_hist), (captured, captured_hist) = _train(False), _train(True)
    assert torch.equal(eager.flat(), captured.flat()) and eager_hist == captured_hist
    assert (eager.flat() - torch.stack([flatten_params(_model(i)) for i in range(2)])).norm() > 0.1  # it trained


def test_a_failed_capture_warns_once_and_trains_eagerly(monkeypatch, caplog):
    def broken(self, idx, aug):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(BatchedStep, "_capture", broken)
    with caplog.at_level("WARNING", logger="distill.batched"):
        fallback, hist = _train(True)
    eager, eager_hist = _train(False)
    assert torch.equal(fallback.flat(), eager.flat()) and hist == eager_hist
    warnings = [r for r in caplog.records if "capture" in r.getMessage()]
    assert len(warnings) == 1 and "training eagerly" in warnings[0].getMessage()


def test_training_on_cpu_is_bit_reproducible():
    x, y = _task()
    runs = []
    for _ in range(2):
        m = _model(0)
        hist = train_network(m, x, y, CAPTURE_RECIPE, generator(0, 0))
        runs.append((flatten_params(m), hist))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    (a, ha), (b, hb) = _train(False), _train(False)
    assert torch.equal(a.flat(), b.flat()) and ha == hb


def test_captured_step_matches_the_eager_step_on_the_device(device, caplog):
    """On CUDA (pytest --device cuda) the real graphs against eager; on the CPU both are eager."""
    x, y = (t.to(device) for t in _task())

    def run(capture):
        models = [_model(i).to(device) for i in range(2)]
        return train_batched(models, x, y, CAPTURE_RECIPE, [generator(0, i) for i in range(2)], capture=capture)

    with caplog.at_level("WARNING", logger="distill.batched"):
        (captured, hist), (eager, eager_hist) = run(True), run(False)
    assert not [r for r in caplog.records if "capture" in r.getMessage()]  # it captured, no fallback
    start = torch.stack([flatten_params(_model(i)) for i in range(2)]).to(device)
    rel = (captured.flat() - eager.flat()).norm(dim=1) / (eager.flat() - start).norm(dim=1)
    assert bool((rel < TOL).all())
    for h, e in zip(hist, eager_hist):
        assert [s["acc"] for s in h] == pytest.approx([s["acc"] for s in e], abs=0.1)
