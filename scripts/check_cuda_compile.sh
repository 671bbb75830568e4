#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu to an object file with the machine's nvcc (sm_90, no torch
# headers, no GPU needed) so the CUDA kernels cannot rot silently on a CPU-only CI.
#
#     scripts/check_cuda_compile.sh            # uses $CUDA_HOME/bin/nvcc or nvcc on PATH
#
# The kernels include only the CUDA runtime and csrc/cuda/*.{h,cuh}; the torch-facing launchers
# (csrc/cuda/ops_cuda.cpp) need a CUDA build of torch and are compiled by setup.py on a GPU host.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"
  elif command -v nvcc >/dev/null 2>&1; then NVCC="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc
  else echo "check_cuda_compile: nvcc not found (set CUDA_HOME or NVCC)" >&2; exit 2; fi
fi
OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT
"$NVCC" --version | tail -n 1
shopt -s nullglob
files=("$ROOT"/csrc/cuda/*.cu)
if (( ${#files[@]} == 0 )); then echo "check_cuda_compile: no .cu files" >&2; exit 1; fi
pids=(); names=()
for f in "${files[@]}"; do
  name="$(basename "$f" .cu)"
  # -Werror=all-warnings: kernels must compile warning-free; -Xptxas -v reports registers/spills.
  "$NVCC" -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr -Werror all-warnings \
    -Xptxas -warn-spills -I"$ROOT/csrc" -c "$f" -o "$OUT_DIR/$name.o" \
    >"$OUT_DIR/$name.log" 2>&1 &
  pids+=($!); names+=("$name")
done
status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "ok    csrc/cuda/${names[$i]}.cu"
  else
    echo "FAIL  csrc/cuda/${names[$i]}.cu"; status=1
  fi
  cat "$OUT_DIR/${names[$i]}.log"
done
exit $status
