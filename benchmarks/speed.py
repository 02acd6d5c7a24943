"""Speed and memory: time to a share, the full unroll against the fast paths, expert training, storage, op counts.

A benchmark script, not a test: CI never runs it. It measures, in one process on
one device, the four cases of ../shared/BENCHMARKS.md and writes one report:

    python benchmarks/speed.py --device cuda --out docs/performance.md        # GPU, about 6 minutes
    python benchmarks/speed.py --smoke                                        # CPU, tiny sizes, 1-2 minutes
    python benchmarks/speed.py --render docs/performance.json --out docs/performance.md   # re-render only
    python benchmarks/speed.py --device cpu --sections pipeline,opcount --pipeline cpu    # CPU rows, ~5 minutes

*pipeline* times ``distill buffer``, ``run``, ``export`` and ``eval`` as the CLI
runs them (one subprocess each) on PneumoniaMNIST, beside the reference's
figures; ``--old-repo DIR`` also times another checkout's ``distill run`` (git
5bd3815, say) on the same buffer. *opcount* counts the aten operators of one MTT
iteration and one expert step (benchmarks/opcount.py), today's path against 5bd3815's.

Every MTT row pairs the full unroll with ``create_graph=True`` (the reference's
math and the project's correctness oracle, :func:`distill.mtt.unroll.unroll_student`)
with the constant-memory exact path (:func:`tests/oracles/checkpointed.matching_grads`),
on the same random data and the same unroll plan: milliseconds per iteration
(median of 5 after 2 warm-ups, ``torch.cuda.synchronize()`` around each timer),
peak memory, and the relative error of the image and step-size gradients
against the oracle in strict fp32, beside the oracle's disagreement with itself
and a float64 check. Expert training reports images/s one expert
at a time against K experts in one vmapped network, and the trajectories'
agreement. Storage reports disk per expert and what fp16/bf16 snapshots do to
the matching loss and its gradient (``--buffer DIR`` measures that on a real
buffer; without it, on a small expert trained here on a learnable synthetic task).

Next to the Markdown it writes the raw numbers as JSON (same name, ``.json``).

This file is the command line; the rest lives beside it by concern: speed_cases.py (what is measured),
speed_harness.py (how), speed_sections.py and speed_pipeline.py (the sections), speed_verdicts.py and
speed_render.py (the report).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))  # tests/oracles: the reference implementations, outside the package

from distill.io import atomic_path, software_versions, write_json  # noqa: E402
from speed_cases import CASES, EXPERT_BENCHES, PIPELINES, REFERENCE_SNAPSHOTS, REPORT_VERSION, smoke_case, smoke_expert  # noqa: E402
from speed_harness import log  # noqa: E402
from speed_pipeline import buffer_trajectory, disk_section, pipeline_section, precision_section, synthetic_trajectory  # noqa: E402
from speed_render import render  # noqa: E402
from speed_sections import (compile_section, expert_section, iteration_section, mtt_section, opcount_section,  # noqa: E402
                            steps_memory_section)

def _cpu_section(out: Path) -> str:
    """benchmarks/speed_cpu.py's section of ``out`` (between its markers), kept when this script rewrites the file."""
    text = out.read_text() if out.exists() else ""
    i, j = text.find("<!-- speed_cpu:begin -->"), text.find("<!-- speed_cpu:end -->")
    return "" if i < 0 or j < 0 else "\n" + text[i:j + len("<!-- speed_cpu:end -->")] + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--smoke", action="store_true", help="Tiny sizes, to check on a CPU that everything runs.")
    ap.add_argument("--out", default=None, help="Markdown report (default docs/performance.md; out/performance-smoke.md with --smoke).")
    ap.add_argument("--sections", default="pipeline,mtt,steps,experts,storage,compile,opcount",
                    help="Comma list of pipeline, mtt, steps, experts, storage, compile, opcount, iteration "
                         "(run in this order).")
    ap.add_argument("--keep", default=None, metavar="JSON",
                    help="Carry the sections this run does not measure over from an earlier report (rendered as such).")
    ap.add_argument("--pipeline", default=None, choices=sorted(PIPELINES),
                    help="Pipeline settings: cuda = the reference's reduced protocol, cpu = scaled down (default: the device's).")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"),
                    help="Folder with pneumoniamnist.npz for the pipeline (DISTILL_DATA).")
    ap.add_argument("--old-repo", default=None,
                    help="Another checkout (e.g. `git archive 5bd3815 | tar -x -C /tmp/old`) whose distill run is timed too.")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES), help="Comma list of MTT cases.")
    ap.add_argument("--compile-cases", default=None,
                    help="Cases for the torch.compile section (default medmnist28_ipc10,cifar_ipc10 on a GPU, none on a CPU, "
                         "where compiling takes minutes; '' for none).")
    ap.add_argument("--channels-last", action="store_true", help="Also time the graphs path with NHWC images.")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="Only rewrite the Markdown report (--out) from a JSON file this script wrote.")
    ap.add_argument("--buffer", default=None,
                    help="Comma list of real buffer folders (float32 snapshots) for the snapshot-precision check.")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        if res.get("format") != "distill-benchmark-speed":
            raise SystemExit(f"{args.render} is not a report of this script.")
        out = Path(args.out or Path(args.render).with_suffix(".md"))
        with atomic_path(out) as tmp:
            tmp.write_text(render(res) + _cpu_section(out))
        log(f"Wrote {out}.")
        return

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    sections = set(args.sections.split(","))
    if device.type == "cpu" and not args.smoke and sections - {"pipeline", "opcount", "iteration"}:
        raise SystemExit("Without a GPU the full sizes take hours; use --smoke on a CPU (pipeline and opcount run as they are).")
    out = Path(args.out or (REPO / ("out/performance-smoke.md" if args.smoke else "docs/performance.md")))
    names = [n for n in args.cases.split(",") if n]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"Unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(c.name for c in CASES)}.")
    cases = [c for c in CASES if c.name in names]
    if args.smoke:
        cases = [smoke_case(c) for c in cases]

    t0 = time.perf_counter()
    res = {"format": "distill-benchmark-speed", "format_version": REPORT_VERSION, "smoke": args.smoke,
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
           "command": "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
           "device": {"type": device.type,
                      "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"},
           "software": software_versions(), "seconds": 0.0}

    def save():
        # After every section, so a run cut short still leaves what it measured.
        res["seconds"] = time.perf_counter() - t0
        write_json(out.with_suffix(".json"), res)
        with atomic_path(out) as tmp:
            tmp.write_text(render(res) + _cpu_section(out))

    if args.keep:
        old = json.loads(Path(args.keep).read_text())
        kept = [k for k in ("mtt", "steps_memory_case", "steps_memory", "experts", "disk", "precision", "compile")
                if k in old]
        res |= {k: old[k] for k in kept}
        res["kept_from"] = {"date": old.get("date"), "device": old.get("device", {}).get("name"),
                            "command": old.get("command"), "note": old.get("note"), "sections": kept}
    if "pipeline" in sections:
        p = PIPELINES[args.pipeline or device.type]
        res["pipeline"] = pipeline_section(p, device, Path(args.data_dir), Path(args.old_repo) if args.old_repo else None)
        save()
    if "mtt" in sections:
        res["mtt"] = []
        for case in cases:  # saved after each case, so a run cut short keeps the cases it finished
            res["mtt"] += mtt_section([case], device, args.channels_last)
            save()
    if "steps" in sections and cases:
        base = cases[0]
        steps = (base.syn_steps, 2 * base.syn_steps) if args.smoke else (10, 30)
        res["steps_memory_case"] = base.name
        res["steps_memory"] = steps_memory_section(base, device, steps)
        save()
    if "experts" in sections:
        benches = [smoke_expert(b) for b in EXPERT_BENCHES] if args.smoke else list(EXPERT_BENCHES)
        res["experts"] = expert_section(benches, device)
        save()
    if "storage" in sections:
        disk_cases = cases or [smoke_case(c) if args.smoke else c for c in CASES]
        res["disk"] = disk_section(disk_cases, REFERENCE_SNAPSHOTS)
        trajectories = [buffer_trajectory(b) for b in args.buffer.split(",")] if args.buffer else \
            [synthetic_trajectory(device, args.smoke)]
        res["precision"] = [precision_section(snaps, info, device) for snaps, info in trajectories]
        save()
    wanted = args.compile_cases if args.compile_cases is not None else ("medmnist28_ipc10,cifar_ipc10" if device.type == "cuda" else "")
    compile_cases = [c for c in cases if c.name in set(filter(None, wanted.split(",")))]
    if "compile" in sections and compile_cases:
        res["compile"] = compile_section(compile_cases, device)
        save()
    if "opcount" in sections:
        res["opcount"] = opcount_section()
        save()
    if "iteration" in sections:
        res["iteration"] = iteration_section(device)
        save()
    log(f"Wrote {out} and {out.with_suffix('.json')} in {res['seconds']:.0f} s.")


if __name__ == "__main__":
    main()
