"""Recipient evaluation: metrics against hand-computed values, unions of shares, baselines, the JSON report."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import benchmark_module
import torch
from click.testing import CliRunner

from distill.data import fit_preprocessing, load_data
from distill.errors import DataError, DistillError
from distill.evaluate import (EvalConfig, auc_ovr, binary_auc, classification_metrics, draw_random_real, evaluate,
                              format_report, join_shares, renormalise)
from distill.train import TrainRecipe, soft_cross_entropy, train_network
from distill.formats.share import Recipe, Share

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
TINY_MODEL = {"width": 8}  # a width-8 ConvNet keeps every training run here well under a second


# ----------------------------------------------------------------------------- helpers


def make_share(npz: Path, *, per_class: int = 3, soft: bool = False, lr: float = 0.01, epochs: int = 4,
               class_names=None, pre=None, seed: int = 0, **recipe_kw) -> Share:
    """A share of real tiny images (the first ``per_class`` of each class), as a distiller's starting point."""
    data = load_data(npz)
    pre = pre or fit_preprocessing(data.train.images)
    idx = torch.cat([torch.nonzero(data.train.labels == c).flatten()[:per_class] for c in range(2)])
    labels = data.train.labels[idx]
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.nn.functional.one_hot(labels, 2).float() + torch.randn(len(idx), 2, generator=g)) if soft else None
    recipe = dict(model="convnet3", model_kwargs=dict(TINY_MODEL), lr=lr, epochs=epochs, batch_size=256, momentum=0.9,
                  weight_decay=5e-4, lr_decay="half", augment="none",
                  loss="soft_cross_entropy" if soft else "cross_entropy") | recipe_kw
    return Share(images=pre(data.train.images[idx]), labels=labels, label_logits=logits, label_temperature=1.0,
                 class_names=list(class_names or data.class_names), preprocessing=pre, recipe=Recipe(**recipe))


def cfg(npz: Path, **kw) -> EvalConfig:
    return EvalConfig(**({"test": str(npz), "runs": 2, "device": "cpu", "seed": 0} | kw))


# ----------------------------------------------------------------------------- metrics


def test_auc_and_accuracy_match_a_hand_computed_binary_example():
    # Scores of class 1 for 6 test images; truth 0 0 1 0 1 1.
    # Pairs (positive, negative): 3 x 3 = 9. Positive 0.4 beats the negative 0.1 and ties 0.4 (= 1.5 of 3),
    # positive 0.8 beats all three (3), positive 0.35 beats only 0.1 (1). AUC = (1.5 + 3 + 1) / 9 = 5.5 / 9.
    p1 = torch.tensor([0.1, 0.4, 0.4, 0.6, 0.8, 0.35])
    y = torch.tensor([0, 0, 1, 0, 1, 1])
    probs = torch.stack([1 - p1, p1], 1)
    m = classification_metrics(probs, y)
    assert m["auc"] == pytest.approx(5.5 / 9)
    # Predicted (argmax, p1 > 0.5): 0 0 0 1 1 0 -> correct at indices 0, 1, 4 -> 3/6.
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion"] == [[2, 1], [2, 1]]  # rows true, columns predicted
    assert m["per_class_accuracy"] == pytest.approx([2 / 3, 1 / 3])


def test_multiclass_auc_is_the_macro_mean_of_one_vs_rest():
    probs = torch.tensor([[0.7, 0.2, 0.1],
                          [0.2, 0.5, 0.3],
                          [0.3, 0.3, 0.4],
                          [0.1, 0.3, 0.6]])
    y = torch.tensor([0, 1, 2, 1])
    # Class 0 vs rest: positive 0.7 > all negatives (0.2, 0.3, 0.1): 1.0.
    # Class 1 vs rest: positives 0.5, 0.3; negatives 0.2, 0.3 -> 0.5 beats both (2), 0.3 beats 0.2, ties 0.3 (1.5): 3.5/4.
    # Class 2 vs rest: positive 0.4; negatives 0.1, 0.3, 0.6 -> beats two: 2/3.
    assert auc_ovr(probs, y) == pytest.approx((1.0 + 3.5 / 4 + 2 / 3) / 3)
    assert classification_metrics(probs, y)["accuracy"] == pytest.approx(0.75)  # argmax 0 1 2 2: 3 of 4


