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
from pathlib import Path

import numpy as np
import torch

from ..data import RealData
from ..errors import DataError, DistillError
from ..formats.audit import CanaryKey, RateKey, ReferenceKey, RmiaKey
from ..io import atomic_path
from ..seeding import generator
from .membership import Membership
from .neighbours import top_similar
from .references import SIGNALS_FILE, ReferenceSettings, ReferenceTrainer, reference_signals
from .rmia import (CP_LEVEL, GAMMA, OFFLINE_A, above_baseline, choose_temperature, class_probs, offline_prior,
                   out_mean, rate_metrics, rmia_scores, tempered, true_label)
from .streams import CANARY
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
                             ipc=ipc, init=init, hard_labels=hard, model=subject.model, augment=augment, seed=seed,
                             dp_epsilon=subject.dp_epsilon)


def rmia_membership(subject: Subject, data: RealData, x_train: torch.Tensor, x_hold: torch.Tensor,
                    hold_u8: torch.Tensor, hold_y: torch.Tensor, m: Membership, ref: ReferenceSettings,
                    cache: str | os.PathLike, device: torch.device, train: ReferenceTrainer | None = None,
                    canaries: int = 0) -> dict:
    """RMIA on the share's networks and the random-real baseline's, with the same references; the summary section."""
    n_mem = len(x_train)
    pool_u8 = torch.cat([data.train.images, hold_u8])
    pool_y = torch.cat([data.train.labels, hold_y])
    sig = reference_signals(pool_u8, pool_y, list(data.class_names), data.fingerprint(), ref, cache, device, train)
    y = pool_y.numpy()
    population = np.arange(len(y)) >= n_mem
    temperature, self_auc = choose_temperature(sig["probs_all"], sig["members"], y, population)
    prior = offline_prior(out_mean(true_label(tempered(sig["probs_all"], temperature), y), sig["members"]))
    x_pool = torch.cat([x_train, x_hold])

    def attack(nets: list) -> dict:
        p = true_label(tempered(class_probs(nets, x_pool).numpy(), temperature), y)
        scores = rmia_scores(p, prior, p[n_mem:], prior[n_mem:])
        return rate_metrics(scores[:n_mem], scores[n_mem:])

    share, baseline = attack(m.share_nets), attack(m.real_nets)
    extra = {}
    image = image_attack(subject, m, pool_u8, n_mem, sig)
    if image is not None:
        extra[RmiaKey.IMAGE] = image
    if canaries:
        extra[RmiaKey.CANARIES] = canary_exposure(canaries, data, hold_u8, hold_y, sig, ref, device, train, temperature)
    return {**extra, RmiaKey.SHARE: share, RmiaKey.RANDOM_SUBSET: baseline,
            RmiaKey.SIGNIFICANTLY_ABOVE: above_baseline(share, baseline),
            RmiaKey.RULE: RULE, RmiaKey.POPULATION: "non-members",
            RmiaKey.REFERENCES: {**dataclasses.asdict(ref), ReferenceKey.OFFLINE_A: OFFLINE_A,
                                 ReferenceKey.GAMMA: GAMMA, ReferenceKey.TEMPERATURE: temperature,
                                 ReferenceKey.TEMPERATURE_SELF_AUC: {f"{t:g}": round(a, 4) for t, a in self_auc.items()},
                                 ReferenceKey.TRAINED_NOW: sig["trained"],
                                 ReferenceKey.TRAINING_SECONDS: round(sig["seconds"], 1)},
            RmiaKey.N_MEMBERS: n_mem, RmiaKey.N_NONMEMBERS: len(x_hold)}


IMAGE_SIGNAL = ("each pool image's highest Pearson correlation with an image of the attacked set, in display "
                "space, read as (1 + r) / 2 and calibrated by the reference pipelines' own shares")


def image_signal(images: torch.Tensor, pool: torch.Tensor) -> np.ndarray:
    """(P,) float64: (1 + r) / 2 for each pool image's highest Pearson correlation r with any of ``images``."""
    best, _ = top_similar(pool.float(), images.float(), k=1, centre=True)
    return ((1.0 + best[:, 0].double()) / 2.0).clamp_min(1e-6).numpy()


def image_attack(subject: Subject, m: Membership, pool_u8: torch.Tensor, n_mem: int, sig: dict) -> dict | None:
    """RMIA's test on the released images themselves rather than on a network trained on them.

    A share is public, so an attacker can compare a patient's scan with its images directly. The
    signal is how closely the share's nearest image correlates with the patient's; the references'
    shares say how close a share comes to the patient when it did not train on them (the OUT mean,
    offline approximation as for the networks). The random real subset is attacked alike. None when a
    reference's run folder is not in the cache (an old cache keeps only the probabilities).
    """
    if any(s is None for s in sig.get("shares") or [None]):
        log.info("RMIA on the images is skipped: the cache does not hold every reference's share.")
        return None
    pool = pool_u8.float() / 255.0
    refs = np.stack([image_signal(s, pool) for s in sig["shares"]])
    prior = offline_prior(out_mean(refs, sig["members"]))

    def attack(images: torch.Tensor) -> dict:
        p = image_signal(images, pool)
        scores = rmia_scores(p, prior, p[n_mem:], prior[n_mem:])
        return rate_metrics(scores[:n_mem], scores[n_mem:])

    if not m.real_subsets:
        return None
    share = attack(subject.preprocessing.invert(subject.images))
    # One random real subset, the share's size and class mix: its images are copies of members, by design.
    baseline = attack(pool_u8[m.real_subsets[0]].float() / 255.0)
    return {RmiaKey.SHARE: share, RmiaKey.RANDOM_SUBSET: baseline,
            RmiaKey.SIGNIFICANTLY_ABOVE: above_baseline(share, baseline), RmiaKey.SIGNAL: IMAGE_SIGNAL}


