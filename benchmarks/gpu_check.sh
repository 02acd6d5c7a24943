#!/usr/bin/env bash
# The one GPU check of issue 11, prepared to run in under 8 minutes; prints a summary even where parts time out.
#
# What it runs, each under its own `timeout`, writing into $OUT (at most 8 files come back):
#   1. benchmarks/engine_check.py: the captured MTT iteration against the same function eagerly
#      (ms, gradient agreement, host operators per replay), T = 1 and 4, both gradient modes.
#   2. speed.py --sections pipeline: distill buffer, run, export, eval on PneumoniaMNIST at the
#      reference's reduced protocol, as the CLI runs them.
#   3. speed.py --sections mtt: the four cases of ../shared/BENCHMARKS.md, in two runs.
#
# Before the call, here, once (in the repository root):
#   echo /.whl/ >> .git/info/exclude; echo /.gpudata/ >> .git/info/exclude
#   mkdir -p .gpudata && cp ../shared/data/pneumoniamnist.npz .gpudata/      # data does not travel otherwise
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl kornia==0.9.0 kornia_rs==0.2.0    # the GPU machine lacks kornia (distill imports it lazily)
# The call: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpudata"], timeout_s=540).
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BUDGET:-460}  # seconds for everything, leaving the call's limit room for the summary
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 DISTILL_DATA="$PWD/.gpudata"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/summary.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__)" >> "$OUT/summary.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a deadline, record its exit status
  local name=$1 secs=$2; shift 2
  (( secs > $(left) )) && secs=$(left)
  if (( secs < 20 )); then echo "$name: skipped (no time left)" >> "$OUT/summary.txt"; return; fi
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - START )) s$([ $rc = 124 ] && echo ' (timed out)')" >> "$OUT/summary.txt"
}

step engine 120 python3 benchmarks/engine_check.py
step pipeline 170 python3 benchmarks/speed.py --device cuda --sections pipeline --data-dir .gpudata --out "$OUT/pipeline.md"
step mtt_small 110 python3 benchmarks/speed.py --device cuda --sections mtt --cases medmnist28_ipc10,cifar_ipc10 \
  --out "$OUT/mtt-small.md"
step mtt_large 100 python3 benchmarks/speed.py --device cuda --sections mtt --cases cifar_ipc50,cxr128_ipc20 \
  --out "$OUT/mtt-large.md"

{
  echo "== engine"; grep -v "^{\"engine_check\"" "$OUT/engine.log" | tail -8
  for f in pipeline mtt-small mtt-large; do
    echo "== $f"; [ -f "$OUT/$f.md" ] && sed -n '/^| /p' "$OUT/$f.md" | head -30 || echo "(no report)"
    log="$OUT/${f/-/_}.log"; [ -f "$log" ] && { echo "-- last lines of its log"; tail -6 "$log"; }
  done
} >> "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
# At most 8 files come back: the summary, engine.log and the reports (.md and .json) stay.
rm -f "$OUT/pipeline.log" "$OUT/mtt_small.log" "$OUT/mtt_large.log"
