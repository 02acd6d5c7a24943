#!/usr/bin/env bash
# The whole pipeline on real data, about 3 minutes on 2 CPU cores: RetinaMNIST (5 classes, RGB,
# 1,080 training images, from ../shared/data) distilled to 1 image per class with hard labels, then
# evaluated beside a random real image per class, the full training set (briefly) and the majority
# class. The last lines say whether the 5 learned images beat 5 random real ones by at least 5 points.
# Settings were chosen on the validation split (distill run's check); docs/results.md has longer runs.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/distill
PY=.venv/bin/python
# One thread per process: at 28x28 a second thread buys no speed (2.8 s per expert epoch either way, measured),
# and on a busy machine two threads per process slowed distill run from ~3 s to ~20 s an iteration.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${1:-out/quickstart}
DATA=retinamnist
mkdir -p "$OUT"
rm -rf "$OUT/buffer" "$OUT/run"  # a fresh run each time: distill run refuses a folder that holds one

# 2 experts x 4 epochs, a snapshot per epoch (5 optimiser steps); match 2 epochs from starts 0 to 2.
$D buffer --data "$DATA" --out "$OUT/buffer" --experts 2 --epochs 4 --seed 0 --device cpu
# 30 iterations of 10 student steps; validated once, at the end.
$D run --buffer "$OUT/buffer" --out "$OUT/run" --ipc 1 --iterations 30 --syn-steps 10 --expert-epochs 2 \
    --max-start-epoch 2 --hard-labels --eval-every 0 --seed 0 --device cpu
$D audit "$OUT/run" --data "$DATA" --json "$OUT/audit.json" --networks 1 --epochs 50 || true  # export decides below
$D export "$OUT/run" --out "$OUT/share.h5" --force --description "quickstart share: RetinaMNIST, 1 image per class"
$D inspect "$OUT/share.h5" --grid "$OUT/share.png"
# The share and a random real image per class, 3 networks each, on the test split (the share's recipe, 300 epochs);
# then the full training set, 3 networks of 2 epochs only (10 optimiser steps: a floor, not its best).
$D eval "$OUT/share.h5" --test "$DATA" --baseline random-real --runs 3 --seed 0 --device cpu --json "$OUT/eval.json"
$D eval --baseline full --train "$DATA" --runs 3 --epochs 2 --seed 0 --device cpu --json "$OUT/eval_full.json"
$PY scripts/summarize_eval.py "$OUT/eval.json" --full "$OUT/eval_full.json"
