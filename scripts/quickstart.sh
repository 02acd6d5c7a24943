#!/usr/bin/env bash
# The whole pipeline on real data (BreastMNIST from ../shared/data) with quick CPU settings:
# a few minutes on 2 cores. What it prints shows the pipeline working; it is not the method's
# accuracy (see docs/results.md). DATA=pneumoniamnist runs the same on PneumoniaMNIST (slower).
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/distill
OUT=${1:-out/quickstart}
DATA=${DATA:-breastmnist}
mkdir -p "$OUT"

# BreastMNIST has 3 optimiser steps per epoch, so snapshot every step (docs/method.md).
$D buffer --data "$DATA" --out "$OUT/buffer" --experts 2 --epochs 5 --snapshot-every 1 --seed 0 --device cpu
$D run --buffer "$OUT/buffer" --out "$OUT/run" --ipc 2 --iterations 30 --syn-steps 10 --expert-epochs 2 \
    --max-start-epoch 8 --seed 0 --device cpu
$D audit "$OUT/run" --data "$DATA" --json "$OUT/audit.json" --networks 1 --epochs 50 || true  # export decides below
$D export "$OUT/run" --out "$OUT/share.h5" --force --description "quickstart demo share"
$D inspect "$OUT/share.h5" --grid "$OUT/share.png"
$D eval "$OUT/share.h5" --test "$DATA" --runs 2 --epochs 50 --json "$OUT/eval.json" --device cpu
