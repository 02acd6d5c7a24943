"""The audit as a short sequence of named stages: load, hold out, nearest neighbours, membership, verdict, write."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from ..checks import check_model_builds
from ..config import AuditSettings
from ..data import MEDMNIST, RealData
from ..distributed import resolve_device
from ..errors import DistillError
from ..formats.audit import (AUDIT_FILE, FEATURE_COSINE, PIXEL_CORRELATION, SSIM, AuditSummary, DataKey, DetailKey,
                             MembershipKey,
                             SettingKey, VerdictKey)
from ..formats.common import utc_now
from ..io import strict_json, write_json
from .membership import CI_LEVEL, REAL_SUBSET_LR, Membership, membership_inference
from .neighbours import (NN_QUANTILE, SSIM_CANDIDATES, NeighbourResult, embed, feature_network, neighbour_metric,
                         ssim_window)
from .references import ReferenceSettings, ReferenceTrainer
from .report import AUC_MARGIN, PAIRS_FILE, TPR_MARGIN, AuditReport, verdict, write_pairs_png
from .strong import reference_settings, rmia_membership, rmia_reasons
from .subject import Subject, holdout_split, load_matching_data, load_subject

log = logging.getLogger(__name__)

REFERENCE_CACHE = "references"  # default folder of the cached RMIA reference pipelines (holds real images)
SUMMARY_DIGITS = 5  # decimals kept in audit.json: enough for every threshold, short enough to read


@dataclass
class _Views:
    """The images every stage compares, in the two spaces they are compared in, on the audit's device."""

    syn01: torch.Tensor  # (N, C, H, W) synthetic images in display space [0, 1]
    train01: torch.Tensor  # (R, C, H, W) real training images in [0, 1]
    hold01: torch.Tensor  # (M, C, H, W) real held-out images in [0, 1]
    x_train: torch.Tensor  # the training images, preprocessed (network space)
    x_hold: torch.Tensor  # the held-out images, preprocessed
    hold_u8: torch.Tensor  # (M, C, H, W) uint8 held-out images, on the CPU
    hold_y: torch.Tensor  # (M,) their labels
    duplicates: int  # held-out (near-)copies of training images left out


def run_audit(source: str | os.PathLike, data_spec: str | os.PathLike, *, json_path: str | os.PathLike | None = None,
              pairs_png: str | os.PathLike | None = None, seed: int = AuditSettings.seed, device: str = "auto",
              holdout: str = AuditSettings.holdout, networks: int = AuditSettings.networks,
              epochs: int | None = AuditSettings.epochs, expert: str | os.PathLike | None = None,
              expert_epochs: int = AuditSettings.expert_epochs, bootstrap: int = AuditSettings.bootstrap,
              pairs: int = AuditSettings.pairs, attack: str = AuditSettings.attack,
              references: int = AuditSettings.references, reference_experts: int = AuditSettings.reference_experts,
              reference_epochs: int = AuditSettings.reference_epochs,
              reference_iterations: int = AuditSettings.reference_iterations, canaries: int = AuditSettings.canaries,
              reference_cache: str | os.PathLike = REFERENCE_CACHE,
              train_reference: ReferenceTrainer | None = None) -> AuditReport:
    """Audit a run folder (or its ``synthetic.h5``) or a share against the real data it came from.

    Members are the real training split; non-members the ``holdout`` split(s)
    minus (near-)copies of training images. Writes ``RUNDIR/audit.json`` and
    ``RUNDIR/audit_pairs.png`` for a run folder, ``json_path`` (summary plus
    per-image details) and ``pairs_png`` when given. ``attack="rmia"`` adds offline RMIA with
    ``references`` reference pipelines cached under ``reference_cache`` (:mod:`.references`);
    those not cached are made by ``train_reference`` (:func:`distill.reference_pipeline.train_reference`).
    """
    settings = AuditSettings(holdout=holdout, networks=networks, epochs=epochs, expert_epochs=expert_epochs,
                             bootstrap=bootstrap, pairs=pairs, seed=seed, attack=attack, references=references,
                             reference_experts=reference_experts, reference_epochs=reference_epochs,
                             reference_iterations=reference_iterations, canaries=canaries)
    if settings.canaries and settings.attack != "rmia":
        raise DistillError("--canaries needs --attack rmia: canaries are scored by RMIA against its references.")
    if settings.attack == "rmia":
        ReferenceSettings(references=settings.references)  # refuses an odd count before anything is trained
    dev = resolve_device(device)
    subject = load_subject(source)
    data, checked = load_matching_data(subject, data_spec)
    # Fail before any training when the recipe's model cannot take these images.
    check_model_builds(subject.model, data.num_classes, data.channels, data.size, subject.model_kwargs,
                       what="The recipe's model")
    views = _hold_out(subject, data, settings, dev)
    neighbours, feature_info = _nearest_neighbours(subject, data, views, expert, settings, dev)
    flagged = torch.zeros(len(subject.images), dtype=torch.bool)
    for r in neighbours.values():
        flagged |= r.flagged
    membership = membership_inference(subject, data, views.x_train, views.x_hold, views.hold_y, settings, dev)
    passed, reasons = verdict(int(flagged.sum()), membership.share, membership.real_subset)
    rmia = None
    if settings.attack == "rmia":
        ipc = max(1, round(len(subject.images) / data.num_classes))
        ref = reference_settings(subject, ipc, settings.references, settings.reference_experts,
                                 settings.reference_epochs, settings.reference_iterations, settings.seed)
        rmia = rmia_membership(subject, data, views.x_train, views.x_hold, views.hold_u8, views.hold_y, membership,
                               ref, reference_cache, dev, train_reference, settings.canaries)
        reasons += rmia_reasons(rmia)
        passed = not reasons
    report = _report(subject, data, settings, checked, views, neighbours, feature_info, flagged, membership, passed,
                     reasons, rmia)
    _write(report, subject, data, views, neighbours, settings, json_path, pairs_png)
    return report


