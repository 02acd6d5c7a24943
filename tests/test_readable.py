"""Readable output: grids name their classes, inspect shows a share's audit as a table, quirks only where they apply."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distill.data import fit_preprocessing
from distill.formats.audit import summary_lines
from distill.grid import labelled_grid
from distill.mtt.rundir import save_grid
from distill.privacy import AuditReport

LEGACY_AUDIT = Path(__file__).resolve().parent / "data" / "legacy_v1" / "run" / "audit.json"


def _label_strip(path: Path, image_width: int) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return arr[:, : arr.shape[1] - image_width]


def test_a_run_grid_names_each_row_with_its_class(tmp_path):
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (6, 1, 8, 8), generator=g, dtype=torch.uint8)
    pre = fit_preprocessing(raw)
    save_grid(tmp_path / "plain.png", pre(raw), pre, ipc=3)
    save_grid(tmp_path / "named.png", pre(raw), pre, ipc=3, class_names=["normal", "pneumonia"])
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "named.png") as named:
        assert named.height == plain.height and named.width > plain.width  # a label strip on the left
        strip = _label_strip(tmp_path / "named.png", plain.width)
    # Text is drawn in each class's row band (padding 1, images 8 px high).
    for row in range(2):
        band = strip[1 + row * 9: 1 + row * 9 + 8]
        assert (band < 128).any(), f"no class name drawn in row {row}"


def test_a_grid_without_names_is_the_plain_image_grid():
    x = torch.rand(4, 3, 5, 5)
    img = labelled_grid(x, 2, None, padding=2)
    assert img.size == (2 * 7 + 2, 2 * 7 + 2)


def test_the_audit_table_is_what_distill_audit_prints_and_survives_a_foreign_summary():
    doc = json.loads(LEGACY_AUDIT.read_text())
    lines = summary_lines(doc["summary"])
    assert lines[0].startswith("Nearest neighbour (") and any(line.startswith("Membership inference") for line in lines)
    assert lines[-1] == "Verdict: PASS"
    report = AuditReport(passed=True, summary=doc["summary"], details={}, subject_sha256="", created="")
    assert report.text().splitlines()[:-1] == lines
    assert summary_lines({"auc": 0.5, "note": "made elsewhere"}) == ['auc: 0.5', 'note: "made elsewhere"']


def test_inspect_prints_an_old_shares_audit_figures_as_a_table(tmp_path, monkeypatch, capsys):
    from test_share import make_run, run_cli

    # A v1.0 share carries the audit's figures; inspect shows them as the table distill audit prints.
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(LEGACY_AUDIT.parents[1] / "share.h5"))
    assert code == 0, err
    privacy = out[out.index("audit (as recorded):"):]
    assert "  Membership inference (" in privacy and "  Verdict: PASS" in privacy
    assert "{'" not in privacy and '{"' not in privacy  # no raw dicts
    # From v1.1 on the figures stay at home (issue 23): the share says only that an audit ran, and its verdict.
    run = make_run(tmp_path / "run", audit=json.loads(LEGACY_AUDIT.read_text()))
    code, _, err = run_cli(monkeypatch, capsys, "export", str(run), "--out", str(tmp_path / "x.h5"))
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "x.h5"))
    assert code == 0 and "audit: passed" in out.splitlines()[1] and "Membership inference" not in out


def test_the_medmnist_quirk_is_named_only_for_medmnist(caplog):
    from distill.config import AuditSettings
    from distill.data import RealData, Split
    from distill.privacy.audit import _hold_out
    from distill.privacy.subject import Subject

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (20, 1, 8, 8), generator=g, dtype=torch.uint8)
    val = torch.cat([train[:1], torch.randint(0, 256, (9, 1, 8, 8), generator=g, dtype=torch.uint8)])  # 1 copy
    labels = torch.arange(2).repeat(10)
    pre = fit_preprocessing(train)
    subject = Subject(images=pre(train[:2]), labels=labels[:2], targets=labels[:2], preprocessing=pre,
                      class_names=("a", "b"), model="convnet3", model_kwargs={}, recipe=None, data_sha256=None,
                      file_sha256="", rundir=None)
    for name, quirk in (("breastmnist", True), ("my_jpegs", False)):
        data = RealData(name=name, class_names=["a", "b"], train=Split(train, labels), val=Split(val, labels[:10]),
                        test=Split(val[:0], labels[:0]), source_sha256="")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            views = _hold_out(subject, data, AuditSettings(), torch.device("cpu"))
        said = " ".join(r.getMessage() for r in caplog.records)
        assert views.duplicates == 1 and "copies of training images" in said
        assert ("MedMNIST" in said) == quirk, said
