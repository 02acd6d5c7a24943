"""The train/val split the experts trained on travels with the buffer: `distill run` and `distill audit` use it.

A folder with train/ but no val/ is carved with the buffer's seed. Reloading it
with any other seed would hand the audit "non-members" that the experts trained
on, so these tests build a buffer with a non-default seed and check that the
audit's non-members and the run's validation images are not training images.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from distill.buffer import build_buffer
from distill.config import BufferConfig, RunConfig
from distill.data import load_data
from distill.errors import DataError
from distill.export import export_share
from distill.formats.buffer_config import read_buffer_split
from distill.formats.trajectory import read_buffer_preprocessing
from distill.mtt import distill_run
from distill.mtt.distiller import load_real_data
from distill.mtt.experts import ExpertPool
from distill.privacy import holdout_split, load_matching_data, load_subject, run_audit

from conftest import make_tiny_arrays

BUFFER_SEED = 3  # not the default 0: a fresh carve would take another val split
FAST_AUDIT = dict(networks=1, epochs=2, expert_epochs=1, bootstrap=10, pairs=0)


def _write_train_only_folder(root, per_class=20, size=8):
    """train/ and test/ class folders of distinct random PNGs; no val/, so val is carved from train/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 3)):
        for c_idx, c in enumerate(("benign", "malignant")):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.integers(0, 120, size=(size, size)) + 120 * c_idx).astype(np.uint8)
                Image.fromarray(arr, mode="L").save(root / split / c / f"img{i:03d}.png")
    return root


def _buffer_and_run(data_spec, root, seed=BUFFER_SEED):
    buffer, run = root / "buffer", root / "run"
    build_buffer(BufferConfig(data=str(data_spec), out=str(buffer), experts=1, epochs=2, batch_size=8,
                              augment="none", seed=seed, device="cpu"))
    distill_run(RunConfig(buffer=str(buffer), out=str(run), ipc=1, iterations=1, syn_steps=1, expert_epochs=1,
                          max_start_epoch=1, eval_every=0, eval_models=0, device="cpu"))
    return buffer, run


def _rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(x.flatten().tolist()) for x in images}


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    folder = _write_train_only_folder(root / "ds")
    buffer, run = _buffer_and_run(folder, root)
    # What prepare_data gave the experts: the carve with the buffer's seed.
    experts_train = load_data(folder, split_seed=BUFFER_SEED).train.images
    return folder, buffer, run, experts_train


def test_the_fixture_would_catch_a_fresh_carve(folder_run):
    folder, _, _, experts_train = folder_run
    fresh_val = load_data(folder).val.images  # the default seed 0
    assert _rows(fresh_val) & _rows(experts_train), "seed 0's val must overlap seed 3's train for these tests to bite"


def test_the_buffer_records_the_exact_split(folder_run):
    folder, buffer, _, experts_train = folder_run
    record, indices = read_buffer_split(buffer)
    assert record["method"] == "carved" and record["seed"] == BUFFER_SEED and record["carved"] == ["val"]
    pool = load_data(folder, split_seed=BUFFER_SEED)
    assert len(indices["train"]) == len(experts_train) and len(indices["test"]) == 0
    _, fingerprint, _ = read_buffer_preprocessing(buffer)
    assert fingerprint["split"] == record == pool.split_record


def test_audit_nonmembers_are_not_the_experts_training_images(folder_run):
    folder, _, run, experts_train = folder_run
    subject = load_subject(run)
    data, _ = load_matching_data(subject, folder)
    assert torch.equal(data.train.images, experts_train)
    hold, _, _ = holdout_split(data, "val")
    assert len(hold) and not (_rows(hold) & _rows(experts_train))


def test_the_run_validates_on_images_no_expert_trained_on(folder_run):
    _, buffer, run, experts_train = folder_run
    data, why = load_real_data(RunConfig(buffer=str(buffer), out=str(run)), ExpertPool(buffer))
    assert data is not None, why
    assert torch.equal(data.train.images, experts_train) and not (_rows(data.val.images) & _rows(experts_train))


