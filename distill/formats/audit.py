"""The privacy audit's record (``RUNDIR/audit.json``), written by ``distill audit``, read by ``distill export``.

Schema v1 (a JSON object; docs/privacy.md describes every key; 1.1 adds ``summary.membership.rmia``):

- ``format`` = ``"distill-audit"``, ``format_version`` = ``"1.2"`` (``"1.0"`` and ``"1.1"`` files still load);
- ``passed``: bool, the verdict;
- ``summary``: numbers and short strings only (settings, data counts, nearest
  neighbour, membership inference, verdict reasons); it travels in the share;
- ``statement``: the sentence printed with every verdict;
- ``created``: UTC time, ISO 8601; ``subject_sha256``: of the audited file;
- ``details`` (only in the local ``--json`` copy): per-image results that name
  real training images by index. It never goes into a share.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import FormatError
from .common import FORMAT_KEY, VERSION_KEY

AUDIT_FORMAT = "distill-audit"
# 1.1 adds summary.membership.rmia (distill audit --attack rmia); 1.2 adds rmia.image (the same test on the share's
# images) and the references' temperature; older files still load
AUDIT_VERSION = "1.2"
AUDIT_FILE = "audit.json"  # in the run folder
PAIRS_FILE = "audit_pairs.png"  # in the run folder: each synthetic image beside its nearest real ones; for the local reviewer only


class AuditKey:
    """Top-level keys of the document."""

    FORMAT = FORMAT_KEY
    FORMAT_VERSION = VERSION_KEY
    PASSED = "passed"
    SUMMARY = "summary"
    STATEMENT = "statement"
    CREATED = "created"
    SUBJECT_SHA256 = "subject_sha256"
    DETAILS = "details"


REQUIRED = (AuditKey.PASSED, AuditKey.SUMMARY, AuditKey.STATEMENT)


# Keys inside the summary's sections (docs/privacy.md). The writers (distill/privacy/) and the readers (the
# terminal table below, the review page) use these; a new measure adds its key here first.


class SettingKey:
    """``summary.settings``: the audit's settings (:class:`distill.config.AuditSettings`) and margins."""

    HOLDOUT = "holdout"
    NETWORKS = "networks"  # networks trained per side for the loss attack
    EPOCHS = "epochs"
    ATTACK = "attack"  # rmia only: the quick audit's settings stay as before RMIA
    CANARIES = "canaries"
    NN_QUANTILE = "nn_quantile"
    SSIM_WINDOW = "ssim_window"
    SSIM_CANDIDATES = "ssim_candidates"
    AUC_MARGIN = "auc_margin"
    TPR_MARGIN = "tpr_margin"
    REAL_SUBSET_LR = "real_subset_lr"
    CI_LEVEL = "ci_level"


class DataKey:
    """``summary.data``: members, non-members, counts and the train/val/test split assumed."""

    MEMBERS = "members"
    NONMEMBERS = "nonmembers"
    N_TRAIN = "n_train"
    N_HOLDOUT = "n_holdout"
    HOLDOUT_DUPLICATES_REMOVED = "holdout_duplicates_removed"
    FINGERPRINT_CHECK = "fingerprint_check"
    SPLIT = "split"  # {RECORDED, and SPLIT_COPIED from the data's split record, when it has them}
    RECORDED = "recorded"  # the split recorded with the experts (True), or one assumed
    METHOD, SEED, CARVED, PATIENT_GROUPED = "method", "seed", "carved", "patient_grouped"
    SPLIT_COPIED = (METHOD, SEED, CARVED, PATIENT_GROUPED)


class NeighbourKey:
    """One measure of ``summary.nearest_neighbour`` (measure name -> this)."""

    SYNTHETIC = "synthetic"  # QuantileKey stats of the synthetic images' nearest-training similarity
    HOLDOUT = "holdout"  # the same for the held-out images
    THRESHOLD = "threshold"
    FLAGGED = "flagged"


class QuantileKey:
    MEDIAN = "median"
    P95 = "p95"
    MAX = "max"


# The nearest-neighbour measures, in the order the audit runs them.
PIXEL_CORRELATION, SSIM, FEATURE_COSINE = "pixel_correlation", "ssim", "feature_cosine"


