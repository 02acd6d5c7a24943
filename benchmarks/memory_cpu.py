"""Peak memory of `distill run` on the CPU against the number of student steps (issue 28, item 5).

    python benchmarks/memory_cpu.py --out /tmp/memory-cpu [--sizes 28,64] [--steps 10,20,40] [--gradients auto,full]

Generated data: an image folder of 6 classes x 24 images per size (smooth random patterns, seed 0,
RGB PNGs), one expert of 1 epoch (a snapshot every step), then `distill run` with 2 images per class
(12 synthetic images), 2 iterations, no validation, one process per run so that each peak is its
own. The peak is the process's peak RSS as `distill run` writes it into metrics.jsonl
(`peak_rss_mb`, from getrusage), and the gradient is what `--gradient auto` chose (its "memory"
record). `full` at 64 px and 40 steps would need about 25 GiB; --skip-full-over GIB leaves out full
unrolls whose estimate is above that. Prints one JSON line per run and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS, IPC = 6, 24, 2


def make_folder(root: Path, size: int, seed: int = 0) -> Path:
    """root/c{k}/img{i}.png: each class a smooth colour field of its own plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / f"gen{size}"
    if folder.exists():
        return folder
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k in range(CLASSES):
        (folder / f"c{k}").mkdir(parents=True)
        base = np.stack([np.sin((k + 1) * np.pi * xx + c) * np.cos((k + 2) * np.pi * yy) for c in range(3)], -1)
        for i in range(PER_CLASS):
            img = 0.5 + 0.3 * base + 0.2 * rng.standard_normal((size, size, 3))
            Image.fromarray((255 * img.clip(0, 1)).astype(np.uint8)).save(folder / f"c{k}" / f"img{i}.png")
    return folder


def cli(args: list[str], log: Path) -> float:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    return time.perf_counter() - t


def measure(root: Path, size: int, steps: int, gradient: str, max_memory: float | None) -> dict:
    data = make_folder(root, size)
    buffer = root / f"buffer{size}"
    if not (buffer / "expert_0000.h5").exists():
        cli(["buffer", "--data", str(data), "--out", str(buffer), "--experts", "1", "--epochs", "1",
             "--snapshot-every", "1", "--batch-size", "32", "--seed", "0", "--device", "cpu"], root / f"buffer{size}.log")
    out = root / f"run{size}_{steps}_{gradient}"
    config = root / "no_eval.toml"
    config.write_text("eval_models = 0\n")
    args = ["run", "--buffer", str(buffer), "--out", str(out), "--ipc", str(IPC), "--iterations", "2",
            "--syn-steps", str(steps), "--expert-epochs", "1", "--max-start-epoch", "0", "--hard-labels",
            "--eval-every", "0", "--gradient", gradient, "--seed", "0", "--device", "cpu", "--config", str(config)]
    if max_memory is not None:
        args += ["--max-memory", str(max_memory)]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    wall = cli(args, root / f"{out.name}.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in records if r.get("kind") == "iteration"]
    chose = next((r for r in records if r.get("kind") == "memory"), {})
    return {"size": size, "syn_steps": steps, "asked": gradient, "gradient": chose.get("gradient", gradient),
            "estimate_gib": chose.get("full_unroll_estimate_gib"), "budget_gib": chose.get("max_memory_gib"),
            "peak_rss_gib": max(r["peak_rss_mb"] for r in its) / 1024,
            "s_per_iteration": sorted(r["seconds"] for r in its)[len(its) // 2], "wall_s": wall,
            "load_avg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="28,64")
    ap.add_argument("--steps", default="10,20,40")
    ap.add_argument("--gradients", default="auto")
    ap.add_argument("--max-memory", type=float, default=None, help="passed to distill run (default: its own)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here (benchmarks/speed_cpu.py renders them)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in map(int, a.sizes.split(",")):
        for gradient in a.gradients.split(","):
            for steps in map(int, a.steps.split(",")):
                row = measure(a.out, size, steps, gradient, a.max_memory)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if a.json:
                    a.json.write_text(json.dumps({"command": "python benchmarks/memory_cpu.py " + " ".join(sys.argv[1:]),
                                                  "rows": rows}, indent=1))
    print("\n| px | student steps | asked | gradient used | full-unroll estimate GiB | budget GiB | peak RSS GiB "
          "| s / iteration | load avg |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        est = "—" if r["estimate_gib"] is None else f"{r['estimate_gib']:.2f}"
        bud = "—" if r["budget_gib"] is None else f"{r['budget_gib']:.2f}"
        print(f"| {r['size']} | {r['syn_steps']} | {r['asked']} | {r['gradient']} | {est} | {bud} | "
              f"{r['peak_rss_gib']:.2f} | {r['s_per_iteration']:.2f} | {r['load_avg']:.1f} |")


if __name__ == "__main__":
    main()
