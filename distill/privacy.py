"""Privacy audit of a synthetic set or a share: nearest neighbours, membership inference, verdict.

Public entry point: :func:`run_audit`. The method, the thresholds and the JSON
keys are documented in ``docs/privacy.md``; in short:

1. **Nearest neighbour.** Every synthetic image is compared with every real
   training image (Pearson correlation and SSIM in pixel space, cosine
   similarity in an expert network's feature space). The same search for real
   held-out images gives the natural similarity of two different patients; a
   synthetic image more similar than the :data:`NN_QUANTILE` quantile of that
   baseline is flagged.
2. **Membership inference.** Networks trained on the share with its recipe,
   and networks trained on random real subsets of the same size, are attacked
   with a loss threshold (Yeom et al. 2018) and a difficulty-calibrated loss
   (Watson et al. 2022). AUC and TPR at low FPR, with bootstrap intervals.
3. **Verdict.** Pass iff nothing is flagged and the share's attack is not
   meaningfully stronger than the random-real baseline (:data:`AUC_MARGIN`,
   :data:`TPR_MARGIN`). :data:`STATEMENT` is printed with it.

For a run folder the summary is written to ``RUNDIR/audit.json``; ``distill
export`` embeds it in the share. The summary holds numbers and short strings
only: no real image, no path, no file name, no index of a real image.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_model_builds
from .config import HOLDOUTS, AuditSettings, BufferConfig  # noqa: F401 (HOLDOUTS re-exported)
from .data import Preprocessing, RealData, draw_random_real, load_data
from .distributed import resolve_device
from .errors import DataError, DistillError, DivergenceError, FormatError
from .formats.audit import AUDIT_FILE, AUDIT_FORMAT, AUDIT_VERSION, audit_document, read_audit  # noqa: F401 (re-exported)
from .formats.common import utc_now
from .formats.share import load_share, share_targets
from .formats.synset import SYNSET_FILE, SYNSET_FORMAT, read_synset
from .formats.trajectory import read_buffer_preprocessing, read_expert
from .io import atomic_path, sha256_file, strict_json, write_json
from .metrics import auc, tpr_at_fpr
from .models import create_model, load_flat
from .runshare import share_from_synset
from .seeding import derive_seed, generator, seeded
from .train import TrainRecipe, accuracy, predict, train_network

log = logging.getLogger(__name__)

PAIRS_FILE = "audit_pairs.png"  # in the run folder; for the local reviewer only
STATEMENT = "An empirical audit is not a proof of privacy."

# A synthetic image is flagged when it is closer to a training image than 99 % of
# real held-out patients are to theirs: by construction the rule would flag about
# 1 % of genuinely different patients. The maximum is not used because one
# near-copy that slips through NEAR_DUPLICATE_RATIO would set it to 1.0.
NN_QUANTILE = 0.99
NN_METRICS = ("pixel_correlation", "ssim", "feature_cosine")
# A held-out image whose nearest training image is closer (RMS pixel difference) than 0.4 x the
# held-out median is the same picture, not another patient, and is dropped from the baseline and
# from the non-members. Measured on MedMNIST (docs/privacy.md): such copies sit at <= 0.36 x the
# median (31 of 78 BreastMNIST val images, the 8 PneumoniaMNIST train/val copies at 0), genuinely
# different patients at >= 0.47 x (PneumoniaMNIST, RetinaMNIST) and >= 0.82 x (BreastMNIST val).
NEAR_DUPLICATE_RATIO = 0.4
NN_CHUNK = 256  # query rows per similarity matrix: 256 x 4,708 floats is 5 MB
SSIM_WINDOW = 7  # as skimage's default; Wang et al.'s 11 would span 40 % of a 28 px image
# All-pairs SSIM (544 x 4,708 pairs of 28x28 convolutions) is too slow on a CPU, so
# SSIM is evaluated on the top candidates by Pearson correlation (SSIM's structure
# term is a local correlation). The result is a lower bound on the true nearest SSIM.
SSIM_CANDIDATES = 32

# Membership inference.
FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0p1pct_fpr": 0.001}  # Carlini et al. 2022 ask for low-FPR figures
BOOTSTRAP = AuditSettings.bootstrap
CI_LEVEL = 0.95
REAL_SUBSET_LR = 0.01  # the MTT reference trains its random-real baselines at lr_net 0.01
FEATURE_EXPERT_EPOCHS = AuditSettings.expert_epochs  # pass --expert to reuse a fully trained one

# Verdict: the share's attack may exceed the stronger of chance and the random-real
# baseline by this much (and must exceed it with its whole 95 % interval to fail).
# 0.05 AUC is about 3 standard errors with 500 points per side.
AUC_MARGIN = 0.05
TPR_MARGIN = 0.05  # absolute, at 1 % FPR: five times the 1 % a blind attacker finds

SUMMARY_DIGITS = 5  # decimals kept in audit.json: enough for every threshold, short enough to read

# Sub-streams of the audit seed.
_FEATURE, _NET_INIT, _SHARE_TRAIN, _REAL_TRAIN, _SUBSET, _MEMBERS, _BOOT = range(7)


# ----------------------------------------------------------------------------- settings and sources


@dataclass(frozen=True)
class Subject:
    """What is audited, whatever file it came from."""

    images: torch.Tensor  # (N, C, H, W) float32, network space
    labels: torch.Tensor  # (N,) int64
    targets: torch.Tensor  # (N,) int64 or (N, K) float32 probabilities: what a recipient trains on
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    model: str
    model_kwargs: dict
    recipe: TrainRecipe
    data_sha256: str | None  # unsalted hash of the real data, when the source keeps one
    file_sha256: str
    rundir: Path | None  # where audit.json goes; None for a share


def load_subject(source: str | os.PathLike) -> Subject:
    """Read a run folder, its ``synthetic.h5``, or a share ``.h5`` into one :class:`Subject`."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path} does not exist; give a run folder or a share .h5 file.")
    if path.is_dir():
        return _from_synset(path / SYNSET_FILE, path)
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except OSError:
        raise FormatError(f"{path} is not a readable HDF5 file.") from None
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt == SYNSET_FORMAT:
        return _from_synset(path, path.parent)
    return _from_share(path)


