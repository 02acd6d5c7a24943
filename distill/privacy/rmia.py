"""Offline RMIA (Zarifzadeh, Liu, Shokri, "Low-Cost High-Power Membership Inference Attacks", ICML 2024).

The score of a target point x against a model theta is the fraction of population
points z that x dominates in likelihood ratio:

    LR(x, z) = [p(x | theta) / p(x)] / [p(z | theta) / p(z)],   score(x) = mean_z 1[LR(x, z) > gamma],

where p(. | theta) is the model's probability of the point's true label and p(.) its
average over reference models. Offline, only reference models that did *not* train on
the point (OUT models) are available; the paper approximates the missing IN half of
the average linearly, p(x) = ((1 + a) p_OUT(x) + (1 - a)) / 2, with ``a`` chosen per
dataset. Everything here is a pure function on arrays; the reference models
themselves are :mod:`.references`.

The rates are read with exact (Clopper-Pearson) binomial intervals, and a share is
read against a random real subset of the same size attacked alike (:func:`above_baseline`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta
from torch import nn

from ..errors import DataError
from ..formats.audit import RateKey
from ..metrics import auc, tpr_at_fpr

# a of the offline approximation: 0 trusts nothing of the OUT average (p(x) -> (p_OUT + 1) / 2), 1 trusts it
# fully. The paper picks a per dataset by attacking one reference model with the others; 0.3 is a middle
# setting recorded in every audit.json, so a different choice is visible.
OFFLINE_A = 0.3
GAMMA = 1.0  # the paper's threshold on the pairwise ratio: x must be more likely than z, relative to the references
RMIA_FPRS = {RateKey.TPR_AT_1PCT_FPR: 0.01, RateKey.TPR_AT_5PCT_FPR: 0.05, RateKey.TPR_AT_0P1PCT_FPR: 0.001}
# At 0.1 % FPR one false positive needs 1,000 non-members; with fewer the figure is left out, not shown as 0.
MIN_NONMEMBERS = {RateKey.TPR_AT_0P1PCT_FPR: 1000}
# Softmax temperatures the audit may read probabilities at: p_T(y | x) is softmax(logits / T), computed from the
# stored probabilities as p^(1/T), renormalised. Networks trained on a few images are confident on almost every
# point (p of the true label 0.9991 at the median non-member, 0.9999 at the median copied member on the leaky
# share), so at T = 1 the likelihood ratios p_x / p(x) all sit near 1 and a member's edge lies in the fourth
# decimal; a higher T spreads them. Which T is chosen by attacking each reference with the others
# (:func:`choose_temperature`), never by the attacked share's membership.
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
CP_LEVEL = 0.95  # two-sided Clopper-Pearson interval shown; the verdict uses its one-sided halves
ROC_POINTS = 40  # log-spaced FPRs kept for the review page's ROC curve
ROC_MIN_FPR = 1e-3


@torch.no_grad()
def class_probs(nets: list[nn.Module], images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Softmax probabilities (N, K) float64 on the CPU, averaged over ``nets``, in eval mode."""
    total = None
    for net in nets:
        was = net.training
        net.eval()
        p = torch.cat([F.softmax(net(images[i:i + batch_size]).double(), dim=1).cpu()
                       for i in range(0, len(images), batch_size)])
        net.train(was)
        total = p if total is None else total + p
    return total / len(nets)


def true_class_prob(nets: list[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                    batch_size: int = 1024) -> torch.Tensor:
    """p(x | theta): each network's softmax probability of the true label, averaged over ``nets``; (N,) float64, CPU."""
    return class_probs(nets, images, batch_size).gather(1, labels.cpu()[:, None])[:, 0]


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T) along the last axis: the probabilities a network would give at temperature T."""
    logp = np.log(np.maximum(np.asarray(probs, np.float64), np.finfo(np.float64).tiny)) / temperature
    logp -= logp.max(-1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(-1, keepdims=True)


def true_label(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(..., P, K) class probabilities -> (..., P) the probability of each point's label."""
    lab = np.asarray(labels)
    idx = np.broadcast_to(lab.reshape((1,) * (probs.ndim - 2) + (-1, 1)), probs.shape[:-1] + (1,))
    return np.take_along_axis(probs, idx, axis=-1)[..., 0]


def choose_temperature(ref_probs_all: np.ndarray, ref_in: np.ndarray, labels: np.ndarray,
                       population: np.ndarray, candidates: tuple[float, ...] = TEMPERATURES) -> tuple[float, dict]:
    """The temperature at which RMIA best attacks the references themselves; (T, {T: mean AUC}).

    Each reference r in turn plays the attacked model, with the others as its references; its members
    are the pool points it trained on, and it is scored on the points that some other reference left
    out. The mean AUC over r decides, as the RMIA paper picks its offline ``a`` from reference models only.
    ``population`` (bool, P) marks the points RMIA compares against. With fewer than 3 references no
    other reference leaves out both halves of a pair; T = 1 is returned with an empty record.
    """
    probs, ins = np.asarray(ref_probs_all, np.float64), np.asarray(ref_in, bool)
    r_count = len(probs)
    if r_count < 3:
        return 1.0, {}
    record = {}
    for t in candidates:
        p_true = true_label(tempered(probs, t), labels)
        aucs = []
        for r in range(r_count):
            others = [j for j in range(r_count) if j != r]
            out = ~ins[others]
            ok = out.any(0)
            mean_out = np.where(ok, (p_true[others] * out).sum(0) / np.maximum(out.sum(0), 1), np.nan)
            prior = offline_prior(mean_out)
            z = ok & population & ~ins[r]
            if not z.any():
                continue
            scores = rmia_scores(p_true[r][ok], prior[ok], p_true[r][z], prior[z])
            member = ins[r][ok]
            if member.any() and (~member).any():
                aucs.append(float(auc(scores[member], scores[~member])))
        if aucs:
            record[t] = float(np.mean(aucs))
    if not record:
        return 1.0, {}
    best = max(record, key=lambda t: (record[t], -t))
    return best, record


