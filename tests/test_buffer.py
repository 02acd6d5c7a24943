"""Expert trajectory files and ``distill buffer``: round trip, determinism, resume, crashes, torchrun sharding."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import distill.buffer as buffer_mod
from distill.buffer import build_buffer
from distill.config import BufferConfig
from distill.data import load_data
from distill.distributed import World
from distill.errors import DistillError, FormatError
from distill.formats import trajectory
from distill.formats.trajectory import (TrajectoryMeta, expert_path, list_experts, read_buffer_preprocessing, read_expert,
                                        write_expert)
from distill.io import sha256_file
from distill.models import create_model, load_flat
from distill.train import accuracy, predict

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cfg(data, out, **kw) -> BufferConfig:
    return BufferConfig(**{"data": str(data), "out": str(out), "experts": 2, "epochs": 2, "device": "cpu", **kw})


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- trajectory file


def _write(path, snaps, dtype="float32"):
    write_expert(path, snaps, [0, 3, 6][: len(snaps)], snapshot_dtype=dtype,
                 history={"train_loss": [0.7, 0.6], "train_acc": [0.5, 0.6], "val_acc": [0.4, 0.5]},
                 meta=TrajectoryMeta(model="convnet3", num_classes=2, channels=1, size=8, seed=5,
                                     model_kwargs={"width": 8}, param_names=["a", "b"], param_shapes=[[2], [2, 2]],
                                     fingerprint={"name": "tiny"}, train={"epochs": 2}))


@pytest.mark.parametrize("dtype, tol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 1e-2)])
def test_trajectory_round_trip(tmp_path, dtype, tol):
    snaps = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    path = expert_path(tmp_path, 7)
    _write(path, snaps, dtype)
    e = read_expert(path)
    assert path.name == "expert_0007.h5" and list_experts(tmp_path) == [path]
    assert e.attrs["format_version"] == trajectory.FORMAT_VERSION and e.attrs["snapshot_dtype"] == dtype
    assert e.attrs["model"] == "convnet3" and e.attrs["seed"] == 5 and e.model_kwargs == {"width": 8}
    assert e.param_names == ["a", "b"] and e.param_shapes == [[2], [2, 2]] and e.num_params == 6
    assert e.snapshot_steps.tolist() == [0, 3, 6] and e.num_snapshots == 3
    back = e.snapshots()
    assert back.dtype == torch.float32 and back.shape == (3, 6)
    assert torch.allclose(back, snaps, rtol=tol, atol=tol) and (tol > 0 or torch.equal(back, snaps))
    assert torch.equal(e.snapshots([2, 0]), back[[2, 0]])
    assert np.allclose(e.history()["val_acc"], [0.4, 0.5])
    assert _leftovers(tmp_path) == []


def test_trajectory_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trajectory, "encode_snapshots", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(expert_path(tmp_path, 0), torch.zeros(2, 6))
    assert list(tmp_path.iterdir()) == []


def test_trajectory_reader_rejects_foreign_and_future_files(tmp_path):
    path = expert_path(tmp_path, 0)
    _write(path, torch.zeros(2, 6))
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = "1.9"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_expert(path)
    assert any("newer than this reader" in str(w.message) for w in caught)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = "2.0"
    with pytest.raises(FormatError, match="not supported"):
        read_expert(path)
    with h5py.File(path, "a") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(FormatError, match="not a distill trajectory file"):
        read_expert(path)
    truncated = tmp_path / "expert_0001.h5"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FormatError, match="not a readable HDF5"):
        read_expert(truncated)
    with pytest.raises(FormatError, match="no preprocessing.h5"):
        read_buffer_preprocessing(tmp_path)


def test_world_shard_has_no_duplicates_and_no_gaps():
    for n in range(0, 9):
        for size in range(1, 5):
            parts = [World(rank=r, size=size).shard(list(range(n))) for r in range(size)]
            assert sorted(i for p in parts for i in p) == list(range(n))


# ----------------------------------------------------------------------------- training one network


def _tiny_task():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(20) % 2
    x = torch.randn(20, 1, 8, 8, generator=g) + 2.0 * y.view(-1, 1, 1, 1)
    return x, y


def test_train_network_is_seeded_and_learns():
    from distill.augment import Augment
    from distill.models import flatten_params
    from distill.seeding import generator, seeded
    from distill.train import TrainRecipe, train_network

    x, y = _tiny_task()
    recipe = TrainRecipe(epochs=8, lr=0.05, batch_size=8, augment=Augment(transforms=("flip", "crop")))
    results = []
    for seed in (0, 0, 1):
        with seeded(0):
            model = create_model("convnet3", 2, 1, 8, width=8)
        steps = []
        hist = train_network(model, x, y, recipe, generator(seed), after_step=steps.append)
        results.append((flatten_params(model), hist))
        assert steps == list(range(1, 8 * 3 + 1))  # 20 images in batches of 8: 3 steps an epoch
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert not torch.equal(results[0][0], results[2][0])  # the data order and augmentation follow the generator
    assert results[0][1][-1]["loss"] < results[0][1][0]["loss"]
    with pytest.raises(ValueError, match="epochs must be positive"):
        TrainRecipe(epochs=0, lr=0.1)
    with pytest.raises(ValueError, match="as many targets as images"):
        train_network(model, x, y[:5], recipe, generator(0))


def test_soft_cross_entropy_matches_hard_labels_and_predict_handles_empty():
    from distill.train import soft_cross_entropy

    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 1, 0])
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    assert torch.allclose(soft_cross_entropy(logits, y), soft_cross_entropy(logits, one_hot))
    model = create_model("convnet3", 3, 1, 8, width=4)
    assert predict(model, torch.zeros(0, 1, 8, 8)).shape == (0, 3)
    assert np.isnan(accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)))


# ----------------------------------------------------------------------------- distill buffer


def test_buffer_files_are_self_describing(tiny_npz, tmp_path):
    cfg = _cfg(tiny_npz, tmp_path / "buf")
    written = build_buffer(cfg)
    assert written == [expert_path(cfg.out, 0), expert_path(cfg.out, 1)]
    data = load_data(tiny_npz)
    pre, fingerprint, pre_sha = read_buffer_preprocessing(cfg.out)
    assert fingerprint == data.fingerprint() and pre_sha == sha256_file(Path(cfg.out) / "preprocessing.h5")
    assert (Path(cfg.out) / "config.toml").exists() and _leftovers(Path(cfg.out)) == []
    x_val = pre(data.val.images)
    firsts = []
    for i, path in enumerate(written):
        e = read_expert(path)
        assert e.attrs["model"] == "convnet3" and e.attrs["seed"] == 0 and e.attrs["expert_index"] == i
        assert e.attrs["preprocessing_sha256"] == pre_sha and e.fingerprint == data.fingerprint()
        assert e.train["epochs"] == 2 and e.train["lr"] == 0.01 and e.train["momentum"] == 0.0
        assert e.num_snapshots == cfg.epochs + 1  # the start and after every epoch
        steps_per_epoch = e.attrs["steps_per_epoch"]
        assert e.snapshot_steps.tolist() == [k * steps_per_epoch for k in range(cfg.epochs + 1)]
        model = create_model(e.attrs["model"], 2, 1, 8, **e.model_kwargs)
        assert e.param_names == [n for n, _ in model.named_parameters()]
        hist = e.history()
        assert all(len(hist[k]) == cfg.epochs for k in ("train_loss", "train_acc", "val_acc"))
        # The stored val accuracy is that of the stored final parameters.
        load_flat(model, e.snapshots([cfg.epochs])[0])
        assert accuracy(predict(model, x_val), data.val.labels) == pytest.approx(hist["val_acc"][-1])
        snaps = e.snapshots()
        assert not torch.equal(snaps[0], snaps[-1])  # it trained
        firsts.append(snaps[0])
    assert not torch.equal(firsts[0], firsts[1])  # experts start from different initialisations


def test_buffer_same_seed_same_trajectories_and_resume_skips(tiny_npz, tmp_path):
    a = _cfg(tiny_npz, tmp_path / "a", zca=True)
    b = dataclasses.replace(a, out=str(tmp_path / "b"))
    c = dataclasses.replace(a, out=str(tmp_path / "c"), seed=1, experts=1)
    for cfg in (a, b, c):
        build_buffer(cfg)
    for i in range(2):
        sa, sb = read_expert(expert_path(a.out, i)).snapshots(), read_expert(expert_path(b.out, i)).snapshots()
        assert torch.equal(sa, sb)
    assert not torch.equal(read_expert(expert_path(a.out, 0)).snapshots(),
                           read_expert(expert_path(c.out, 0)).snapshots())
    pre, _, _ = read_buffer_preprocessing(a.out)
    assert pre.zca
    # Re-running skips finished experts and leaves their files untouched.
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in list_experts(a.out)}
    assert build_buffer(a) == []
    assert {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in list_experts(a.out)} == before
    # Asking for more experts trains only the new one.
    assert build_buffer(dataclasses.replace(a, experts=3)) == [expert_path(a.out, 2)]
    with pytest.raises(DistillError, match="other settings"):
        build_buffer(dataclasses.replace(a, epochs=3))
    with pytest.raises(DistillError, match="other data or preprocessing"):
        build_buffer(dataclasses.replace(a, zca=False))


def test_interrupted_expert_leaves_no_file_and_a_rerun_finishes(tiny_npz, tmp_path, monkeypatch):
    cfg = _cfg(tiny_npz, tmp_path / "buf", experts=1, epochs=3)
    real = buffer_mod.train_network

    def killed_after_first_epoch(*args, after_epoch=None, **kw):
        def hook(epoch, stats):
            after_epoch(epoch, stats)
            raise RuntimeError("killed")

        return real(*args, after_epoch=hook, **kw)

    monkeypatch.setattr(buffer_mod, "train_network", killed_after_first_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        build_buffer(cfg)
    out = Path(cfg.out)
    assert list_experts(out) == [] and _leftovers(out) == []
    monkeypatch.setattr(buffer_mod, "train_network", real)
    assert build_buffer(cfg) == [expert_path(out, 0)]
    assert read_expert(expert_path(out, 0)).num_snapshots == cfg.epochs + 1


def _cli_buffer(args: list[str], env: dict, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    cmd = launcher + ["-m", "distill.cli", "buffer", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_torchrun_two_processes_shard_experts_like_one_process(tiny_npz, tmp_path, subprocess_env):
    common = ["--data", str(tiny_npz), "--experts", "3", "--epochs", "1", "--device", "cpu", "--seed", "4"]
    two = _cli_buffer(common + ["--out", str(tmp_path / "two")], subprocess_env, nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    one = _cli_buffer(common + ["--out", str(tmp_path / "one")], subprocess_env)
    assert one.returncode == 0, one.stderr[-2000:]
    # Rank 0 trains experts 0 and 2, rank 1 trains expert 1: each reports its own share.
    assert sorted(line for line in two.stdout.splitlines() if "written" in line) == [
        f"1 expert(s) written to {tmp_path / 'two'}", f"2 expert(s) written to {tmp_path / 'two'}"]
    names = [p.name for p in list_experts(tmp_path / "two")]
    assert names == ["expert_0000.h5", "expert_0001.h5", "expert_0002.h5"]
    assert _leftovers(tmp_path / "two") == []
    for i in range(3):
        a, b = read_expert(expert_path(tmp_path / "two", i)), read_expert(expert_path(tmp_path / "one", i))
        assert a.attrs["expert_index"] == i
        assert torch.equal(a.snapshots(), b.snapshots()), f"expert {i} differs between 2 processes and 1"