def _from_synset(path: Path, rundir: Path) -> Subject:
    s = read_synset(path)
    # The share this run would export, so the audit trains on exactly the recipe a recipient gets.
    share = share_from_synset(s, {}, license="", description="", citation="")
    fp = s.fingerprint or {}
    return _subject(share, sha256_file(path), rundir, fp.get("sha256"), str(path))


def _from_share(path: Path) -> Subject:
    # A share keeps only a salted hash of its data, so it cannot prove which data made it.
    return _subject(load_share(path), sha256_file(path), None, None, str(path))


def _subject(share, file_sha: str, rundir: Path | None, data_sha: str | None, where: str) -> Subject:
    try:
        recipe = share.recipe.to_train_recipe()
    except ValueError as e:
        raise FormatError(f"{where}: its training recipe is not usable ({str(e).rstrip('.')}).") from None
    if not torch.isfinite(share.images).all():
        # NaN compares as 'not similar' and would pass the nearest-neighbour check unseen.
        raise FormatError(f"{where} holds NaN or infinite pixels; it cannot be audited or shared.")
    return Subject(images=share.images.float(), labels=share.labels.long(), targets=share_targets(share, where),
                   preprocessing=share.preprocessing, class_names=tuple(share.class_names), model=share.recipe.model,
                   model_kwargs=dict(share.recipe.model_kwargs or {}), recipe=recipe, data_sha256=data_sha,
                   file_sha256=file_sha, rundir=rundir)


