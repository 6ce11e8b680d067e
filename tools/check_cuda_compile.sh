#!/usr/bin/env bash
# Compile-check every CUDA kernel source for sm_90 with the installed nvcc (no GPU needed: the
# .cu files include only the CUDA runtime). Skips, saying why, when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: SKIPPED: nvcc not found (set NVCC=/path/to/nvcc)"
  exit 0
fi
shopt -s nullglob
files=(csrc/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "check_cuda_compile: no .cu files"; exit 0; fi
tmp=$(mktemp -d)
for f in "${files[@]}"; do
  "$NVCC" -c -O3 -std=c++17 -arch=sm_90 -o "$tmp/$(basename "$f").o" "$f"
  echo "check_cuda_compile: ok $f (sm_90, $("$NVCC" --version | tail -1))"
done
rm -rf "$tmp"
