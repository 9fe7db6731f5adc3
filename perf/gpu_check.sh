#!/usr/bin/env bash
# The one script to run on a lent GPU (one run of at most 8 minutes, H100/H200): a complete verdict
# in summary.txt even when the run is cut.  From the repository root, nothing to install:
#   bash perf/gpu_check.sh             # GPU: ~7.5 minutes in all, JIT included
#   bash perf/gpu_check.sh --dry-run   # CPU: every phase on tiny budgets in the interpreter (CI)
# Writes ${OUT:-perf/results}/<YYYY-MM-DD>-<card>/ with four files (the device tool returns at most
# 8 files and the last 12,000 characters of output):
#   summary.txt (<= 120 lines: card, versions, commit, phases, test counts and each failure's first
#   line, every performance target PASS/FAIL with its ratio, a per-op table), gpu_check.log (the
#   full log), results.json and results.csv (the sweep).  stdout carries only the phase lines and,
#   last, summary.txt.  PNGs: redraw them anywhere with `python -m perf.plot DIR`.
# Device tool: carry perf/wheels (git-ignored) so that expecttest (torch's OpInfo tests skip
# without it) and flag_gems (the peer provider) are there; fetch them once with
#   pip download expecttest flag_gems==5.0.2 sqlalchemy==2.0.48 --no-deps -d perf/wheels
# They are installed into a temporary folder (never into the image) when not importable.
#
# Phases, in order of value, each with its own budget; the summary is rewritten after each one:
#   1 tests-gpu   tests/test_gpu.py, serially (their timings want an idle GPU): CUDA-graph replay,
#                 no host sync, fp16/bf16 rounding, > 2^31 elements, tiny-call latency.  ~20 tests,
#                 ~25 kernel specialisations to JIT.
#   2 perf        the sweep (every provider checked, then timed) and the issues' targets: speed has
#                 never been measured, and the check catches a wrong kernel on realistic shapes.
#   3 tests-suite the rest of the suite on CUDA, 8 workers, --maxfail bounded.  Left out:
#                 tests/test_gpu_compile.py (compile-only: CPU CI already runs it) and
#                 tests/test_perf.py (phase 2 runs the same harness for real; its quick sweeps
#                 would spend ~1 min in torch.compile).
# Suite budget, from the measured number of specialisations: the suite launches 990 distinct kernel
# specialisations (counted 2026-12-01 on CPU with perf/speccount.py, a hook on the interpreter's
# launcher keyed like Triton's JIT cache: kernel, constexprs, dtypes, 16-byte alignment, integer
# specialisation, num_warps; torch 2.13 + triton 3.9, expecttest present; 1036 summed over 2 xdist
# workers, i.e. ~5% compiled twice).  At ~1 s of JIT each over 8 workers: ~130 s, plus ~25 s to
# start 8 workers (torch import, CUDA context) and ~30 s running tests: 185 s.
# A phase past its budget gets SIGINT (pytest and the harness then stop and still report; 16 s for
# pytest -n 2 in the CPU dry run), and SIGKILL 20 s later.  Budgets: 15 (set-up) + 60 + 165+25 +
# 185 + 5 (summary) = 455 s (GPU_CHECK_BUDGET_S); a phase never starts with more than what is
# left of that, so only the phase that is cut can overrun, by its 20 s stop: <= 475 s < 8 min.
# Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET_S (455), GPU_TESTS_BUDGET_S (60),
# PERF_BUDGET_S (165), SUITE_BUDGET_S (185), TEST_WORKERS (8), MAX_FAIL (25), PERF_DTYPES
# (bfloat16), PERF_ARGS (extra harness arguments), PERF_COMPARE (a baseline results.json: adds the
# regression gate).
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: bash perf/gpu_check.sh [--dry-run]  (the header of this file says more)" >&2; exit 2 ;;
esac
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tkern_gpu_check.XXXXXX")
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  # Tiny budgets: the suite phase is cut on purpose (the SIGINT path runs every time).
  GPU_B=${GPU_TESTS_BUDGET_S:-60}; PERF_B=${PERF_BUDGET_S:-20}; SUITE_B=${SUITE_BUDGET_S:-45}
  WORKERS=${TEST_WORKERS:-2}
  PERF_SWEEP=(--quick --ops activation_dropout,lrn,wn --batches 1,2 --modes fwd,full
              --layouts contiguous --dtypes float32)
