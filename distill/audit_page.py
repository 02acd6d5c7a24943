"""The review page's opening block: the verdict, the attack's figures against the random-subset baseline,
the log-scale ROC, what to change after a failure, a plain-language key and a sign-off block.

Called by :mod:`distill.report`; reads only the audit summary (docs/privacy.md) and, for the
remedies, the run folder's config. Inline HTML and SVG only: the page stays self-contained.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from .formats.audit import AuditSummary, MembershipKey, RateKey, ReferenceKey, RmiaKey, VerdictKey
from .formats.share_schema import AUDIT_STATUSES
from .privacy.remedies import remedies

KEY = (
    ("AUC", "The chance that the attack ranks a random training patient above a random patient it never saw. "
            "0.5 is guessing; 1.0 means it always tells them apart."),
    ("TPR at 1 % FPR", "The share of training patients the attacker picks out while wrongly accusing at most 1 in "
                       "100 patients who were not in the training data. Guessing gives 0.01; 0.5 would mean half of "
                       "the training patients are exposed."),
    ("Interval", "The range that holds the true rate with 95 % confidence (exact binomial, Clopper-Pearson), "
                 "given how many patients were tested."),
    ("Random real subset", "The baseline: the same attack against a network trained on the same number of real "
                           "training images, chosen at random. A share is read against it, not against zero."),
)
SHARE_LABEL, BASELINE_LABEL = "share", "random real subset"  # the attacked networks, as the page names them
ROC_COLOURS = {SHARE_LABEL: "#c0392b", BASELINE_LABEL: "#2c6fa8"}
# The heading word of each audit status (the share's privacy group, distill/formats/share_schema.py).
STATUS_WORDS = dict(zip(AUDIT_STATUSES, ("PASSED", "FAILED", "NO AUDIT", "AUDIT UNREADABLE")))


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _rate(m) -> str:
    if not isinstance(m, dict) or not isinstance(m.get(RateKey.VALUE), (int, float)):
        return "n/a"
    lo, hi = (m.get(RateKey.CI95) or [None, None])[:2]
    text = f"{m[RateKey.VALUE]:.3f}"
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        text += f" [{lo:.3f}, {hi:.3f}]"
    return text + ("" if m.get(RateKey.RESOLVABLE, True) else " (too few non-members)")


def _auc(v) -> str:
    if isinstance(v, dict):
        return _rate(v)
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"


def roc_svg(curves: dict[str, list], width: int = 320, height: int = 240) -> str:
    """Log-log ROC (FPR and TPR from 0.001 to 1) of each named curve, with the chance diagonal."""
    lo = -3.0
    left, right, top, bottom = 44, 10, 10, 34
    sx = lambda f: left + (math.log10(max(f, 10 ** lo)) - lo) / -lo * (width - left - right)  # noqa: E731
    sy = lambda t: top + (0 - math.log10(max(t, 10 ** lo))) / -lo * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'aria-label="ROC curve, log scale">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="frame"/>',
             f'<path d="M{sx(1e-3):.1f},{sy(1e-3):.1f} L{sx(1):.1f},{sy(1):.1f}" class="ref"/>']
    for v in (1e-3, 1e-2, 1e-1, 1):
        parts.append(f'<text x="{sx(v):.1f}" y="{height - 20}" text-anchor="middle">{v:g}</text>'
                     f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" text-anchor="middle">'
                 'false-positive rate</text>')
    y = top + 12
    for name, pts in curves.items():
        ok = [(float(f), float(t)) for f, t in pts or [] if isinstance(f, (int, float)) and isinstance(t, (int, float))]
        if not ok:
            continue
        colour = ROC_COLOURS.get(name, "#333")
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(f):.1f},{sy(t):.1f}" for i, (f, t) in enumerate(ok))
        parts.append(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.8"/>'
                     f'<text x="{left + 6}" y="{y}" style="fill:{colour}">{_e(name)}</text>')
        y += 12
    parts.append("</svg>")
    return ('<figure class="plot"><figcaption>RMIA ROC, true-positive rate against false-positive rate '
            f'(log scale; dashed: guessing)</figcaption>{"".join(parts)}</figure>')


def _figures(mia: dict) -> str:
    """The attack's figures beside the baseline's: RMIA when it ran, else the quick loss attack."""
    rmia = mia.get(MembershipKey.RMIA)
    if isinstance(rmia, dict):
        rows = [(SHARE_LABEL, rmia.get(RmiaKey.SHARE) or {}), (BASELINE_LABEL, rmia.get(RmiaKey.RANDOM_SUBSET) or {})]
        labels = {RateKey.TPR_AT_1PCT_FPR: "TPR at 1 % FPR", RateKey.TPR_AT_5PCT_FPR: "TPR at 5 % FPR",
                  RateKey.TPR_AT_0P1PCT_FPR: "TPR at 0.1 % FPR"}
        keys = [k for k in labels if any(k in m for _, m in rows)]
        head = "".join(f"<th>{_e(labels[k])}</th>" for k in keys)
        body = "".join(f"<tr><td>{_e(n)}</td><td>{_auc(m.get(RateKey.AUC))}</td>"
                       + "".join(f"<td>{_e(_rate(m.get(k)))}</td>" for k in keys) + "</tr>" for n, m in rows)
        ref = rmia.get(RmiaKey.REFERENCES) or {}
        above = rmia.get(RmiaKey.SIGNIFICANTLY_ABOVE)
        text = (f"<p>Offline RMIA (Zarifzadeh et al. 2024) with {_e(ref.get(ReferenceKey.REFERENCES, '?'))} reference "
                f"pipelines; {_e(rmia.get(RmiaKey.N_MEMBERS, '?'))} members (training patients), "
                f"{_e(rmia.get(RmiaKey.N_NONMEMBERS, '?'))} non-members. The share is "
                f"<b>{'significantly above' if above else 'not significantly above'}</b> the random real subset "
                f"at 1 % FPR. Each reference pipeline used {_e(ref.get(ReferenceKey.EXPERTS, '?'))} experts of "
                f"{_e(ref.get(ReferenceKey.EPOCHS, '?'))} epochs and {_e(ref.get(ReferenceKey.ITERATIONS, '?'))} "
                "iterations, fewer than a full run.</p>")
        image = rmia.get(RmiaKey.IMAGE)
        if isinstance(image, dict):
            pairs = [("the share's images", image.get(RmiaKey.SHARE) or {}),
                     ("the random subset's images", image.get(RmiaKey.RANDOM_SUBSET) or {})]
            body += "".join(f"<tr><td>{_e(n)}</td><td>{_auc(m.get(RateKey.AUC))}</td>"
                            + "".join(f"<td>{_e(_rate(m.get(k)))}</td>" for k in keys) + "</tr>" for n, m in pairs)
            text += ("<p>The last two rows attack the images themselves, which are public once shared: how closely "
                     "a patient's scan correlates with the nearest shared image, against the reference pipelines' "
                     "own shares. A random real subset copies its patients, so it is found at that rate by design; "
                     f"the share is <b>{'significantly above' if image.get(RmiaKey.SIGNIFICANTLY_ABOVE) else 'not significantly above'}"
                     "</b> it.</p>")
        table = f"<table><tr><th>attacked network</th><th>AUC</th>{head}</tr>{body}</table>"
        roc = roc_svg({name: m.get(RateKey.ROC) for name, m in rows})
        return text + table + roc
    share, real = (mia.get(MembershipKey.SHARE) or {}).get(MembershipKey.LOSS), mia.get(MembershipKey.REAL_SUBSET)
    if not isinstance(share, dict):
        return ""
    rows = [(SHARE_LABEL, share), (BASELINE_LABEL, real or {})]
    body = "".join(f"<tr><td>{_e(n)}</td><td>{_auc(m.get(RateKey.AUC))}</td>"
                   f"<td>{_e(_rate(m.get(RateKey.TPR_AT_1PCT_FPR)))}</td></tr>" for n, m in rows)
    return ("<p>Quick loss-threshold attack only (95 % bootstrap intervals). The strong attack is "
            "<code>distill audit RUNDIR --data DATA --attack rmia</code>.</p>"
            f"<table><tr><th>attacked network</th><th>AUC</th><th>TPR at 1 % FPR</th></tr>{body}</table>")


def decision_section(status: str, forced: bool, summary: dict, statement: str, rundir: Path | None,
                     public: bool) -> str:
    """The block the page opens with."""
    word = STATUS_WORDS.get(status, status.upper())
    parts = [f'<p class="verdict {"ok" if status == "passed" else "bad"}">Privacy audit: {_e(word)}'
             + (" (export forced despite this)" if forced else "") + "</p>",
             f'<p class="disclaimer">{_e(statement)}</p>']
    s = AuditSummary.from_json(summary)
    reasons = s.verdict.get(VerdictKey.REASONS) or []
    if reasons:
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
    if s.membership:
        parts.append(_figures(s.membership))
    if status != "passed" and not public:
        parts.append("<h3>What to change</h3><ol>" + "".join(
            f"<li>{_e(what)}:<br><code>{_e(cmd)}</code></li>" for what, cmd in remedies(rundir)) + "</ol>"
            "<p>Then audit the new run with <code>distill audit NEWRUN --data DATA --attack rmia</code>.</p>")
    parts.append("<h3>How to read these figures</h3><dl>"
                 + "".join(f"<dt><b>{_e(k)}</b></dt><dd>{_e(v)}</dd>" for k, v in KEY) + "</dl>")
    if not public:
        parts.append('<h3>Sign-off</h3><table class="signoff"><tr><td>Reviewed by</td><td style="width:18em">'
                     '&nbsp;</td></tr><tr><td>Date</td><td>&nbsp;</td></tr><tr><td>Decision</td><td>'
                     '&#9744; release the share &nbsp; &#9744; do not release</td></tr><tr><td>Signature</td>'
                     '<td>&nbsp;</td></tr></table>')
    return f'<section id="decision"><h2>Decision</h2>{"".join(parts)}</section>'


def public_note(status: str, summary: dict, default: str) -> str:
    """The public page's banner: it says 'no real image' only when the audit passed and flagged nothing."""
    flagged = AuditSummary.from_json(summary).flagged
    if status == "passed" and not flagged:
        return default
    states = {"failed": "its privacy audit FAILED", "missing": "it was exported without a privacy audit",
              "invalid": "its privacy audit is unreadable"}
    what = (f"the privacy audit flagged {flagged} of these images as close to a real training image"
            if isinstance(flagged, int) and flagged else states.get(status, f"its privacy audit is {status}"))
    return (f"Public page: it holds only the share's own content, but {what}; "
            "do not assume that the images below reveal no patient.")
