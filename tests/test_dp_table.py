"""benchmarks/dp_table.py: the DP table's rows come from the steps' records, and unfinished rows say so."""
from __future__ import annotations

import json

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def dp_table():
    yield from benchmark_module("dp_table.py", "benchmark_dp_table")


def _eval_json(path, acc, auc):
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"mean": {"accuracy": acc, "auc": auc}, "std": {"accuracy": 0.01, "auc": 0.002}, "runs": [{}, {}]}
    path.write_text(json.dumps({"format": "distill-eval", "format_version": "1.0", "results": [result]}))


def test_render_only_fills_finished_rows_and_marks_the_rest(dp_table, tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "privacy.md"
    # The section is named for the class means' grid and budget part too, so older sections stay apart.
    name = dp_table.section_name("smoke", None)
    out.write_text(f"# page\n\n<!-- dp-table:{name}:begin -->\nold\n<!-- dp-table:{name}:end -->\n\nafter\n")
    monkeypatch.setattr(dp_table, "snapshot_every", lambda p, ds: 1)  # no real data needed
    # A finished random-real step, recorded with exactly the command the script would run.
    (work / "steps").mkdir(parents=True)
    (work / "steps" / "breastmnist-random-real.json").write_text(
        json.dumps({"command": "distill " + " ".join(["eval", "--baseline", "random-real", "--train", "breastmnist",
                                                       "--test", "breastmnist", "--runs", "1", "--json",
                                                       str(work / "breastmnist" / "random-real.json"), "--seed", "0",
                                                       "--device", "cpu", "--ipc", "2", "--epochs", "5"]),
                    "returncode": 0, "wall_seconds": 3.0}))
    _eval_json(work / "breastmnist" / "random-real.json", 0.671, 0.715)
    dp_table.main(["--profile", "smoke", "--datasets", "breastmnist", "--epsilons", "8", "--work", str(work),
                   "--out", str(out), "--render-only"])
    page = out.read_text()
    assert page.startswith("# page\n") and page.rstrip().endswith("after") and "\nold\n" not in page
    rows = [line for line in page.splitlines() if line.startswith("| breastmnist")]
    assert len(rows) == 4  # DP share, DP-SGD direct, random real, full data
    assert "| random real, 2 per class |  | 67.1 ± 1.0 | 0.715 ± 0.002 |" in page
    assert sum("not run" in r for r in rows) == 3