def load_matching_data(subject: Subject, data_spec: str | os.PathLike) -> tuple[RealData, str]:
    """Load the real data and refuse data that cannot be the subject's; returns (data, how it was checked)."""
    data = load_data(data_spec)
    pre = subject.preprocessing
    same_file = subject.data_sha256 is not None and subject.data_sha256 == data.source_sha256
    if subject.data_sha256 is not None and not same_file:
        raise DataError(f"The real data {data.name!r} is not the data this synthetic set was made from "
                        "(their SHA-256 fingerprints differ); pass the same --data as for 'distill buffer'.")
    if data.size != pre.size and same_file:
        log.info("Resizing the real data to %d px, as the buffer did.", pre.size)
        data = load_data(data_spec, size=pre.size)
    n_syn_classes = len(subject.class_names)
    if data.num_classes != n_syn_classes:
        raise DataError(f"The real data has {data.num_classes} classes but the synthetic set has {n_syn_classes}; "
                        "they cannot come from the same dataset.")
    if data.channels != subject.images.shape[1] or data.size != subject.images.shape[-1]:
        raise DataError(f"The real images are {data.channels}x{data.size}x{data.size} but the synthetic ones are "
                        f"{'x'.join(map(str, subject.images.shape[1:]))}; they cannot come from the same dataset.")
    if list(subject.class_names) != list(data.class_names):
        log.warning("Class names differ (%s vs %s); the audit goes on because counts and geometry match.",
                    ", ".join(subject.class_names), ", ".join(data.class_names))
    how = "sha256" if same_file else "geometry"
    return data, how


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


