"""Privacy audit of a synthetic set or a share: nearest neighbours, membership inference, verdict.

Public entry point: :func:`run_audit`. The method, the thresholds and the JSON
keys are documented in ``docs/privacy.md``; in short:

1. **Nearest neighbour** (:mod:`.neighbours`). Every synthetic image is compared
   with every real training image (Pearson correlation and SSIM in pixel space,
   cosine similarity in an expert network's feature space). The same search for
   real held-out images gives the natural similarity of two different patients;
   a synthetic image more similar than the :data:`NN_QUANTILE` quantile of that
   baseline is flagged.
2. **Membership inference** (:mod:`.membership`). Networks trained on the share
   with its recipe, and networks trained on random real subsets of the same
   size, are attacked with a loss threshold (Yeom et al. 2018) and a
   difficulty-calibrated loss (Watson et al. 2022). AUC and TPR at low FPR, with
   bootstrap intervals.
3. **Verdict** (:mod:`.report`). Pass iff nothing is flagged and the share's
   attack is not meaningfully stronger than the random-real baseline
   (:data:`AUC_MARGIN`, :data:`TPR_MARGIN`). :data:`STATEMENT` is printed with it.

What is audited and against which real images is :mod:`.subject`; the stages
run in that order in :mod:`.audit`. For a run folder the summary is written to
``RUNDIR/audit.json`` (schema: :mod:`distill.formats.audit`); ``distill
export`` embeds it in the share. The summary holds numbers and short strings
only: no real image, no path, no file name, no index of a real image.
"""
from ..config import HOLDOUTS, AuditSettings
from ..formats.audit import AUDIT_FILE, AUDIT_FORMAT, AUDIT_VERSION, read_audit
from ..metrics import auc, tpr_at_fpr
from .audit import SUMMARY_DIGITS, run_audit
from .membership import (BOOTSTRAP, CI_LEVEL, FPRS, REAL_SUBSET_LR, Membership, attack_metrics, example_losses,
                         membership_inference, random_real_subsets, train_networks)
from .neighbours import (NN_CHUNK, NN_METRICS, NN_QUANTILE, SSIM_CANDIDATES, SSIM_WINDOW, NeighbourResult, embed,
                         feature_network, nearest_rms, nearest_ssim, neighbour_metric, quantile_stats, ssim_window,
                         top_similar)
from .report import AUC_MARGIN, PAIRS_FILE, STATEMENT, TPR_MARGIN, AuditReport, verdict, write_pairs_png
from .subject import NEAR_DUPLICATE_RATIO, Subject, holdout_split, load_matching_data, load_subject

__all__ = [
    "AUC_MARGIN", "AUDIT_FILE", "AUDIT_FORMAT", "AUDIT_VERSION", "BOOTSTRAP", "CI_LEVEL", "FPRS",
    "HOLDOUTS", "NEAR_DUPLICATE_RATIO", "NN_CHUNK", "NN_METRICS", "NN_QUANTILE", "PAIRS_FILE",
    "REAL_SUBSET_LR", "SSIM_CANDIDATES", "SSIM_WINDOW", "STATEMENT", "SUMMARY_DIGITS", "TPR_MARGIN", "AuditReport",
    "AuditSettings", "Membership", "NeighbourResult", "Subject", "attack_metrics", "auc", "embed", "example_losses",
    "feature_network", "holdout_split", "load_matching_data", "load_subject", "membership_inference", "nearest_rms",
    "nearest_ssim", "neighbour_metric", "quantile_stats", "random_real_subsets", "read_audit", "run_audit",
    "ssim_window", "top_similar", "tpr_at_fpr", "train_networks", "verdict", "write_pairs_png",
]