def test_auc_of_a_class_missing_from_the_labels_is_left_out():
    assert np.isnan(binary_auc(np.array([0.1, 0.9]), np.array([True, True])))
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    assert auc_ovr(probs, torch.tensor([0, 1])) == pytest.approx(1.0)  # class 2 has no positive: not averaged in


# ----------------------------------------------------------------------------- random real


def test_random_real_draws_exactly_k_per_class_with_the_seed():
    labels = torch.tensor([0] * 30 + [1] * 12 + [2] * 7)
    draw = lambda seed: draw_random_real(labels, 3, 5, torch.Generator().manual_seed(seed))  # noqa: E731
    idx = draw(1)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [5, 5, 5]
    assert len(set(idx.tolist())) == 15  # without replacement
    assert torch.equal(idx, draw(1))  # the seed fixes the subset
    assert not torch.equal(idx, draw(2))  # and another seed changes it
    with pytest.raises(DataError, match="only 7 training images"):
        draw_random_real(labels, 3, 8, torch.Generator().manual_seed(0), ["a", "b", "c"])


def test_random_real_baseline_records_its_subset_per_run(tiny_npz, tmp_path):
    c = cfg(tiny_npz, baselines=("random-real",), real_per_class=3, epochs=2, model_kwargs=TINY_MODEL, json=str(tmp_path / "r.json"))
    report = evaluate(c)
    (arm,) = report["results"]
    y = load_data(tiny_npz).train.labels
    subsets = [run["indices"] for run in arm["runs"]]
    for s in subsets:
        assert torch.bincount(y[s], minlength=2).tolist() == [3, 3]
    assert subsets[0] != subsets[1]  # every run draws its own subset
    assert evaluate(c)["results"][0]["runs"][0]["indices"] == subsets[0]  # same seed, same subsets
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["kind"] == "random-real"


# ----------------------------------------------------------------------------- unions of shares


def test_union_concatenates_and_mixes_hard_and_soft_labels(tiny_npz):
    hard = make_share(tiny_npz, per_class=2, lr=0.01)
    soft = make_share(tiny_npz, per_class=3, soft=True, lr=0.04)
    u = join_shares([("hard.h5", hard), ("soft.h5", soft)])
    assert u.images.shape == (10, 1, 8, 8)
    assert u.targets.shape == (10, 2)
    assert torch.equal(u.targets[:4], torch.nn.functional.one_hot(hard.labels, 2).float())
    assert torch.allclose(u.targets[4:], torch.softmax(soft.label_logits, 1))
    assert u.recipe.lr == pytest.approx(0.02)  # geometric mean of 0.01 and 0.04
    assert join_shares([("a", hard), ("b", soft)], lr=0.5).recipe.lr == 0.5
    both_hard = join_shares([("a", hard), ("b", make_share(tiny_npz, per_class=1))])
    assert both_hard.targets.dtype == torch.int64 and both_hard.targets.shape == (6,)


def test_a_share_trained_with_cross_entropy_uses_its_hard_labels(tiny_npz):
    s = make_share(tiny_npz, soft=True, loss="cross_entropy")
    assert torch.equal(join_shares([("s", s)]).targets, s.labels)


def test_union_converts_another_mean_std_exactly(tiny_npz):
    data = load_data(tiny_npz)
    pre_a = fit_preprocessing(data.train.images)
    pre_b = fit_preprocessing(data.train.images[:7])  # another hospital's statistics
    a, b = make_share(tiny_npz, pre=pre_a), make_share(tiny_npz, pre=pre_b)
    u = join_shares([("a", a), ("b", b)])
    # The same real pixels, normalised by either hospital, must end up identical in a's space.
    assert torch.allclose(u.images[6:], a.images, atol=1e-5)
    assert torch.allclose(renormalise(a.images, pre_a, pre_b), b.images, atol=1e-5)


def test_evaluating_a_union_of_two_shares(tiny_npz):
    shares = [("a.h5", make_share(tiny_npz, per_class=2)), ("b.h5", make_share(tiny_npz, per_class=3, soft=True))]
    report = evaluate(cfg(tiny_npz, baselines=("none",)), shares=shares)
    (arm,) = report["results"]
    assert arm["trained_on"]["images"] == 10 and arm["trained_on"]["labels"] == "mixed"
    assert [s["path"] for s in arm["trained_on"]["shares"]] == ["a.h5", "b.h5"]
    assert arm["recipe"]["loss"] == "soft_cross_entropy"
    assert len(arm["runs"]) == 2


