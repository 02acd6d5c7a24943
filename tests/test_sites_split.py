"""Several hospitals: the split across sites, a site's pipeline with a scarce class, unions of partial shares, FedAvg."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_arrays
from distill.config import EvalConfig, SplitConfig
from distill.data import load_data
from distill.errors import DistillError
from distill.evaluate import evaluate
from distill.formats import load_share
from distill.models import create_model
from distill.formats.sites_split import SPLIT_FORMAT, SPLIT_FORMAT_VERSION
from distill.sites import average_predictions, fedavg, split_dataset, split_indices
from distill.train import predict
from test_cli_errors import assert_one_sentence, run_main
from test_evaluate import TINY_MODEL, make_share


def _labels(counts=(60, 25, 7)) -> torch.Tensor:
    # Shuffled, so that the split cannot rely on images being sorted by class.
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize("alpha", [0.3, 1.0, None])
def test_the_split_is_seeded_disjoint_and_covers_the_training_set_once(alpha):
    y = _labels()
    parts = split_indices(y, 4, alpha, seed=3)
    again = split_indices(y, 4, alpha, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    joined = torch.cat(parts)
    assert len(joined) == len(y)  # nothing twice ...
    assert torch.equal(joined.sort().values, torch.arange(len(y)))  # ... and nothing left out
    other = split_indices(y, 4, alpha, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))  # the seed decides who gets which images


def test_iid_gives_every_site_its_fair_share_and_small_alpha_concentrates_classes():
    y = _labels((600, 300))
    iid = split_indices(y, 3, None, seed=0)
    for part in iid:
        assert torch.bincount(y[part], minlength=2).tolist() == [200, 100]
    skewed = split_indices(y, 3, 0.05, seed=0)
    largest = [max(int((y[p] == c).sum()) for p in skewed) for c in range(2)]
    assert largest[0] > 500 and largest[1] > 250  # Dirichlet(0.05) puts most of each class at one site


def test_min_per_class_gives_every_site_every_class():
    y = _labels()
    plain = split_indices(y, 5, 0.05, seed=0)
    assert any(torch.bincount(y[p], minlength=3).min() == 0 for p in plain)  # the plain split leaves gaps
    floored = split_indices(y, 5, 0.05, seed=0, min_per_class=1)
    assert all(torch.bincount(y[p], minlength=3).min() >= 1 for p in floored)
    assert torch.equal(torch.cat(floored).sort().values, torch.arange(len(y)))
    with pytest.raises(DistillError, match="too few to give each of 5 sites 2"):
        split_indices(y, 5, 0.3, seed=0, min_per_class=2)  # class 2 has 7 images


def test_split_writes_one_medmnist_file_per_site_and_the_class_counts(tmp_path, tiny_npz):
    result = split_dataset(SplitConfig(data=str(tiny_npz), out=str(tmp_path / "s"), sites=3, alpha="0.5", seed=1))
    record = json.loads(result.json_path.read_text())
    assert (record["format"], record["format_version"]) == (SPLIT_FORMAT, SPLIT_FORMAT_VERSION)
    source = load_data(tiny_npz)
    seen = []
    for entry, summary in zip(record["site_files"], result.sites):
        site = load_data(result.json_path.parent / entry["path"])
        idx = torch.tensor(entry["train_indices"], dtype=torch.int64)
        assert torch.equal(site.train.images, source.train.images[idx])
        assert torch.equal(site.train.labels, source.train.labels[idx])
        assert entry["class_counts"] == summary.class_counts == torch.bincount(site.train.labels, minlength=2).tolist()
        for split in ("val", "test"):  # the shared splits, untouched
            assert torch.equal(site.split(split).images, source.split(split).images)
            assert torch.equal(site.split(split).labels, source.split(split).labels)
        seen += entry["train_indices"]
    assert sorted(seen) == list(range(len(source.train)))


def test_split_cli_and_its_refusals(tmp_path, tiny_npz, monkeypatch, capsys):
    out = tmp_path / "s"
    code, stdout, err = run_main(["split", str(tiny_npz), "--sites", "2", "--alpha", "iid", "--out", str(out)],
                                 monkeypatch, capsys)
    assert code == 0, err
    assert "site 0: 10 training images" in stdout and (out / "split.json").exists()
    code, _, err = run_main(["split", str(tiny_npz), "--out", str(out)], monkeypatch, capsys)
    assert_one_sentence(code, err, "already holds a split")
    code, _, err = run_main(["split", str(tiny_npz), "--alpha", "-1", "--out", str(tmp_path / "t")], monkeypatch, capsys)
    assert_one_sentence(code, err, "--alpha must be a positive number or iid")
    code, _, err = run_main(["split", str(tiny_npz), "--sites", "1", "--out", str(tmp_path / "t")], monkeypatch, capsys)
    assert_one_sentence(code, err, "--sites must be at least 2")


def test_a_site_with_one_image_of_a_class_still_makes_a_valid_share(tmp_path, monkeypatch, capsys):
    """The site's own pipeline: buffer, run (--init noise, since --init real needs ipc images a class), export."""
    arrays = make_tiny_arrays()
    keep = np.concatenate([np.flatnonzero(arrays["train_labels"][:, 0] == 0), [10]])  # one image of class 1
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
    site = tmp_path / "site.npz"
    np.savez(site, **arrays)
    conf = tmp_path / "run.toml"
    conf.write_text("eval_models = 0\n")
    steps = [
        ["buffer", "--data", str(site), "--out", str(tmp_path / "b"), "--experts", "1", "--epochs", "2",
         "--batch-size", "4", "--snapshot-every", "1", "--device", "cpu"],
        ["run", "--buffer", str(tmp_path / "b"), "--out", str(tmp_path / "r"), "--ipc", "2", "--iterations", "2",
         "--syn-steps", "2", "--max-start-epoch", "1", "--init", "noise", "--config", str(conf), "--device", "cpu"],
        ["export", str(tmp_path / "r"), "--out", str(tmp_path / "share.h5"), "--force"],
    ]
    for args in steps:
        code, _, err = run_main(args, monkeypatch, capsys)
        assert code == 0, (args[0], err)
    share = load_share(tmp_path / "share.h5")
    assert share.class_counts() == [2, 2]
    real_init = [{"noise": "real", str(tmp_path / "r"): str(tmp_path / "r2")}.get(a, a) for a in steps[1]]
    code, _, err = run_main(real_init, monkeypatch, capsys)
    assert_one_sentence(code, err, "fewer than --ipc 2", "--init real-or-noise", "--init noise")
    real_or_noise = [{"real": "real-or-noise"}.get(a, a) for a in real_init]  # the one image of class 1, then noise
    code, _, err = run_main(real_or_noise, monkeypatch, capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------- the union of partial shares


def test_a_union_with_classes_only_some_shares_cover_trains_and_scores(tiny_npz):
    full = make_share(tiny_npz, per_class=3)
    only_class_0 = make_share(tiny_npz, per_class=3)
    keep = only_class_0.labels == 0
    only_class_0.images, only_class_0.labels = only_class_0.images[keep], only_class_0.labels[keep]
    report = evaluate(EvalConfig(test=str(tiny_npz), runs=2, device="cpu", baselines=("none",)),
                      shares=[("hospital_a.h5", only_class_0), ("hospital_b.h5", full)])
    (result,) = report["results"]
    assert result["trained_on"]["shares_per_class"] == [2, 1]
    assert result["trained_on"]["class_counts"] == [6, 3]
    assert all(np.isfinite(run["accuracy"]) and np.isfinite(run["auc"]) for run in result["runs"])
    assert all(v is not None for v in result["mean"]["per_class_accuracy"])


# ----------------------------------------------------------------------------- federated baselines


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet3", 2, 1, 8, **TINY_MODEL)


def test_fedavg_of_identical_models_is_that_model_and_of_two_their_weighted_mean():
    a, b = _net(0), _net(1)
    same = fedavg([a.state_dict(), a.state_dict(), a.state_dict()], weights=[5, 1, 2])
    assert all(torch.equal(same[k], v) for k, v in a.state_dict().items())
    mixed = fedavg([a.state_dict(), b.state_dict()], weights=[3, 1])
    for k, v in a.state_dict().items():
        torch.testing.assert_close(mixed[k], 0.75 * v + 0.25 * b.state_dict()[k])
    with pytest.raises(ValueError, match="one non-negative weight per state dict"):
        fedavg([a.state_dict()], weights=[1, 2])


def test_the_ensemble_label_is_the_mean_of_the_sites_probabilities():
    a, b = _net(0), _net(1)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    soft = average_predictions([a, b], x)
    torch.testing.assert_close(soft, (predict(a, x) + predict(b, x)) / 2)
    torch.testing.assert_close(soft.sum(1), torch.ones(5))


def test_fedavg_keeps_batch_norm_counters_that_differ_between_sites():
    # Sites that took different numbers of steps disagree on num_batches_tracked; fedavg must not refuse them.
    torch.manual_seed(0)
    a, b = create_model("convnet3", 2, 1, 8, norm="batch"), create_model("convnet3", 2, 1, 8, norm="batch")
    sa, sb = a.state_dict(), b.state_dict()
    counters = [k for k, v in sa.items() if not v.is_floating_point()]
    assert counters  # the model really has integer buffers
    for k in counters:
        sa[k], sb[k] = torch.tensor(3), torch.tensor(7)
    avg = fedavg([sa, sb])
    assert all(int(avg[k]) == 7 for k in counters)
    floats = [k for k in sa if sa[k].is_floating_point()]
    assert all(torch.allclose(avg[k], (sa[k] + sb[k]) / 2) for k in floats)