class MembershipKey:
    """``summary.membership``: the quick loss attack, and the RMIA block (1.1)."""

    N_MEMBERS = "n_members"
    N_NONMEMBERS = "n_nonmembers"
    SHARE = "share"  # attack name (LOSS, CALIBRATED) -> RateKey metrics, on networks trained on the share
    REAL_SUBSET = "real_subset"  # the loss attack on networks trained on random real subsets: the baseline
    REAL_SUBSET_INCLUDED = "real_subset_included"  # those networks' own images against the non-members
    RMIA = "rmia"  # RmiaKey; only after --attack rmia
    LOSS = "loss"
    CALIBRATED = "calibrated"


class RateKey:
    """The figures of one attack: AUC and true-positive rates at low false-positive rates."""

    N_MEMBERS = "n_members"
    N_NONMEMBERS = "n_nonmembers"
    AUC = "auc"  # loss attack: {VALUE, CI95}; RMIA: a number
    TPR_AT_1PCT_FPR = "tpr_at_1pct_fpr"
    TPR_AT_5PCT_FPR = "tpr_at_5pct_fpr"  # RMIA only
    TPR_AT_0P1PCT_FPR = "tpr_at_0p1pct_fpr"
    VALUE = "value"
    CI95 = "ci95"  # [low, high]
    RESOLVABLE = "resolvable"  # False: too few non-members for this false-positive rate
    K = "k"  # RMIA: members above the threshold, of N
    N = "n"
    ROC = "roc"  # RMIA: [[fpr, tpr], ...]


class RmiaKey:
    """``summary.membership.rmia``."""

    SHARE = "share"  # RateKey metrics
    RANDOM_SUBSET = "random_subset"  # RateKey metrics of the baseline
    SIGNIFICANTLY_ABOVE = "significantly_above_random_subset"
    RULE = "rule"
    POPULATION = "population"
    REFERENCES = "references"  # the reference pipelines' settings (ReferenceKey and the rest of ReferenceSettings)
    CANARIES = "canaries"  # only with --canaries: CanaryKey and RateKey metrics
    # (1.2) The same test on the share's images themselves: SHARE, RANDOM_SUBSET, SIGNIFICANTLY_ABOVE and SIGNAL
    IMAGE = "image"
    SIGNAL = "signal"
    N_MEMBERS = "n_members"
    N_NONMEMBERS = "n_nonmembers"


class ReferenceKey:
    """``rmia.references``: :class:`distill.privacy.references.ReferenceSettings` and how they were obtained."""

    REFERENCES = "references"
    EXPERTS = "experts"
    EPOCHS = "epochs"
    ITERATIONS = "iterations"
    OFFLINE_A = "offline_a"
    GAMMA = "gamma"
    TEMPERATURE = "temperature"  # the softmax temperature the probabilities were read at (1.2)
    TEMPERATURE_SELF_AUC = "temperature_self_auc"  # {T: mean AUC of RMIA on each reference, the others its references}
    TRAINED_NOW = "trained_now"
    TRAINING_SECONDS = "training_seconds"


class CanaryKey:
    N_CANARIES = "n_canaries"
    KIND = "kind"


class DetailKey:
    """``details`` (local copy only): ``{SYNTHETIC: [one object per synthetic image]}``; each object has INDEX, LABEL,
    FLAGGED and, per nearest-neighbour measure, {SIMILARITY, TRAIN_INDEX}."""

    SYNTHETIC = "synthetic"
    INDEX = "index"
    LABEL = "label"
    FLAGGED = "flagged"
    SIMILARITY = "similarity"
    TRAIN_INDEX = "train_index"


class VerdictKey:
    """``summary.verdict``."""

    PASSED = "passed"
    REASONS = "reasons"


@dataclass
class AuditSummary:
    """``summary``: the audit's numbers and short strings, one field per section, in the order the audit writes
    them. docs/privacy.md describes each; the nested records are plain JSON (dicts of numbers and strings).

    Adding a measure: add its key to the key class of its section above, write it under that key where
    :mod:`distill.privacy` builds this, and read it through the key in :func:`summary_lines` (the terminal) and
    :mod:`distill.report` (the review page) if they should show it.
    """

    settings: dict = field(default_factory=dict)  # the audit's settings and margins
    data: dict = field(default_factory=dict)  # members, non-members, counts, the split it assumed
    n_synthetic: int | None = None
    nearest_neighbour: dict = field(default_factory=dict)  # measure -> synthetic/holdout stats, threshold, flagged
    feature_network: dict = field(default_factory=dict)  # the network whose features the cosine measure uses
    flagged: int | None = None  # synthetic images flagged under any measure
    flagged_synthetic_indices: list = field(default_factory=list)
    membership: dict = field(default_factory=dict)  # the loss attack (and rmia, 1.1) on the share and random real
    verdict: dict = field(default_factory=dict)  # passed, reasons

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, doc) -> "AuditSummary":
        """A summary as found in a file or a share; missing or mistyped sections read as empty."""
        doc = doc if isinstance(doc, dict) else {}
        out = cls()
        for f in fields(cls):
            value = doc.get(f.name)
            default = getattr(out, f.name)
            if value is not None and (default is None or isinstance(value, type(default))):
                setattr(out, f.name, value)
        return out

    def reasons(self) -> list[str]:
        """The verdict's reasons that are text."""
        return [r for r in self.verdict.get("reasons") or [] if isinstance(r, str)]


