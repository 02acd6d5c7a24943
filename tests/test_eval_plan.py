"""`distill eval` says what it will cost before it trains, and a random-real row does not depend on the other rows."""
from __future__ import annotations

import logging

from distill.evaluate import evaluate

from test_evaluate import TINY_MODEL, cfg, make_share


def _row(report, kind):
    (row,) = [r for r in report["results"] if r["kind"] == kind]
    return [{k: v for k, v in run.items() if k != "train_seconds"} for run in row["runs"]]


def test_the_cost_of_every_row_is_logged_before_training(tiny_npz, caplog):
    share = make_share(tiny_npz)  # 3 images per class
    with caplog.at_level(logging.INFO, logger="distill.evaluate"):
        evaluate(cfg(tiny_npz, runs=1, epochs=2, model_kwargs=TINY_MODEL), shares=[("s", share)])
    said = [r.getMessage() for r in caplog.records]
    first_run = next(i for i, m in enumerate(said) if ", run 0:" in m)
    plan = said[:first_run]
    # tiny.npz: 2 classes x 10 training images; the share and random real: 3 per class.
    assert "  distilled (1 share, hard labels): 6 images x 2 epochs x 1 run(s) = 12" in plan
    assert "  random real (3/class): 6 images x 2 epochs x 1 run(s) = 12" in plan
    assert "  full training split: 20 images x 2 epochs x 1 run(s) = 40" in plan
    assert any("full-data baseline is 62% of this evaluation's work" in m for m in plan)  # 40 of 64


def test_no_warning_when_the_full_baseline_is_not_asked_for(tiny_npz, caplog):
    with caplog.at_level(logging.INFO, logger="distill.evaluate"):
        evaluate(cfg(tiny_npz, runs=1, epochs=1, baselines=("random-real",), model_kwargs=TINY_MODEL),
                 shares=[("s", make_share(tiny_npz))])
    assert not any("full-data baseline" in r.getMessage() for r in caplog.records)


def test_the_random_real_row_is_the_same_alone_and_combined(tiny_npz):
    share = make_share(tiny_npz)
    common = dict(runs=2, epochs=2, model_kwargs=TINY_MODEL)
    alone = evaluate(cfg(tiny_npz, baselines=("random-real",), **common), shares=[("s", share)])
    combined = evaluate(cfg(tiny_npz, baselines=("full", "random-real"), **common), shares=[("s", share)])
    assert _row(alone, "random-real") == _row(combined, "random-real")
    assert _row(alone, "random-real")[0]["indices"] != _row(alone, "random-real")[1]["indices"]  # a subset per run
