"""MTT distillation (``distill run``): gradients against finite differences, the step-size guard,
resume, the NaN guard, torchrun against one process, and an end-to-end run on BreastMNIST."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.mtt.distiller as distiller
from conftest import make_tiny_arrays
from distill.augment import Augment
from distill.buffer import build_buffer
from distill.cli import main
from distill.config import BufferConfig, RunConfig, build, load_toml
from distill.errors import DistillError, DivergenceError
from distill.formats.synset import read_synset
from distill.models import create_model, flatten_params, param_spec
from distill.mtt import compute_grads, distill_run, matching_objective
from distill.mtt.experts import ExpertPool, Segment
from distill.formats.run import CHECKPOINT_FILE, read_metrics
from distill.mtt.synthetic import bound_log_step
from distill.mtt.unroll import make_plan
from distill.seeding import generator, seeded
from distill.workers import threads_per_worker

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SNAPSHOT_EVERY = 2  # optimiser steps per snapshot interval in the tiny buffer


# ----------------------------------------------------------------------------- the matching gradient


def _tiny_problem(n: int = 4, steps: int = 3, size: int = 4, augment: Augment | None = None):
    """A float64 depth-2 ConvNet (width 4) on 4x4 images (few pixels keep finite differences cheap);
    the target is a small random move away from the start."""
    with seeded(0):
        model = create_model("convnet", 2, 1, size, width=4, depth=2).double()
    spec = param_spec(model)
    g = torch.Generator().manual_seed(0)
    start = flatten_params(model)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)
    logits = torch.randn(n, 2, generator=g, dtype=torch.float64)
    log_lr = torch.tensor(math.log(0.1), dtype=torch.float64)
    # Batches of 2 out of 4: every step sees another subset; the augmentation is drawn into the plan.
    plan = make_plan(n, steps, 2, g, augment=augment, size=(size, size), dtype=torch.float64)
    return model, spec, start, target, images, logits, log_lr, plan


@pytest.mark.parametrize("augment", [None, Augment(("color", "crop", "flip", "scale", "rotate"), mode="all")],
                         ids=["no-augment", "fixed-augment"])
def test_matching_gradients_agree_with_finite_differences(augment):
    model, spec, start, target, images, logits, log_lr, plan = _tiny_problem(augment=augment)

    def loss(x, z, a):
        return matching_objective(model, spec, start, target, x, z, a, plan, augment)[0]

    inputs = tuple(t.clone().requires_grad_(True) for t in (images, logits, log_lr))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    # gradcheck would also pass for a loss that ignores an input; every input must matter here.
    _, g_img, g_logits, g_log_lr, _ = compute_grads(model, spec, start, target, images, logits, log_lr, plan, augment)
    assert g_img.abs().sum() > 0 and g_logits.abs().sum() > 0 and g_log_lr.abs() > 0


def test_hard_label_gradients_agree_with_finite_differences():
    model, spec, start, target, images, _, log_lr, plan = _tiny_problem()
    labels = torch.tensor([0, 1, 0, 1])

    def loss(x, a):
        return matching_objective(model, spec, start, target, x, labels, a, plan, None)[0]

    assert torch.autograd.gradcheck(loss, (images.clone().requires_grad_(True), log_lr.clone().requires_grad_(True)),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)
    _, _, g_labels, _, _ = compute_grads(model, spec, start, target, images, labels, log_lr, plan, None)
    assert g_labels is None


def test_compute_grads_is_pure_and_checkpoint_mode_matches():
    model, spec, start, target, images, logits, log_lr, plan = _tiny_problem()
    full = compute_grads(model, spec, start, target, images, logits, log_lr, plan, None)
    again = compute_grads(model, spec, start, target, images, logits, log_lr, plan, None)
    for a, b in zip(full, again):
        assert torch.equal(a, b) and not a.requires_grad
    assert images.grad is None and not images.requires_grad  # the caller's tensors are untouched
    # The constant-memory path must reproduce the full one.
    ckpt = compute_grads(model, spec, start, target, images, logits, log_lr, plan, None, gradient="checkpoint")
    for a, b in zip(full, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_log_step_size_cannot_collapse_or_cross_zero():
    # NOTES-MTT: a step-size gradient of ~1e3 at lr_lr 1e-5 takes the raw step size 0.01 below zero.
    raw = 0.01 - 1e-5 * 1.1e3
    assert raw < 0
    log_lr = torch.tensor(math.log(0.01))
    before = log_lr.clone()
    log_lr -= 1e-5 * 1.1e3 / 0.01 ** 2  # the same first step, taken on the log
    assert bound_log_step(log_lr, before, 0.1)
    assert math.isclose(float(log_lr.exp()), 0.01 * math.exp(-0.1), rel_tol=1e-6)
    small = before - 0.05
    assert not bound_log_step(small, before, 0.1) and torch.equal(small, before - 0.05)


# ----------------------------------------------------------------------------- a tiny buffer


@pytest.fixture(scope="module")
def tiny_buffer(tmp_path_factory) -> Path:
    """2 experts x 3 epochs on 2 classes x 10 images of 8x8, batch 5 (4 steps an epoch), a snapshot every 2 steps."""
    root = tmp_path_factory.mktemp("mtt")
    np.savez(root / "tiny.npz", **make_tiny_arrays())
    out = root / "buffer"
    build_buffer(BufferConfig(data=str(root / "tiny.npz"), out=str(out), experts=2, epochs=3, batch_size=5,
                              snapshot_every=TINY_SNAPSHOT_EVERY, augment="crop,flip", device="cpu"))
    return out


def _cfg(buffer: Path, out: Path, **kw) -> RunConfig:
    # Soft labels by name: at ipc 2 the default (auto) would choose hard ones.
    base = dict(buffer=str(buffer), out=str(out), ipc=2, iterations=4, syn_steps=3, expert_epochs=2, max_start_epoch=3,
                hard_labels=False, eval_models=0, checkpoint_every=2, device="cpu")
    return RunConfig(**{**base, **kw})


def test_expert_epochs_count_snapshot_intervals(tiny_buffer):
    pool = ExpertPool(tiny_buffer)
    assert pool.num_snapshots == 3 * 4 // TINY_SNAPSHOT_EVERY + 1
    assert pool.expert_steps(Segment(1, 2, 4)) == 2 * TINY_SNAPSHOT_EVERY
    pool.check_span(0, pool.num_snapshots - 3, 2)
    with pytest.raises(DistillError, match="snapshot-every"):
        pool.check_span(0, pool.num_snapshots - 2, 2)


def test_run_writes_a_valid_run_folder(tiny_buffer, tmp_path):
    cfg = _cfg(tiny_buffer, tmp_path / "run", init="real", eval_models=1, eval_epochs=3, eval_every=2)
    out = distill_run(cfg)
    s = read_synset(out / "synthetic.h5")
    assert s.images.shape == (4, 1, 8, 8) and torch.isfinite(s.images).all()
    assert s.label_logits.shape == (4, 2) and s.labels.tolist() == [0, 0, 1, 1]
    assert s.iteration == 4 and s.syn_lr > 0 and s.model == "convnet3"
    assert set(s.method) == {f.name for f in dataclasses.fields(RunConfig)}
    assert s.method["augment"] == "crop,flip"  # "expert" resolved to the buffer's augmentation
    assert s.experts["count"] == 2 and s.experts["snapshot_every"] == TINY_SNAPSHOT_EVERY
    assert s.fingerprint == ExpertPool(tiny_buffer).fingerprint
    # config.toml records what the "auto" settings resolved to: the tiny unroll fits any budget, and auto is fp32.
    assert build(RunConfig, load_toml(out / "config.toml")) == dataclasses.replace(cfg, augment="crop,flip",
                                                                                  gradient="full", precision="fp32")
    rows = read_metrics(out / "metrics.jsonl")
    its = [r for r in rows if r["kind"] == "iteration"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["iteration"] for r in its] == [0, 1, 2, 3]
    assert [r["iteration"] for r in evals] == [0, 2, 4]
    for r in its:
        assert math.isfinite(r["loss"]) and r["movement_ratio"] > 0 and r["seconds"] > 0 and r["peak_rss_mb"] > 0
    for r in evals:
        assert 0 <= r["val_acc_mean"] <= 1 and (out / r["grid"]).exists()
        assert r["val_majority"] == 0.5  # make_tiny_arrays: a balanced validation split
    from PIL import Image

    with Image.open(out / "grid_00004.png") as im:  # one row per class, ipc images a row (1 px padding),
        assert im.size[1] == 2 * 9 + 1 and im.size[0] > 2 * 9 + 1  # and a strip naming the classes (issue 17)


def test_a_set_no_better_than_the_majority_class_is_flagged(tiny_buffer, tmp_path, monkeypatch, caplog):
    import distill.mtt.distiller as distiller

    monkeypatch.setattr(distiller, "accuracy", lambda logits, labels: 0.25)  # networks that learned nothing
    with caplog.at_level("WARNING", logger=distiller.log.name):
        distill_run(_cfg(tiny_buffer, tmp_path / "run", eval_models=1, eval_epochs=1, eval_every=2))
    flagged = [r.getMessage() for r in caplog.records if "most frequent class" in r.getMessage()]
    assert len(flagged) == 2 and "iteration 2" in flagged[0] and "Do not share" in flagged[0]  # not at iteration 0


def test_a_set_at_the_majority_class_up_to_float32_rounding_is_flagged(tiny_buffer, tmp_path, monkeypatch, caplog):
    # Seen on PneumoniaMNIST: float32 accuracy 0.74236643 against the majority share 0.74236641 did not warn.
    monkeypatch.setattr(distiller, "accuracy", lambda logits, labels: 0.5 + 1e-8)  # the tiny val split is balanced
    with caplog.at_level("WARNING", logger=distiller.log.name):
        distill_run(_cfg(tiny_buffer, tmp_path / "run", eval_models=1, eval_epochs=1, eval_every=0, iterations=1))
    assert any("most frequent class" in r.getMessage() for r in caplog.records)


def test_real_init_starts_from_real_training_images(tiny_buffer, tmp_path):
    out = distill_run(_cfg(tiny_buffer, tmp_path / "run", iterations=0, init="real"))
    s = read_synset(out / "synthetic.h5")
    from distill.data import load_data

    real = load_data(load_toml(tiny_buffer / "config.toml")["data"])
    x = s.preprocessing(real.train.images)
    for img, y in zip(s.images, s.labels):
        d = (x - img).flatten(1).abs().amax(1)
        i = int(d.argmin())
        assert d[i] < 1e-5 and int(real.train.labels[i]) == int(y)


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_buffer, tmp_path, monkeypatch):
    whole = read_synset(distill_run(_cfg(tiny_buffer, tmp_path / "whole")))
    calls = {"n": 0}
    real_grads = distiller.match_segments

    def interrupt_at_iteration_3(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_grads(*a, **kw)

    monkeypatch.setattr(distiller, "match_segments", interrupt_at_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        distill_run(_cfg(tiny_buffer, tmp_path / "cut"))
    monkeypatch.setattr(distiller, "match_segments", real_grads)
    # checkpoint_every is 2, so only the save on Ctrl-C holds iteration 3: no finished iteration is lost.
    assert torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)["iteration"] == 3
    resumed = read_synset(distill_run(_cfg(tiny_buffer, tmp_path / "cut"), resume=True))
    assert torch.equal(resumed.images, whole.images)
    assert torch.equal(resumed.label_logits, whole.label_logits)
    assert resumed.syn_lr == whole.syn_lr
    losses = lambda p: [r["loss"] for r in read_metrics(p / "metrics.jsonl") if r["kind"] == "iteration"]  # noqa: E731
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # no line lost, none twice


def test_a_resumed_run_keeps_what_its_auto_settings_resolved_to(tiny_buffer, tmp_path, monkeypatch):
    # The run starts while the default gives soft labels at 2 images per class and a window ending at 3 ...
    monkeypatch.setattr(distiller, "SOFT_LABELS_FROM_IPC", 1)
    out = tmp_path / "run"
    distill_run(_cfg(tiny_buffer, out, iterations=2, hard_labels=None))
    started = load_toml(out / "config.toml")
    assert started["hard_labels"] is False
    # ... and is resumed after the default changed: it must go on with soft labels and the same window.
    monkeypatch.setattr(distiller, "SOFT_LABELS_FROM_IPC", 10)
    resumed = read_synset(distill_run(_cfg(tiny_buffer, out, iterations=4, hard_labels=None, max_start_epoch=None),
                                      resume=True))
    assert resumed.label_logits is not None
    assert load_toml(out / "config.toml")["max_start_epoch"] == started["max_start_epoch"]


def test_nan_guard_keeps_the_last_good_state_which_resumes_exactly(tiny_buffer, tmp_path, monkeypatch):
    whole = read_synset(distill_run(_cfg(tiny_buffer, tmp_path / "whole", hard_labels=True, checkpoint_every=10)))
    calls = {"n": 0}
    real_grads = distiller.match_segments

    def nan_at_iteration_2(*a, **kw):
        calls["n"] += 1
        m = real_grads(*a, **kw)
        return m._replace(loss=m.loss * float("nan")) if calls["n"] == 3 else m

    monkeypatch.setattr(distiller, "match_segments", nan_at_iteration_2)
    with pytest.raises(DivergenceError, match="iteration 2"):
        distill_run(_cfg(tiny_buffer, tmp_path / "bad", hard_labels=True, checkpoint_every=10))
    monkeypatch.setattr(distiller, "match_segments", real_grads)
    ck = torch.load(tmp_path / "bad" / CHECKPOINT_FILE, weights_only=True)
    assert ck["iteration"] == 2 and torch.isfinite(ck["images"]).all()
    assert not (tmp_path / "bad" / "synthetic.h5").exists()
    resumed = read_synset(distill_run(_cfg(tiny_buffer, tmp_path / "bad", hard_labels=True, checkpoint_every=10), resume=True))
    assert torch.equal(resumed.images, whole.images)


def test_huge_image_steps_stop_with_a_divergence_error(tiny_buffer, tmp_path):
    with pytest.raises(DivergenceError, match="NaN or Inf"):
        distill_run(_cfg(tiny_buffer, tmp_path / "run", lr_img=1e38, hard_labels=True, iterations=3))
    ck = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    assert torch.isfinite(ck["images"]).all()


def _run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["distill", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("Error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_command_line_errors_are_one_sentence(tiny_buffer, tmp_path, monkeypatch, capsys):
    base = ["run", "--buffer", str(tiny_buffer), "--ipc", "1", "--syn-steps", "2", "--max-start-epoch", "1",
            "--device", "cpu"]
    config = tmp_path / "run.toml"
    config.write_text("iterations = 1\neval_models = 0\nexpert_epochs = 9\n")
    code, err = _run_main([*base, "--out", str(tmp_path / "a"), "--config", str(config)], monkeypatch, capsys)
    assert code == 1 and "exceeds the 6 snapshot intervals" in _error_line(err)
    code, err = _run_main([*base, "--out", str(tmp_path / "a"), "--config", str(config), "--expert-epochs", "2"],
                          monkeypatch, capsys)  # the flag overrides the file
    assert code == 0, err
    code, err = _run_main([*base, "--out", str(tmp_path / "a"), "--config", str(config), "--expert-epochs", "2"],
                          monkeypatch, capsys)
    assert code == 1 and "already holds a run; pass --resume" in _error_line(err)
    code, err = _run_main([*base, "--out", str(tmp_path / "b"), "--resume"], monkeypatch, capsys)
    assert code == 1 and "no checkpoint.pt to continue from" in _error_line(err)


# ----------------------------------------------------------------------------- torchrun


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "distill.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_ranks_equal_one_process_matching_both_trajectories(tiny_buffer, tmp_path):
    args = ["run", "--buffer", str(tiny_buffer), "--ipc", "1", "--iterations", "3", "--syn-steps", "2",
            "--max-start-epoch", "3", "--trajectories-per-iter", "2", "--soft-labels", "--device", "cpu"]  # as _cfg below
    config = tmp_path / "run.toml"
    config.write_text("eval_models = 0\n")
    two = _torchrun([*args, "--out", str(tmp_path / "two"), "--config", str(config), "--workers", "1"])
    assert two.returncode == 0, two.stderr
    # --workers 2 on a CPU starts the two ranks itself, no torchrun; the config records the count.
    spawned = subprocess.run([sys.executable, "-m", "distill.cli", *args, "--out", str(tmp_path / "spawned"),
                              "--config", str(config), "--workers", "2"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert spawned.returncode == 0, spawned.stderr
    assert load_toml(tmp_path / "spawned" / "config.toml")["workers"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1), so the float sums are the same
    try:
        distill_run(_cfg(tiny_buffer, tmp_path / "one", ipc=1, iterations=3, syn_steps=2, max_start_epoch=3,
                         trajectories_per_iter=2, workers=1))
    finally:
        torch.set_num_threads(threads)
    a, b, c = read_synset(tmp_path / "one"), read_synset(tmp_path / "two"), read_synset(tmp_path / "spawned")
    print("max |two ranks - one process|:", float((b.images - a.images).abs().max()))
    torch.testing.assert_close(b.images, a.images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.label_logits, a.label_logits, rtol=1e-5, atol=1e-6)
    assert math.isclose(a.syn_lr, b.syn_lr, rel_tol=1e-5)
    if threads_per_worker(2) == 1:  # each spawned rank has one thread, as torchrun's: the same sums
        assert torch.equal(c.images, b.images) and torch.equal(c.label_logits, b.label_logits)
    torch.testing.assert_close(c.images, a.images, rtol=1e-5, atol=1e-6)
    rows = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "iteration"]
    assert all(len(r["segments"]) == 2 for r in rows)
    assert any(r["segments"][0] != r["segments"][1] for r in rows)  # two different trajectories were matched


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_breastmnist_end_to_end_matching_loss_falls(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_DATA", str(shared_data))
    buf = tmp_path / "buf"
    build_buffer(BufferConfig(data="breastmnist", out=str(buf), experts=2, epochs=3, device="cpu"))
    common = dict(buffer=str(buf), ipc=1, syn_steps=10, expert_epochs=2, max_start_epoch=1, hard_labels=False,
                  device="cpu")
    start = read_synset(distill_run(RunConfig(out=str(tmp_path / "start"), iterations=0, eval_models=0, **common)))
    out = distill_run(RunConfig(out=str(tmp_path / "run"), iterations=30, eval_every=0, eval_models=1, eval_epochs=50,
                                **common))
    end = read_synset(out)
    assert end.images.shape == (2, 1, 28, 28) and torch.isfinite(end.images).all() and end.syn_lr > 0
    assert end.class_names == ["malignant", "normal, benign"]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["iteration"] == 30 and 0 < evals[-1]["val_acc_mean"] <= 1

    # The loss over every segment the run could draw, with one fixed plan and no augmentation:
    # the initial images against the final ones (the per-iteration log is too noisy for this).
    pool = ExpertPool(buf)
    model = pool.build_model()
    spec = param_spec(model)

    def mean_loss(s) -> float:
        total = 0.0
        for e in range(2):
            for t in range(2):
                a, b = pool.pair(Segment(e, t, t + 2), torch.device("cpu"))
                plan = make_plan(2, 10, 0, generator(0, e, t))
                logits = s.label_logits
                log_lr = torch.tensor(math.log(s.syn_lr))
                total += float(matching_objective(model, spec, a, b, s.images, logits, log_lr, plan, None)[0].detach())
        return total / 4

    before, after = mean_loss(start), mean_loss(end)
    print(f"matching loss over all segments: {before:.3f} -> {after:.3f}")
    assert after < 0.9 * before, (before, after)


# ----------------------------------------------------------------------------- issue 12: labels, start window, floor


def test_real_init_prefers_images_the_expert_classifies_correctly(tiny_arrays, caplog):
    from distill.data import Split
    from distill.mtt.synthetic import init_real

    arrays = tiny_arrays()
    train = Split(torch.from_numpy(arrays["train_images"])[:, None], torch.from_numpy(arrays["train_labels"][:, 0]).long())
    prefer = torch.zeros(len(train.labels), dtype=torch.bool)
    prefer[[1, 4, 12, 13, 17]] = True  # class 0 (rows 0-9): 1 and 4; class 1 (rows 10-19): 12, 13, 17
    keep = lambda x: x.float()  # noqa: E731  (preprocessing that keeps the pixels, to find them again)

    def picked(ipc):
        images, _ = init_real(ipc, 2, 1, 8, torch.Generator().manual_seed(0), train, keep, prefer=prefer)
        flat = train.images.float().flatten(1)
        return [int((flat - x.flatten()).abs().sum(1).argmin()) for x in images]

    with caplog.at_level("WARNING"):
        assert set(picked(2)[:2]) == {1, 4} and set(picked(2)[2:]) <= {12, 13, 17}
    assert not caplog.records
    with caplog.at_level("WARNING"):
        three = picked(3)  # class 0 has only two correct images: the third is another, with one warning
    assert set(three[:3]) >= {1, 4} and set(three[3:]) == {12, 13, 17}
    (warning,) = caplog.records
    assert "Class 0 has only 2" in warning.getMessage() and "\n" not in warning.getMessage()


def test_real_or_noise_init_keeps_a_scarce_class_real_images_and_tops_up_with_noise(tiny_arrays, caplog):
    from distill.data import Split
    from distill.mtt.synthetic import init_real, init_real_or_noise

    arrays = tiny_arrays()
    train = Split(torch.from_numpy(arrays["train_images"])[:, None], torch.from_numpy(arrays["train_labels"][:, 0]).long())
    keep = lambda x: x.float()  # noqa: E731  (preprocessing that keeps the pixels, to find them again)
    draw = lambda init, split: init(3, 2, 1, 8, torch.Generator().manual_seed(0), split, keep)  # noqa: E731
    # Every class holds at least ipc images: exactly what --init real draws.
    assert torch.equal(draw(init_real_or_noise, train)[0], draw(init_real, train)[0])
    scarce = torch.cat([torch.nonzero(train.labels == 0).flatten(), torch.tensor([15])])  # one image of class 1
    site = Split(train.images[scarce], train.labels[scarce])
    with caplog.at_level("WARNING"):
        images, labels = draw(init_real_or_noise, site)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    real = site.images.float().flatten(1)
    nearest = [float((real - x.flatten()).abs().sum(1).min()) for x in images]
    assert nearest[:4] == [0.0] * 4  # class 0's three and class 1's one real image
    assert torch.equal(images[3], site.images[-1].float())
    assert min(nearest[4:]) > 0  # the other two of class 1 are not training images
    assert any("Class(es) 1 have fewer than --ipc 3" in r.getMessage() for r in caplog.records)


def test_correctly_classified_is_the_experts_argmax_in_chunks(tiny_buffer, monkeypatch):
    import distill.mtt.synthetic as synthetic
    from distill.models import flat_forward

    pool = ExpertPool(tiny_buffer)
    model = pool.build_model()
    spec = param_spec(model)
    params = pool.snapshot(0, pool.num_snapshots - 1, torch.device("cpu"))
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    expected = flat_forward(model, spec, params, x).argmax(1) == y
    monkeypatch.setattr(synthetic, "PREDICT_CHUNK", 3)
    assert torch.equal(synthetic.correctly_classified(model, spec, params, x, y), expected)


def test_soft_labels_start_from_the_last_snapshot_on_correctly_classified_images(tiny_buffer, tmp_path, monkeypatch):
    from distill.models import flat_forward

    wanted = [2, 5, 13, 16]  # the only images the run may draw from
    seen = {}

    def only_wanted(model, spec, params, images, labels):
        seen["params"] = params
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[wanted] = True
        return mask

    monkeypatch.setattr(distiller, "correctly_classified", only_wanted)
    s = read_synset(distill_run(_cfg(tiny_buffer, tmp_path / "run", iterations=0, init="real")))
    pool = ExpertPool(tiny_buffer)
    last = pool.snapshot(0, pool.num_snapshots - 1, torch.device("cpu"))
    assert torch.equal(seen["params"], last)  # not max_start_epoch + expert_epochs (5 here; the last is 6)
    from distill.data import load_data

    real = load_data(load_toml(tiny_buffer / "config.toml")["data"])
    x = s.preprocessing(real.train.images)
    rows = [int((x - img).flatten(1).abs().amax(1).argmin()) for img in s.images]
    assert sorted(rows) == wanted
    model = pool.build_model()
    torch.testing.assert_close(s.label_logits, flat_forward(model, param_spec(model), last, s.images))


def test_start_window_grows_with_images_per_class(tiny_buffer, tmp_path):
    from distill.mtt.distiller import auto_max_start

    # The rule: 0.1, 0.4 and 0.8 of the latest legal start at 1, 10 and 50 images per class.
    assert [auto_max_start(k, 20) for k in (1, 10, 50, 500)] == [2, 8, 16, 16]
    assert auto_max_start(1, 20) < auto_max_start(3, 20) < auto_max_start(10, 20) < auto_max_start(30, 20)
    assert auto_max_start(1, 20, min_start=5) == 5
    assert auto_max_start(1, 3) == 0 and auto_max_start(50, 3) == 2
    # A run left at auto (None) records the window it used, and draws its starts from it.
    out = distill_run(_cfg(tiny_buffer, tmp_path / "run", max_start_epoch=None, ipc=1))
    latest = ExpertPool(tiny_buffer).num_snapshots - 1 - 2
    window = auto_max_start(1, latest)
    assert load_toml(out / "config.toml")["max_start_epoch"] == window == 0
    assert read_synset(out).method["max_start_epoch"] == window
    starts = [t for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "iteration" for _, t in r["segments"]]
    assert starts and max(starts) <= window


def test_labels_default_to_hard_at_one_image_per_class_and_soft_from_ten(tiny_buffer):
    pool = ExpertPool(tiny_buffer)
    assert distiller.resolve_config(RunConfig(buffer=str(tiny_buffer), ipc=1, max_start_epoch=1), pool).hard_labels is True
    assert distiller.resolve_config(RunConfig(buffer=str(tiny_buffer), ipc=10, max_start_epoch=1), pool).hard_labels is False
    assert distiller.resolve_config(RunConfig(buffer=str(tiny_buffer), ipc=1, max_start_epoch=1, hard_labels=False),
                                    pool).hard_labels is False


def test_label_rate_scales_with_the_number_of_classes():
    assert distiller.label_rate(0.2, 2) == 0.2  # the rate measured on 2 classes is unchanged
    assert math.isclose(distiller.label_rate(0.2, 5), 0.5)
    assert math.isclose(distiller._rates(RunConfig(lr_label=0.3), 10)["logits"], 1.5)


def _push_step_size_down(monkeypatch):
    real = distiller.match_segments

    def down(*a, **kw):
        m = real(*a, **kw)
        return m._replace(log_lr=torch.ones_like(m.log_lr) * 100.0)  # a large positive gradient: log_lr falls

    monkeypatch.setattr(distiller, "match_segments", down)


def test_step_size_floor_holds_and_says_so(tiny_buffer, tmp_path, monkeypatch, caplog):
    _push_step_size_down(monkeypatch)
    cfg = _cfg(tiny_buffer, tmp_path / "floor", iterations=12, hard_labels=True, min_syn_lr_fraction=0.5)
    with caplog.at_level("WARNING", logger=distiller.log.name):
        out = distill_run(cfg)
    s = read_synset(out)
    assert math.isclose(s.syn_lr, 0.005, rel_tol=1e-5)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "iteration"]
    hit = [r["syn_lr_floored"] for r in rows]
    assert not hit[0] and hit[-1] and hit == sorted(hit)  # once it binds it keeps binding
    said = [r.getMessage() for r in caplog.records if "floor" in r.getMessage()]
    assert len(said) == 1 and f"iteration {hit.index(True)}" in said[0]
    # Without the floor the same gradient takes the step size below it.
    free = read_synset(distill_run(dataclasses.replace(cfg, out=str(tmp_path / "free"), min_syn_lr_fraction=0.0)))
    assert free.syn_lr < 0.004


def test_bad_floor_and_label_snapshot_are_one_sentence(tiny_buffer, tmp_path):
    with pytest.raises(DistillError, match="min_syn_lr_fraction"):
        distill_run(_cfg(tiny_buffer, tmp_path / "a", min_syn_lr_fraction=1.0))
    with pytest.raises(DistillError, match="label_snapshot 99 does not exist"):
        distill_run(_cfg(tiny_buffer, tmp_path / "b", label_snapshot=99))


def test_label_temperature_flag_reaches_the_run(tiny_buffer, tmp_path, monkeypatch, capsys):
    code, err = _run_main(["run", "--buffer", str(tiny_buffer), "--out", str(tmp_path / "run"), "--ipc", "1",
                           "--iterations", "1", "--syn-steps", "2", "--max-start-epoch", "1", "--soft-labels",
                           "--label-temperature", "2.5", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0, err
    s = read_synset(tmp_path / "run" / "synthetic.h5")
    assert s.label_temperature == 2.5 and load_toml(tmp_path / "run" / "config.toml")["label_temperature"] == 2.5
    torch.testing.assert_close(s.targets(), torch.softmax(s.label_logits / 2.5, dim=1))
