#!/usr/bin/env bash
# The whole pipeline on real data, on 2 CPU cores: PneumoniaMNIST (normal or pneumonia, greyscale 28x28,
# 4,708 training images, from ../shared/data) distilled to 1 image per class with hard labels, audited, and
# exported only if the audit passes; then evaluated beside a random real image per class, the full training
# set (briefly) and the majority class. The last lines say whether the 2 learned images beat 2 random real
# ones by at least 5 points.
#
# How the dataset and settings were chosen, on the validation split only (never on test):
# - RetinaMNIST, the previous quickstart, cannot clear its majority class by 5 points: even the full
#   training set scores 45.3 % against a majority of 43.5 % (docs/results.md). BreastMNIST at 1 image per
#   class ties its majority class (docs/results.md). PneumoniaMNIST at 1 image per class, hard labels, did
#   not: 76.3 % against 65.5 % for random real and 62.5 % for the majority class (docs/results.md, CPU
#   profile), so it is the dataset here.
# - On one expert of 1 epoch with a snapshot every 2 steps (below), seven settings of `distill run` (30 or 60
#   iterations; 10 or 20 student steps; 2, 4 or 5 snapshots per target; starts up to 2, 4 or 6) were scored
#   by `distill eval` on PneumoniaMNIST's val split (a copy of the .npz whose test arrays are the val
#   arrays; 3 runs each, the share's 300-epoch recipe). All seven scored 76.7 to 78.2 %, within their
#   spread, against 71.1 ± 4.8 % for 1 random real image per class and 74.2 % for always "pneumonia".
#   The setting with the best mean val accuracy, 30 iterations of 10 student steps spanning 2 snapshots from
#   starts 0 to 2 (77.8 ± 2.6 % on val), is used. (A second criterion, the mean of the two per-class
#   accuracies on val, would pick 20 steps from starts 0 to 4; it was proposed only after this setting's
#   test result had been seen, so it is not used: choosing by it would be choosing on test.)
# The test split's class mix differs from train and val (62.5 % pneumonia against 74.2 %); that is MedMNIST's
# split, not a choice made here.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DISTILL:-.venv/bin/distill}
PY=${PYTHON:-.venv/bin/python}
# One thread per process; the two cores are used by running independent steps side by side.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${1:-out/quickstart}
DATA=pneumoniamnist
mkdir -p "$OUT"
rm -rf "$OUT/buffer" "$OUT/run" "$OUT/share.h5"  # a fresh run each time: distill run refuses a folder that holds one

# The full training set, 1 network of 1 epoch (19 optimiser steps: a floor, not its best). It needs nothing
# from the steps below, so it runs beside them on the second core.
$D eval --baseline full --train "$DATA" --runs 1 --epochs 1 --seed 0 --device cpu --json "$OUT/eval_full.json" \
    > "$OUT/eval_full.log" 2>&1 &
FULL=$!

# 1 expert x 1 epoch, a snapshot every 2 optimiser steps; match 2 snapshots (4 expert steps) from starts 0 to 2.
$D buffer --data "$DATA" --out "$OUT/buffer" --experts 1 --epochs 1 --snapshot-every 2 --seed 0 --device cpu
# 30 iterations of 10 student steps; validated once, at the end.
$D run --buffer "$OUT/buffer" --out "$OUT/run" --ipc 1 --iterations 30 --syn-steps 10 --expert-epochs 2 \
    --max-start-epoch 2 --hard-labels --eval-every 0 --seed 0 --device cpu

# The privacy gate: the share is written only if the audit passes (exit 3 = FAIL). The buffer's expert
# gives the audit its features, so it trains no network of its own for them.
status=0
$D audit "$OUT/run" --data "$DATA" --json "$OUT/audit.json" --networks 1 --epochs 50 \
    --expert "$OUT/buffer/expert_0000.h5" || status=$?
if [ "$status" -eq 3 ]; then
    echo "The audit FAILED, so no share is written. Read the remedies above, change the run (more images per" \
         "class, fewer iterations, or DP experts: docs/privacy.md), run it again and re-audit it." >&2
    kill "$FULL" 2>/dev/null || true
    exit 3
elif [ "$status" -ne 0 ]; then
    kill "$FULL" 2>/dev/null || true
    exit "$status"
fi
$D export "$OUT/run" --out "$OUT/share.h5" --description "quickstart share: PneumoniaMNIST, 1 image per class"
$D inspect "$OUT/share.h5" --grid "$OUT/share.png"
# The share and a random real image per class, 3 networks each, on the test split (the share's recipe, 300 epochs).
$D eval "$OUT/share.h5" --test "$DATA" --baseline random-real --runs 3 --seed 0 --device cpu --json "$OUT/eval.json"
wait "$FULL" || { cat "$OUT/eval_full.log" >&2; exit 1; }
$PY scripts/summarize_eval.py "$OUT/eval.json" --full "$OUT/eval_full.json"
