"""The review page of a run or a share (``distill report``): one self-contained HTML file.

Public entry point: :func:`write_report`. The page is for the person who signs a
share off before it leaves the hospital and does not read JSON: the synthetic
images per class, each beside its nearest real training image, the audit's
verdict and numbers, the recipe and provenance, accuracy next to real-data
baselines, the learning curves and the checksum of the file that is sent.

Everything is inline (PNG data URIs, CSS, SVG plots); the page runs no script
and loads nothing, so it opens the same on a machine without network. Every
piece of text that came from a user or a file is HTML-escaped. ``public=True``
makes the variant for the receiving side: only what the share itself holds,
no real image at all. docs/report.md describes the sections.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import DistillError, FormatError
from .formats import Share, load_share
from .audit_page import STATUS_WORDS, decision_section, public_note
from .formats.audit import (AUDIT_FILE, FEATURE_COSINE, PIXEL_CORRELATION, SSIM, AuditSummary, MembershipKey,
                            NeighbourKey, QuantileKey, RateKey, SettingKey, VerdictKey, read_audit)
from .formats.buffer_config import buffer_data_spec
from .formats.eval_report import (DISTILLED, EvalKey, MetricKey, RecipeKey, RowKey, ScoredSplitKey, ShareKey,
                                   TrainedOnKey, read_eval_report)
from .formats.provenance import SALT, SALTED_SHA256
from .formats.run import (CONFIG_BUFFER, CONFIG_DATA, EVAL, ITERATION, KIND, LOSS, METRICS_FILE, SYN_LR, VAL_ACC_MEAN,
                          VAL_MAJORITY, read_curves, read_run_config)
from .formats.share_schema import Attr
from .formats.synset import SYNSET_FILE, read_synset
from .io import atomic_path, sha256_file
from .privacy import STATEMENT, holdout_split, load_matching_data, load_subject, neighbour_metric
from .runshare import share_from_synset

log = logging.getLogger(__name__)

REPORT_FORMAT = "distill-report"
REPORT_VERSION = "1.0"
PAIR_MEASURES = (PIXEL_CORRELATION, SSIM)  # the audit's pixel-space measures; the feature one needs a trained network
MEASURE_NAMES = {PIXEL_CORRELATION: "pixel correlation", SSIM: "SSIM", FEATURE_COSINE: "feature cosine"}
THUMB_PX = 56  # displayed size of one image; a 28 px MedMNIST image at 2x stays sharp with pixelated scaling
HOSPITAL_ONLY = ("For viewing inside the hospital only. This page shows real patient images; "
                 "it must not leave the hospital, and it is never part of the share.")
PUBLIC_NOTE = "Public page: it holds only the share's own content and no real image."


@dataclass
class _Audit:
    """The audit as the page shows it, from RUNDIR/audit.json or from a share's privacy group."""

    status: str  # passed | failed | missing | invalid
    forced: bool = False
    summary: dict = field(default_factory=dict)
    statement: str = ""
    created: str = ""
    stale: bool = False  # audit.json names another synthetic.h5 than the one in the folder


@dataclass
class _Pairs:
    """Nearest real training images of each synthetic image (in-hospital page only)."""

    syn: np.ndarray  # (N, C, H, W) uint8 display pixels
    nearest: dict[str, np.ndarray]  # measure -> (N, C, H, W) uint8, the nearest training image
    scores: dict[str, np.ndarray]  # measure -> (N,) similarity
    thresholds: dict[str, float]  # measure -> held-out threshold
    threshold_source: str  # where the thresholds came from
    holdout: str
    n_train: int
    n_holdout: int
    audit_flagged: set[int]  # synthetic indices the audit flagged under any measure, the feature one included


# ----------------------------------------------------------------------------- inputs