def test_a_changed_folder_is_refused_not_silently_recarved(folder_run, tmp_path):
    folder, _, run, _ = folder_run
    changed = _write_train_only_folder(tmp_path / "ds", per_class=21)  # one more image per class
    with pytest.raises(DataError, match="split"):
        load_matching_data(load_subject(run), changed)
    assert load_data(folder, split=read_buffer_split(folder_run[1])[0]).split_record["seed"] == BUFFER_SEED


def test_audit_of_a_share_says_which_split_it_assumes_and_why(folder_run, tmp_path, caplog):
    folder, _, run, experts_train = folder_run
    share = export_share(run, tmp_path / "s.h5", force=True)
    with caplog.at_level(logging.WARNING):
        data, _ = load_matching_data(load_subject(share), folder)
    said = " ".join(r.getMessage() for r in caplog.records if "assuming" in r.getMessage())
    assert f"val carved from train/ with seed {BUFFER_SEED}" in said and "records that its buffer carved it with seed 3" in said
    assert "counts of every split match" in said
    assert torch.equal(data.train.images, experts_train)  # the experts' seed is the buffer's carve seed


def test_npz_with_an_official_split_audits_its_own_val(tmp_path):
    npz = tmp_path / "tiny.npz"
    arrays = make_tiny_arrays()
    np.savez(npz, **arrays)
    _, run = _buffer_and_run(npz, tmp_path)
    report = run_audit(run, npz, device="cpu", **FAST_AUDIT)
    assert report.summary["data"]["split"] == {"recorded": True, "method": "official"}
    data, _ = load_matching_data(load_subject(run), npz)
    hold, _, _ = holdout_split(data, "val")
    official_train = torch.from_numpy(arrays["train_images"][:, None])
    assert _rows(hold) <= _rows(torch.from_numpy(arrays["val_images"][:, None]))
    assert not (_rows(hold) & _rows(official_train))


def test_eval_of_a_share_on_its_own_source_scores_images_no_expert_trained_on(tmp_path):
    from distill.evaluate import _source_split
    from distill.formats.share import load_share

    folder = tmp_path / "flat"
    rng = np.random.default_rng(1)
    for c_idx, c in enumerate(("benign", "malignant")):  # no train/: val and test are both carved
        (folder / c).mkdir(parents=True)
        for i in range(20):
            arr = (rng.integers(0, 120, size=(8, 8)) + 120 * c_idx).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(folder / c / f"img{i:03d}.png")
    _, run = _buffer_and_run(folder, tmp_path)
    share = [("s.h5", load_share(export_share(run, tmp_path / "s.h5", force=True)))]
    experts_train = load_data(folder, split_seed=BUFFER_SEED).train.images
    fresh = load_data(folder)
    assert _rows(fresh.test.images) & _rows(experts_train)  # a fresh carve would score training images
    carve = _source_split(share, fresh)
    assert carve is not None and carve["seed"] == BUFFER_SEED
    scored = load_data(folder, split=carve).test.images
    assert len(scored) and not (_rows(scored) & _rows(experts_train))
    other = _write_train_only_folder(tmp_path / "other")  # another hospital's data: its own split stands
    assert _source_split(share, load_data(other)) is None


def test_a_run_from_before_recorded_splits_is_audited_with_its_buffers_seed(folder_run, tmp_path, caplog):
    import dataclasses

    from distill.formats.synset import SYNSET_FILE, read_synset, write_synset

    folder, _, run, experts_train = folder_run
    s = read_synset(run / SYNSET_FILE)
    old = dataclasses.replace(s, fingerprint={k: v for k, v in s.fingerprint.items() if k != "split"})
    (tmp_path / "old").mkdir()
    write_synset(tmp_path / "old" / SYNSET_FILE, old)
    with caplog.at_level(logging.WARNING):
        data, _ = load_matching_data(load_subject(tmp_path / "old"), folder)
    said = " ".join(r.getMessage() for r in caplog.records if "assuming" in r.getMessage())
    assert f"buffer (its config.toml) was built with seed {BUFFER_SEED}" in said
    assert torch.equal(data.train.images, experts_train)
