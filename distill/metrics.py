"""Scores shared by recipient evaluation and the privacy audit; pure functions on arrays.

One convention throughout: a spread over runs is the sample standard deviation,
:data:`STD_DDOF` = 1 (n - 1 in the denominator; 0 for a single value).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.stats import rankdata

STD_DDOF = 1  # sample standard deviation: runs are a sample of the seeds one could have drawn


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts; row = true class, column = predicted class."""
    idx = labels.long().cpu() * num_classes + pred.long().cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank formula; ties count one half. NaN without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))  # average ranks, so ties give 1/2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_ovr(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """AUC of (N, K) class probabilities: binary for K = 2, else the macro mean of one-vs-rest AUCs.

    A class absent from ``labels`` has no one-vs-rest AUC and is left out of the mean.
    """
    p = probs.detach().double().cpu().numpy()
    y = labels.cpu().numpy()
    if p.shape[1] == 2:
        return binary_auc(p[:, 1], y == 1)
    per_class = [binary_auc(p[:, k], y == k) for k in range(p.shape[1])]
    valid = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan")


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, AUC, per-class accuracy (recall; NaN for a class absent from ``labels``) and confusion."""
    k = probs.shape[1]
    cm = confusion_matrix(probs.argmax(1), labels, k)
    support = cm.sum(1)
    per_class = [float(cm[c, c] / support[c]) if support[c] else float("nan") for c in range(k)]
    acc = float(cm.diag().sum() / cm.sum()) if cm.sum() else float("nan")
    return {"accuracy": acc, "auc": auc_ovr(probs, labels), "per_class_accuracy": per_class,
            "confusion": cm.tolist()}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation (ddof :data:`STD_DDOF`; 0 for one value) of the finite values; NaN if none."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=STD_DDOF)) if len(v) > STD_DDOF else 0.0


def summarize(runs: Sequence[dict]) -> tuple[dict, dict]:
    """Mean and std over runs of accuracy, AUC and each class's accuracy."""
    mean, std = {}, {}
    for key in ("accuracy", "auc"):
        mean[key], std[key] = mean_std([r[key] for r in runs])
    per_class = [mean_std(col) for col in zip(*(r["per_class_accuracy"] for r in runs))]
    mean["per_class_accuracy"] = [m for m, _ in per_class]
    std["per_class_accuracy"] = [s for _, s in per_class]
    return mean, std


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Area under the ROC curve of scores where higher means 'member' (ties count one half)."""
    return binary_auc(np.concatenate([members, nonmembers]), np.arange(len(members) + len(nonmembers)) < len(members))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """True-positive rate at the strictest threshold whose false-positive rate is at most ``fpr``.

    With fewer than 1 / fpr non-members the only such threshold admits no false
    positive at all; the caller should mark that case as not resolvable.
    """
    allowed = int(math.floor(fpr * len(nonmembers) + 1e-9))
    ranked = np.sort(nonmembers)[::-1]
    threshold = ranked[allowed] if allowed < len(ranked) else -np.inf
    return float(np.mean(members > threshold))
