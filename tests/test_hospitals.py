"""benchmarks/hospitals.py's pure parts (target arithmetic, the page's marked sections) and label_prior.py on tiny shares.

The benchmark itself runs the whole pipeline and never runs in CI; these tests feed its table
functions invented numbers, which are not results, and write nothing into docs/.
"""
from __future__ import annotations

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("hospitals.py", "benchmark_hospitals")


def test_targets_say_met_or_by_how_much_they_are_missed(bench):
    R = bench.Row
    rows = [R("pneumoniamnist", 6, "0.3", "union of shares", 0.84, 0.01),
            R("pneumoniamnist", 6, "0.3", "local only, mean over sites", 0.70, 0.02),
            R("pneumoniamnist", 6, "0.3", "local only, best site", 0.82, 0.02),
            R("pneumoniamnist", 6, "0.3", "one-round FedAvg", 0.60, 0.02),
            R("pneumoniamnist", 3, "0.3", "union of shares", 0.99, 0.01)]  # 3 sites: not the target's setting
    central = {"pneumoniamnist": R("pneumoniamnist", 0, "–", "centralised", 0.90, 0.01)}
    verdicts = bench.check_targets(rows, central)
    line = lambda *words: next(v for v in verdicts if all(w in v for w in words))  # noqa: E731
    assert "met (84.0 vs 70.0, +14.0)" in line("mean over sites")
    assert "NOT met by 3.0 points (84.0 vs 82.0, +2.0)" in line("best site")
    assert "met (84.0 vs 60.0, +24.0)" in line("FedAvg")
    assert "NOT met by 3.0 points (84.0 vs 90.0, -6.0)" in line("centralised")
    assert all("not measured" in v for v in bench.check_targets(rows[-1:], {}))
    rows.append(R("pneumoniamnist", 3, "0.3", "one-round FedAvg", 0.97, 0.01))  # another number of sites
    indicative = [v for v in bench.check_targets(rows, central) if "indicative only: 3 sites" in v]
    assert any("FedAvg + 5 points: NOT met by 3.0 points (99.0 vs 97.0, +2.0)" in v for v in indicative)
    assert any("centralised: met (99.0 vs 90.0, +9.0)" in v for v in indicative)


def test_a_profile_section_replaces_only_its_own(bench):
    page = bench.HEADER
    page = bench.merge_hospitals(page, "cpu", "## Profile `cpu`\nold\n")
    page = bench.merge_hospitals(page, "gpu", "## Profile `gpu`\nplan\n")
    page = bench.merge_hospitals(page, "cpu", "## Profile `cpu`\nnew\n")
    assert page.startswith(bench.HEADER) and "old" not in page and "new" in page and "plan" in page
    assert page.count("<!-- hospitals:cpu:begin -->") == 1 and "<!-- results:" not in page


def test_a_render_only_call_reaches_every_step_and_writes_a_plan(bench, tmp_path):
    # Every step is called with results.Runner's real signature; with --render-only none runs, so every
    # row is rendered as a plan. An outdated call (a missing argument) fails here, not an hour into a run.
    out = tmp_path / "hospitals.md"
    bench.main(["--profile", "cpu6", "--render-only", "--work", str(tmp_path / "work"), "--out", str(out)])
    page = out.read_text()
    assert "<!-- hospitals:cpu6:begin -->" in page and "## Profile `cpu6`" in page
    assert page.count("| not run |") == len(bench.ROWS)  # five arms at 6 sites, α 0.3, and centralised
    assert not (tmp_path / "work" / "steps").exists()


def test_a_spent_budget_starts_no_step_so_a_chunked_run_stops_cleanly(bench, tmp_path, monkeypatch):
    # --budget-minutes is how the gpu profile fits in 8-minute chunks: once the budget is spent no new step
    # starts, the table is still written, and the next call picks up the steps that did not run. The clock
    # here jumps an hour at every reading, so the budget is spent before the first step.
    clock = iter(range(0, 10**9, 3600))
    monkeypatch.setattr(bench.time, "monotonic", lambda: next(clock))
    out = tmp_path / "hospitals.md"
    bench.main(["--profile", "smoke", "--budget-minutes", "8", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert out.read_text().count("| not run |") == len(bench.ROWS)
    assert not (tmp_path / "work" / "steps").exists()


@pytest.fixture(scope="module")
def label_prior_script():
    yield from benchmark_module("label_prior.py", "benchmark_label_prior")


def test_label_prior_script_scores_every_way_of_joining(label_prior_script, tiny_npz, tmp_path):
    # benchmarks/label_prior.py end to end on two tiny site shares: one row per (--label-prior,
    # --share-weights) pair and per weighting for the class-ids reference, each scored on val and test.
    from test_evaluate import make_share

    from distill.config import LABEL_PRIORS, SHARE_WEIGHTS
    from distill.formats.share import write_share

    paths = []
    for i, counts in enumerate(([9, 1], [1, 9])):
        s = make_share(tiny_npz, per_class=2, soft=True, epochs=2, seed=i)
        s.provenance = {"dataset": {"name": "site", "counts": {"train": counts, "val": [1, 1], "test": [1, 1]}}}
        paths.append(str(write_share(tmp_path / f"site-{i}.h5", s)))
    mod = label_prior_script
    rows, facts = mod.score(paths, str(tiny_npz), runs=1, seed=0, device="cpu")
    assert [(r["choice"], r["weights"]) for r in rows] == [
        (c, w) for c in (*LABEL_PRIORS, mod.HARD) for w in SHARE_WEIGHTS]
    assert all(set(r["runs"][0]) == {"val", "test"} for r in rows)
    assert facts["site_counts"] == [[9, 1], [1, 9]]
    table = mod.render("two sites", rows, facts, ["x"], "cpu")
    assert len([line for line in table.splitlines() if line.startswith("| ") and "---" not in line]) == 1 + len(rows)
