#!/usr/bin/env bash
# The one script to run on a lent GPU: prints the card, runs the test suite on CUDA, then the perf
# sweep (torch.compile included) within 8 minutes in all on an H100, and writes
#   ${OUT:-perf/results}/<YYYY-MM-DD>-<card>/{results.csv,results.json,<op>.png x6}
# (8 files: the device tool returns at most 8, so with OUT set the log stays in /tmp and on stdout;
# without OUT it is written beside the results as gpu_check.log).  Run from the repository root, no install needed:
#   bash perf/gpu_check.sh
# Environment: OUT (output root), GPU_CHECK_BUDGET_S (total seconds, default 470),
# TESTS_BUDGET_S (seconds for the test suite, default 210), PERF_COMPARE (a baseline results.json:
# adds the regression gate), PERF_ARGS (extra arguments for python -m perf).
set -u
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
TOTAL=${GPU_CHECK_BUDGET_S:-470}
TESTS_BUDGET=${TESTS_BUDGET_S:-210}

CARD=$(python -c "import torch; from perf.cli import card_name; print(card_name(torch.device('cuda')) if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
DIR="${OUT:-perf/results}/$(date -u +%Y-%m-%d)-${CARD}"
mkdir -p "$DIR"
if [ -n "${OUT:-}" ]; then LOG=/tmp/tkern_gpu_check.log; else LOG="$DIR/gpu_check.log"; fi
exec > >(tee "$LOG") 2>&1
TEE_PID=$!

echo "== tkern gpu_check $(date -u +%FT%TZ) commit $(git describe --always --dirty 2>/dev/null || echo unknown)"
nvidia-smi || echo "nvidia-smi not available"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"

echo "== test suite on CUDA (at most ${TESTS_BUDGET}s)"
timeout "$TESTS_BUDGET" python -m pytest -q -x -p no:cacheprovider tests
TESTS_RC=$?
[ "$TESTS_RC" = 124 ] && echo "== tests: stopped after ${TESTS_BUDGET}s (time budget), not all ran"
echo "== tests exit status: $TESTS_RC"

# The sweep gets what is left, less 75 s: a measurement that overruns the budget (the harness checks
# it between measurements), the plots, and a margin.  Past budget + 35 s, `timeout` sends SIGTERM,
# on which the harness stops and still writes its outputs; 15 s later it is killed.
ELAPSED=$(( $(date +%s) - START ))
SWEEP_BUDGET=$(( TOTAL - ELAPSED - 75 ))
[ "$SWEEP_BUDGET" -lt 60 ] && SWEEP_BUDGET=60
echo "== perf sweep (budget ${SWEEP_BUDGET}s)"
GATE=()
[ -n "${PERF_COMPARE:-}" ] && GATE=(--compare "$PERF_COMPARE" --max-slowdown "${PERF_MAX_SLOWDOWN:-0.10}")
# bf16 (the training dtype that matters), three batch sizes, every op, shape and layout; torch.compile
# with torch's default shape handling (static first, the batch dimension dynamic after one
# recompile: two compiles per case).  Shortened do_bench windows keep the sweep inside the budget,
# which the harness shares equally between ops; when it runs out the harness stops cleanly and
# still writes its outputs.
timeout -k 15 $(( SWEEP_BUDGET + 35 )) python -m perf --dtypes bfloat16 --batches 16,64,256 \
  --warmup-ms 5 --rep-ms 25 --time-budget "$SWEEP_BUDGET" --out "$DIR" ${PERF_ARGS:-} "${GATE[@]}"
PERF_RC=$?
echo "== perf exit status: $PERF_RC (sum of 1: a provider failed its check, 4: gate, 8: interrupted; 124/137: killed)"
echo "== the issues' performance targets on this sweep (python -m perf.targets)"
[ -f "$DIR/results.json" ] && python -m perf.targets "$DIR/results.json"
echo "== done in $(( $(date +%s) - START ))s; outputs in $DIR:"
ls -l "$DIR"
RC=0
[ "$TESTS_RC" = 0 ] && [ "$PERF_RC" = 0 ] || RC=1
# let tee finish the log before the outputs are collected
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$RC"