def _hold_out(subject: Subject, data: RealData, settings: AuditSettings, dev: torch.device) -> _Views:
    """The real non-members, without copies of training images, and every image in both spaces."""
    pre = subject.preprocessing
    hold_u8, hold_y, dupes = holdout_split(data, settings.holdout)
    if dupes:
        # Only MedMNIST is known to ship such copies; elsewhere they may be a data-handling error worth a look.
        quirk = " (a known MedMNIST quirk)" if data.name.lower() in MEDMNIST else ""
        log.warning("Dropped %d held-out image(s) that are (near-)copies of training images: they are the same "
                    "pictures, not other patients%s.", dupes, quirk)
    return _Views(syn01=pre.invert(subject.images).to(dev), train01=(data.train.images.float() / 255).to(dev),
                  hold01=(hold_u8.float() / 255).to(dev), x_train=pre(data.train.images).to(dev),
                  x_hold=pre(hold_u8).to(dev), hold_u8=hold_u8, hold_y=hold_y, duplicates=dupes)


def _nearest_neighbours(subject: Subject, data: RealData, v: _Views, expert: str | os.PathLike | None,
                        settings: AuditSettings, dev: torch.device) -> tuple[dict[str, NeighbourResult], dict]:
    """Each metric's nearest-training-image search, in display space [0, 1] and in an expert's feature space."""
    log.info("Nearest-neighbour search: %d synthetic and %d held-out images against %d training images.",
             len(subject.images), len(v.hold_u8), len(v.x_train))
    results = {k: neighbour_metric(v.syn01, v.hold01, v.train01, kind=k) for k in (PIXEL_CORRELATION, SSIM)}
    net, info = feature_network(subject.model, subject.model_kwargs, subject.preprocessing, data, v.x_train,
                                subject.preprocessing(data.val.images).to(dev),
                                str(expert) if expert is not None else None, settings, dev)
    f_syn, f_hold, f_train = (embed(net, x) for x in (subject.images.to(dev), v.x_hold, v.x_train))
    results[FEATURE_COSINE] = neighbour_metric(f_syn, f_hold, f_train, kind=FEATURE_COSINE)
    return results, info


