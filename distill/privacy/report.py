"""The verdict and what is shown of it: the terminal report, audit.json's document, the pairs PNG.

Pass iff nothing is flagged and the share's attack is not meaningfully stronger
than the random-real baseline (:data:`AUC_MARGIN`, :data:`TPR_MARGIN`).
:data:`STATEMENT` is printed with every verdict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..formats.audit import PAIRS_FILE, AuditDocument, summary_lines  # noqa: F401 (PAIRS_FILE re-exported)
from ..io import atomic_path
from .membership import FPRS
from .neighbours import NN_QUANTILE, NeighbourResult

STATEMENT = "An empirical audit is not a proof of privacy."
# Verdict: the share's attack may exceed the stronger of chance and the random-real
# baseline by this much (and must exceed it with its whole 95 % interval to fail).
# 0.05 AUC is about 3 standard errors with 500 points per side.
AUC_MARGIN = 0.05
TPR_MARGIN = 0.05  # absolute, at 1 % FPR: five times the 1 % a blind attacker finds


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
        return AuditDocument(passed=self.passed, summary=self.summary, statement=self.statement, created=self.created,
                             subject_sha256=self.subject_sha256, details=self.details).to_json(details=details)

    def text(self) -> str:
        """A short human-readable report for the terminal."""
        return "\n".join([*summary_lines(self.summary), self.statement])


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