def offline_prior(p_out: np.ndarray, a: float = OFFLINE_A) -> np.ndarray:
    """p(x) from the OUT references' mean probability ``p_out`` by the paper's linear approximation."""
    return 0.5 * ((1.0 + a) * np.asarray(p_out, dtype=np.float64) + (1.0 - a))


def out_mean(ref_probs: np.ndarray, ref_in: np.ndarray) -> np.ndarray:
    """Mean over reference models that did not train on each point: ref_probs, ref_in (R, P) -> (P,).

    Raises :class:`DataError` where a point has no OUT reference (references come in complementary pairs).
    """
    out = ~np.asarray(ref_in, dtype=bool)
    count = out.sum(0)
    if (count == 0).any():
        raise DataError("Some points have no reference model that left them out; use an even --references.")
    return (np.asarray(ref_probs, dtype=np.float64) * out).sum(0) / count


def rmia_scores(p_x: np.ndarray, prior_x: np.ndarray, p_z: np.ndarray, prior_z: np.ndarray,
                gamma: float = GAMMA) -> np.ndarray:
    """score(x) = fraction of population points z with [p_x / prior_x] / [p_z / prior_z] > gamma; (N,) in [0, 1]."""
    tiny = np.finfo(np.float64).tiny  # a probability that underflowed to 0 still ranks, below every other
    ratio_x = np.maximum(np.asarray(p_x, np.float64), tiny) / np.asarray(prior_x, np.float64)
    ratio_z = np.maximum(np.asarray(p_z, np.float64), tiny) / np.asarray(prior_z, np.float64)
    if len(ratio_z) == 0:
        raise DataError("RMIA needs at least one population point.")
    # LR(x, z) > gamma  <=>  ratio_x > gamma * ratio_z: count with a sorted search, not an N x Z matrix.
    thresholds = np.sort(gamma * ratio_z)
    return np.searchsorted(thresholds, ratio_x, side="left") / len(thresholds)


def clopper_pearson(k: int, n: int, level: float = CP_LEVEL) -> tuple[float, float]:
    """Exact two-sided binomial interval for k successes in n trials (Clopper & Pearson 1934)."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def roc_curve(members: np.ndarray, nonmembers: np.ndarray, points: int = ROC_POINTS) -> list[list[float]]:
    """[[fpr, tpr], ...] at log-spaced FPRs from :data:`ROC_MIN_FPR` to 1 (the review page's log-scale ROC)."""
    grid = np.geomspace(ROC_MIN_FPR, 1.0, points)
    return [[float(f), float(tpr_at_fpr(members, nonmembers, f))] for f in grid]


def rate_metrics(members: np.ndarray, nonmembers: np.ndarray) -> dict:
    """AUC, and TPR at each of :data:`RMIA_FPRS` with its Clopper-Pearson interval; higher score = member.

    The interval is over the members only (how many of n members pass the threshold that lets
    through at most the given fraction of the non-members); a rate with too few non-members to
    resolve it is marked, and 0.1 % FPR is left out below :data:`MIN_NONMEMBERS`.
    """
    m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    if len(m) < 1 or len(n) < 1:
        raise DataError("A membership attack needs at least one member and one non-member.")
    out: dict = {RateKey.N_MEMBERS: len(m), RateKey.N_NONMEMBERS: len(n), RateKey.AUC: float(auc(m, n))}
    for key, fpr in RMIA_FPRS.items():
        if len(n) < MIN_NONMEMBERS.get(key, 0):
            continue
        tpr = float(tpr_at_fpr(m, n, fpr))
        k = int(round(tpr * len(m)))
        out[key] = {RateKey.VALUE: tpr, RateKey.K: k, RateKey.N: len(m), RateKey.CI95: list(clopper_pearson(k, len(m))),
                    RateKey.RESOLVABLE: bool(len(n) * fpr >= 1)}
    out[RateKey.ROC] = roc_curve(m, n)
    return out


def above_baseline(share: dict, baseline: dict, key: str = RateKey.TPR_AT_1PCT_FPR, level: float = CP_LEVEL) -> bool:
    """The rule of the verdict: the share's rate is significantly above the baseline's.

    True iff the one-sided lower bound of the share's rate lies above the one-sided upper bound of the
    baseline's, each at (1 + level) / 2 (the halves of the two-sided ``level`` intervals): the intervals
    do not overlap. Unresolvable rates (too few non-members) never fail a share.
    """
    s, b = share.get(key), baseline.get(key)
    if not s or not b or not s.get(RateKey.RESOLVABLE, True):
        return False
    s_lo, _ = clopper_pearson(s[RateKey.K], s[RateKey.N], level)
    _, b_hi = clopper_pearson(b[RateKey.K], b[RateKey.N], level)
    return s_lo > b_hi