def _report(subject: Subject, data: RealData, settings: AuditSettings, checked: str, v: _Views,
            neighbours: dict[str, NeighbourResult], feature_info: dict, flagged: torch.Tensor, m: Membership,
            passed: bool, reasons: list[str], rmia: dict | None = None) -> AuditReport:
    """The summary (numbers and short strings only; it travels in the share) and the local per-image details."""
    recorded = dataclasses.asdict(settings)
    if settings.attack == "loss":  # the quick audit's summary stays as before RMIA; RMIA records its own settings
        recorded = {k: v for k, v in recorded.items()
                    if k not in (SettingKey.ATTACK, SettingKey.CANARIES) and not k.startswith("reference")}
    summary = strict_json(AuditSummary(
        settings=recorded | {
            SettingKey.EPOCHS: m.epochs, SettingKey.NN_QUANTILE: NN_QUANTILE,
            SettingKey.SSIM_WINDOW: ssim_window(data.size), SettingKey.SSIM_CANDIDATES: SSIM_CANDIDATES,
            SettingKey.AUC_MARGIN: AUC_MARGIN, SettingKey.TPR_MARGIN: TPR_MARGIN,
            SettingKey.REAL_SUBSET_LR: REAL_SUBSET_LR, SettingKey.CI_LEVEL: CI_LEVEL},
        data={DataKey.MEMBERS: "train", DataKey.NONMEMBERS: settings.holdout, DataKey.N_TRAIN: len(v.x_train),
              DataKey.N_HOLDOUT: len(v.x_hold), DataKey.HOLDOUT_DUPLICATES_REMOVED: v.duplicates,
              DataKey.FINGERPRINT_CHECK: checked,
              # Which train/val/test split: the one recorded with the experts, or one assumed (see subject.py).
              DataKey.SPLIT: {DataKey.RECORDED: subject.split is not None,
                              **{k: data.split_record[k] for k in DataKey.SPLIT_COPIED if k in data.split_record}}},
        n_synthetic=len(subject.images),
        nearest_neighbour={k: r.summary() for k, r in neighbours.items()},
        feature_network=feature_info,
        flagged=int(flagged.sum()),
        flagged_synthetic_indices=torch.nonzero(flagged).flatten().tolist(),
        membership={MembershipKey.N_MEMBERS: m.n_members, MembershipKey.N_NONMEMBERS: m.n_nonmembers,
                    MembershipKey.SHARE: m.share, MembershipKey.REAL_SUBSET: m.real_subset,
                    MembershipKey.REAL_SUBSET_INCLUDED: m.real_subset_included,
                    **({MembershipKey.RMIA: rmia} if rmia is not None else {})},
        verdict={VerdictKey.PASSED: passed, VerdictKey.REASONS: reasons},
    ).to_json(), SUMMARY_DIGITS)
    details = strict_json({DetailKey.SYNTHETIC: [
        {DetailKey.INDEX: i, DetailKey.LABEL: int(subject.labels[i]), DetailKey.FLAGGED: bool(flagged[i]),
         **{k: {DetailKey.SIMILARITY: float(r.synthetic[i]), DetailKey.TRAIN_INDEX: int(r.synthetic_index[i])}
            for k, r in neighbours.items()}}
        for i in range(len(subject.images))]}, SUMMARY_DIGITS)
    return AuditReport(passed=passed, summary=summary, details=details, subject_sha256=subject.file_sha256,
                       created=utc_now(), reasons=reasons)


def _write(report: AuditReport, subject: Subject, data: RealData, v: _Views, neighbours: dict[str, NeighbourResult],
           settings: AuditSettings, json_path: str | os.PathLike | None, pairs_png: str | os.PathLike | None) -> None:
    """audit.json beside a run, the local JSON with details, and the pairs PNG for the reviewer."""
    if subject.rundir is not None:
        write_json(subject.rundir / AUDIT_FILE, report.document())
        if pairs_png is None:
            pairs_png = subject.rundir / PAIRS_FILE
    if json_path is not None:
        write_json(json_path, report.document(details=True))
    if pairs_png is not None and settings.pairs:
        # Flagged images first, then the closest to their threshold.
        excess = torch.stack([r.synthetic - r.threshold for r in neighbours.values()]).max(0).values
        order = excess.argsort(descending=True)[:settings.pairs].tolist()
        write_pairs_png(pairs_png, v.syn01.cpu(), data.train.images, neighbours, order)
