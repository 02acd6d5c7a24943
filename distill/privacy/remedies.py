"""What to change when the audit fails: concrete remedies, each with the exact command to run.

Read from the run folder's ``config.toml`` (and its buffer's) where there is one, so the
commands name the user's own folders and settings; placeholders otherwise.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DistillError
from ..formats.buffer_config import buffer_data_spec
from ..formats.run import read_run_config

DP_EPSILON = 8  # the budget issue 24 names for the DP buffer remedy; docs/privacy.md, "The guarantee"


def _run_settings(rundir: Path | None) -> dict:
    """buffer, out, ipc, iterations, init and data of the run, with placeholders for what is not known."""
    found = {"buffer": "BUFFER", "out": "RUNDIR", "ipc": 10, "iterations": 1000, "init": "real", "data": "DATA"}
    if rundir is None:
        return found
    found["out"] = str(rundir)
    try:
        run = read_run_config(rundir, missing_ok=False)
    except (DistillError, OSError, ValueError):
        return found
    for k in ("buffer", "ipc", "iterations", "init", "data"):
        if run.get(k) not in (None, ""):
            found[k] = run[k]
    if found["data"] == "DATA":
        try:
            found["data"] = buffer_data_spec(Path(str(found["buffer"]))) or "DATA"
        except (DistillError, OSError, ValueError):
            pass
    return found


def remedies(rundir: Path | None) -> list[tuple[str, str]]:
    """(what to change, the command that does it), most effective last-resort last."""
    s = _run_settings(rundir)
    out, buf, ipc, it, data = s["out"], s["buffer"], int(s["ipc"]), int(s["iterations"]), s["data"]
    run = f"distill run --buffer {buf} --ipc {ipc}"
    items = [
        (f"Distil longer, so the images move further from the real ones they started from ({2 * it} iterations)",
         f"{run} --iterations {2 * it} --init {s['init']} --out {out}-longer"),
    ]
    if s["init"] != "noise":
        items.append(("Start from noise instead of real training images (--init noise)",
                      f"{run} --iterations {it} --init noise --out {out}-noise"))
    items.append((f"Train the experts with differential privacy (epsilon {DP_EPSILON}), then distil from that buffer",
                  f"distill buffer --data {data} --out {buf}-dp --dp-epsilon {DP_EPSILON} && "
                  f"distill run --buffer {buf}-dp --ipc {ipc} --iterations {it} --out {out}-dp"))
    if ipc > 1:
        lower = max(1, ipc // 2)
        items.append((f"Share fewer images per class ({lower} instead of {ipc})",
                      f"distill run --buffer {buf} --ipc {lower} --iterations {it} --out {out}-ipc{lower}"))
    return items


def remedy_text(rundir: Path | None) -> str:
    """The remedies as lines for a terminal message, then how to check the new run."""
    lines = [f"  - {what}: {cmd}" for what, cmd in remedies(rundir)]
    return ("What to change (then audit the new run with 'distill audit NEWRUN --data DATA --attack rmia'):\n"
            + "\n".join(lines))