# The summary's sections, in the order the audit writes them.
SUMMARY_KEYS = tuple(f.name for f in fields(AuditSummary))


@dataclass
class AuditDocument:
    """``audit.json``. ``passed`` is kept as read: a file whose verdict is not a boolean is invalid to its reader."""

    passed: Any
    summary: dict
    statement: str
    created: str = ""
    subject_sha256: str | None = None
    details: dict | None = None  # only in the local --json copy
    format_version: str = AUDIT_VERSION

    def to_json(self, *, details: bool = False) -> dict:
        """The JSON document; ``details`` only for the local copy."""
        doc = {AuditKey.FORMAT: AUDIT_FORMAT, AuditKey.FORMAT_VERSION: self.format_version,
               AuditKey.PASSED: self.passed, AuditKey.SUMMARY: self.summary, AuditKey.STATEMENT: self.statement,
               AuditKey.CREATED: self.created, AuditKey.SUBJECT_SHA256: self.subject_sha256}
        if details and self.details is not None:
            doc[AuditKey.DETAILS] = self.details
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "AuditDocument":
        return cls(passed=doc.get(AuditKey.PASSED), summary=doc.get(AuditKey.SUMMARY), statement=doc.get(AuditKey.STATEMENT),
                   created=doc.get(AuditKey.CREATED, ""), subject_sha256=doc.get(AuditKey.SUBJECT_SHA256),
                   details=doc.get(AuditKey.DETAILS), format_version=str(doc.get(AuditKey.FORMAT_VERSION)))

    def sections(self) -> AuditSummary:
        return AuditSummary.from_json(self.summary)


def read_audit(rundir: str | os.PathLike) -> AuditDocument:
    """Read and check ``RUNDIR/audit.json``; raises :class:`FormatError` if it is missing or malformed."""
    path = Path(rundir) / AUDIT_FILE
    if not path.exists():
        raise FormatError(f"{path} does not exist; run 'distill audit {rundir} --data DATA' first.")
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        raise FormatError(f"{path} is not valid JSON; run 'distill audit' again.") from None
    if not isinstance(doc, dict) or doc.get(AuditKey.FORMAT) != AUDIT_FORMAT:
        raise FormatError(f"{path} is not a distill audit file.")
    if str(doc.get(AuditKey.FORMAT_VERSION, "")).split(".")[0] != AUDIT_VERSION.split(".")[0]:
        raise FormatError(f"{path} has audit format {doc.get(AuditKey.FORMAT_VERSION)!r}; "
                          f"this reader reads {AUDIT_VERSION}.")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise FormatError(f"{path} lacks {', '.join(missing)}; run 'distill audit' again.")
    return AuditDocument.from_json(doc)


def summary_lines(summary: dict) -> list[str]:
    """The audit summary as a short table: one row per nearest-neighbour measure and per attack, then the verdict.

    ``distill audit`` prints it and ``distill inspect`` prints it for a share's audit. A summary
    this version cannot lay out (written by another tool) is shown one section per line.
    """
    if not isinstance(summary, dict):
        return [json.dumps(summary)]
    try:
        return _table(summary)
    except (KeyError, TypeError, ValueError, AttributeError):
        return [f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(summary.items())]