def canary_exposure(n: int, data: RealData, hold_u8: torch.Tensor, hold_y: torch.Tensor, sig: dict,
                    ref: ReferenceSettings, device: torch.device, train: ReferenceTrainer | None,
                    temperature: float = 1.0) -> dict:
    """The worst case (Zhao & Zhang, ICLR 2025): ``n`` held-out images, each given a wrong label, are added to the
    training data of one more pipeline like the references; how far does RMIA single them out?

    The canaries' scores (at their wrong label) are read against the remaining non-members'. Returns
    rate_metrics(...) plus the count; the canary pipeline is cached beside the references.
    """
    n_train, n_hold, k = len(data.train), len(hold_y), data.num_classes
    if not 1 <= n <= n_hold // 2:
        raise DataError(f"--canaries must be between 1 and {n_hold // 2} (half the {n_hold} held-out images, so the "
                        f"rest can be non-members); got {n}.")
    g = generator(ref.seed, CANARY)
    chosen = torch.randperm(n_hold, generator=g)[:n]
    rest = torch.ones(n_hold, dtype=torch.bool)
    rest[chosen] = False
    # A wrong label: the true one shifted by 1..K-1 classes.
    wrong = (hold_y[chosen] + 1 + torch.randint(0, max(1, k - 1), (n,), generator=g)) % k
    pool_u8 = torch.cat([data.train.images, hold_u8[chosen], hold_u8[rest]])
    pool_y = torch.cat([data.train.labels, wrong, hold_y[rest]])
    half = np.zeros(len(pool_y), dtype=bool)
    half[:n_train + n] = True
    folder = Path(sig["folder"]) / f"canaries_{n}"
    signals = folder / SIGNALS_FILE
    if signals.exists():
        with np.load(signals) as f:
            p_all = f["probs"]
    else:
        if train is None:
            raise DistillError(f"The canary pipeline is not in the cache {folder}; 'distill audit --canaries' trains it.")
        log.info("Canaries: one more pipeline with %d mislabeled held-out image(s) in its training data.", n)
        p_all = train(folder, 10_000 + n, pool_u8, pool_y, half, list(data.class_names), ref, device)
        with atomic_path(signals) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, probs=p_all, members=half)
    p = tempered(p_all, temperature)[np.arange(len(pool_y)), pool_y.numpy()]
    # The references' view of the same images: OUT references only, at the canary's (wrong) label.
    hold_pos = n_train + np.arange(n_hold)
    out_c = ~sig["members"][:, hold_pos[chosen.numpy()]]
    probs_all = tempered(sig["probs_all"], temperature)
    probs_c = probs_all[:, hold_pos[chosen.numpy()], :][:, np.arange(n), wrong.numpy()]
    prior_c = offline_prior((probs_c * out_c).sum(0) / out_c.sum(0))
    true_all = true_label(probs_all, np.concatenate([data.train.labels.numpy(), hold_y.numpy()]))
    prior_rest = offline_prior(out_mean(true_all[:, hold_pos[rest.numpy()]], sig["members"][:, hold_pos[rest.numpy()]]))
    p_c, p_rest = p[n_train:n_train + n], p[n_train + n:]
    scores_c = rmia_scores(p_c, prior_c, p_rest, prior_rest)
    scores_rest = rmia_scores(p_rest, prior_rest, p_rest, prior_rest)
    return {CanaryKey.N_CANARIES: n, CanaryKey.KIND: "mislabeled held-out images",
            **rate_metrics(scores_c, scores_rest)}


def rmia_reasons(rmia: dict) -> list[str]:
    """One sentence for each RMIA test (on networks, on the images) the share fails, else none."""
    out = []
    for part, what in ((rmia, "The RMIA attack on networks trained on the share"),
                       (rmia.get(RmiaKey.IMAGE) or {}, "The RMIA attack on the share's images")):
        if not part.get(RmiaKey.SIGNIFICANTLY_ABOVE):
            continue
        s, b = (part[k][RateKey.TPR_AT_1PCT_FPR] for k in (RmiaKey.SHARE, RmiaKey.RANDOM_SUBSET))
        (s_lo, s_hi), (b_lo, b_hi) = s[RateKey.CI95], b[RateKey.CI95]
        out.append(f"{what} reaches TPR {s[RateKey.VALUE]:.3f} at 1% FPR (95% CI {s_lo:.3f}-{s_hi:.3f}), "
                   f"significantly above a random real subset of the same size ({b[RateKey.VALUE]:.3f}, "
                   f"{b_lo:.3f}-{b_hi:.3f}).")
    return out