def _open_source(source: Path, share_path: str | os.PathLike | None) -> tuple[Share, Path | None, Path | None]:
    """(share content, run folder or None, share file or None) of a run folder or a share file."""
    if not source.exists():
        raise DistillError(f"{source} does not exist; give a run folder or a share .h5 file.")
    if source.is_dir():
        if not (source / SYNSET_FILE).exists():
            raise DistillError(f"{source} is not a finished run folder (it has no {SYNSET_FILE}).")
        synset = read_synset(source)
        if share_path is None:
            # What export would write, minus the text and checksum the export adds.
            share = share_from_synset(synset, {}, license="", description="", citation="")
            return share, source, None
        share = load_share(share_path)
        if share.images.shape != synset.images.shape or not torch.equal(share.images, synset.images):
            raise DistillError(f"{share_path} was not exported from {source}: their images differ.")
        return share, source, Path(share_path)
    if share_path is not None:
        raise DistillError("--share goes with a run folder; give the share itself as the source instead.")
    return load_share(source), None, source  # its FormatError names what is wrong with the file


def _audit_of(share: Share, rundir: Path | None, share_file: Path | None) -> _Audit:
    """The run folder's audit.json when there is a run folder (its figures never travel in a share),
    else the share's privacy group (a v1.0 share may still carry figures)."""
    if rundir is None:
        p = share.privacy
        return _Audit(status=str(p.get(Attr.AUDIT_STATUS, "missing")), forced=bool(p.get(Attr.FORCED)),
                      summary=p.get(Attr.SUMMARY) or {}, statement=str(p.get(Attr.STATEMENT) or STATEMENT),
                      created=str(p.get(Attr.AUDIT_CREATED, "")))
    if not (rundir / AUDIT_FILE).exists():
        return _Audit(status="missing", statement=STATEMENT)
    try:
        doc = read_audit(rundir)
    except (FormatError, OSError):
        return _Audit(status="invalid", statement=STATEMENT)
    stale = doc.subject_sha256 not in (None, sha256_file(rundir / SYNSET_FILE))
    return _Audit(status="passed" if doc.passed is True else "failed", summary=doc.summary or {},
                  statement=str(doc.statement or STATEMENT), created=str(doc.created), stale=stale)


def _run_data_spec(rundir: Path) -> str | None:
    """The real data named by the run's config.toml, or by its buffer's; None when neither says."""
    try:
        cfg = read_run_config(rundir)
        if cfg.get(CONFIG_DATA):
            return str(cfg[CONFIG_DATA])
        if cfg.get(CONFIG_BUFFER):
            return buffer_data_spec(Path(str(cfg[CONFIG_BUFFER])))
    except (DistillError, OSError, ValueError):
        return None
    return None


def _pairs(source: Path, data_spec: str, audit: _Audit) -> _Pairs:
    """Nearest training image of every synthetic image, with the audit's own search and held-out thresholds."""
    subject = load_subject(source)
    data, _ = load_matching_data(subject, data_spec)
    audited = AuditSummary.from_json(audit.summary)
    holdout = str(audited.settings.get(SettingKey.HOLDOUT, "val"))
    hold_u8, _, _ = holdout_split(data, holdout)
    syn01 = subject.preprocessing.invert(subject.images)
    train01, hold01 = data.train.images.float() / 255, hold_u8.float() / 255
    results = {k: neighbour_metric(syn01, hold01, train01, kind=k) for k in PAIR_MEASURES}
    thresholds, from_audit = {}, True
    for k, r in results.items():
        t = audited.nearest_neighbour.get(k, {}).get(NeighbourKey.THRESHOLD)
        from_audit &= isinstance(t, (int, float))
        thresholds[k] = float(t) if isinstance(t, (int, float)) else r.threshold
    return _Pairs(syn=_to_u8(syn01), nearest={k: data.train.images[r.synthetic_index].numpy() for k, r in results.items()},
                  scores={k: r.synthetic.numpy() for k, r in results.items()}, thresholds=thresholds,
                  threshold_source="the audit" if from_audit else f"the {holdout} split, computed here",
                  holdout=holdout, n_train=len(data.train.images), n_holdout=len(hold_u8),
                  audit_flagged={int(i) for i in audited.flagged_synthetic_indices})


