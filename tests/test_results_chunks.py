"""benchmarks/results.py: chunks, the time budget, resuming a stopped run, cross-architecture rows.

The benchmark never runs here: its `distill` commands are replaced by a Python one-liner that records
its arguments, so these tests check which steps would run, not what they measure.
"""
from __future__ import annotations

import json
import sys

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def results_mod():
    yield from benchmark_module("results.py", "benchmark_results_chunks")


@pytest.fixture
def fake_distill(results_mod, monkeypatch, tmp_path):
    """Every `distill ...` the Runner starts appends its arguments to calls.jsonl instead of running."""
    log = tmp_path / "calls.jsonl"
    code = f"import json, sys; open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')"
    monkeypatch.setattr(results_mod, "distill_argv", lambda: [sys.executable, "-c", code])
    return lambda: [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_only_selected_chunks_run_and_finished_steps_are_kept(results_mod, fake_distill, tmp_path):
    m = results_mod
    work = tmp_path / "work"
    first = m.Runner(work, {}, chunks={"pneumoniamnist:10"})
    code, wall = first("step-a", ["eval", "a"], "pneumoniamnist:10")
    assert code == 1 and isinstance(wall, float) and wall > 0
    with pytest.raises(m.NotRun):
        first("step-b", ["eval", "b"], "pneumoniamnist:1")
    assert fake_distill() == [["eval", "a"]] and first.commands == ["distill eval a"]
    # A later session with another chunk takes step a from the record and runs step b.
    second = m.Runner(work, {}, chunks={"pneumoniamnist:1"})
    second("step-a", ["eval", "a"], "pneumoniamnist:10")
    second("step-b", ["eval", "b"], "pneumoniamnist:1")
    assert fake_distill() == [["eval", "a"], ["eval", "b"]]
    # A command shared by several rows is listed and counted once.
    assert second("step-b", ["eval", "b"], "pneumoniamnist:1")[0] == 2 and len(second.commands) == 2


def test_time_budget_stops_new_steps(results_mod, fake_distill, tmp_path):
    run = results_mod.Runner(tmp_path / "work", {}, max_seconds=0.0)
    with pytest.raises(results_mod.NotRun):
        run("step-a", ["eval", "a"], "breastmnist:1")
    assert fake_distill() == []


def test_a_stopped_run_is_resumed(results_mod, fake_distill, tmp_path):
    rundir = tmp_path / "run_1_soft"
    rundir.mkdir()
    (rundir / "checkpoint.pt").write_bytes(b"")
    run = results_mod.Runner(tmp_path / "work", {})
    run("run-1-soft", ["run", "--out", str(rundir)], "breastmnist:1", resumable=rundir)
    assert fake_distill() == [["run", "--out", str(rundir), "--resume"]]
    record = json.loads((tmp_path / "work" / "steps" / "run-1-soft.json").read_text())
    assert record["command"] == f"distill run --out {rundir}" and record["resumed"] is True


def test_paper_chunks_cover_three_datasets_at_1_10_50(results_mod):
    m = results_mod
    p = m.PROFILES["paper"]
    names = m.chunk_names(p, m.DATASETS, p.ipcs)
    assert names[:5] == ["pneumoniamnist:full", "pneumoniamnist:buffer", "pneumoniamnist:1", "pneumoniamnist:10",
                         "pneumoniamnist:50"]
    assert {"breastmnist:50", "retinamnist:10"} <= set(names) and p.max_start_epoch is None
    counts = {"pneumoniamnist": [1214, 3494], "breastmnist": [147, 399], "retinamnist": [486, 128, 206, 194, 66]}
    listed = m.chunk_names(p, m.DATASETS, p.ipcs, counts)
    assert "retinamnist:10" in listed and "retinamnist:50" not in listed and "breastmnist:50" in listed


def test_unrun_rows_say_not_run_and_retinamnist_has_no_50(results_mod, shared_data, monkeypatch, tmp_path):
    m = results_mod
    monkeypatch.setenv("DISTILL_DATA", str(shared_data))
    run = m.Runner(tmp_path / "work", {}, render_only=True)
    rows, _ = m.run_dataset(run, m.PROFILES["paper"], "retinamnist", (1, 10, 50), "cuda", tmp_path / "work")
    by = {(r.ipc, r.label): r for r in rows}
    assert by[(None, "full data")].note == "not run"
    for k in (1, 10):
        for label in ("random real", "distilled, hard labels", "distilled, soft labels"):
            for model in ("", ", resnet18", ", vgg11"):  # every row also under the two other architectures
                assert by[(k, label + model)].note == "not run"
    assert "fewer than 2 × 50" in by[(50, "random real")].note and run.commands == []
    section = m.render_section({"profile": {**m.PROFILES["paper"].__dict__}, "hardware": "x", "software": "y",
                                "commit": "z", "finished": "never", "wall_seconds": 0.0}, rows, [], {})
    assert "| 10 | distilled, soft labels, resnet18 | – | – | – | – | not run |" in section