def _table(s: dict) -> list[str]:
    data, mia = s["data"], s["membership"]
    split = data.get(DataKey.SPLIT)
    lines = [f"Nearest neighbour ({s['n_synthetic']} synthetic vs {data[DataKey.N_TRAIN]} training images; "
             f"baseline {data[DataKey.N_HOLDOUT]} held-out images"
             + (f", {data[DataKey.NONMEMBERS]} split {_split_words(split)}" if isinstance(split, dict) else "") + "):"]
    for k, m in s["nearest_neighbour"].items():
        syn, hold = m[NeighbourKey.SYNTHETIC], m[NeighbourKey.HOLDOUT]
        lines.append(f"  {k:18s} synthetic median {syn[QuantileKey.MEDIAN]:.3f} p95 {syn[QuantileKey.P95]:.3f} "
                     f"max {syn[QuantileKey.MAX]:.3f} | held-out median {hold[QuantileKey.MEDIAN]:.3f} "
                     f"p95 {hold[QuantileKey.P95]:.3f} max {hold[QuantileKey.MAX]:.3f} | threshold "
                     f"{m[NeighbourKey.THRESHOLD]:.3f}, flagged {m[NeighbourKey.FLAGGED]}")
    lines.append(f"Membership inference ({mia[MembershipKey.N_MEMBERS]} members, {mia[MembershipKey.N_NONMEMBERS]} "
                 f"non-members, {s['settings'][SettingKey.NETWORKS]} network(s) per side):")
    rows = [(f"share, {k}", v) for k, v in mia[MembershipKey.SHARE].items()]
    rows += [("random real, loss", mia[MembershipKey.REAL_SUBSET]),
             ("random real, its own images", mia[MembershipKey.REAL_SUBSET_INCLUDED])]
    for name, m in rows:
        line = f"  {name:28s} AUC {_ci(m[RateKey.AUC])}"
        for key, label in ((RateKey.TPR_AT_1PCT_FPR, "TPR@1%FPR"), (RateKey.TPR_AT_0P1PCT_FPR, "TPR@0.1%FPR")):
            line += f"  {label} {_ci(m[key])}" + ("" if m[key][RateKey.RESOLVABLE] else " (too few points)")
        lines.append(line)
    if isinstance(mia.get(MembershipKey.RMIA), dict):
        lines += rmia_lines(mia[MembershipKey.RMIA])
    verdict = s["verdict"]
    lines.append(f"Verdict: {'PASS' if verdict[VerdictKey.PASSED] else 'FAIL'}")
    lines += [f"  - {r}" for r in verdict.get(VerdictKey.REASONS, [])]
    return lines


def _split_words(split: dict) -> str:
    carved = split.get(DataKey.METHOD) == "carved"
    how = f"carved with seed {split.get(DataKey.SEED)}" if carved else "as the source splits"
    grouped = ", patient-grouped (no patient on both sides)" if split.get(DataKey.PATIENT_GROUPED) else ""
    return how + grouped + (", as the experts had it" if split.get(DataKey.RECORDED) else ", assumed")


def _ci(m: dict) -> str:
    ci = m[RateKey.CI95]
    return f"{m[RateKey.VALUE]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def rmia_lines(rmia: dict) -> list[str]:
    """The RMIA rows: the share and the random real subset, attacked alike with the same references."""
    r = rmia[RmiaKey.REFERENCES]
    lines = [f"RMIA (offline, {r[ReferenceKey.REFERENCES]} reference pipeline(s) of {r[ReferenceKey.EXPERTS]} "
             f"expert(s) x {r[ReferenceKey.EPOCHS]} epochs, {r[ReferenceKey.ITERATIONS]} iterations; "
             f"{rmia[RmiaKey.N_MEMBERS]} members, {rmia[RmiaKey.N_NONMEMBERS]} non-members):"]
    for name, key in (("share", RmiaKey.SHARE), ("random real subset", RmiaKey.RANDOM_SUBSET)):
        mm = rmia[key]
        line = f"  {name:20s} AUC {mm[RateKey.AUC]:.3f}"
        for k, label in ((RateKey.TPR_AT_1PCT_FPR, "TPR@1%"), (RateKey.TPR_AT_5PCT_FPR, "TPR@5%"),
                         (RateKey.TPR_AT_0P1PCT_FPR, "TPR@0.1%")):
            if k in mm:
                line += f"  {label} {_ci(mm[k])}"
        lines.append(line)
    c = rmia.get(RmiaKey.CANARIES)
    if isinstance(c, dict):
        line = f"  {c[CanaryKey.N_CANARIES]} canaries ({c.get(CanaryKey.KIND, '')}) AUC {c[RateKey.AUC]:.3f}"
        for k, label in ((RateKey.TPR_AT_1PCT_FPR, "TPR@1%"), (RateKey.TPR_AT_5PCT_FPR, "TPR@5%")):
            if k in c:
                line += f"  {label} {_ci(c[k])}"
        lines.append(line + " (worst case)")
    lines.append("  significantly above the random subset: " +
                 ("YES" if rmia[RmiaKey.SIGNIFICANTLY_ABOVE] else "no"))
    return lines

