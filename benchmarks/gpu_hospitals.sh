#!/usr/bin/env bash
# Issue 13's targets on a GPU in one device call of about 8 minutes: benchmarks/hospitals.py's gpu6 profile
# (PneumoniaMNIST, 6 sites, alpha 0.3). Prints the rendered section even when the budget runs out first.
#
# hospitals.py starts no new step after --budget-minutes; a step already started runs on, so the whole
# script is also under `timeout`, after which the table is rendered from the finished steps. Steps are
# recorded in .hospitals-gpu/ (ignored), so a second call on the still-warm machine continues the first.
#
# Before the call, here, once (in the repository root), as for benchmarks/gpu_check.sh:
#   mkdir -p .gpudata && cp ../shared/data/pneumoniamnist.npz .gpudata/      # data does not travel otherwise
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl kornia==0.9.0 kornia_rs==0.2.0    # the GPU machine lacks kornia
# The call: run(command="bash benchmarks/gpu_hospitals.sh", carry=[".whl", ".gpudata"], timeout_s=540).
# Back in $OUT: summary.txt (the section), hospitals.md (docs/hospitals.md with the gpu6 section merged),
# results.tgz (step records, split.json, eval JSONs and the six shares) and the last lines of the log.
set -u
OUT=${OUT:-/tmp/gpu-hospitals}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BUDGET:-470}  # seconds for everything, leaving the call's limit room for rendering and packing
WORK=${WORK:-$PWD/.hospitals-gpu}
PROFILE=${PROFILE:-gpu6} DEVICE=${DEVICE:-cuda}  # PROFILE=smoke DEVICE=cpu rehearses the script on a CPU
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 DISTILL_DATA="${DISTILL_DATA:-$PWD/.gpudata}"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch, kornia; print('torch', torch.__version__, 'kornia', kornia.__version__)"; } \
  > "$OUT/summary.txt" 2>&1
cp docs/hospitals.md "$OUT/hospitals.md"
left=$(( BUDGET - ($(date +%s) - START) ))
# No new step in the last ~2.5 minutes: a distillation step of this profile is estimated at 1 to 2 minutes.
minutes=$(python3 -c "print(max(0.0, ($left - 150) / 60))")
timeout "$(( left > 30 ? left - 20 : 10 ))" python3 benchmarks/hospitals.py --profile "$PROFILE" --device "$DEVICE" \
  --budget-minutes "$minutes" --work "$WORK" --out "$OUT/hospitals.md" > "$OUT/run.log" 2>&1
echo "hospitals.py: exit $? after $(( $(date +%s) - START )) s (124: timed out; rendered below from finished steps)" \
  >> "$OUT/summary.txt"
python3 benchmarks/hospitals.py --profile "$PROFILE" --render-only --work "$WORK" --out "$OUT/hospitals.md" \
  > "$OUT/section.md" 2>> "$OUT/run.log"
cat "$OUT/section.md" >> "$OUT/summary.txt"
( cd "$WORK" 2>/dev/null && tar czf "$OUT/results.tgz" $(ls -d steps pneumoniamnist/central.json \
    pneumoniamnist/sites*/split/split.json pneumoniamnist/sites*/*.json pneumoniamnist/sites*/site-*/share.h5 \
    2>/dev/null) ) 2>> "$OUT/run.log"
tail -40 "$OUT/run.log" > "$OUT/run-tail.log"
rm -f "$OUT/run.log" "$OUT/section.md"
cat "$OUT/summary.txt"
