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
from distill.mtt.rundir import CHECKPOINT_FILE, read_metrics
from distill.mtt.synthetic import bound_log_step
from distill.mtt.unroll import make_plan
from distill.seeding import generator, seeded

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
    base = dict(buffer=str(buffer), out=str(out), ipc=2, iterations=4, syn_steps=3, expert_epochs=2, max_start_epoch=3,
                eval_models=0, checkpoint_every=2, device="cpu")
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
    assert build(RunConfig, load_toml(out / "config.toml")) == dataclasses.replace(cfg, augment="crop,flip")
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
            "--max-start-epoch", "3", "--trajectories-per-iter", "2", "--device", "cpu"]  # as _cfg below
    config = tmp_path / "run.toml"
    config.write_text("eval_models = 0\n")
    two = _torchrun([*args, "--out", str(tmp_path / "two"), "--config", str(config)])
    assert two.returncode == 0, two.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1), so the float sums are the same
    try:
        distill_run(_cfg(tiny_buffer, tmp_path / "one", ipc=1, iterations=3, syn_steps=2, max_start_epoch=3,
                         trajectories_per_iter=2))
    finally:
        torch.set_num_threads(threads)
    a, b = read_synset(tmp_path / "one"), read_synset(tmp_path / "two")
    print("max |two ranks - one process|:", float((b.images - a.images).abs().max()))
    torch.testing.assert_close(b.images, a.images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.label_logits, a.label_logits, rtol=1e-5, atol=1e-6)
    assert math.isclose(a.syn_lr, b.syn_lr, rel_tol=1e-5)
    rows = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "iteration"]
    assert all(len(r["segments"]) == 2 for r in rows)
    assert any(r["segments"][0] != r["segments"][1] for r in rows)  # two different trajectories were matched


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_breastmnist_end_to_end_matching_loss_falls(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_DATA", str(shared_data))
    buf = tmp_path / "buf"
    build_buffer(BufferConfig(data="breastmnist", out=str(buf), experts=2, epochs=3, device="cpu"))
    common = dict(buffer=str(buf), ipc=1, syn_steps=10, expert_epochs=2, max_start_epoch=1, device="cpu")
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
