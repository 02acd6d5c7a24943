"""The strong membership attack of ``distill audit --attack rmia``: offline RMIA against the share's networks.

The attacked models are the networks the loss attack trained on the share with its recipe,
and the baseline the ones it trained on random real subsets of the same size drawn from the
members. Both are scored with the same reference pipelines (:mod:`.references`), on every
member (the real training split) and every non-member (the held-out split), against the
non-members as RMIA's population. The share fails when its TPR at 1 % FPR is significantly
above the random subset's (:func:`.rmia.above_baseline`).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from ..data import RealData
from .membership import Membership
from .references import ReferenceSettings, ReferenceTrainer, reference_signals
from .rmia import (CP_LEVEL, GAMMA, OFFLINE_A, above_baseline, offline_prior, out_mean, rate_metrics, rmia_scores,
                   true_class_prob)
from .subject import Subject

log = logging.getLogger(__name__)

RULE = ("fails when the share's TPR at 1% FPR is significantly above the random real subset's: the one-sided "
        f"{(1 + CP_LEVEL) / 2:.1%} Clopper-Pearson lower bound of the share's rate lies above the one-sided "
        f"{(1 + CP_LEVEL) / 2:.1%} upper bound of the subset's (non-overlapping {CP_LEVEL:.0%} intervals)")


def reference_settings(subject: Subject, ipc: int, references: int, experts: int, epochs: int, iterations: int,
                       seed: int) -> ReferenceSettings:
    """Reference pipelines shaped like the one that made the subject, where the subject records it."""
    method = subject.method or {}
    init = method.get("init") if isinstance(method.get("init"), str) else ReferenceSettings.init
    hard = method.get("hard_labels") if isinstance(method.get("hard_labels"), bool) else None
    # A run records the augmentation it used, which is its buffer's unless it chose another.
    augment = method.get("augment") if isinstance(method.get("augment"), str) else ReferenceSettings.augment
    return ReferenceSettings(references=references, experts=experts, epochs=epochs, iterations=iterations,
                             ipc=ipc, init=init, hard_labels=hard, model=subject.model, augment=augment, seed=seed)


def rmia_membership(subject: Subject, data: RealData, x_train: torch.Tensor, x_hold: torch.Tensor,
                    hold_u8: torch.Tensor, hold_y: torch.Tensor, m: Membership, ref: ReferenceSettings,
                    cache: str | os.PathLike, device: torch.device, train: ReferenceTrainer | None = None) -> dict:
    """RMIA on the share's networks and the random-real baseline's, with the same references; the summary section."""
    n_mem = len(x_train)
    pool_u8 = torch.cat([data.train.images, hold_u8])
    pool_y = torch.cat([data.train.labels, hold_y])
    sig = reference_signals(pool_u8, pool_y, list(data.class_names), data.fingerprint(), ref, cache, device, train)
    prior = offline_prior(out_mean(sig["probs"], sig["members"]))
    x_pool = torch.cat([x_train, x_hold])

    def attack(nets: list) -> dict:
        p = true_class_prob(nets, x_pool, pool_y).numpy()
        scores = rmia_scores(p, prior, p[n_mem:], prior[n_mem:])
        return rate_metrics(scores[:n_mem], scores[n_mem:])

    share, baseline = attack(m.share_nets), attack(m.real_nets)
    return {"share": share, "random_subset": baseline,
            "significantly_above_random_subset": above_baseline(share, baseline),
            "rule": RULE, "population": "non-members",
            "references": {**dataclasses.asdict(ref), "offline_a": OFFLINE_A, "gamma": GAMMA,
                           "trained_now": sig["trained"], "training_seconds": round(sig["seconds"], 1)},
            "n_members": n_mem, "n_nonmembers": len(x_hold)}


def rmia_reasons(rmia: dict) -> list[str]:
    """One sentence when the share fails the RMIA rule, else none."""
    if not rmia.get("significantly_above_random_subset"):
        return []
    s, b = rmia["share"]["tpr_at_1pct_fpr"], rmia["random_subset"]["tpr_at_1pct_fpr"]
    return [f"The RMIA attack on the share reaches TPR {s['value']:.3f} at 1% FPR (95% CI {s['ci95'][0]:.3f}-"
            f"{s['ci95'][1]:.3f}), significantly above a random real subset of the same size "
            f"({b['value']:.3f}, {b['ci95'][0]:.3f}-{b['ci95'][1]:.3f})."]
