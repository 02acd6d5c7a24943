"""benchmarks/speed.py's storage section writes real expert files (it once called write_expert with keywords
the trajectory format had dropped, and ``speed.py --smoke`` stopped there)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from speed_cases import CASES, smoke_case  # noqa: E402
from speed_pipeline import disk_section  # noqa: E402


def test_the_storage_section_measures_one_expert_file_per_snapshot_dtype():
    case = smoke_case(CASES[0])
    (row,) = disk_section([case], snapshots=3)
    assert row["case"] == case.name and row["snapshots"] == 3 and row["params"] > 0
    # fp16 and bf16 store half the bytes of fp32; the file's fixed part keeps them above half.
    assert 0 < row["float16_mb"] < row["float32_mb"] and 0 < row["bfloat16_mb"] < row["float32_mb"]
