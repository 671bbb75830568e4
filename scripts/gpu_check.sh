#!/usr/bin/env bash
# The one script to run on a lent GPU machine (H100/H200): build fastlla with its CUDA kernels,
# run the CUDA tests, the GPU benchmark, and compute-sanitizer (memcheck, racecheck) over every
# CUDA op. Every log and result lands in $OUT (default /tmp/fastlla_gpu_check); a failing stage
# does not stop the later ones; each stage has a timeout and the whole run a budget
# (GPU_CHECK_BUDGET seconds, default 360), so it ends in about 6 minutes at worst.
#
#     bash scripts/gpu_check.sh          # from the repository root
#
# Files written (at most 8, for the device tool): summary.txt, env.txt, build.log, pytest.log,
# sanitize.log, bench.log, bench_cuda.json.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-/tmp/fastlla_gpu_check}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET:-360}"
START=$SECONDS
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# run_stage NAME MAX_SECONDS LOGFILE CMD...: runs CMD with a timeout of min(MAX, budget left).
run_stage() {
  local name="$1" max="$2" log="$3"
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  if ((limit < 10)); then
    say "SKIP  $name (budget spent: $((SECONDS - START)) s of $BUDGET s)"
    return 99
  fi
  local t0=$SECONDS
  echo "===== $name (timeout ${limit}s): $*" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local verdict="ok"
  if ((rc == 124 || rc == 137)); then verdict="TIMEOUT"; elif ((rc != 0)); then verdict="FAIL(rc=$rc)"; fi
  say "$(printf '%-8s %-34s %4ss  -> %s' "$verdict" "$name" "$((SECONDS - t0))" "$(basename "$log")")"
  return $rc
}

# ---------------------------------------------------------------------------- environment
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3 /opt/torch/.venv/bin/python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
      PY="$(command -v "$cand")"
      break
    fi
  done
fi
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  echo "nvcc: $(command -v nvcc || echo missing) $(nvcc --version 2>/dev/null | tail -n 1)"
  echo "compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo missing)"
  echo "python: ${PY:-NONE WITH TORCH}"
} >"$OUT/env.txt" 2>&1
if [[ -z "$PY" ]]; then
  say "FATAL: no python with torch found on this machine (tried python3, /opt/torch/.venv/bin/python3, python)."
  say "       The CUDA build needs a CUDA build of PyTorch; nothing else can run."
  cat "$OUT/env.txt"
  exit 2
fi
"$PY" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1))
EOF
cat "$OUT/env.txt" | tee -a "$SUMMARY"
# GPU_CHECK_DRY=1: exercise this script's own flow on a machine without a GPU (no build).
DRY="${GPU_CHECK_DRY:-0}"
if [[ "$DRY" == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
  say "FATAL: torch on this machine is not a CUDA build or sees no GPU; the CUDA kernels cannot be built or run."
  exit 2
fi
SANITIZER="$(command -v compute-sanitizer || true)"
[[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer

# ---------------------------------------------------------------------------- 1. build
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}"
if [[ "$DRY" != 0 ]]; then
  run_stage "build (dry run: skipped)" 10 "$OUT/build.log" true
elif ! run_stage "build (pip install -e, CUDA)" 240 "$OUT/build.log" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
  # Fallback without pip (e.g. an old pip refusing the editable install).
  run_stage "build (setup.py build_ext --inplace)" 200 "$OUT/build.log" \
    "$PY" setup.py build_ext --inplace
fi
export FASTLLA_REQUIRE_NATIVE=1
run_stage "import + backend report" 60 "$OUT/build.log" \
  "$PY" -c "import fastlla._ops as o; print(o.backend_report()); print('cuda_version', o.cuda_version())"
grep -E "native library|CUDA=|cuda_version" "$OUT/build.log" | tail -n 12 >>"$SUMMARY"

# ---------------------------------------------------------------------------- 2. tests
run_stage "pytest test_ops.py -k cuda" 150 "$OUT/pytest.log" \
  "$PY" -m pytest -q -rfE --no-header -p no:cacheprovider tests/test_ops.py -k "cuda or device_mismatch"
tail -n 3 "$OUT/pytest.log" >>"$SUMMARY"

# ---------------------------------------------------------------------------- 3. smoke + bench
run_stage "cuda_sanitize.py (plain)" 60 "$OUT/sanitize.log" "$PY" scripts/cuda_sanitize.py
run_stage "bench/bench_ops_cuda.py" 90 "$OUT/bench.log" \
  "$PY" bench/bench_ops_cuda.py --json "$OUT/bench_cuda.json"
sed -n '/^| op/,$p' "$OUT/bench.log" >>"$SUMMARY"

# ---------------------------------------------------------------------------- 4. sanitizer
# Last: the slowest stages, the first the budget cuts.
if [[ -n "$SANITIZER" ]]; then
  # No caching allocator under the sanitizer: every tensor its own cudaMalloc, so an access
  # past the end of a tensor is out of bounds for memcheck rather than inside a cached block.
  for tool in memcheck racecheck; do
    run_stage "compute-sanitizer --tool $tool" 110 "$OUT/sanitize.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$tool" --print-limit 20 --error-exitcode 3 \
      "$PY" scripts/cuda_sanitize.py
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cuda_sanitize:" "$OUT/sanitize.log" >>"$SUMMARY"
else
  say "SKIP  compute-sanitizer (not found)"
fi

say "total $((SECONDS - START)) s"
echo "----- summary ($SUMMARY)"
cat "$SUMMARY"