@pytest.mark.parametrize("change, message", [
    (dict(class_names=["benign", "malignant"]), "classes"),
    (dict(zca=True), "ZCA"),
    (dict(size=16), "geometry"),
    (dict(augment="flip"), "augment"),
    (dict(epochs=9), "--epochs"),
])
def test_incompatible_shares_are_refused_with_what_differs(tiny_npz, tmp_path, change, message):
    a = make_share(tiny_npz)
    if "zca" in change:
        b = make_share(tiny_npz, pre=fit_preprocessing(load_data(tiny_npz).train.images, zca=True))
    elif "size" in change:
        arrays = np.load(tiny_npz)
        big = tmp_path / "big.npz"
        np.savez(big, **{k: (np.kron(v, np.ones((1, 2, 2), np.uint8)) if k.endswith("images") else v)
                         for k, v in arrays.items()})
        b = make_share(big)
    elif "class_names" in change:
        b = make_share(tiny_npz, class_names=change["class_names"])
    else:
        b = make_share(tiny_npz, **change)
    with pytest.raises(DataError, match=message) as e:
        join_shares([("a.h5", a), ("b.h5", b)])
    assert "a.h5" in str(e.value) and "b.h5" in str(e.value)


def test_test_data_with_other_classes_is_refused(tiny_npz, tmp_path, tiny_arrays):
    arrays = tiny_arrays()
    for split in ("train", "val", "test"):
        arrays[f"{split}_labels"][:2] = 2  # a third class
    other = tmp_path / "three.npz"
    np.savez(other, **arrays)
    with pytest.raises(DataError, match="3 classes but the share has 2"):
        evaluate(cfg(other, baselines=("none",)), shares=[("a.h5", make_share(tiny_npz))])


def test_test_data_with_other_class_names_is_refused_unless_matched_by_position(tiny_npz, tmp_path):
    # Saved under a MedMNIST name, the tiny data takes BreastMNIST's class names.
    named = tmp_path / "breastmnist.npz"
    named.write_bytes(tiny_npz.read_bytes())
    share = make_share(tiny_npz, class_names=["normal", "pneumonia"])
    with pytest.raises(DataError, match="--match-classes-by-position"):
        evaluate(cfg(named, baselines=("none",)), shares=[("a.h5", share)])
    report = evaluate(cfg(named, baselines=("none",), runs=1, match_by_position=True), shares=[("a.h5", share)])
    assert len(report["results"]) == 1


# ----------------------------------------------------------------------------- the stage and its report


