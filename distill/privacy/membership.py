"""Membership inference: can an attacker tell the real training images from held-out ones?

Networks trained on the share with its recipe, and networks trained on random
real subsets of the same size, are attacked with a loss threshold (Yeom et al.
2018) and a difficulty-calibrated loss (Watson et al. 2022). AUC and TPR at low
FPR, with bootstrap intervals.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import AuditSettings
from ..data import RealData, draw_random_real
from ..errors import DataError, DivergenceError
from ..formats.audit import MembershipKey, RateKey
from ..metrics import auc, tpr_at_fpr
from ..models import create_model
from ..reference_defaults import NETWORK_LR
from ..seeding import derive_seed, generator, seeded
from ..train import TrainRecipe, train_network
from .streams import BOOT, MEMBERS, NET_INIT, REAL_TRAIN, SHARE_TRAIN, SUBSET
from .subject import Subject

log = logging.getLogger(__name__)

FPRS = {RateKey.TPR_AT_1PCT_FPR: 0.01, RateKey.TPR_AT_0P1PCT_FPR: 0.001}  # Carlini et al. 2022 ask for low-FPR figures
BOOTSTRAP = AuditSettings.bootstrap
CI_LEVEL = 0.95
REAL_SUBSET_LR = NETWORK_LR  # random-real baselines train as the reference's networks do (lr_net)


@torch.no_grad()
def example_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Per-example cross-entropy (N,) of preprocessed images against their true labels, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        logp = F.log_softmax(model(images[i:i + batch_size]), dim=1)
        out.append(-logp.gather(1, labels[i:i + batch_size, None].to(logp.device))[:, 0])
    model.train(was_training)
    return torch.cat(out).cpu()


def attack_metrics(members: np.ndarray | torch.Tensor, nonmembers: np.ndarray | torch.Tensor, *,
                   bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict:
    """AUC and TPR at low FPR of a membership score (higher = member), with bootstrap intervals.

    Members and non-members are resampled separately (``bootstrap`` times, seeded),
    so each interval reflects both sample sizes.
    """
    m = np.asarray(members, dtype=np.float64)
    n = np.asarray(nonmembers, dtype=np.float64)
    if len(m) < 1 or len(n) < 1:
        raise DataError("A membership attack needs at least one member and one non-member.")
    funcs = {RateKey.AUC: auc} | {k: (lambda a, b, f=f: tpr_at_fpr(a, b, f)) for k, f in FPRS.items()}
    rng = np.random.default_rng(derive_seed(seed, BOOT))
    boots = {k: [] for k in funcs}
    for _ in range(bootstrap):
        mb, nb = m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))]
        for k, fn in funcs.items():
            boots[k].append(fn(mb, nb))
    lo, hi = (1 - CI_LEVEL) / 2, 1 - (1 - CI_LEVEL) / 2
    out: dict = {RateKey.N_MEMBERS: len(m), RateKey.N_NONMEMBERS: len(n)}
    for k, fn in funcs.items():
        out[k] = {RateKey.VALUE: fn(m, n),
                  RateKey.CI95: [float(np.quantile(boots[k], lo)), float(np.quantile(boots[k], hi))]}
        if k in FPRS:
            # Below 1 / fpr non-members the rate cannot be told apart from 'no false positive at all'.
            out[k][RateKey.RESOLVABLE] = bool(len(n) * FPRS[k] >= 1)
    return out


def train_networks(kind: int, subset_images: list[torch.Tensor], subset_targets: list[torch.Tensor], model: str,
                   model_kwargs: dict, recipe: TrainRecipe, num_classes: int, seed: int,
                   device: torch.device) -> list[nn.Module]:
    """Network j trained on (images[j], targets[j]); ``kind`` is the seed sub-stream of the training data order."""
    nets = []
    for j, (x, y) in enumerate(zip(subset_images, subset_targets)):
        # Network j of either side starts from the same weights, so the two sides differ only in their data.
        with seeded(seed, NET_INIT, j):
            net = create_model(model, num_classes, x.shape[1], x.shape[-1], **model_kwargs)
        net.to(device)
        train_network(net, x.to(device), y.to(device), recipe, generator(seed, kind, j))
        nets.append(net)
    return nets


def random_real_subsets(labels: torch.Tensor, num_classes: int, ipc: int, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` seeded random index sets into ``labels``, each with ``ipc`` images per class."""
    g = generator(seed, SUBSET)
    return [draw_random_real(labels, num_classes, ipc, g) for _ in range(n)]


