"""``distill eval SHARE --test FOLDER|TABLE``: test data without splits of its own is scored whole."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.errors import DataError
from distill.evaluate import evaluate, format_report

from test_cli_errors import assert_one_sentence, run_main
from test_evaluate import cfg, make_share


def _folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    rng = np.random.default_rng(1)
    for i, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for k in range(n):
            a = rng.integers(0, 120, (size, size)).astype(np.uint8) + (120 if name == "pneumonia" else 0)
            Image.fromarray(a.astype(np.uint8)).save(root / name / f"{k}.png")
    return root


def test_a_folder_given_as_test_is_scored_whole(tiny_npz, tmp_path, caplog):
    share = make_share(tiny_npz, class_names=["normal", "pneumonia"])
    folder = _folder(tmp_path / "ours", {"normal": 13, "pneumonia": 17})
    with caplog.at_level(logging.INFO):
        report = evaluate(cfg(folder, runs=1), shares=[("s.h5", share)])
    assert report["test"]["images"] == 30  # all of it, not a carved fifth
    assert report["test"]["class_counts"] == [13, 17]
    assert [r["kind"] for r in report["results"]] == ["distilled"]  # no train split: baselines need --train
    assert "pass --train" in caplog.text
    with pytest.raises(DataError, match="--train"):
        evaluate(cfg(folder, runs=1, baselines=("full",)), shares=[("s.h5", share)])
    # With --train, the baselines come back and the test data is still whole.
    both = evaluate(cfg(folder, train=str(tiny_npz), runs=1, baselines=("random-real",)), shares=[("s.h5", share)])
    assert both["test"]["images"] == 30 and len(both["results"]) == 2


def test_classes_are_matched_by_name_and_gaps_are_said(tiny_npz, tmp_path, caplog):
    share = make_share(tiny_npz, class_names=["normal", "pneumonia"])
    only = _folder(tmp_path / "only", {"pneumonia": 5, "zzz-empty-ignored": 0})
    # A folder with one class: its label is the share's class 1, by name, not position 0.
    with caplog.at_level(logging.WARNING):
        report = evaluate(cfg(only, runs=1), shares=[("s.h5", share)])
    assert report["test"]["class_counts"] == [0, 5] and report["test"]["missing_classes"] == ["normal"]
    assert "covers only" in caplog.text and "covers only" in format_report(report)
    extra = _folder(tmp_path / "extra", {"normal": 3, "pneumonia": 3, "effusion": 3})
    with pytest.raises(DataError, match="'effusion' that the share lacks"):
        evaluate(cfg(extra, runs=1), shares=[("s.h5", share)])


def test_extra_class_through_the_cli(tiny_npz, tmp_path, monkeypatch, capsys):
    from distill.formats.share import write_share

    write_share(tmp_path / "s.h5", make_share(tiny_npz, class_names=["normal", "pneumonia"]))
    extra = _folder(tmp_path / "extra", {"normal": 3, "pneumonia": 3, "effusion": 3})
    code, _, err = run_main(["eval", str(tmp_path / "s.h5"), "--test", str(extra), "--runs", "1", "--device", "cpu"],
                            monkeypatch, capsys)
    assert_one_sentence(code, err, "effusion")