# ----------------------------------------------------------------------------- pieces of HTML


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _to_u8(x01: torch.Tensor) -> np.ndarray:
    return x01.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def _png_uri(img: np.ndarray) -> str:
    """A data URI of one (C, H, W) uint8 image; channels other than 1 or 3 show their first."""
    from PIL import Image

    arr = img[0] if img.shape[0] != 3 else img.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(img: np.ndarray, alt: str) -> str:
    return f'<img src="{_png_uri(img)}" width="{THUMB_PX}" height="{THUMB_PX}" alt="{_e(alt)}">'


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _num(v, digits: int = 3) -> str:
    """A float to ``digits`` decimals; anything else as it is, a missing value as n/a."""
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _kv(d: dict) -> str:
    """A flat dict as 'key: value' table rows (nested values as compact JSON)."""
    def shown(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        return v if isinstance(v, (str, int, float)) else json.dumps(v, sort_keys=True)

    rows = [(k, shown(v)) for k, v in sorted(d.items())]
    return _table(rows) if rows else "<p>Not recorded.</p>"


def _svg_plot(points: list[tuple[float, float]], title: str, *, log_y: bool = False,
              reference: tuple[float, str] | None = None, width: int = 320, height: int = 200) -> str:
    """A small line plot as inline SVG: x = iteration; ``reference`` draws a dashed level with a label."""
    pts = [(float(x), float(y)) for x, y in points if isinstance(x, (int, float)) and isinstance(y, (int, float))
           and math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        return f'<figure class="plot"><figcaption>{_e(title)}</figcaption><p>No values logged.</p></figure>'
    f = math.log10 if log_y else (lambda v: v)
    xs, ys = [p[0] for p in pts], [f(p[1]) for p in pts]
    levels = ys + ([f(reference[0])] if reference and (reference[0] > 0 or not log_y) else [])
    x0, x1 = min(xs), max(xs)
    if x1 == x0:  # a single point still needs a width
        x1 = x0 + 1
    y0, y1 = min(levels), max(levels)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 58, 10, 8, 34
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    shown = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="frame"/>']
    for v in (y0, y1):
        parts.append(f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{_e(shown(v))}</text>')
    for v in (x0, x1):
        parts.append(f'<text x="{sx(v):.1f}" y="{height - 20}" text-anchor="middle">{_e(f"{v:g}")}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" text-anchor="middle">iteration</text>')
    if reference and (reference[0] > 0 or not log_y):
        yr = sy(f(reference[0]))
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yr:.1f}" y2="{yr:.1f}" class="ref"/>'
                     f'<text x="{width - right - 4}" y="{yr - 4:.1f}" text-anchor="end" class="reflabel">'
                     f'{_e(reference[1])}</text>')
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
    parts.append(f'<polyline points="{line}" class="curve"/>')
    if len(pts) <= 30:  # sparse series (validation) get their points marked
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" class="dot"/>' for x, y in zip(xs, ys)]
    parts.append("</svg>")
    scale = " (log scale)" if log_y else ""
    return f'<figure class="plot"><figcaption>{_e(title + scale)}</figcaption>{"".join(parts)}</figure>'


# ----------------------------------------------------------------------------- sections


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _grid_section(share: Share) -> str:
    disp = _to_u8(share.preprocessing.invert(share.images))
    probs = share.targets() if share.label_logits is not None else None
    blocks = []
    for k, name in enumerate(share.class_names):
        idx = torch.nonzero(share.labels == k).flatten().tolist()
        cells = []
        for i in idx:
            caption = f"#{i}" + (f" · p {float(probs[i, k]):.2f}" if probs is not None else "")
            cells.append(f'<figure class="thumb">{_img(disp[i], f"synthetic image {i}, class {name}")}'
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
        blocks.append(f'<div class="classrow"><h3>{_e(k)}: {_e(name)} <span class="muted">({len(idx)} images)</span></h3>'
                      f'<div class="thumbs">{"".join(cells) or "<p>No image of this class.</p>"}</div></div>')
    labels = ("Soft labels: under each image, p is the probability its training target gives its own class "
              f"(softmax of the logits at temperature {share.label_temperature:g})." if probs is not None
              else "Hard labels: each image trains as its class.")
    intro = (f"<p>{share.num_images} synthetic images, shown with the preprocessing undone "
             f"(normalisation{' and ZCA whitening' if share.preprocessing.zca else ''} inverted, clamped to [0, 1]). "
             f"{_e(labels)}</p>")
    return _section("images", "Synthetic images per class", intro + "".join(blocks))


def _pairs_section(pairs: _Pairs | None, reason: str, share: Share) -> str:
    if pairs is None:
        return _section("pairs", "Nearest real training images", f"<p>{_e(reason)}</p>")
    scores = np.stack([pairs.scores[k] - pairs.thresholds[k] for k in PAIR_MEASURES])
    by_audit = np.array([i in pairs.audit_flagged for i in range(scores.shape[1])])
    # Flagged first (by the audit, then here), then the closest to a threshold.
    order = np.lexsort((-scores.max(0), ~by_audit))
    rows = []
    for i in order.tolist():
        name = share.class_names[int(share.labels[i])]
        mark = " FLAGGED by the audit" if by_audit[i] else ""
        cells = [f'<td{" class=flag" if mark else ""}>{_img(pairs.syn[i], f"synthetic image {i}")}'
                 f"<div>#{i} {_e(name)}{mark}</div></td>"]
        for k in PAIR_MEASURES:
            s, t = float(pairs.scores[k][i]), pairs.thresholds[k]
            flag = s > t
            cells.append(f'<td{" class=flag" if flag else ""}>{_img(pairs.nearest[k][i], f"nearest training image by {MEASURE_NAMES[k]}")}'
                         f"<div>{_e(f'{s:.3f}')} {'&gt;' if flag else '&le;'} {_e(f'{t:.3f}')}"
                         f"{' FLAGGED' if flag else ''}</div></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    n_flag = int(((scores > 0).any(0) | by_audit).sum())
    head = "".join(f"<th>nearest by {_e(MEASURE_NAMES[k])}: similarity vs threshold</th>" for k in PAIR_MEASURES)
    intro = (f'<p class="warn">{_e(HOSPITAL_ONLY)}</p>'
             f"<p>Each synthetic image beside the most similar of the {pairs.n_train} real training images, under "
             f"the audit's two pixel-space measures. A threshold is the {_e('99 %')} level of the same similarity "
             f"for real held-out patients ({pairs.n_holdout} images of the {_e(pairs.holdout)} split, copies of "
             f"training images removed); it comes from {_e(pairs.threshold_source)}. An image above a threshold is "
             f"closer to a training image than 99 % of other patients are to theirs. {n_flag} of "
             f"{len(pairs.syn)} images are flagged here or by the audit. Feature-space similarity, the audit's third "
             "measure, is in its numbers below. Flagged rows come first, then the closest to a threshold.</p>")
    return _section("pairs", "Nearest real training images",
                    intro + f'<table class="pairs"><tr><th>synthetic</th>{head}</tr>{"".join(rows)}</table>')


def _ci(m: dict) -> str:
    if not isinstance(m, dict) or not isinstance(m.get(RateKey.VALUE), (int, float)):
        return "n/a"
    lo, hi = (m.get(RateKey.CI95) or [None, None])[:2]
    both = isinstance(lo, (int, float)) and isinstance(hi, (int, float))
    text = f"{m[RateKey.VALUE]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if both else "")
    return text + ("" if m.get(RateKey.RESOLVABLE, True) else " (too few points)")


def _audit_section(audit: _Audit) -> str:
    s = AuditSummary.from_json(audit.summary)
    word = STATUS_WORDS.get(audit.status, audit.status.upper())
    parts = [f'<p class="verdict {"ok" if audit.status == "passed" else "bad"}">Privacy audit: {_e(word)}'
             + (" (export forced despite this)" if audit.forced else "") + "</p>",
             f'<p class="disclaimer">{_e(audit.statement)}</p>']
    if audit.created:
        parts.append(f"<p>Audit made {_e(audit.created)}.</p>")
    if audit.stale:
        parts.append('<p class="warn">audit.json was made for an earlier synthetic.h5 in this folder; '
                     "run <code>distill audit</code> again before exporting.</p>")
    reasons = s.verdict.get(VerdictKey.REASONS) or []
    if reasons:
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
    nn = s.nearest_neighbour
    if nn:
        rows = [(MEASURE_NAMES.get(k, k), _num((m.get(NeighbourKey.SYNTHETIC) or {}).get(QuantileKey.MEDIAN)),
                 _num((m.get(NeighbourKey.SYNTHETIC) or {}).get(QuantileKey.MAX)),
                 _num((m.get(NeighbourKey.HOLDOUT) or {}).get(QuantileKey.MEDIAN)),
                 _num(m.get(NeighbourKey.THRESHOLD)), _num(m.get(NeighbourKey.FLAGGED)))
                for k, m in nn.items() if isinstance(m, dict)]
        parts.append("<h3>Nearest neighbour</h3>" + _table(rows, ("measure", "synthetic median", "synthetic max",
                                                                  "held-out median", "threshold", "flagged")))
    mia = s.membership
    if mia:
        attacks = [(f"share, {k} attack", v) for k, v in (mia.get(MembershipKey.SHARE) or {}).items()]
        attacks += [("random real subset (reference)", mia.get(MembershipKey.REAL_SUBSET)),
                    ("random real, its own images", mia.get(MembershipKey.REAL_SUBSET_INCLUDED))]
        rows = [(name, _ci((m or {}).get(RateKey.AUC)), _ci((m or {}).get(RateKey.TPR_AT_1PCT_FPR)))
                for name, m in attacks if m]
        parts.append(f"<h3>Membership inference</h3><p>{_e(mia.get(MembershipKey.N_MEMBERS, '?'))} members, "
                     f"{_e(mia.get(MembershipKey.N_NONMEMBERS, '?'))} non-members; 95 % bootstrap intervals in "
                     "brackets.</p>" + _table(rows, ("attacked networks", "AUC", "TPR at 1 % FPR")))
    if s.data:
        parts.append(_boxes([("Audit data", _kv(s.data)), ("Audit settings", _kv(s.settings))]))
    if audit.status in ("missing", "invalid"):
        parts.append("<p>Run <code>distill audit RUNDIR --data DATA</code> before this set is shared.</p>")
    return _section("audit", "Privacy audit", "".join(parts))


def _recipe_section(share: Share, from_run: bool) -> str:
    r = share.recipe
    recipe = _table([("model", f"{r.model} {json.dumps(r.model_kwargs, sort_keys=True)}"), ("learned step size", f"{r.lr:.4g}"),
                     ("epochs", r.epochs), ("batch size", r.batch_size), ("momentum", r.momentum),
                     ("weight decay", r.weight_decay), ("step size decay", r.lr_decay), ("augmentation", r.augment),
                     ("loss", r.loss)])
    pre = share.preprocessing
    prep = _table([("input", f"{pre.channels} x {pre.size} x {pre.size}"), ("mean", ", ".join(f"{v:.4g}" for v in pre.mean.tolist())),
                   ("std", ", ".join(f"{v:.4g}" for v in pre.std.tolist())), ("ZCA", f"yes (eps {pre.zca_eps:g})" if pre.zca else "no")])
    prov = dict(share.provenance)
    dataset = dict(prov.get(Attr.DATASET) or {})
    if from_run:  # the salt is drawn at export; a value shown now would not be the share's
        dataset.pop(SALT, None)
        dataset.pop(SALTED_SHA256, None)
    text = _table([("licence", share.license or "set at export"), ("description", share.description or "none"),
                   ("citation", share.citation or "none"), ("created", share.created or "not yet exported")])
    boxes = [("Training recipe for the recipient", recipe), ("Preprocessing", prep),
             ("Method", _kv(prov.get(Attr.METHOD) or {})), ("Expert trajectories", _kv(prov.get(Attr.EXPERTS) or {})),
             ("Source data", _kv(dataset)), ("Software", _kv(prov.get(Attr.SOFTWARE) or {}))]
    return _section("recipe", "Recipe and provenance", f"<h3>Text from the sender</h3>{text}" + _boxes(boxes))


def _boxes(boxes: list[tuple[str, str]]) -> str:
    """Titled tables side by side, wrapping on a narrow screen."""
    return '<div class="boxes">' + "".join(f"<div><h3>{_e(t)}</h3>{body}</div>" for t, body in boxes) + "</div>"


def _eval_section(doc: dict | None, share: Share) -> str:
    if doc is None:
        return _section("accuracy", "Accuracy", "<p>No evaluation given; run <code>distill eval SHARE.h5 --test DATA "
                        "--json EVAL.json</code> and pass <code>--eval EVAL.json</code>.</p>")
    test, results = doc.get(EvalKey.TEST) or {}, doc[EvalKey.RESULTS]
    rows, bars = [], []
    for res in results:
        if not isinstance(res, dict):
            continue
        mean, std = res.get(RowKey.MEAN) or {}, res.get(RowKey.STD) or {}
        acc, acc_sd, auc = mean.get(MetricKey.ACCURACY), std.get(MetricKey.ACCURACY), mean.get(MetricKey.AUC)
        rows.append((res.get(RowKey.NAME, "?"), res.get(RowKey.KIND, "?"),
                     (res.get(RowKey.TRAINED_ON) or {}).get(TrainedOnKey.IMAGES, "?"),
                     (res.get(RowKey.RECIPE) or {}).get(RecipeKey.EPOCHS, "?"),
                     "n/a" if not isinstance(acc, (int, float)) else f"{100 * acc:.1f} ± {100 * (acc_sd or 0):.1f}",
                     "n/a" if not isinstance(auc, (int, float)) else f"{auc:.3f}"))
        if isinstance(acc, (int, float)):
            bars.append((str(res.get(RowKey.NAME, "?")), float(acc)))
    shas = [s.get(ShareKey.PAYLOAD_SHA256) for r in results if isinstance(r, dict) and r.get(RowKey.KIND) == DISTILLED
            for s in ((r.get(RowKey.TRAINED_ON) or {}).get(TrainedOnKey.SHARES) or []) if isinstance(s, dict)]
    note = ""
    if share.payload_sha256 and shas and share.payload_sha256 not in shas:
        note = '<p class="warn">This evaluation was run on another share than this one (its payload checksum differs).</p>'
    intro = (f"<p>Networks trained on each row, tested on the {_e(test.get(ScoredSplitKey.SPLIT, 'test'))} split of "
             f"{_e(test.get(ScoredSplitKey.NAME, '?'))} ({_e(test.get(ScoredSplitKey.IMAGES, '?'))} images); "
             f"{_e(doc.get(EvalKey.RUNS, '?'))} run(s) per row, model {_e(doc.get(EvalKey.MODEL, '?'))}; "
             "mean ± standard deviation.</p>")
    return _section("accuracy", "Accuracy against real-data baselines", note + intro + _bars(bars) + _table(
        rows, ("trained on", "kind", "images", "epochs", "accuracy %", "AUC")))


def _bars(bars: list[tuple[str, float]], width: int = 600) -> str:
    if not bars:
        return ""
    label_w, row_h = 250, 22
    height = row_h * len(bars) + 6
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'aria-label="test accuracy per row">']
    for j, (name, acc) in enumerate(bars):
        y = 3 + j * row_h
        w = max(0.0, min(1.0, acc)) * (width - label_w - 50)
        short = name if len(name) <= 40 else name[:39] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{_e(short)}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" class="bar"/>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{_e(f"{100 * acc:.1f} %")}</text>')
    return "".join(parts) + "</svg>"


def _curves_section(records: list[dict], from_run: bool) -> str:
    if not from_run:
        return _section("curves", "Learning curves", f"<p>A share does not carry its run's {METRICS_FILE}; make the page "
                        "from the run folder to see the learning curves.</p>")
    its = [r for r in records if r.get(KIND) == ITERATION]
    evals = [r for r in records if r.get(KIND) == EVAL and isinstance(r.get(VAL_ACC_MEAN), (int, float))]
    if not its and not evals:
        return _section("curves", "Learning curves", f"<p>The run folder has no {METRICS_FILE} entries.</p>")
    majority = next((r.get(VAL_MAJORITY) for r in reversed(evals) if isinstance(r.get(VAL_MAJORITY), (int, float))),
                    None)
    plots = [_svg_plot([(r.get(ITERATION), r.get(LOSS)) for r in its], "Trajectory-matching loss"),
             _svg_plot([(r.get(ITERATION), r.get(SYN_LR)) for r in its], "Learned step size", log_y=True),
             _svg_plot([(r.get(ITERATION), r[VAL_ACC_MEAN]) for r in evals], "Validation accuracy",
                       reference=(majority, "majority class") if majority is not None else None)]
    return _section("curves", "Learning curves", f"<p>From {METRICS_FILE}: {len(its)} iterations, {len(evals)} "
                    f"validation points on real held-out data.</p><div class=\"plots\">{''.join(plots)}</div>")


def _checksum_section(share: Share, share_file: Path | None) -> str:
    if share_file is None:
        body = ("<p>This page was made from a run folder, before export. The share's payload checksum appears here "
                "once it is exported (<code>distill export RUNDIR --out SHARE.h5 --report</code>).</p>")
    else:
        body = (f"<p>Sign off exactly this file: the payload checksum is stored in the share and was verified while "
                f"this page was made; the file checksum is what <code>sha256sum</code> prints.</p>"
                + _table([("file", share_file.name), ("payload sha256", share.payload_sha256),
                          ("file sha256", sha256_file(share_file)), ("format version", share.format_version)]))
    return _section("checksum", "Checksum", body)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:0 18px 40px;color:#1d1d1f}
header{border-bottom:3px solid #444;margin-bottom:10px}
h1{font-size:1.5em;margin:14px 0 4px}h2{border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}h3{margin:14px 0 6px;font-size:1.02em}
.banner{font-weight:600;padding:8px 12px;border-radius:4px;margin:6px 0 10px}
.hospital{background:#fde8e8;border:2px solid #c0392b;color:#7b1d14}.public{background:#e8f4fd;border:2px solid #2c6fa8;color:#143d5e}
.summary td:first-child,table td:first-child{color:#555}
table{border-collapse:collapse;margin:4px 0 10px;font-size:.92em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}code{background:#f2f2f2;padding:0 3px}
img{image-rendering:pixelated;background:#000;display:block}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}.thumb{margin:0;font-size:.75em;color:#555;text-align:center}
.classrow{margin-bottom:8px}.muted{color:#777;font-weight:normal}
.pairs td{text-align:center;font-size:.8em}.pairs img{margin:0 auto 2px}.flag{background:#fde8e8;color:#a11;font-weight:600}
.verdict{font-size:1.2em;font-weight:700;padding:6px 10px;display:inline-block;border-radius:4px}
.ok{background:#e3f5e1;color:#1e6b1a}.bad{background:#fde8e8;color:#a11}
.disclaimer{font-style:italic}.warn{color:#a11;font-weight:600}
.boxes{display:flex;flex-wrap:wrap;gap:0 22px;align-items:flex-start}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{margin:0}.plot figcaption{font-size:.85em;font-weight:600}
svg text{font-size:10px;fill:#333}.frame{fill:#fafafa;stroke:#bbb}.curve{fill:none;stroke:#2c6fa8;stroke-width:1.6}
.dot{fill:#2c6fa8}.ref{stroke:#c0392b;stroke-dasharray:4 3}.reflabel{fill:#c0392b}.bar{fill:#2c6fa8}
footer{margin-top:30px;color:#777;font-size:.8em}
"""


def guarantee_block(share: Share, audit: _Audit, public: bool) -> str:
    """The privacy guarantee in the sentence a data-protection officer signs, and the audit beside it.

    On the in-hospital page the audit's figures are named as what they are: computed from the
    private images, outside the guarantee, and not part of the share.
    """
    dp = share.dp_record()
    parts = [f'<p class="verdict {"ok" if dp is not None else "bad"}">Privacy guarantee: {_e(share.guarantee())}</p>']
    if dp is not None:
        parts.append(_table([("privacy unit", dp.unit), ("ε, δ", f"{dp.epsilon:.4g}, {dp.delta:.3g}"),
                             ("accountant", dp.accountant), ("noise multiplier σ", f"{dp.noise_multiplier:.4g}"),
                             ("clip norm", f"{dp.clip:g}"), ("sampling rate q", f"{dp.sample_rate:.4g}"),
                             ("steps per expert", dp.steps), ("experts, shards", f"{dp.experts}, {dp.shards}"),
                             ("normalisation", dp.normalisation),
                             ("DP statistics", f"{dp.stats} (ε {dp.stats_epsilon:.3g})" if dp.stats else "none"),
                             ("Opacus", dp.opacus_version)]))
    stats = share.privacy.get(Attr.PRIVATE_STATISTICS)
    if isinstance(stats, list) and stats:
        parts.append(f"<p>Statistics of the private images this share carries: {_e(', '.join(map(str, stats)))}.</p>")
    if audit.status in ("missing", "invalid"):
        where = "no audit figures are available"
    elif public:
        where = "its figures stay inside the hospital and are not in the share"
    else:
        where = "its figures, further down this page, are computed from the private images and are not in the share"
    parts.append(f'<p class="disclaimer">Empirical privacy audit: {_e(audit.status)}. The audit is outside the '
                 f"formal guarantee; {_e(where)}.</p>")
    return '<div class="guarantee">' + "".join(parts) + "</div>"


def render_report(share: Share, *, title: str, audit: _Audit, rundir: Path | None, share_file: Path | None,
                  pairs: _Pairs | None, pairs_reason: str, eval_doc: dict | None, public: bool) -> str:
    """The page's HTML text (see :func:`write_report`)."""
    banner = (f'<p class="banner public">{_e(public_note(audit.status, audit.summary, PUBLIC_NOTE))}</p>' if public
              else f'<p class="banner hospital">{_e(HOSPITAL_ONLY)}</p>')
    kind = "public page" if public else "in-hospital review page"
    summary = _table([("privacy audit", audit.status + (" (export forced)" if audit.forced else "")),
                      ("images", f"{share.num_images} in {share.num_classes} classes "
                                 f"({'soft' if share.label_logits is not None else 'hard'} labels)"),
                      ("payload sha256", share.payload_sha256 or "appears once exported"),
                      ("licence", share.license or "set at export")])
    # The decision first: verdict, the attack against its baseline, what to change, sign-off (issue 24).
    sections = [decision_section(audit.status, audit.forced, audit.summary, audit.statement, rundir, public),
                _grid_section(share)]
    if not public:
        sections.append(_pairs_section(pairs, pairs_reason, share))
    sections += [_audit_section(audit), _eval_section(eval_doc, share), _recipe_section(share, share_file is None)]
    if not public:
        sections.append(_curves_section(read_curves(rundir) if rundir else [], rundir is not None))
    sections.append(_checksum_section(share, share_file))
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="distill {_e(__version__)}">'
            f'<meta name="distill-report" content="{REPORT_FORMAT} {REPORT_VERSION}">'
            f'<meta name="distill-report-kind" content="{"public" if public else "hospital"}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}: distill {_e(kind)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}: {_e(kind)}</h1>{banner}{guarantee_block(share, audit, public)}{summary}</header>"
            + "".join(sections)
            + f"<footer>{REPORT_FORMAT} {REPORT_VERSION}, made by distill {_e(__version__)}. "
              "Self-contained: no script, nothing loaded from the network.</footer></body></html>\n")


def write_report(source: str | os.PathLike, out: str | os.PathLike, *, eval_json: str | os.PathLike | None = None,
                 data: str | os.PathLike | None = None, share: str | os.PathLike | None = None,
                 public: bool = False) -> Path:
    """Write the review page of a run folder or a share to ``out`` (atomically); returns ``out``.

    source: a run folder (after ``distill run``) or a share ``.h5``. share: the
    share exported from a run folder, for its checksum and text. data: the real
    data, for the nearest-neighbour pairs (default for a run folder: the data its
    config names). eval_json: a ``distill eval --json`` report. public: the
    receiving side's page, only the share's content (a share file, no ``data``).
    """
    source, out = Path(source), Path(out)
    if out.is_dir():
        raise DistillError(f"{out} is a folder; give the page's file name, e.g. {out / 'report.html'}.")
    if public and data is not None:
        raise DistillError("--public shows no real image, so it takes no --data; drop one of them.")
    if public and source.is_dir():
        raise DistillError("--public describes a share file; export the run first and give the share.")
    content, rundir, share_file = _open_source(source, share)
    audit = _audit_of(content, rundir, share_file)
    eval_doc = read_eval_report(eval_json) if eval_json is not None else None
    pairs, reason = None, ""
    if not public:
        spec = str(data) if data is not None else (_run_data_spec(rundir) if rundir else None)
        if spec is None:
            reason = "No real data was given: pass --data DATA (the data the set was made from) to show the pairs."
        else:
            try:
                pairs = _pairs(rundir or source, spec, audit)
            except DistillError as e:
                if data is not None:
                    raise
                reason = f"The run's data ({spec}) could not be used: {str(e).rstrip('.')}. Pass --data DATA."
    title = (share_file or source).name
    text = render_report(content, title=title, audit=audit, rundir=rundir, share_file=share_file, pairs=pairs,
                         pairs_reason=reason, eval_doc=eval_doc, public=public)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
