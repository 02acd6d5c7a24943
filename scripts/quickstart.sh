#!/usr/bin/env bash
# The whole pipeline on real data (PneumoniaMNIST) with quick CPU settings: a few minutes on 2 cores.
# The numbers it prints show the pipeline working; they are not the method's accuracy (see docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/distill
OUT=${1:-out/quickstart}
DATA=${DATA:-pneumoniamnist}
mkdir -p "$OUT"

$D buffer --data "$DATA" --out "$OUT/buffer" --experts 2 --epochs 3 --seed 0 --device cpu
$D run --buffer "$OUT/buffer" --out "$OUT/run" --ipc 2 --iterations 20 --syn-steps 10 --expert-epochs 1 \
    --max-start-epoch 1 --seed 0 --device cpu
$D audit "$OUT/run" --data "$DATA" --json "$OUT/audit.json" || true   # a failed audit is reported, export decides
$D export "$OUT/run" --out "$OUT/share.h5" --force --description "quickstart demo share"
$D inspect "$OUT/share.h5" --grid "$OUT/share.png"
$D eval "$OUT/share.h5" --test "$DATA" --runs 2 --json "$OUT/eval.json" --device cpu