else
  GPU_B=${GPU_TESTS_BUDGET_S:-60}; PERF_B=${PERF_BUDGET_S:-165}; SUITE_B=${SUITE_BUDGET_S:-185}
  WORKERS=${TEST_WORKERS:-8}
  # bf16 (the training dtype that matters), three batch sizes, every op, shape and layout;
  # shortened do_bench windows; the harness shares its budget equally between ops.
  PERF_SWEEP=(--dtypes "${PERF_DTYPES:-bfloat16}" --batches 16,64,256 --warmup-ms 5 --rep-ms 25)
fi
MAXFAIL=${MAX_FAIL:-25}

CARD=$("$PY" -c "import torch; from perf.cli import card_name; print(card_name(torch.device('cuda')) if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
# a dry run's outputs go to the git-ignored perf/out unless OUT says otherwise
DEFAULT_OUT=perf/results
[ "$DRY" = 1 ] && DEFAULT_OUT=perf/out
DIR="${OUT:-$DEFAULT_OUT}/$(date -u +%Y-%m-%d)-${CARD}$([ "$DRY" = 1 ] && echo -dry-run)"
mkdir -p "$DIR"
rm -f "$DIR"/summary.txt "$DIR"/gpu_check.log "$DIR"/results.json "$DIR"/results.csv
LOG="$DIR/gpu_check.log"
exec 3>&1 >>"$LOG" 2>&1   # everything to the log; fd 3 is the terminal
say() { echo "$*"; echo "$*" >&3; }
summary() { "$PY" perf/summary.py "$WORK" "$DIR" || say "summary writer failed (see log)"; }

say "== tkern gpu_check $(date -u +%FT%TZ) $([ "$DRY" = 1 ] && echo 'DRY RUN ')-> $DIR (log: gpu_check.log)"
nvidia-smi || echo "nvidia-smi not available"

# Pure-Python test needs, carried as wheels: installed into $WORK/site when not importable.
for pair in expecttest:expecttest sqlalchemy:sqlalchemy flag_gems:flag_gems; do
  mod=${pair%%:*}; whl=${pair#*:}
  "$PY" -c "import $mod" 2>/dev/null && continue
  set -- perf/wheels/${whl}-*.whl
  if [ -f "$1" ]; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$1"; then
      echo "installed $1 into $WORK/site"
    else
      echo "pip failed for $1: putting the wheel itself on PYTHONPATH (zipimport)"
      export PYTHONPATH="$PYTHONPATH:$PWD/$1"
    fi
  else
    echo "$mod is missing and perf/wheels has no ${whl} wheel"
  fi
done
[ -d "$WORK/site" ] && export PYTHONPATH="$PYTHONPATH:$WORK/site"

"$PY" - "$WORK/env.json" "$DRY" <<'EOF' || echo "environment probe failed"
import json, platform, subprocess, sys, datetime
env = {"dry_run": sys.argv[2] == "1", "python": platform.python_version(),
       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
try:
    env["commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                   text=True, timeout=10).stdout.strip() or "unknown"
except Exception:
    env["commit"] = "unknown"
import numpy, torch, triton
env.update(torch=torch.__version__, triton=triton.__version__, numpy=numpy.__version__,
           cuda=torch.version.cuda or "-")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        drv = "?"
    env["card"] = (f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                   f"{p.total_memory / 2**30:.0f} GiB, driver {drv}")
else:
    env["card"] = f"none: CPU ({platform.machine()}), kernels in Triton's interpreter"
extras = {}
for mod in ("expecttest", "flag_gems"):
    try:
        m = __import__(mod)
        where = "carried wheel" if "tkern_gpu_check" in (m.__file__ or "") else "installed"
        try:
            from importlib.metadata import version
            v = version(mod)
        except Exception:
            v = getattr(m, "__version__", "?")
        extras[mod] = f"{v} ({where})"
    except Exception as e:
        extras[mod] = f"absent ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"
env["extras"] = extras
json.dump(env, open(sys.argv[1], "w"), indent=1)
EOF
: >"$WORK/phases.tsv"
summary

# run_phase NAME BUDGET KILL_GRACE CMD...: timeout with SIGINT, then the phase's line and summary
run_phase() {
  local name=$1 budget=$2 grace=$3; shift 3
  local left=$(( (START + ${GPU_CHECK_BUDGET_S:-455}) - $(date +%s) ))
  [ "$DRY" = 0 ] && [ "$budget" -gt "$left" ] && budget=$(( left > 10 ? left : 10 ))
  say "== phase $name (budget ${budget}s): $*"
  local t0=$(date +%s)
  timeout -s INT -k 20 $(( budget + grace )) "$@"
  local rc=$?
  local used=$(( $(date +%s) - t0 ))
  [ "$rc" = 130 ] && rc=124  # pytest's own exit status on SIGINT
  printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$used" "$rc" >>"$WORK/phases.tsv"
  say "== phase $name: exit $rc after ${used}s"
  summary
  return 0
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p perf.pytest_outcomes -o addopts= -rfE
        --tb=short)
TKERN_OUTCOMES="$WORK/outcomes-tests-gpu.jsonl" TKERN_GPU_REPORT="$WORK/gpu-report.jsonl" \
  run_phase tests-gpu "$GPU_B" 0 "${PYTEST[@]}" tests/test_gpu.py

GATE=()
[ -n "${PERF_COMPARE:-}" ] && GATE=(--compare "$PERF_COMPARE" --max-slowdown "${PERF_MAX_SLOWDOWN:-0.10}")
# The harness stops starting measurements at its budget; the grace covers the measurement in
# flight and writing the outputs.
run_phase perf "$PERF_B" 25 "$PY" -m perf "${PERF_SWEEP[@]}" --time-budget "$PERF_B" --no-plots \
  --no-progress --out "$DIR" ${PERF_ARGS:-} "${GATE[@]}"
if [ -f "$DIR/results.json" ]; then
  "$PY" -m perf.targets "$DIR/results.json" >"$WORK/targets.txt"
  cat "$WORK/targets.txt"
  summary
fi

TKERN_OUTCOMES="$WORK/outcomes-tests-suite.jsonl" \
  run_phase tests-suite "$SUITE_B" 0 "${PYTEST[@]}" -n "$WORKERS" --maxfail "$MAXFAIL" \
  --ignore tests/test_gpu.py --ignore tests/test_gpu_compile.py --ignore tests/test_perf.py tests

say "== done in $(( $(date +%s) - START ))s"
summary
RC=0
"$PY" perf/summary.py --verdict "$WORK" "$DIR" >&3 || RC=1
if [ "$DRY" = 1 ]; then
  # The dry run checks the script itself: every phase ran, the layout, the summary's shape, and
  # that the plots can be redrawn from results.json.
  "$PY" perf/summary.py --check-layout "$WORK" "$DIR" >&3 || RC=1
  if "$PY" -c "import matplotlib" 2>/dev/null; then
    "$PY" -m perf.plot "$DIR" --out "$WORK/plots" || { say "perf.plot failed"; RC=1; }
  else
    say "matplotlib not installed: python -m perf.plot not exercised"
  fi
fi
cat "$DIR/summary.txt" >&3
rm -rf "$WORK"
exit "$RC"
