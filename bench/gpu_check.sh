#!/usr/bin/env bash
# GPU check (a machine with an NVIDIA GPU, no network): build the CUDA extension, run every
# CUDA/Triton test and the GPU benchmarks of every fused op, a fused-engine round on the GPU,
# and print a table last. Target: under 8 minutes on one H100/H200.
# Usage: bash bench/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/fsl_fast_gpu_check}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
PY=${PYTHON:-python3}
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUTDIR/device.txt"

stamp "build (CUDA extension, sm_90)"
# One module for this machine (FSL_FAST_MARCH=native): the default pair would compile the CUDA
# kernels twice, once into each module.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FSL_FAST_CUDA=1 FSL_FAST_MARCH=${FSL_FAST_MARCH-native}
if ! $PY setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1; then
  grep -E "error|Error" "$OUTDIR/build.log" | head -40
  tail -40 "$OUTDIR/build.log"
  echo "BUILD FAILED"; exit 1
fi
$PY -m fsl_fast.env | tee -a "$OUTDIR/device.txt"

stamp "CUDA + Triton tests"
$PY -m pytest -q -p no:cacheprovider tests/test_quantize.py tests/test_fedavg.py tests/test_flat.py \
  tests/test_aux.py tests/test_aux_conv.py tests/test_layers.py tests/test_codec.py tests/triton 2>&1 | tail -25 | tee "$OUTDIR/tests.txt"

stamp "GPU benchmarks"
B="--benchmark-only -q -p no:cacheprovider --benchmark-min-rounds=3 --benchmark-max-time=0.1"
$PY -m pytest bench/bench_quantize.py -k test_gpu $B --benchmark-json="$OUTDIR/bq.json" 2>&1 | tail -3
$PY -m pytest bench/bench_fedavg.py -k test_gpu $B --benchmark-json="$OUTDIR/bf.json" 2>&1 | tail -3
$PY -m pytest bench/bench_aux.py -k cuda $B --benchmark-json="$OUTDIR/ba.json" 2>&1 | tail -3
$PY -m pytest bench/bench_codec.py -k test_gpu -s $B --benchmark-json="$OUTDIR/bc.json" 2>&1 | tail -24

stamp "fused engine on the GPU (fsl_sage, resnet18, 10 clients, synthetic 32x32)"
PYTHONPATH=. $PY tools/gpu_round.py 2>&1 | tail -12 | tee "$OUTDIR/round.txt"

stamp "table"
$PY tools/bench_table.py "$OUTDIR"/bq.json "$OUTDIR"/bf.json "$OUTDIR"/ba.json | tee "$OUTDIR/table.md"
cat "$OUTDIR/round.txt"
stamp "done"
