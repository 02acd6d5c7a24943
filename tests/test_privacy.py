"""The privacy audit: nearest neighbours, membership inference, verdict, JSON contract, export gate."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data import fit_preprocessing, load_data
from distill.errors import DataError, DistillError, FormatError
from distill.formats.synset import SyntheticSet, write_synset
from distill.models import create_model
from distill.privacy import (AUDIT_FILE, FPRS, NEAR_DUPLICATE_RATIO, STATEMENT, attack_metrics, auc, embed,
                             example_losses, holdout_split, load_matching_data, load_subject, nearest_ssim, read_audit,
                             run_audit, top_similar, tpr_at_fpr, verdict)
from distill.train import TrainRecipe, train_network

# What distill export and docs/privacy.md rely on.
DOC_KEYS = {"format", "format_version", "passed", "summary", "statement", "created", "subject_sha256"}
SUMMARY_KEYS = {"settings", "data", "n_synthetic", "nearest_neighbour", "feature_network", "flagged",
                "flagged_synthetic_indices", "membership", "verdict"}
NN_KEYS = {"synthetic", "holdout", "threshold", "flagged"}
ATTACK_KEYS = {"auc", "tpr_at_1pct_fpr", "tpr_at_0p1pct_fpr", "n_members", "n_nonmembers"}
# Small enough for a shared CPU: a narrow ConvNet, one network per side, a few epochs.
FAST = dict(networks=1, epochs=5, expert_epochs=1, bootstrap=20, pairs=4)
PLANTED = 3  # index of the real training image planted in the synthetic set


# ----------------------------------------------------------------------------- attack statistics


def _brute_auc(m, n):
    return np.mean([(a > b) + 0.5 * (a == b) for a in m for b in n])


def _brute_tpr(m, n, fpr):
    thresholds = np.concatenate([[-np.inf], np.unique(np.concatenate([m, n]))])
    return max(np.mean(m > t) for t in thresholds if np.mean(n > t) <= fpr + 1e-12)


def test_auc_and_tpr_match_their_definitions():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 20, 150).astype(float) + 3  # integers, so ties happen
    n = rng.integers(0, 20, 200).astype(float)
    assert auc(m, n) == pytest.approx(_brute_auc(m, n))
    for fpr in (0.01, 0.05, 0.2):
        assert tpr_at_fpr(m, n, fpr) == pytest.approx(_brute_tpr(m, n, fpr))


def test_attack_metrics_are_seeded_and_mark_unresolvable_rates():
    rng = np.random.default_rng(1)
    m, n = rng.normal(0.5, 1, 120), rng.normal(0, 1, 150)
    a, b = attack_metrics(m, n, bootstrap=50, seed=3), attack_metrics(m, n, bootstrap=50, seed=3)
    assert a == b
    assert a["auc"]["ci95"][0] <= a["auc"]["value"] <= a["auc"]["ci95"][1]
    assert a["auc"]["ci95"][0] < a["auc"]["ci95"][1]
    assert a["tpr_at_1pct_fpr"]["resolvable"] and not a["tpr_at_0p1pct_fpr"]["resolvable"]  # 150 < 1 / 0.001
    assert set(a) == ATTACK_KEYS and set(FPRS) < set(a)


def test_verdict_fails_strong_attacks_and_flags_but_not_noise():
    rng = np.random.default_rng(2)
    null = attack_metrics(rng.normal(0, 1, 500), rng.normal(0, 1, 500), bootstrap=50)
    strong = attack_metrics(rng.normal(1.5, 1, 500), rng.normal(0, 1, 500), bootstrap=50)
    assert verdict(0, {"loss": null}, null)[0]
    passed, reasons = verdict(0, {"loss": strong}, null)
    assert not passed and any("AUC" in r for r in reasons)
    assert not verdict(1, {"loss": null}, null)[0]
    # A real subset that leaks as much as the share is the reference, so the share passes.
    assert verdict(0, {"loss": strong}, strong)[0]


# ----------------------------------------------------------------------------- similarity search


def test_top_similar_in_chunks_matches_numpy_correlation():
    g = torch.Generator().manual_seed(0)
    q, r = torch.rand(10, 1, 8, 8, generator=g), torch.rand(20, 1, 8, 8, generator=g)
    vals, idx = top_similar(q, r, 2, centre=True, chunk=3)
    corr = np.corrcoef(q.flatten(1).numpy(), r.flatten(1).numpy())[:10, 10:]
    best = np.sort(corr, axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(vals.numpy(), best, atol=1e-5)
    np.testing.assert_array_equal(idx[:, 0].numpy(), corr.argmax(1))


def test_nearest_ssim_finds_the_identical_candidate():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(6, 1, 8, 8, generator=g)
    q = ref[[4, 1]].clone()
    val, idx = nearest_ssim(q, ref, torch.tensor([[0, 4, 2], [1, 3, 5]]))
    assert idx.tolist() == [4, 1]
    assert torch.allclose(val, torch.ones(2), atol=1e-4)


def test_embed_gives_the_classifier_input():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = create_model("convnet3", 2, 1, 8, width=4)
    x = torch.randn(5, 1, 8, 8)
    f = embed(net, x, batch_size=2)
    head = net.classifier
    assert torch.allclose(head(f), net.eval()(x), atol=1e-5)


def test_holdout_split_drops_a_near_copy_of_a_training_image(tiny_npz):
    data = load_data(tiny_npz)
    copy = data.train.images[3].clone()
    copy[0, 0, 0] ^= 1  # one grey level off: the same picture re-encoded, not another patient
    data.val.images[2] = copy
    images, labels, removed = holdout_split(data, "val")
    assert removed == 1 and len(images) == len(data.val) - 1
    assert not any(torch.equal(x, copy) for x in images)
    assert 0 < NEAR_DUPLICATE_RATIO < 1


# ----------------------------------------------------------------------------- real data (BreastMNIST)


@pytest.fixture(scope="module")
def breast_npz() -> Path:
    # The repository's conftest `shared_data` fixture is function-scoped; this module shares one set of audits.
    from conftest import SHARED_DATA

    path = SHARED_DATA / "breastmnist.npz"
    if not path.exists():
        pytest.skip(f"real MedMNIST data not found at {path}")
    return path


def _rundir(path: Path, data, images: torch.Tensor, labels: torch.Tensor, pre, **fingerprint) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_synset(path / "synthetic.h5", SyntheticSet(
        images=images, labels=labels, label_logits=None, preprocessing=pre, syn_lr=0.01, label_temperature=1.0,
        model="convnet3", class_names=list(data.class_names), model_kwargs={"width": 8},
        fingerprint=data.fingerprint() | fingerprint, method={"eval_epochs": 5, "augment": "none"}))
    return path


@pytest.fixture(scope="module")
def breast(breast_npz):
    data = load_data(breast_npz)
    return data, fit_preprocessing(data.train.images)


def _noise_set(data, pre, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(data.num_classes).repeat_interleave(5)
    return torch.randn(len(labels), data.channels, data.size, data.size, generator=g), labels


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, breast, breast_npz):
    data, pre = breast
    images, labels = _noise_set(data, pre)
    images[PLANTED] = pre(data.train.images[7:8])[0]
    labels[PLANTED] = data.train.labels[7]
    rundir = _rundir(tmp_path_factory.mktemp("planted"), data, images, labels, pre)
    report = run_audit(rundir, breast_npz, device="cpu", **FAST)
    return rundir, report


def test_planted_training_image_is_flagged(planted_run):
    rundir, report = planted_run
    s = report.summary
    assert s["flagged_synthetic_indices"] == [PLANTED]
    assert s["nearest_neighbour"]["pixel_correlation"]["synthetic"]["max"] > 0.999
    assert not report.passed and any("closer to a training image" in r for r in report.reasons)
    assert (rundir / "audit_pairs.png").stat().st_size > 0


def test_noise_set_is_not_flagged_and_json_has_documented_keys(tmp_path, breast, breast_npz):
    data, pre = breast
    rundir = _rundir(tmp_path / "run", data, *_noise_set(data, pre, seed=1), pre)
    full = tmp_path / "full.json"
    report = run_audit(rundir, breast_npz, json_path=full, device="cpu", **FAST)
    s = report.summary
    assert s["flagged"] == 0
    for name, m in s["nearest_neighbour"].items():
        assert set(m) == NN_KEYS
        assert m["synthetic"]["max"] < m["threshold"], name

    doc = json.loads((rundir / AUDIT_FILE).read_text())
    assert set(doc) == DOC_KEYS and doc["format"] == "distill-audit" and doc["statement"] == STATEMENT
    assert set(doc["summary"]) == SUMMARY_KEYS and doc["passed"] == report.passed
    mia = doc["summary"]["membership"]
    assert {"share", "real_subset", "real_subset_included", "n_members", "n_nonmembers"} <= set(mia)
    assert set(mia["share"]) == {"loss", "calibrated"} and set(mia["real_subset"]) == ATTACK_KEYS
    assert doc["summary"]["data"]["nonmembers"] == "val" and doc["summary"]["data"]["n_holdout"] > 0
    # The summary travels in the share: no path or file name of this machine may be in it.
    text = json.dumps(doc["summary"])
    for word in (str(tmp_path), "breastmnist.npz", "synthetic.h5", "/"):
        assert word not in text
    local = json.loads(full.read_text())
    assert len(local["details"]["synthetic"]) == s["n_synthetic"] and "details" not in doc


def test_a_buffer_expert_can_give_the_features(tmp_path, breast, breast_npz):
    from distill.buffer import build_buffer
    from distill.config import BufferConfig

    data, pre = breast
    buf = tmp_path / "buf"
    build_buffer(BufferConfig(data=str(breast_npz), out=str(buf), experts=1, epochs=1, augment="none", device="cpu"))
    images, labels = _noise_set(data, pre, seed=2)
    images[0] = pre(data.train.images[11:12])[0]
    rundir = _rundir(tmp_path / "run", data, images, labels, pre)
    report = run_audit(rundir, breast_npz, expert=buf / "expert_0000.h5", device="cpu", **FAST)
    s = report.summary
    assert s["feature_network"]["source"] == "trajectory"
    assert s["flagged_synthetic_indices"] == [0]
    assert s["nearest_neighbour"]["feature_cosine"]["flagged"] == 1


def test_attack_finds_members_of_an_overfitted_network(breast):
    data, pre = breast
    members = torch.cat([torch.nonzero(data.train.labels == c).flatten()[:10] for c in range(2)])
    x, y = pre(data.train.images[members]), data.train.labels[members]
    hold, hold_y, _ = holdout_split(data, "val+test")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = create_model("convnet3", 2, 1, data.size, width=16)
    # No weight decay, no augmentation, 300 epochs on 20 images: memorisation on purpose.
    recipe = TrainRecipe(epochs=300, lr=0.01, batch_size=20, weight_decay=0.0, decay_at_half=False)
    train_network(net, x, y, recipe, torch.Generator().manual_seed(0))
    m = attack_metrics(-example_losses(net, x, y), -example_losses(net, pre(hold), hold_y), bootstrap=20)
    assert m["auc"]["value"] > 0.8


def test_wrong_data_and_broken_sets_are_refused(tmp_path, breast, breast_npz):
    data, pre = breast
    wrong_hash = _rundir(tmp_path / "a", data, *_noise_set(data, pre), pre, sha256="0" * 64)
    with pytest.raises(DataError, match="not the data"):
        load_matching_data(load_subject(wrong_hash), breast_npz)
    three = load_subject(_rundir(tmp_path / "b", data, *_noise_set(data, pre), pre))
    three = dataclasses.replace(three, class_names=("a", "b", "c"), data_sha256=None)
    with pytest.raises(DataError, match="3"):
        load_matching_data(three, breast_npz)
    images, labels = _noise_set(data, pre)
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        load_subject(_rundir(tmp_path / "c", data, images, labels, pre))


def test_cli_reports_a_missing_source_in_one_sentence(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distill.cli", "audit", str(tmp_path / "nope"), "--data", "breastmnist"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_read_audit_refuses_missing_and_malformed_files(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        read_audit(tmp_path)
    for text in ("{not json", json.dumps({"format": "something-else"}),
                 json.dumps({"format": "distill-audit", "format_version": "2.0", "passed": True}),
                 json.dumps({"format": "distill-audit", "format_version": "1.0", "passed": True})):
        (tmp_path / AUDIT_FILE).write_text(text)
        with pytest.raises(FormatError):
            read_audit(tmp_path)
    good = {"format": "distill-audit", "format_version": "1.3", "passed": False, "summary": {}, "statement": STATEMENT}
    (tmp_path / AUDIT_FILE).write_text(json.dumps(good))
    doc = read_audit(tmp_path)
    assert (doc.passed, doc.summary, doc.statement, doc.format_version) == (False, {}, STATEMENT, "1.3")


# ----------------------------------------------------------------------------- export gate (distill/export.py)


def test_export_refuses_a_failed_audit_and_records_force(planted_run, tmp_path, breast_npz):
    from distill.export import export_share
    from distill.formats.share import load_share

    rundir, report = planted_run
    with pytest.raises(DistillError, match="failed"):
        export_share(rundir, tmp_path / "share.h5")
    out = export_share(rundir, tmp_path / "share.h5", force=True)
    privacy = load_share(out).privacy
    assert privacy["forced"] is True or privacy["forced"] == np.bool_(True)
    assert privacy["audit_status"] == "failed"
    # The figures stay at home (issue 23, share format 1.1): the share records the verdict only.
    assert privacy["summary"] == {} and "verdict: failed" in privacy["statement"]
    assert report.summary["flagged_synthetic_indices"] == [PLANTED]

    # The share can be audited too; it only holds a salted hash, so the data is checked by geometry.
    again = run_audit(out, breast_npz, device="cpu", **FAST)
    assert again.summary["flagged_synthetic_indices"] == [PLANTED]
    assert again.summary["data"]["fingerprint_check"] == "geometry"
