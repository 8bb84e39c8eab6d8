#!/usr/bin/env bash
# One script for a GPU machine (under 5 minutes on an H100/H200): compile the Triton kernels for this
# GPU, check each against its PyTorch reference through the ahead-of-time launcher and Triton's JIT,
# time the fp8 GEMM against bf16, check lossless decoding on the GPU, benchmark the NLD-8B shape, and
# print a table last. Writes JSON/PNG under $OUT when set. The ahead-of-time launcher needs
# cuda-python (`pip install 'nemodiff[gpu]'`); without it those checks fail with that message.
# Runs from a source checkout without installing: a shadow package tree maps the top-level folders.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$(mktemp -d)}
export OUT
pkg=$(mktemp -d)
mkdir -p "$pkg/nemodiff"
for f in "$repo"/nemodiff/*.py; do ln -s "$f" "$pkg/nemodiff/"; done
for sub in builder runtime plugins model_repo; do ln -s "$repo/$sub" "$pkg/nemodiff/$sub"; done
export PYTHONPATH="$pkg:$repo/tests${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import triton; print('triton', triton.__version__)" || true
"$PY" -c "from nemodiff.plugins.aot import cuda_driver; cuda_driver()" 2>/dev/null \
  || echo "cuda-python is missing: the ahead-of-time launcher checks will fail (pip install 'nemodiff[gpu]')"

status=0
timeout 150 "$PY" "$repo/tests/gpu/device_checks.py" 2>&1 | tee "$OUT/device_checks.log" || status=1
timeout 90 "$PY" "$repo/tests/gpu/model_checks.py" 2>&1 | tee "$OUT/model_checks.log" || status=1
timeout 100 "$PY" -m nemodiff.cli bench --shape nld-8b --dtype bf16 --batch-sizes 1,8,32 --context 1024 \
  --iters 10 --json "$OUT/bench_nld8b_bf16.json" --plot "$OUT/bench_nld8b_bf16.png" 2>&1 \
  | tee "$OUT/bench_bf16.log" || status=1
timeout 60 "$PY" -m nemodiff.cli bench --shape nld-8b --dtype fp8 --batch-sizes 1,32 --context 1024 --iters 10 \
  --no-hf --json "$OUT/bench_nld8b_fp8.json" --plot "$OUT/bench_nld8b_fp8.png" 2>&1 \
  | tee "$OUT/bench_fp8.log" || status=1
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
if [ "$gpus" -ge 2 ]; then  # tensor parallelism: NCCL, kernels and graphs per rank, the ratio to one GPU
  timeout 200 "$PY" "$repo/tests/gpu/tp_checks.py" 2>&1 | tee "$OUT/tp_checks.log" || status=1
  timeout 150 "$PY" -m nemodiff.cli bench --shape nld-8b --dtype bf16 --tp 2 --batch-sizes 1,8 --context 1024 \
    --iters 10 --no-hf --json "$OUT/bench_nld8b_tp2.json" --plot "$OUT/bench_nld8b_tp2.png" 2>&1 \
    | tee "$OUT/bench_tp2.log" || status=1
fi

echo
echo "=== summary ($(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)) ==="
[ -f "$OUT/bench_tp2.log" ] && grep -E "tensor parallel" "$OUT/bench_tp2.log" || true
"$PY" "$repo/tests/gpu/summary.py" "$OUT" || status=1
exit $status