@dataclass
class Membership:
    """The attacks' results, each an :func:`attack_metrics` dict."""

    share: dict[str, dict]  # attack name -> metrics, against networks trained on the share
    real_subset: dict  # the loss attack against networks trained on random real subsets: the reference
    real_subset_included: dict  # those networks' own images against the non-members: a real subset's worst case
    n_members: int
    n_nonmembers: int
    epochs: int  # of every network trained here
    # The attacked networks themselves, for a stronger attack on the same models (not part of the summary).
    share_nets: list = dataclasses.field(default_factory=list, repr=False)
    real_nets: list = dataclasses.field(default_factory=list, repr=False)
    real_subsets: list = dataclasses.field(default_factory=list, repr=False)  # training-set indices of each


def membership_inference(subject: Subject, data: RealData, x_train: torch.Tensor, x_hold: torch.Tensor,
                         hold_y: torch.Tensor, settings: AuditSettings, device: torch.device) -> Membership:
    """Networks on the share vs on random real subsets of the same size and class mix, attacked alike.

    x_train, x_hold: preprocessed training and held-out images on ``device``; hold_y: held-out labels.
    """
    seed = settings.seed
    recipe = subject.recipe if settings.epochs is None else dataclasses.replace(subject.recipe, epochs=settings.epochs)
    # Same size and class mix as the share (shares hold the same number of images per class).
    ipc = max(1, round(len(subject.images) / data.num_classes))
    subsets = random_real_subsets(data.train.labels, data.num_classes, ipc, settings.networks, seed)
    log.info("Membership inference: training %d network(s) on the share and %d on random real subsets (%d epochs).",
             settings.networks, settings.networks, recipe.epochs)
    share_nets = train_networks(SHARE_TRAIN, [subject.images] * settings.networks,
                                [subject.targets] * settings.networks, subject.model, subject.model_kwargs, recipe,
                                data.num_classes, seed, device)
    real_recipe = dataclasses.replace(recipe, lr=REAL_SUBSET_LR)
    real_nets = train_networks(REAL_TRAIN, [x_train[s] for s in subsets], [data.train.labels[s] for s in subsets],
                               subject.model, subject.model_kwargs, real_recipe, data.num_classes, seed, device)
    # Members: training images outside every random subset (the calibrated attack uses the subset
    # networks as references, which must not have seen the point), as many as there are non-members.
    used = torch.zeros(len(x_train), dtype=torch.bool)
    for s in subsets:
        used[s] = True
    pool = torch.nonzero(~used).flatten()
    pool = pool[torch.randperm(len(pool), generator=generator(seed, MEMBERS))[:len(x_hold)]]
    x_mem, y_mem = x_train[pool.to(device)], data.train.labels[pool]

    share_mem, share_non = _mean_loss(share_nets, x_mem, y_mem), _mean_loss(share_nets, x_hold, hold_y)
    real_mem, real_non = _mean_loss(real_nets, x_mem, y_mem), _mean_loss(real_nets, x_hold, hold_y)
    metric = lambda a, b: attack_metrics(a.numpy(), b.numpy(), bootstrap=settings.bootstrap, seed=seed)  # noqa: E731
    share_attacks = {
        MembershipKey.LOSS: metric(-share_mem, -share_non),
        # Watson et al. 2022: subtract how hard each image is for networks that never saw it.
        MembershipKey.CALIBRATED: metric(real_mem - share_mem, real_non - share_non),
    }
    # The worst case of a real subset: its own images against the non-members, network by network.
    own = torch.cat([example_losses(n, x_train[s], data.train.labels[s]) for n, s in zip(real_nets, subsets)])
    own_non = torch.cat([example_losses(n, x_hold, hold_y) for n in real_nets])
    return Membership(share=share_attacks, real_subset=metric(-real_mem, -real_non),
                      real_subset_included=metric(-own, -own_non), n_members=len(x_mem), n_nonmembers=len(x_hold),
                      epochs=recipe.epochs, share_nets=share_nets, real_nets=real_nets, real_subsets=subsets)


def _mean_loss(nets: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = torch.stack([example_losses(n, x, y) for n in nets]).mean(0)
    if not torch.isfinite(loss).all():
        # NaN scores would rank as neither member nor non-member and pass the verdict unseen.
        raise DivergenceError("A network trained for the membership attack diverged (NaN loss); the share's "
                              "recipe does not train, so the audit cannot measure membership.")
    return loss
