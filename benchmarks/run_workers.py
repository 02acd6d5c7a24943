"""`distill run --workers` on the CPU (issue 28, item 2): an iteration's trajectories across cores.

Arms, each a fresh `distill run` process on the same buffer (PneumoniaMNIST, 10 images per class, 20
student steps, --gradient full, no validation), alternated rep by rep so that a busy machine disturbs them
alike, with the 1-minute load average recorded beside every number:

- 1 trajectory per iteration, 1 process (today's default: --workers auto gives 1 here);
- 2 trajectories per iteration, 1 process (--workers 1, one thread);
- 2 trajectories per iteration, 2 processes (--workers 2: two ranks of one gloo group, one thread each).

Seconds per iteration are the median of metrics.jsonl's per-iteration times without the first; CPU seconds
are the command's and its workers'. The buffer: 2 experts x 1 epoch with a snapshot every 4 steps, built
once in --work (seed 0).

    python benchmarks/run_workers.py --work /tmp/run-workers --out /tmp/run-workers.json --doc docs/performance.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed_cpu import REPO, cli, seconds_per_iteration, write_section  # noqa: E402

ARMS = {"1 trajectory, 1 process": ["--trajectories-per-iter", "1", "--workers", "1"],
        "2 trajectories, 1 process": ["--trajectories-per-iter", "2", "--workers", "1"],
        "2 trajectories, 2 processes": ["--trajectories-per-iter", "2", "--workers", "2"]}
BEGIN, END = "<!-- run_workers:begin -->", "<!-- run_workers:end -->"


def render(res: dict) -> str:
    lines = [f"Written by `{res['command']}` on {res['machine']['cores']} logical cores; load average (1, 5, 15 min) "
             f"{', '.join(f'{x:.1f}' for x in res['machine']['load_at_start'])} at the start and "
             f"{', '.join(f'{x:.1f}' for x in res['machine']['load_at_end'])} at the end. `distill run` on "
             "PneumoniaMNIST, 10 images per class, 20 student steps, "
             f"{res['iterations']} iterations, fp32, one thread per process.", "",
             "| arm | s / iteration (median) | each alternation | s / trajectory | CPU s | load avg (1 min) |",
             "|---|---|---|---|---|---|"]
    means = {}
    for arm in ARMS:
        rows = [r for r in res["rows"] if r["arm"] == arm]
        if not rows:
            continue
        its = [r["s_per_iteration"] for r in rows]
        means[arm] = statistics.mean(its)
        per = means[arm] / int(ARMS[arm][1])
        each = ", ".join(f"{x:.2f}" for x in its)
        loads = ", ".join(f"{r['load_before']:.1f}" for r in rows)
        cpu = statistics.mean(r["cpu_s"] for r in rows)
        lines.append(f"| {arm} | {means[arm]:.2f} | {each} | {per:.2f} | {cpu:.1f} | {loads} |")
    a, b, c = (means.get(k) for k in ARMS)
    if b and c:
        lines += ["", f"Two trajectories per iteration: {b / c:.2f}x faster per iteration on 2 processes than on 1"
                      + (f"; an iteration of 2 trajectories on 2 processes takes {c / a:.2f}x the time of today's "
                         "1-trajectory iteration." if a else ".")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/run-workers"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--doc", type=Path, default=None)
    ap.add_argument("--render", action="store_true", help="only render --out into --doc")
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads(a.out.read_text())
    else:
        os.environ.setdefault("DISTILL_DATA", str(REPO.parent / "shared" / "data"))
        a.work.mkdir(parents=True, exist_ok=True)
        (a.work / "no_eval.toml").write_text("eval_models = 0\n")
        buffer = a.work / "buffer"
        if not (buffer / "expert_0001.h5").exists():
            cli(REPO, ["buffer", "--data", "pneumoniamnist", "--experts", "2", "--epochs", "1", "--snapshot-every", "4",
                       "--seed", "0", "--device", "cpu", "--out", str(buffer)], a.work / "buffer.log")
        res = {"machine": {"cores": os.cpu_count(), "load_at_start": os.getloadavg()}, "iterations": a.iterations,
               "command": "python benchmarks/run_workers.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "rows": []}
        for rep in range(a.reps):
            for arm, extra in ARMS.items():
                out = a.work / f"run_{rep}_{arm.replace(' ', '_').replace(',', '')}"
                r = cli(REPO, ["run", "--buffer", str(buffer), "--out", str(out), "--ipc", "10", "--iterations",
                               str(a.iterations), "--syn-steps", "20", "--expert-epochs", "2", "--max-start-epoch", "0",
                               "--gradient", "full", "--eval-every", "0", "--seed", "0", "--device", "cpu",
                               "--config", str(a.work / "no_eval.toml"), *extra], a.work / f"{out.name}.log")
                res["rows"].append({"arm": arm, "rep": rep, **r, "s_per_iteration": seconds_per_iteration(out)})
                print(json.dumps(res["rows"][-1]), flush=True)
                a.out.write_text(json.dumps(res, indent=1))
        res["machine"]["load_at_end"] = os.getloadavg()
        a.out.write_text(json.dumps(res, indent=1))
    text = render(res)
    print(text)
    if a.doc:
        write_section(a.doc, text, BEGIN, END)


if __name__ == "__main__":
    main()
