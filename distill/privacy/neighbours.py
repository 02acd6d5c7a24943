"""Nearest-neighbour search: how close each synthetic image comes to a real training image.

Pearson correlation and SSIM in pixel space, cosine similarity in an expert
network's feature space. The same search for real held-out images gives the
natural similarity of two different patients; a synthetic image more similar
than the :data:`NN_QUANTILE` quantile of that baseline is flagged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import kornia
import torch
from torch import nn

from ..config import AuditSettings, BufferConfig
from ..data import Preprocessing, RealData
from ..errors import DataError, DistillError, FormatError
from ..formats.audit import NeighbourKey, QuantileKey
from ..formats.trajectory import read_buffer_preprocessing, read_expert
from ..models import create_model, load_flat
from ..reference_defaults import NETWORK_LR
from ..seeding import generator, seeded
from ..train import TrainRecipe, accuracy, predict, train_network
from .streams import FEATURE

log = logging.getLogger(__name__)

# A synthetic image is flagged when it is closer to a training image than 99 % of
# real held-out patients are to theirs: by construction the rule would flag about
# 1 % of genuinely different patients. The maximum is not used because one
# near-copy that slips through NEAR_DUPLICATE_RATIO would set it to 1.0.
NN_QUANTILE = 0.99
NN_METRICS = ("pixel_correlation", "ssim", "feature_cosine")
NN_CHUNK = 256  # query rows per similarity matrix: 256 x 4,708 floats is 5 MB
SSIM_WINDOW = 7  # as skimage's default; Wang et al.'s 11 would span 40 % of a 28 px image
# All-pairs SSIM (544 x 4,708 pairs of 28x28 convolutions) is too slow on a CPU, so
# SSIM is evaluated on the top candidates by Pearson correlation (SSIM's structure
# term is a local correlation). The result is a lower bound on the true nearest SSIM.
SSIM_CANDIDATES = 32


def nearest_rms(queries: torch.Tensor, reference: torch.Tensor, chunk: int = NN_CHUNK) -> torch.Tensor:
    """Root-mean-square pixel difference (Q,) of each query to its nearest reference image.

    queries: (Q, ...) and reference: (R, ...), same units (e.g. uint8 grey levels); the
    search uses |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, so it is one matrix product per chunk.
    """
    ref = reference.flatten(1).double()
    ref_sq = (ref * ref).sum(1)
    out = []
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk].flatten(1).double().to(ref.device)
        d2 = (q * q).sum(1, keepdim=True) + ref_sq[None] - 2 * q @ ref.T
        out.append(d2.min(1).values.clamp_min(0).div(ref.shape[1]).sqrt())
    return torch.cat(out).float().cpu()


def _unit_rows(x: torch.Tensor, centre: bool) -> torch.Tensor:
    x = x.flatten(1).float()
    if centre:
        x = x - x.mean(dim=1, keepdim=True)
    # A constant image has no correlation with anything; eps keeps it at 0 rather than NaN.
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def top_similar(queries: torch.Tensor, reference: torch.Tensor, k: int = 1, *, centre: bool = False,
                chunk: int = NN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities (Pearson correlation with ``centre=True``) of each query row.

    queries: (Q, ...) and reference: (R, ...), flattened per row. Returns values (Q, k)
    and reference indices (Q, k), computed ``chunk`` queries at a time so memory stays Q-independent.
    """
    ref = _unit_rows(reference, centre)
    k = min(k, len(ref))
    vals, idx = [], []
    for start in range(0, len(queries), chunk):
        q = _unit_rows(queries[start:start + chunk].to(ref.device), centre)
        v, i = (q @ ref.T).topk(k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals).clamp(-1, 1), torch.cat(idx)


def ssim_window(size: int) -> int:
    """:data:`SSIM_WINDOW`, shrunk to the largest odd window that fits a small image."""
    return max(1, min(SSIM_WINDOW, size if size % 2 else size - 1))


