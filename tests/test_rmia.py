"""The strong audit: offline RMIA's score, its intervals, its reference pipelines and their cache, its verdict."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import make_tiny_arrays
from distill.data import fit_preprocessing, load_data
from distill.errors import DistillError
from distill.formats.audit import read_audit, summary_lines
from distill.formats.synset import SyntheticSet, write_synset
from distill.reference_pipeline import train_reference
from distill.privacy import run_audit
from distill.privacy.references import ReferenceSettings, pool_halves, reference_signals
from distill.privacy.rmia import (TEMPERATURES, above_baseline, choose_temperature, clopper_pearson, offline_prior,
                                  out_mean, rate_metrics, rmia_scores, tempered, true_label)

# A tiny pipeline: 2 experts x 3 epochs, 4 iterations; a few seconds per reference on one CPU thread.
TINY_REFS = dict(attack="rmia", references=2, reference_experts=2, reference_epochs=3, reference_iterations=0)
FAST = dict(networks=1, epochs=60, expert_epochs=1, bootstrap=10, pairs=0)


# ----------------------------------------------------------------------------- the score, by hand


def test_rmia_score_matches_a_hand_computed_example():
    # Offline prior: 0.5 * ((1 + a) * p_out + (1 - a)); at a = 0.3, p_out = 0.4 -> 0.5 * (0.52 + 0.7) = 0.61.
    assert offline_prior(np.array([0.4]), a=0.3)[0] == pytest.approx(0.61)
    assert offline_prior(np.array([0.4]), a=1.0)[0] == pytest.approx(0.4)
    # ratio_x = [0.8 / 0.4, 0.2 / 0.4] = [2, 0.5]; ratio_z = [1, 0.6, 3, 0.5].
    p_x, prior_x = np.array([0.8, 0.2]), np.array([0.4, 0.4])
    p_z, prior_z = np.array([0.5, 0.3, 0.9, 0.1]), np.array([0.5, 0.5, 0.3, 0.2])
    # gamma 1: x0 beats 1, 0.6, 0.5 (3 of 4); x1 = 0.5 beats none (0.5 is not > 0.5).
    assert rmia_scores(p_x, prior_x, p_z, prior_z, gamma=1.0).tolist() == [0.75, 0.0]
    # gamma 2: x0 = 2 must exceed 2 * ratio_z = [2, 1.2, 6, 1]: 1.2 and 1 (2 of 4).
    assert rmia_scores(p_x, prior_x, p_z, prior_z, gamma=2.0).tolist() == [0.5, 0.0]
    # The OUT mean uses only references that left the point out.
    probs = np.array([[0.2, 0.4], [0.6, 0.8]])
    assert out_mean(probs, np.array([[True, False], [False, True]])).tolist() == [0.6, 0.4]


def test_tempered_probabilities_are_softmax_of_scaled_logits():
    logits = np.array([[4.0, 1.0, -2.0], [0.5, 0.0, 3.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(tempered(p, 1.0), p)
    want = np.exp(logits / 4) / np.exp(logits / 4).sum(1, keepdims=True)
    assert np.allclose(tempered(p, 4.0), want)
    assert true_label(want, np.array([0, 2])).tolist() == pytest.approx([want[0, 0], want[1, 2]])
    # An underflowed probability still ranks below every other instead of producing NaN.
    assert np.isfinite(tempered(np.array([[1.0, 0.0]]), 2.0)).all()


def _saturated_references(r_count: int, shift: float, seed: int = 0):
    """Reference models on 400 points of 2 classes: a per-point logit margin (difficulty) plus model noise,
    plus ``shift`` where the model trained on the point; margins are large, so probabilities saturate."""
    rng = np.random.default_rng(seed)
    n = 400
    difficulty = rng.normal(8.0, 3.0, n)
    ins = np.zeros((r_count, n), bool)
    for j in range(r_count // 2):
        perm = rng.permutation(n)
        ins[2 * j, perm[: n // 2]] = True
        ins[2 * j + 1] = ~ins[2 * j]
    margin = difficulty + rng.normal(0.0, 1.0, (r_count, n)) + shift * ins
    labels = np.zeros(n, int)
    probs = np.stack([1 / (1 + np.exp(margin)), 1 / (1 + np.exp(-margin))], -1)[..., ::-1]  # label 0 is the true one
    return probs, ins, labels


def test_the_temperature_is_chosen_on_the_references_alone():
    probs, ins, labels = _saturated_references(6, shift=2.0)
    population = np.ones(len(labels), bool)
    t, record = choose_temperature(probs, ins, labels, population)
    assert t in TEMPERATURES and set(record) == set(TEMPERATURES)
    # Members do have an edge, so every candidate attacks the references better than chance ...
    assert min(record.values()) > 0.55
    # ... and T = 1 is the worst: at margins near 8, p = 0.9997 and the ratios barely move.
    assert record[1.0] == min(record.values()) and t > 1.0
    # Without an edge nothing is found, whatever T.
    _, flat = choose_temperature(*_saturated_references(6, shift=0.0), population)
    assert max(flat.values()) < 0.56
    # Two references cannot attack each other: the default stands.
    assert choose_temperature(probs[:2], ins[:2], labels, population) == (1.0, {})


def test_references_are_complementary_pairs():
    halves = pool_halves(11, 4, seed=0)
    assert (halves[0] ^ halves[1]).all() and (halves[2] ^ halves[3]).all()
    assert not np.array_equal(halves[0], halves[2])
    assert ((~halves).sum(0) == 2).all()  # every point is OUT for exactly half of the references
    with pytest.raises(DistillError, match="even"):
        ReferenceSettings(references=3)
    with pytest.raises(DistillError, match="even"):  # before any file is read or network trained
        run_audit("nowhere", "nowhere", attack="rmia", references=3)


# ----------------------------------------------------------------------------- intervals


def test_clopper_pearson_matches_closed_forms_and_covers_its_rate():
    # k = 0: upper = 1 - (alpha/2)^(1/n); k = n: lower = (alpha/2)^(1/n).
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1), 1.0)
    rng = np.random.default_rng(0)
    for p, n in ((0.02, 200), (0.3, 40)):
        ks = rng.binomial(n, p, size=2000)
        cover = np.mean([lo <= p <= hi for lo, hi in (clopper_pearson(int(k), n) for k in ks)])
        assert cover >= 0.95, (p, n, cover)  # exact intervals are conservative


def test_tpr_intervals_cover_the_true_rate_on_simulated_scores():
    # Members ~ N(1, 1), non-members ~ N(0, 1): TPR at FPR f is 1 - Phi(Phi^-1(1 - f) - 1).
    rng = np.random.default_rng(1)
    truth = {k: 1 - norm.cdf(norm.ppf(1 - f) - 1) for k, f in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_5pct_fpr", 0.05))}
    hits = {k: 0 for k in truth}
    sims = 200
    for _ in range(sims):
        m = rate_metrics(rng.normal(1, 1, 300), rng.normal(0, 1, 20000))
        for k, t in truth.items():
            hits[k] += m[k]["ci95"][0] <= t <= m[k]["ci95"][1]
    for k in truth:
        assert hits[k] / sims >= 0.90, (k, hits[k] / sims)


def test_low_fpr_rows_need_enough_nonmembers_and_the_rule_needs_disjoint_intervals():
    rng = np.random.default_rng(2)
    few = rate_metrics(rng.normal(0, 1, 50), rng.normal(0, 1, 999))
    assert "tpr_at_0p1pct_fpr" not in few and few["tpr_at_1pct_fpr"]["resolvable"]
    assert "tpr_at_0p1pct_fpr" in rate_metrics(rng.normal(0, 1, 50), rng.normal(0, 1, 1000))
    row = lambda k, n: {"tpr_at_1pct_fpr": {"value": k / n, "k": k, "n": n, "ci95": [0, 1], "resolvable": True}}  # noqa: E731
    assert above_baseline(row(60, 200), row(4, 200))
    assert not above_baseline(row(8, 200), row(4, 200))  # overlapping intervals: not significant
    unresolved = row(60, 200)
    unresolved["tpr_at_1pct_fpr"]["resolvable"] = False
    assert not above_baseline(unresolved, row(0, 200))


# ----------------------------------------------------------------------------- pipelines on tiny data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmia")
    npz = root / "tiny.npz"
    np.savez(npz, **make_tiny_arrays(per_class={"train": 20, "val": 20, "test": 15}))
    data = load_data(npz)
    return root, npz, data, fit_preprocessing(data.train.images)


def _share_of(root, name, data, pre, u8: torch.Tensor, labels: torch.Tensor):
    """A run folder whose 'synthetic' set is the given real images: the leakiest share there is."""
    path = root / name
    path.mkdir()
    write_synset(path / "synthetic.h5", SyntheticSet(
        images=pre(u8), labels=labels, label_logits=None, preprocessing=pre, syn_lr=0.01, label_temperature=1.0,
        model="convnet3", class_names=list(data.class_names), model_kwargs={},
        fingerprint=data.fingerprint(), method={"eval_epochs": 60, "augment": "none", "init": "real", "hard_labels": True}))
    return path


@pytest.fixture(scope="module")
def leaky(tiny):
    root, npz, data, pre = tiny
    # 15 of each class's 20 training images, copied: three quarters of the members are in the share.
    pick = torch.cat([torch.nonzero(data.train.labels == c).flatten()[:15] for c in range(2)])
    rundir = _share_of(root, "leaky", data, pre, data.train.images[pick], data.train.labels[pick])
    return rundir, run_audit(rundir, npz, device="cpu", reference_cache=root / "refs", train_reference=train_reference,
                             **FAST, **TINY_REFS)


def test_a_leaky_share_is_caught_with_tpr_well_above_fpr(leaky):
    rundir, report = leaky
    rmia = report.summary["membership"]["rmia"]
    share = rmia["share"]
    assert rmia["n_members"] == 40 and rmia["n_nonmembers"] == 40
    # 40 non-members: at '1 % FPR' no non-member may pass, so this is TPR at zero false positives.
    assert share["tpr_at_1pct_fpr"]["value"] >= 0.5 and share["auc"] > 0.9
    assert rmia["references"]["trained_now"] == 2
    # The same test on the images themselves: every copied member is found (correlation 1 with a share
    # image, where the references that left it out come less close) and no non-member passes.
    image = rmia["image"]
    assert image["share"]["tpr_at_1pct_fpr"]["value"] >= 0.7 and image["share"]["auc"] > 0.85
    # A random real subset of the members copies three quarters of them too: the leaky share is no worse.
    assert image["random_subset"]["tpr_at_1pct_fpr"]["value"] >= 0.7
    assert not image["significantly_above_random_subset"]
    doc = read_audit(rundir)
    assert doc.format_version == "1.2" and "rmia" in doc.sections().membership
    assert any(line.startswith("RMIA") for line in summary_lines(doc.summary))


def _no_training(*a, **k):
    raise AssertionError("a cached reference was retrained")


def test_a_random_subset_of_nonmembers_scores_near_chance_and_references_are_reused(tiny, leaky):
    root, npz, data, pre = tiny
    # Images from the test split: in neither the members, the non-members nor any reference's pool.
    # As many per class as the leaky share, from the same pipeline settings: the same references apply.
    pick = torch.cat([torch.nonzero(data.test.labels == c).flatten()[:15] for c in range(2)])
    rundir = _share_of(root, "subset", data, pre, data.test.images[pick], data.test.labels[pick])
    report = run_audit(rundir, npz, device="cpu", reference_cache=root / "refs", train_reference=_no_training,
                       **FAST, **TINY_REFS)
    rmia = report.summary["membership"]["rmia"]
    assert rmia["references"]["trained_now"] == 0
    assert 0.3 <= rmia["share"]["auc"] <= 0.7
    assert not rmia["significantly_above_random_subset"]
    assert rmia["share"]["tpr_at_5pct_fpr"]["value"] <= 0.25
    # Images of other patients single out no member.
    assert rmia["image"]["share"]["tpr_at_1pct_fpr"]["value"] <= 0.1
    assert not rmia["image"]["significantly_above_random_subset"]


def test_reference_signals_come_back_from_the_cache(tiny, leaky):
    root, npz, data, pre = tiny
    from distill.privacy.subject import holdout_split

    hold, hold_y, _ = holdout_split(data, "val")
    pool_u8, pool_y = torch.cat([data.train.images, hold]), torch.cat([data.train.labels, hold_y])
    settings = ReferenceSettings(references=2, experts=2, epochs=3, iterations=0, ipc=15, init="real",
                                 hard_labels=True, augment="none")
    sig = reference_signals(pool_u8, pool_y, list(data.class_names), data.fingerprint(), settings, root / "refs", "cpu",
                            train=_no_training)
    assert sig["trained"] == 0 and sig["probs"].shape == (2, len(pool_y))
    assert ((sig["probs"] > 0) & (sig["probs"] <= 1)).all()
    # Without a pipeline a missing reference is one sentence, not a traceback.
    with pytest.raises(DistillError, match="not in the cache"):
        reference_signals(pool_u8, pool_y, list(data.class_names), data.fingerprint(),
                          dataclasses.replace(settings, seed=1), root / "refs", "cpu")


# ----------------------------------------------------------------------------- the gate and the page


def test_a_failed_audit_names_remedies_and_the_page_opens_with_the_decision(tiny, leaky, tmp_path):
    from distill.export import export_share
    from distill.formats.share import load_share
    from distill.report import write_report

    root, npz, data, pre = tiny
    rundir, report = leaky
    assert not report.passed
    with pytest.raises(DistillError) as e:
        export_share(rundir, tmp_path / "s.h5")
    for words in ("--init noise", "--dp-epsilon 8", "--iterations", "--ipc", "--force"):
        assert words in str(e.value), words
    page = write_report(rundir, tmp_path / "review.html", data=npz).read_text()
    decision, first_image = page.index("Privacy audit: FAILED"), page.index("<img")
    assert decision < first_image
    for words in ("What to change", "How to read these figures", "Sign-off", "RMIA ROC", "random real subset"):
        assert words in page[:first_image], words
    share = export_share(rundir, tmp_path / "s.h5", force=True)
    assert load_share(share).privacy
    public = write_report(share, tmp_path / "public.html", public=True).read_text()
    assert "no real image" not in public and "Sign-off" not in public and "What to change" not in public


def test_canaries_are_scored_against_the_other_nonmembers(tiny, leaky):
    root, npz, data, pre = tiny
    rundir, _ = leaky
    with pytest.raises(DistillError, match="--attack rmia"):
        run_audit(rundir, npz, device="cpu", canaries=4, **FAST)
    report = run_audit(rundir, npz, device="cpu", reference_cache=root / "refs", train_reference=train_reference,
                       canaries=8, **FAST, **TINY_REFS)
    rmia = report.summary["membership"]["rmia"]
    c = rmia["canaries"]
    assert rmia["references"]["trained_now"] == 0  # only the canary pipeline was new
    assert c["n_canaries"] == c["n_members"] == 8 and c["n_nonmembers"] == 32
    # Mislabeled images the experts memorised stand out from the non-members.
    assert c["auc"] > 0.7
    assert any("canaries" in line for line in report.text().splitlines())


def test_a_dp_share_is_attacked_with_references_made_the_dp_way(tmp_path):
    """A share from a DP buffer (DP-SGD experts, DP class means, --init dp-means): its references are DP
    pipelines of the same budget, since a non-DP buffer has no class means to start from."""
    from distill.buffer import build_buffer
    from distill.config import BufferConfig, RunConfig
    from distill.formats.dp_record import read_dp_record
    from distill.mtt import distill_run

    npz = tmp_path / "tiny.npz"
    np.savez(npz, **make_tiny_arrays(per_class={"train": 20, "val": 20, "test": 15}))
    buf = tmp_path / "buffer"
    build_buffer(BufferConfig(data=str(npz), out=str(buf), experts=1, epochs=2, batch_size=8, snapshot_every=2,
                              augment="none", dp_epsilon=4.0, dp_init="class-means", device="cpu"))
    run = distill_run(RunConfig(buffer=str(buf), out=str(tmp_path / "run"), ipc=2, iterations=2, syn_steps=2,
                                expert_epochs=1, max_start_epoch=0, hard_labels=True, eval_models=0, init="dp-means",
                                augment="none", device="cpu"))
    report = run_audit(run, npz, device="cpu", reference_cache=tmp_path / "refs", train_reference=train_reference,
                       **{**FAST, **TINY_REFS, "reference_iterations": 2})
    rmia = report.summary["membership"]["rmia"]
    assert rmia["references"]["dp_epsilon"] == pytest.approx(4.0) and rmia["references"]["init"] == "dp-means"
    ref_buffers = sorted((tmp_path / "refs").glob("*/ref_*/buffer"))
    assert len(ref_buffers) == 2
    assert all(read_dp_record(b) is not None and (b / "dp_stats.h5").exists() for b in ref_buffers)