def holdout_split(data: RealData, holdout: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Held-out images and labels with (near-)copies of training images removed.

    Returns (images (M, C, H, W) uint8, labels (M,), number of copies removed).
    A copy of a training image is a member, not a non-member, and would pose as
    'two patients' at similarity 1.0 (see :data:`NEAR_DUPLICATE_RATIO`).
    """
    parts = [data.split(s) for s in holdout.split("+")]
    images = torch.cat([p.images for p in parts])
    labels = torch.cat([p.labels for p in parts])
    if len(images) == 0:
        raise DataError(f"The {holdout} split of {data.name} is empty; choose another --holdout.")
    rms = nearest_rms(images, data.train.images)
    keep = rms >= NEAR_DUPLICATE_RATIO * rms.median()
    if int(keep.sum()) < 2:
        raise DataError(f"The {holdout} split of {data.name} has fewer than 2 images that are not copies of "
                        "training images; choose another --holdout.")
    return images[keep], labels[keep], int((~keep).sum())


# ----------------------------------------------------------------------------- nearest neighbours


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
    import kornia

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
    return {"median": float(x.median()), "p95": float(torch.quantile(x, 0.95)), "max": float(x.max())}


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
        return {"synthetic": quantile_stats(self.synthetic), "holdout": quantile_stats(self.holdout),
                "threshold": self.threshold, "flagged": int(self.flagged.sum())}


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


# ----------------------------------------------------------------------------- membership inference


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
    funcs = {"auc": auc} | {k: (lambda a, b, f=f: tpr_at_fpr(a, b, f)) for k, f in FPRS.items()}
    rng = np.random.default_rng(derive_seed(seed, _BOOT))
    boots = {k: [] for k in funcs}
    for _ in range(bootstrap):
        mb, nb = m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))]
        for k, fn in funcs.items():
            boots[k].append(fn(mb, nb))
    lo, hi = (1 - CI_LEVEL) / 2, 1 - (1 - CI_LEVEL) / 2
    out: dict = {"n_members": len(m), "n_nonmembers": len(n)}
    for k, fn in funcs.items():
        out[k] = {"value": fn(m, n), "ci95": [float(np.quantile(boots[k], lo)), float(np.quantile(boots[k], hi))]}
        if k in FPRS:
            # Below 1 / fpr non-members the rate cannot be told apart from 'no false positive at all'.
            out[k]["resolvable"] = bool(len(n) * FPRS[k] >= 1)
    return out


def _train_nets(kind: int, subset_images: list[torch.Tensor], subset_targets: list[torch.Tensor], subject: Subject,
                recipe: TrainRecipe, num_classes: int, seed: int, device: torch.device) -> list[nn.Module]:
    nets = []
    for j, (x, y) in enumerate(zip(subset_images, subset_targets)):
        # Network j of either side starts from the same weights, so the two sides differ only in their data.
        with seeded(seed, _NET_INIT, j):
            net = create_model(subject.model, num_classes, x.shape[1], x.shape[-1], **subject.model_kwargs)
        net.to(device)
        train_network(net, x.to(device), y.to(device), recipe, generator(seed, kind, j))
        nets.append(net)
    return nets


def random_real_subsets(labels: torch.Tensor, num_classes: int, ipc: int, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` seeded random index sets into ``labels``, each with ``ipc`` images per class."""
    g = generator(seed, _SUBSET)
    return [draw_random_real(labels, num_classes, ipc, g) for _ in range(n)]


# ----------------------------------------------------------------------------- verdict and report


def verdict(flagged: int, share: dict, real: dict) -> tuple[bool, list[str]]:
    """Pass iff no image is flagged and no attack on the share beats the reference clearly.

    share: {attack name: attack_metrics(...)}; real: attack_metrics(...) of the random-real
    networks under the loss attack. The reference is the stronger of chance and that
    baseline. An attack fails the share when its point estimate exceeds the reference by
    the margin *and* its whole confidence interval lies above the reference, so a small
    hold-out set does not fail a share by sampling noise alone. TPR at 1 % FPR only counts
    where it is resolvable (at least 100 non-members). Returns (passed, one sentence per failure).
    """
    reasons = []
    if flagged:
        reasons.append(f"{flagged} synthetic image(s) are closer to a training image than "
                       f"{NN_QUANTILE:.0%} of held-out patients are to theirs.")
    refs = {"auc": (max(0.5, real["auc"]["value"]), AUC_MARGIN),
            "tpr_at_1pct_fpr": (max(FPRS["tpr_at_1pct_fpr"], real["tpr_at_1pct_fpr"]["value"]), TPR_MARGIN)}
    for name, m in share.items():
        for key, (ref, margin) in refs.items():
            v = m[key]
            if not v.get("resolvable", True):
                continue
            if v["value"] > ref + margin and v["ci95"][0] > ref:
                what = "AUC" if key == "auc" else "TPR at 1% FPR"
                reasons.append(f"The {name} membership attack on the share reaches {what} {v['value']:.3f} "
                               f"(95% CI from {v['ci95'][0]:.3f}), above the reference {ref:.3f} + {margin}.")
    return not reasons, reasons


@dataclass
class AuditReport:
    passed: bool
    summary: dict  # JSON-able numbers and strings only; goes into the share
    details: dict  # per-image results with training-image indices; stays local
    subject_sha256: str
    created: str
    reasons: list[str] = field(default_factory=list)
    statement: str = STATEMENT

    def document(self, *, details: bool = False) -> dict:
        """The ``audit.json`` document (``details=True`` adds the local per-image results)."""
        return audit_document(passed=self.passed, summary=self.summary, statement=self.statement,
                              created=self.created, subject_sha256=self.subject_sha256,
                              details=self.details if details else None)

    def text(self) -> str:
        """A short human-readable report for the terminal."""
        s = self.summary
        lines = [f"Nearest neighbour ({s['n_synthetic']} synthetic vs {s['data']['n_train']} training images; "
                 f"baseline {s['data']['n_holdout']} held-out images):"]
        for k in NN_METRICS:
            m = s["nearest_neighbour"][k]
            lines.append(f"  {k:18s} synthetic median {m['synthetic']['median']:.3f} p95 {m['synthetic']['p95']:.3f} "
                         f"max {m['synthetic']['max']:.3f} | held-out median {m['holdout']['median']:.3f} "
                         f"p95 {m['holdout']['p95']:.3f} max {m['holdout']['max']:.3f} | threshold "
                         f"{m['threshold']:.3f}, flagged {m['flagged']}")
        mia = s["membership"]
        lines.append(f"Membership inference ({mia['n_members']} members, {mia['n_nonmembers']} non-members, "
                     f"{s['settings']['networks']} network(s) per side):")
        rows = [(f"share, {k}", v) for k, v in mia["share"].items()]
        rows += [("random real, loss", mia["real_subset"]), ("random real, its own images", mia["real_subset_included"])]
        for name, m in rows:
            line = f"  {name:28s} AUC {_ci(m['auc'])}"
            for key, label in (("tpr_at_1pct_fpr", "TPR@1%FPR"), ("tpr_at_0p1pct_fpr", "TPR@0.1%FPR")):
                line += f"  {label} {_ci(m[key])}" + ("" if m[key]["resolvable"] else " (too few points)")
            lines.append(line)
        lines.append(f"Verdict: {'PASS' if self.passed else 'FAIL'}")
        lines += [f"  - {r}" for r in self.reasons]
        lines.append(self.statement)
        return "\n".join(lines)


def _ci(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def write_pairs_png(path: str | os.PathLike, syn01: torch.Tensor, train_u8: torch.Tensor,
                    results: dict[str, NeighbourResult], order: list[int], scale: int = 4) -> None:
    """One row per synthetic image: it, then its nearest training image under each metric, with the scores.

    syn01: (N, C, H, W) in [0, 1]; train_u8: (R, C, H, W) uint8. Rows follow ``order``.
    """
    from PIL import Image, ImageDraw

    _, c, h, w = syn01.shape
    cols = 1 + len(results)
    cap, gap = 12, 4  # caption height and gutter, in pixels
    cell_w, cell_h = w * scale, h * scale
    width = cols * cell_w + (cols + 1) * gap
    canvas = Image.new("RGB", (width, cap + gap + len(order) * (cell_h + cap + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 0), "synthetic | nearest training image by " + ", ".join(results), fill="black")

    def tile(x01: torch.Tensor) -> Image.Image:
        arr = (x01.clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.expand(3, h, w) if c == 1 else arr[:3]
        return Image.fromarray(arr.permute(1, 2, 0).numpy()).resize((cell_w, cell_h), Image.NEAREST)

    for row, i in enumerate(order):
        y = cap + gap + row * (cell_h + cap + gap)
        cells = [(tile(syn01[i].cpu()), f"syn {i}")]
        for r in results.values():
            j = int(r.synthetic_index[i])
            cells.append((tile(train_u8[j].float() / 255), f"{float(r.synthetic[i]):.3f}{' !' if r.flagged[i] else ''}"))
        for col, (img, label) in enumerate(cells):
            x = gap + col * (cell_w + gap)
            draw.text((x, y), label, fill="red" if label.endswith("!") else "black")
            canvas.paste(img, (x, y + cap))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


# ----------------------------------------------------------------------------- the audit


def _feature_network(subject: Subject, data: RealData, x_train: torch.Tensor, x_val: torch.Tensor, expert: str | None,
                     settings: AuditSettings, device: torch.device) -> tuple[nn.Module, dict]:
    """An expert network for feature similarity: the last snapshot of ``expert``, or one trained here."""
    if expert is not None:
        e = read_expert(expert)
        if e.fingerprint.get("sha256") != data.source_sha256:
            raise DataError(f"The expert {Path(expert).name} was trained on other data than --data; "
                            "pass an expert from the buffer of this synthetic set.")
        try:
            pre, _, _ = read_buffer_preprocessing(Path(expert).parent)
            diff = pre.same_as(subject.preprocessing)
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
        with seeded(settings.seed, _FEATURE, 0):
            net = create_model(subject.model, data.num_classes, data.channels, data.size, **subject.model_kwargs)
        net.to(device)
        recipe = TrainRecipe(epochs=settings.expert_epochs, lr=b.lr, batch_size=b.batch_size, momentum=b.momentum,
                             weight_decay=b.weight_decay, decay_at_half=False, augment=None)
        train_network(net, x_train, data.train.labels.to(device), recipe, generator(settings.seed, _FEATURE, 1))
        info = {"source": "trained", "epochs": settings.expert_epochs}
    info["holdout_accuracy"] = accuracy(predict(net, x_val), data.val.labels) if len(x_val) else None  # JSON has no NaN
    return net, info


def run_audit(source: str | os.PathLike, data_spec: str | os.PathLike, *, json_path: str | os.PathLike | None = None,
              pairs_png: str | os.PathLike | None = None, seed: int = 0, device: str = "auto", holdout: str = "val",
              networks: int = 2, epochs: int | None = None, expert: str | os.PathLike | None = None,
              expert_epochs: int = FEATURE_EXPERT_EPOCHS, bootstrap: int = BOOTSTRAP, pairs: int = 16) -> AuditReport:
    """Audit a run folder (or its ``synthetic.h5``) or a share against the real data it came from.

    Members are the real training split; non-members the ``holdout`` split(s)
    minus (near-)copies of training images. Writes ``RUNDIR/audit.json`` and
    ``RUNDIR/audit_pairs.png`` for a run folder, ``json_path`` (summary plus
    per-image details) and ``pairs_png`` when given.
    """
    settings = AuditSettings(holdout=holdout, networks=networks, epochs=epochs, expert_epochs=expert_epochs,
                             bootstrap=bootstrap, pairs=pairs, seed=seed)
    dev = resolve_device(device)
    subject = load_subject(source)
    data, checked = load_matching_data(subject, data_spec)
    # Fail before any training when the recipe's model cannot take these images.
    check_model_builds(subject.model, data.num_classes, data.channels, data.size, subject.model_kwargs,
                       what="The recipe's model")
    pre = subject.preprocessing
    hold_u8, hold_y, dupes = holdout_split(data, settings.holdout)
    if dupes:
        log.warning("Dropped %d held-out image(s) that are (near-)copies of training images: they are the same "
                    "pictures, not other patients (a known MedMNIST quirk).", dupes)
    n_syn = len(subject.images)

    # 1. Nearest neighbours, in display space [0, 1] and in an expert's feature space.
    syn01 = pre.invert(subject.images).to(dev)
    train01 = (data.train.images.float() / 255).to(dev)
    hold01 = (hold_u8.float() / 255).to(dev)
    x_train, x_hold = pre(data.train.images).to(dev), pre(hold_u8).to(dev)
    log.info("Nearest-neighbour search: %d synthetic and %d held-out images against %d training images.",
             n_syn, len(hold_u8), len(x_train))
    nn_res = {k: neighbour_metric(syn01, hold01, train01, kind=k) for k in ("pixel_correlation", "ssim")}
    feat_net, feat_info = _feature_network(subject, data, x_train, pre(data.val.images).to(dev),
                                           str(expert) if expert is not None else None, settings, dev)
    f_syn, f_hold, f_train = (embed(feat_net, x) for x in (subject.images.to(dev), x_hold, x_train))
    nn_res["feature_cosine"] = neighbour_metric(f_syn, f_hold, f_train, kind="feature_cosine")
    del feat_net, f_syn, f_hold, f_train
    flagged = torch.zeros(n_syn, dtype=torch.bool)
    for r in nn_res.values():
        flagged |= r.flagged

    # 2. Membership inference: networks on the share vs on random real subsets of the same size and class mix.
    recipe = subject.recipe if settings.epochs is None else dataclasses.replace(subject.recipe, epochs=settings.epochs)
    # Same size and class mix as the share (shares hold the same number of images per class).
    ipc = max(1, round(n_syn / data.num_classes))
    subsets = random_real_subsets(data.train.labels, data.num_classes, ipc, settings.networks, seed)
    log.info("Membership inference: training %d network(s) on the share and %d on random real subsets (%d epochs).",
             settings.networks, settings.networks, recipe.epochs)
    share_nets = _train_nets(_SHARE_TRAIN, [subject.images] * settings.networks, [subject.targets] * settings.networks,
                             subject, recipe, data.num_classes, seed, dev)
    real_recipe = dataclasses.replace(recipe, lr=REAL_SUBSET_LR)
    real_nets = _train_nets(_REAL_TRAIN, [x_train[s] for s in subsets], [data.train.labels[s] for s in subsets],
                            subject, real_recipe, data.num_classes, seed, dev)
    # Members: training images outside every random subset (the calibrated attack uses the subset
    # networks as references, which must not have seen the point), as many as there are non-members.
    used = torch.zeros(len(x_train), dtype=torch.bool)
    for s in subsets:
        used[s] = True
    pool = torch.nonzero(~used).flatten()
    pool = pool[torch.randperm(len(pool), generator=generator(seed, _MEMBERS))[:len(x_hold)]]
    x_mem, y_mem = x_train[pool.to(dev)], data.train.labels[pool]

    def mean_loss(nets, x, y):
        loss = torch.stack([example_losses(n, x, y) for n in nets]).mean(0)
        if not torch.isfinite(loss).all():
            # NaN scores would rank as neither member nor non-member and pass the verdict unseen.
            raise DivergenceError("A network trained for the membership attack diverged (NaN loss); the share's "
                                  "recipe does not train, so the audit cannot measure membership.")
        return loss

    share_mem, share_non = mean_loss(share_nets, x_mem, y_mem), mean_loss(share_nets, x_hold, hold_y)
    real_mem, real_non = mean_loss(real_nets, x_mem, y_mem), mean_loss(real_nets, x_hold, hold_y)
    metric = lambda a, b: attack_metrics(a.numpy(), b.numpy(), bootstrap=settings.bootstrap, seed=seed)  # noqa: E731
    share_attacks = {
        "loss": metric(-share_mem, -share_non),
        # Watson et al. 2022: subtract how hard each image is for networks that never saw it.
        "calibrated": metric(real_mem - share_mem, real_non - share_non),
    }
    real_attack = metric(-real_mem, -real_non)
    # The worst case of a real subset: its own images against the non-members, network by network.
    own = torch.cat([example_losses(n, x_train[s], data.train.labels[s]) for n, s in zip(real_nets, subsets)])
    own_non = torch.cat([example_losses(n, x_hold, hold_y) for n in real_nets])
    real_own = metric(-own, -own_non)

    # 3. Verdict.
    passed, reasons = verdict(int(flagged.sum()), share_attacks, real_attack)
    summary = strict_json({
        "settings": dataclasses.asdict(settings) | {
            "epochs": recipe.epochs, "nn_quantile": NN_QUANTILE, "ssim_window": ssim_window(data.size),
            "ssim_candidates": SSIM_CANDIDATES, "auc_margin": AUC_MARGIN, "tpr_margin": TPR_MARGIN,
            "real_subset_lr": REAL_SUBSET_LR, "ci_level": CI_LEVEL},
        "data": {"members": "train", "nonmembers": settings.holdout, "n_train": len(x_train),
                 "n_holdout": len(x_hold), "holdout_duplicates_removed": dupes, "fingerprint_check": checked},
        "n_synthetic": n_syn,
        "nearest_neighbour": {k: r.summary() for k, r in nn_res.items()},
        "feature_network": feat_info,
        "flagged": int(flagged.sum()),
        "flagged_synthetic_indices": torch.nonzero(flagged).flatten().tolist(),
        "membership": {"n_members": len(x_mem), "n_nonmembers": len(x_hold), "share": share_attacks,
                       "real_subset": real_attack, "real_subset_included": real_own},
        "verdict": {"passed": passed, "reasons": reasons},
    }, SUMMARY_DIGITS)
    details = strict_json({"synthetic": [
        {"index": i, "label": int(subject.labels[i]), "flagged": bool(flagged[i]),
         **{k: {"similarity": float(r.synthetic[i]), "train_index": int(r.synthetic_index[i])} for k, r in nn_res.items()}}
        for i in range(n_syn)]}, SUMMARY_DIGITS)
    report = AuditReport(passed=passed, summary=summary, details=details, subject_sha256=subject.file_sha256,
                         created=utc_now(), reasons=reasons)

    if subject.rundir is not None:
        write_json(subject.rundir / AUDIT_FILE, report.document())
        if pairs_png is None:
            pairs_png = subject.rundir / PAIRS_FILE
    if json_path is not None:
        write_json(json_path, report.document(details=True))
    if pairs_png is not None and settings.pairs:
        # Flagged images first, then the closest to their threshold.
        excess = torch.stack([r.synthetic - r.threshold for r in nn_res.values()]).max(0).values
        order = excess.argsort(descending=True)[:settings.pairs].tolist()
        write_pairs_png(pairs_png, syn01.cpu(), data.train.images, nn_res, order)
    return report