def nearest_ssim(queries: torch.Tensor, reference: torch.Tensor, candidates: torch.Tensor,
                 chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest mean SSIM of each query against its candidate reference images.

    queries: (Q, C, H, W) and reference: (R, C, H, W) in [0, 1]; candidates: (Q, k)
    reference indices. Returns values (Q,) and reference indices (Q,).
    """
    q_idx = torch.arange(len(queries), device=candidates.device).repeat_interleave(candidates.shape[1])
    r_idx = candidates.flatten()
    win = ssim_window(queries.shape[-1])
    scores = []
    for s in range(0, len(r_idx), chunk):
        a = queries[q_idx[s:s + chunk]].float()
        b = reference[r_idx[s:s + chunk]].float()
        scores.append(kornia.metrics.ssim(a, b, win, max_val=1.0).mean(dim=(1, 2, 3)))
    scores = torch.cat(scores).view(candidates.shape)
    best, pos = scores.max(dim=1)
    return best, candidates.gather(1, pos[:, None])[:, 0]


def _embedder(model: nn.Module) -> nn.Module:
    """The last linear layer; its input is the network's feature vector (penultimate layer)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DistillError(f"The feature network {type(model).__name__} has no final linear layer to take features from.")
    return linears[-1]


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate-layer features (N, D) of preprocessed images (N, C, H, W), in eval mode."""
    grabbed: list[torch.Tensor] = []
    hook = _embedder(model).register_forward_pre_hook(lambda _m, inp: grabbed.append(inp[0].flatten(1).detach()))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(grabbed)


def quantile_stats(x: torch.Tensor) -> dict[str, float]:
    """median / p95 / max of a 1-D tensor."""
    x = x.double().cpu()
    return {QuantileKey.MEDIAN: float(x.median()), QuantileKey.P95: float(torch.quantile(x, 0.95)),
            QuantileKey.MAX: float(x.max())}


@dataclass
class NeighbourResult:
    """Nearest-neighbour similarities for one metric."""

    synthetic: torch.Tensor  # (N,) similarity of each synthetic image to its nearest training image
    synthetic_index: torch.Tensor  # (N,) index of that training image (local only)
    holdout: torch.Tensor  # (M,) the same for real held-out images
    threshold: float

    @property
    def flagged(self) -> torch.Tensor:
        return self.synthetic > self.threshold

    def summary(self) -> dict:
        return {NeighbourKey.SYNTHETIC: quantile_stats(self.synthetic),
                NeighbourKey.HOLDOUT: quantile_stats(self.holdout),
                NeighbourKey.THRESHOLD: self.threshold, NeighbourKey.FLAGGED: int(self.flagged.sum())}


def neighbour_metric(syn: torch.Tensor, holdout: torch.Tensor, train: torch.Tensor, *, kind: str,
                     quantile: float = NN_QUANTILE) -> NeighbourResult:
    """Nearest-training-image similarity of synthetic and held-out images, and the flag threshold.

    kind: "pixel_correlation" or "ssim" (inputs in [0, 1] display space, (N, C, H, W)),
    or "feature_cosine" (inputs are feature vectors (N, D)).
    """
    both = torch.cat([syn, holdout])
    if kind == "pixel_correlation":
        v, i = top_similar(both, train, 1, centre=True)
        v, i = v[:, 0], i[:, 0]
    elif kind == "ssim":
        _, cand = top_similar(both, train, SSIM_CANDIDATES, centre=True)
        v, i = nearest_ssim(both, train, cand)
    elif kind == "feature_cosine":
        v, i = top_similar(both, train, 1, centre=False)
        v, i = v[:, 0], i[:, 0]
    else:
        raise ValueError(f"Unknown similarity {kind!r}; choose one of {', '.join(NN_METRICS)}.")
    n = len(syn)
    hold = v[n:].cpu()
    thr = float(torch.quantile(hold.double(), quantile))
    return NeighbourResult(synthetic=v[:n].cpu(), synthetic_index=i[:n].cpu(), holdout=hold, threshold=thr)


def feature_network(model: str, model_kwargs: dict, preprocessing: Preprocessing, data: RealData,
                    x_train: torch.Tensor, x_val: torch.Tensor, expert: str | None, settings: AuditSettings,
                    device: torch.device) -> tuple[nn.Module, dict]:
    """An expert network for feature similarity: the last snapshot of ``expert``, or one trained here.

    ``model``/``model_kwargs``: the share's recipe network, trained here when no expert is given;
    ``preprocessing``: the synthetic set's, which the expert's buffer must share.
    """
    if expert is not None:
        e = read_expert(expert)
        if e.fingerprint.get("sha256") != data.source_sha256:
            raise DataError(f"The expert {Path(expert).name} was trained on other data than --data; "
                            "pass an expert from the buffer of this synthetic set.")
        try:
            pre, _, _ = read_buffer_preprocessing(Path(expert).parent)
            diff = pre.same_as(preprocessing)
        except FormatError:
            diff = None
            log.warning("No preprocessing.h5 beside %s; assuming it matches the synthetic set's.", Path(expert).name)
        if diff:
            raise DataError(f"The expert's buffer and the synthetic set differ in preprocessing: {diff}.")
        try:
            net = create_model(str(e.attrs["model"]), data.num_classes, data.channels, data.size, **e.model_kwargs)
        except ValueError as err:
            raise DistillError(str(err)) from None
        load_flat(net, e.snapshots([e.num_snapshots - 1])[0])
        net.to(device)
        info = {"source": "trajectory", "epochs": int(e.train.get("epochs", 0))}
    else:
        b = BufferConfig()  # the buffer's expert recipe, so the feature network is an expert in the usual sense
        with seeded(settings.seed, FEATURE, 0):
            net = create_model(model, data.num_classes, data.channels, data.size, **model_kwargs)
        net.to(device)
        recipe = TrainRecipe(epochs=settings.expert_epochs, lr=NETWORK_LR, batch_size=b.batch_size, momentum=b.momentum,
                             weight_decay=b.weight_decay, decay_at_half=False, augment=None)
        train_network(net, x_train, data.train.labels.to(device), recipe, generator(settings.seed, FEATURE, 1))
        info = {"source": "trained", "epochs": settings.expert_epochs}
    info["holdout_accuracy"] = accuracy(predict(net, x_val), data.val.labels) if len(x_val) else None  # JSON has no NaN
    return net, info