def _keys(obj) -> set[str]:
    """Every dict key in the report, except inside free-form dicts: library versions, model arguments and the
    share's own recipe (documented in docs/share-format.md; told apart from the report's recipe by its model)."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            free_form = k in ("software", "model_kwargs") or (k == "recipe" and "model" in v)
            if not free_form:
                out |= _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _keys(v)
    return out


def test_eval_json_has_the_documented_keys(tiny_npz, tmp_path):
    out = tmp_path / "eval.json"
    report = evaluate(cfg(tiny_npz, real_per_class=2, epochs=2, json=str(out)), shares=[("s.h5", make_share(tiny_npz, soft=True))])
    on_disk = json.loads(out.read_text())  # strict JSON: NaN would have been written as null
    assert on_disk == json.loads(json.dumps(report))
    assert [r["kind"] for r in on_disk["results"]] == ["distilled", "random-real", "full"]
    documented = set(re.findall(r"`([a-z_0-9]+)`", DOCS.read_text()))
    undocumented = _keys(on_disk) - documented
    assert not undocumented, f"keys missing from docs/evaluation.md: {sorted(undocumented)}"
    for r in on_disk["results"]:
        assert set(r["mean"]) == {"accuracy", "auc", "per_class_accuracy"} == set(r["std"])
        assert 0 <= r["mean"]["accuracy"] <= 1 and 0 <= r["mean"]["auc"] <= 1
        for run in r["runs"]:
            assert np.sum(run["confusion"]) == on_disk["test"]["images"]
    table = format_report(on_disk)
    assert "random real (2/class)" in table and "full training split" in table  # baselines beside the share


def test_eval_is_seeded(tiny_npz):
    share = [("s.h5", make_share(tiny_npz, soft=True, augment="flip,crop"))]
    run = lambda seed: evaluate(cfg(tiny_npz, runs=1, seed=seed, baselines=("none",)), shares=share)  # noqa: E731
    first, again = run(0)["results"][0]["runs"][0], run(0)["results"][0]["runs"][0]
    assert first["final_train_loss"] == again["final_train_loss"]
    assert first["confusion"] == again["confusion"]
    assert run(1)["results"][0]["runs"][0]["final_train_loss"] != first["final_train_loss"]


def test_cross_architecture_model_override(tiny_npz):
    report = evaluate(cfg(tiny_npz, runs=1, model="vgg11", epochs=1, baselines=("none",)),
                      shares=[("s.h5", make_share(tiny_npz))])
    assert report["model"] == "vgg11" and report["model_kwargs"] == {}  # the share's ConvNet width is not carried over


@pytest.mark.parametrize("kw, message", [
    (dict(), "Nothing to evaluate"),
    (dict(baselines=("random-real",)), "needs --ipc"),
    (dict(baselines=("full",), runs=0), "--runs"),
    (dict(baselines=("full",), model="resnet99"), "Unknown model"),
    (dict(baselines=("random-real",), real_per_class=11), "fewer than --ipc 11"),
])
def test_bad_requests_get_one_sentence(tiny_npz, kw, message):
    with pytest.raises(DistillError, match=message):
        evaluate(cfg(tiny_npz, **kw), shares=[])


def test_cli_baseline_writes_json_and_refuses_nonsense(tiny_npz, tmp_path):
    from distill.cli import cli

    out = tmp_path / "full.json"
    ok = CliRunner().invoke(cli, ["eval", "--baseline", "full", "--train", str(tiny_npz), "--runs", "1", "--epochs", "1",
                                  "--device", "cpu", "--json", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "full training split" in ok.output
    assert json.loads(out.read_text())["results"][0]["trained_on"]["images"] == 20
    bad = CliRunner().invoke(cli, ["eval", "--test", str(tiny_npz)])
    assert bad.exit_code != 0 and isinstance(bad.exception, DistillError)


def test_cli_eval_through_a_share_file(tiny_npz, tmp_path):
    from distill.cli import cli
    from distill.formats.share import write_share

    path, other = tmp_path / "s.h5", tmp_path / "t.h5"
    write_share(path, make_share(tiny_npz, soft=True))
    write_share(other, make_share(tiny_npz, soft=True, seed=1))  # other soft labels: another share
    out = tmp_path / "e.json"
    res = CliRunner().invoke(cli, ["eval", str(path), str(other), "--test", str(tiny_npz), "--runs", "1",
                                   "--baseline", "random-real", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["results"][0]["trained_on"]["images"] == 12  # the union of the two files
    assert report["results"][1]["trained_on"]["ipc"] == 6


# ----------------------------------------------------------------------------- benchmarks/results.py (table logic)
# The benchmark itself runs the whole pipeline and never runs in CI. These tests feed its pure
# table-writing functions invented numbers to check the layout and the target arithmetic; the
# numbers are not results and nothing here writes docs/results.md.


@pytest.fixture(scope="module")
def results_mod():
    yield from benchmark_module("results.py", "benchmark_results")


def _fake_rows(m, margin_acc: float, big_acc: float):
    R = m.Row
    return [
        R("pneumoniamnist", None, "full data", 0.80, 0.01, 0.9, 0.01, 3, 100.0, [1]),
        R("pneumoniamnist", 10, "random real", 0.60, 0.02, 0.7, 0.02, 3, 5.0, [2]),
        R("pneumoniamnist", 10, "distilled, hard labels", margin_acc, 0.02, 0.7, 0.02, 3, 50.0, [3, 4, 5]),
        R("pneumoniamnist", 50, "distilled, soft labels", big_acc, 0.02, 0.7, 0.02, 3, 50.0, [6, 7, 8]),
        R("retinamnist", 50, "random real", note="a class has only 40 training images"),
    ]


def test_results_targets_arithmetic(results_mod):
    verdicts = results_mod.check_targets(_fake_rows(results_mod, margin_acc=0.66, big_acc=0.75))
    line = lambda *words: next(v for v in verdicts if all(w in v for w in words))  # noqa: E731
    assert "met (66.0 vs 60.0, +6.0 points)" in line("pneumoniamnist, 10/class, hard")
    assert "not measured" in line("pneumoniamnist, 10/class, soft")  # no such row
    assert "not measured" in line("breastmnist, 10/class, hard")
    assert "NOT met (75.0 vs 80.0, 93.8%)" in line("pneumoniamnist, 50/class, soft")
    below = results_mod.check_targets(_fake_rows(results_mod, margin_acc=0.64, big_acc=0.77))
    assert any("10/class, hard" in v and "NOT met" in v for v in below)
    assert any("50/class, soft" in v and ": met" in v for v in below)


def test_results_section_layout_and_merge(results_mod):
    m = results_mod
    meta = {"profile": {**m.PROFILES["quick"].__dict__}, "hardware": "CPU Example 9000, 2 logical cores",
            "software": "torch x", "commit": "abc123", "finished": "today", "wall_seconds": 300.0}
    commands = [f"distill step {i}" for i in range(1, 9)]
    section = m.render_section(meta, _fake_rows(m, 0.66, 0.75), commands, {"pneumoniamnist": {"buffer_seconds": 40.0,
                                                                                                "buffer_command": 9,
                                                                                                "majority_accuracy": 0.625}})
    assert "Profile `quick`" in section and "CPU Example 9000" in section
    assert "| all | full data | 80.0 ± 1.0 | 0.900 ± 0.010 | 3 | 100 s | [1] |" in section
    assert "| 10 | distilled, hard labels | 66.0 ± 2.0 |" in section and "[3], [4], [5]" in section
    assert "skipped: a class has only 40 training images" in section
    assert "8. `distill step 8`" in section and "command [9]" in section
    assert "most frequent test class scores 62.5 %" in section
    doc = m.merge_section("", "quick", section)
    doc = m.merge_section(doc, "paper", "## Profile `paper`\nGPU table\n")
    again = m.merge_section(doc, "quick", "## Profile `quick`\nnew numbers\n")
    assert "GPU table" in again and "new numbers" in again and "CPU Example 9000" not in again
    assert again.count("<!-- results:quick:begin -->") == 1 and again.startswith("# Results")


def test_a_diverging_share_gets_one_sentence_not_a_number(tiny_npz):
    from distill.errors import DivergenceError

    with pytest.raises(DivergenceError, match="diverged"):
        evaluate(cfg(tiny_npz, runs=1, baselines=("none",)), shares=[("s.h5", make_share(tiny_npz, lr=1e12))])


def test_evaluate_needs_neither_the_distiller_nor_the_buffer():
    import subprocess

    code = ("import sys, distill.evaluate; print(' '.join(m for m in sys.modules "
            "if m.startswith('distill.mtt') or m == 'distill.buffer'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"distill.evaluate imports {done.stdout.strip()}"


# ----------------------------------------------------------------------------- moving soft labels to one class mix


def _site_share(npz: Path, counts: list[int], logits: torch.Tensor) -> Share:
    """A soft-labelled share whose provenance says its site held ``counts`` training images per class."""
    s = make_share(npz, per_class=2, soft=True)
    s.label_logits = logits
    s.provenance = {"dataset": {"name": "site", "counts": {"train": counts, "val": [1, 1], "test": [1, 1]}}}
    return s


def test_label_prior_applies_the_prior_shift_rule_per_site(tiny_npz):
    # Logits of a Bayes-optimal site network are log p_site(y) + log p(x|y). Site a holds 9:1 and site b
    # 1:9; both see the same evidence. Moved to the federation's mix (10:10, plus one per class: 11:11),
    # both must give softmax(log p(x|y)): the evidence alone, the same for both sites.
    evidence = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 1.0]], dtype=torch.float64)
    a_counts, b_counts = [9, 1], [1, 9]
    prior = lambda c: torch.log(torch.tensor(c, dtype=torch.float64) + 1)  # noqa: E731 (smoothed, unnormalised)
    a = _site_share(tiny_npz, a_counts, (evidence + prior(a_counts)).float())
    b = _site_share(tiny_npz, b_counts, (evidence + prior(b_counts)).float())
    as_shared = join_shares([("a", a), ("b", b)])
    assert as_shared.label_prior is None
    assert as_shared.targets[:4, 0].mean() > as_shared.targets[4:, 0].mean() + 0.3  # each site's skew shows
    u = join_shares([("a", a), ("b", b)], label_prior="federation")
    want = torch.softmax(evidence, 1).float()
    assert torch.allclose(u.targets[:4], want, atol=1e-5) and torch.allclose(u.targets[4:], want, atol=1e-5)
    assert u.label_prior["shares_moved"] == 2 and u.label_prior["site_counts"] == [a_counts, b_counts]
    assert u.label_prior["target_mix"] == pytest.approx([0.5, 0.5])
    # Balanced from a skewed federation: the evidence plus nothing; from 'federation' at 3:1 overall,
    # the evidence plus log(3:1).
    c = _site_share(tiny_npz, [29, 9], (evidence + prior([29, 9])).float())
    fed = join_shares([("a", a), ("c", c)], label_prior="federation")
    goal = torch.log(torch.tensor([9 + 29 + 1, 1 + 9 + 1], dtype=torch.float64))
    assert torch.allclose(fed.targets[4:], torch.softmax(evidence + goal, 1).float(), atol=1e-5)
    bal = join_shares([("a", a), ("c", c)], label_prior="balanced")
    assert torch.allclose(bal.targets[4:], want, atol=1e-5)


def test_label_prior_leaves_one_share_hard_labels_and_unrecorded_counts_alone(tiny_npz, caplog):
    logits = torch.tensor([[1.0, 0.0]] * 4)
    one = _site_share(tiny_npz, [30, 10], logits)
    alone = join_shares([("one", one)], label_prior="federation")
    assert torch.equal(alone.targets, torch.softmax(logits, 1))  # its mix is the federation's: nothing moves
    hard = make_share(tiny_npz, per_class=2)  # cross_entropy: class ids, no mix to move
    hard.provenance = {"dataset": {"counts": {"train": [1, 30]}}}
    mixed = join_shares([("hard", hard), ("one", one)], label_prior="balanced")
    assert torch.equal(mixed.targets[:4], torch.nn.functional.one_hot(hard.labels, 2).float())
    assert mixed.label_prior["shares_moved"] == 1
    unknown = make_share(tiny_npz, per_class=2, soft=True)  # provenance without counts
    with caplog.at_level("WARNING"):
        fallback = join_shares([("one", one), ("unknown", unknown)], label_prior="federation")
    assert fallback.label_prior == {"prior": "shared", "requested": "federation", "reason": "counts not recorded",
                                    "shares": ["unknown"]}
    assert torch.equal(fallback.targets, join_shares([("one", one), ("unknown", unknown)]).targets)
    assert "do(es) not record" in caplog.text


def test_eval_refuses_an_unknown_label_prior(tiny_npz):
    with pytest.raises(DistillError, match="label-prior"):
        evaluate(cfg(tiny_npz, label_prior="skewed"), shares=[("s", make_share(tiny_npz, soft=True))])


# ----------------------------------------------------------------------------- weighing shares by the real images behind them


def test_share_weights_follow_the_real_images_behind_each_class(tiny_npz):
    # Site a held 30 normal and 10 pneumonia images, site b 10 and 30; each share holds 2 images a class.
    # Within a class the weights go as 30:10 (a's normal images 3x b's), and each class keeps its 4 images' worth.
    logits = torch.zeros(4, 2)
    a, b = _site_share(tiny_npz, [30, 10], logits), _site_share(tiny_npz, [10, 30], logits)
    u = join_shares([("a", a), ("b", b)], share_weights="real-images")
    assert u.labels.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert u.weights.tolist() == pytest.approx([1.5, 1.5, 0.5, 0.5, 0.5, 0.5, 1.5, 1.5])
    assert [float(u.weights[u.labels == k].sum()) for k in range(2)] == pytest.approx([4.0, 4.0])
    assert u.share_weights["per_image_weight"] == [pytest.approx([1.5, 0.5]), pytest.approx([0.5, 1.5])]
    # A site that recorded no image of a class gives its images of that class no weight.
    c = _site_share(tiny_npz, [40, 0], logits)
    w = join_shares([("a", a), ("c", c)], share_weights="real-images").weights
    assert w[6:].tolist() == [0.0, 0.0] and w[2:4].tolist() == pytest.approx([2.0, 2.0])
    assert join_shares([("a", a), ("b", b)]).weights is None  # the Python default: all alike
    assert join_shares([("a", a)], share_weights="real-images").weights is None  # one share: nothing to weigh


def test_share_weights_fall_back_to_equal_without_counts(tiny_npz, caplog):
    a = _site_share(tiny_npz, [30, 10], torch.zeros(4, 2))
    unknown = make_share(tiny_npz, per_class=2, soft=True)  # provenance without counts
    with caplog.at_level("WARNING"):
        u = join_shares([("a", a), ("unknown", unknown)], share_weights="real-images")
    assert u.weights is None
    assert u.share_weights == {"weights": "equal", "requested": "real-images", "reason": "counts not recorded",
                               "shares": ["unknown"]}
    assert "do(es) not record" in caplog.text
    with pytest.raises(DistillError, match="share-weights"):
        join_shares([("a", a), ("unknown", unknown)], share_weights="sizes")


def test_weighted_loss_is_the_mean_of_weighted_per_sample_losses():
    g = torch.Generator().manual_seed(0)
    logits, w = torch.randn(5, 3, generator=g), torch.tensor([0.0, 1.0, 2.0, 0.5, 1.5])
    ids = torch.tensor([0, 2, 1, 1, 0])
    soft = torch.softmax(torch.randn(5, 3, generator=g), 1)
    per_hard = torch.nn.functional.cross_entropy(logits, ids, reduction="none")
    per_soft = -(soft * torch.log_softmax(logits, 1)).sum(1)
    assert torch.allclose(soft_cross_entropy(logits, ids, w), (w * per_hard).mean())
    assert torch.allclose(soft_cross_entropy(logits, soft, w), (w * per_soft).mean())
    ones = torch.ones(5)
    assert torch.allclose(soft_cross_entropy(logits, ids, ones), soft_cross_entropy(logits, ids))
    assert torch.allclose(soft_cross_entropy(logits, soft, ones), soft_cross_entropy(logits, soft))


def test_training_with_weights_two_and_zero_is_training_on_the_weighted_half():
    # One full batch: the mean of 2*loss over the first half and 0 over the second is the first half's mean loss.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 4, 4, generator=g), torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    recipe = TrainRecipe(epochs=3, lr=0.1, batch_size=256)

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))

    weighted, half = net(), net()
    train_network(weighted, x, y, recipe, torch.Generator().manual_seed(1), weights=torch.tensor([2.0] * 4 + [0.0] * 4))
    train_network(half, x[:4], y[:4], recipe, torch.Generator().manual_seed(1))
    for p, q in zip(weighted.parameters(), half.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(ValueError, match="one weight per image"):
        train_network(net(), x, y, recipe, torch.Generator().manual_seed(1), weights=torch.ones(3))


def test_eval_weighs_a_union_and_reports_how(tiny_npz):
    a = _site_share(tiny_npz, [30, 10], torch.zeros(4, 2))
    b = _site_share(tiny_npz, [10, 30], torch.zeros(4, 2))
    shares = [("a", a), ("b", b)]
    kw = dict(runs=1, baselines=("none",), epochs=2)
    weighted = evaluate(cfg(tiny_npz, **kw), shares=shares)
    equal = evaluate(cfg(tiny_npz, share_weights="equal", **kw), shares=shares)
    on = weighted["results"][0]["trained_on"]["share_weights"]
    assert on["weights"] == "real-images" and on["site_counts"] == [[30, 10], [10, 30]]
    assert equal["results"][0]["trained_on"]["share_weights"] == {"weights": "equal"}
    assert weighted["results"][0]["runs"][0]["final_train_loss"] != equal["results"][0]["runs"][0]["final_train_loss"]
    assert "images weighed by the real images behind them" in format_report(weighted)
    assert "Union:" not in format_report(evaluate(cfg(tiny_npz, share_weights="equal", label_prior="shared", **kw),
                                                  shares=shares))
