#!/usr/bin/env bash
# The one script for a GPU machine (an H100/H200; under 5 minutes in all, every step under its own
# `timeout`): compile the Triton kernels for this GPU and check each against its PyTorch reference
# through the ahead-of-time launcher (attention also through Triton's JIT), check the engine (kernel
# path and CUDA graphs against the reference path, every mode), check exactness on the GPU (spec modes
# and batches against AR bit for bit, 500 graph replays, memcheck, an engine on cuda:1, launch cost with
# the driver call, the decode GEMM's HBM bandwidth), benchmark the NLD-8B shape in bf16 and fp8 through
# the same cubins and CUDA graphs serving runs, and print a summary whose last rows are the targets of
# docs/performance.md. Every step writes its JSON after every result, so a step cut short by
# its budget loses nothing. Results (JSON, PNG, run.log, summary.md) go to $OUT when set, else a temp dir.
#
#   OUT=results bash tests/gpu/run_device_checks.sh               # on the GPU machine
#   OUT=results bash tests/gpu/run_device_checks.sh --cpu-dry-run # anywhere: the same steps on the CPU
#
# --cpu-dry-run (or NEMODIFF_CPU_DRY_RUN=1) runs the same Python entry points end to end on a tiny shape
# on the CPU: kernels compiled for sm_90a, every launch checked against its cubin and interpreted
# (kernels="aot-check"), few iterations; only the CUDA driver calls and the timing source differ
# (tests/test_device_script.py runs it in CI).
# Needs PyTorch with CUDA, Triton and cuda-bindings (`pip install 'nemodiff[gpu]'`); transformers and
# matplotlib are optional (the baseline and the plots). Runs from a source checkout without installing
# (the package is the checkout's nemodiff/ folder, first on PYTHONPATH).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
dry=0
case "${1:-}" in
  --cpu-dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: [OUT=dir] $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac
[ "${NEMODIFF_CPU_DRY_RUN:-0}" = 1 ] && dry=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
work=$(mktemp -d)  # the compiled kernels, the step timings
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$repo:$repo/tests:$repo/tests/gpu${PYTHONPATH:+:$PYTHONPATH}"
export NEMODIFF_KERNEL_ROOT="$work"  # device_checks.py compiles into $work/kernels/<sm>; the benchmarks reuse it
PY=${PYTHON:-python3}
log="$OUT/run.log"
: > "$log"

if [ "$dry" = 1 ]; then
  export NEMODIFF_CPU_DRY_RUN=1 TRITON_INTERPRET=1
  shape=micro
  bench=(--device cpu --kernels aot-check --sm sm_90a --context 16 --iters 1)
  bf16=(--batch-sizes 1,2 --end-to-end --concurrency 1 --max-new-tokens 2 --prompt-tokens 6 --block-length 2)
  fp8=(--batch-sizes 1 --no-hf)
  echo "CPU dry run: the device script's steps on the CPU, kernels for sm_90a checked and interpreted" | tee -a "$log"
else
  shape=nld-8b
  bench=(--kernels aot --context 1024 --iters 10)
  bf16=(--batch-sizes 1,8,32 --end-to-end --concurrency 1 --max-new-tokens 32 --prompt-tokens 128)
  fp8=(--batch-sizes 1,32 --no-hf)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$log" || true
  "$PY" -c "from nemodiff.cuda_driver import cuda_driver; cuda_driver()" 2>/dev/null \
    || echo "cuda-python is missing: the ahead-of-time launcher cannot run (pip install 'nemodiff[gpu]')" | tee -a "$log"
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$log" || true

# Every step runs under `timeout` within the whole run's budget (TOTAL seconds, 10 of them kept for the
# summary); its name, budget, time taken and exit status go to $work/steps.tsv for the summary. The CPU
# dry run interprets every kernel on a shared CI machine: its budgets are three times the GPU's.
scale=1
if [ "$dry" = 1 ]; then scale=3; fi
TOTAL=${NEMODIFF_DEVICE_BUDGET_S:-$((290 * scale))}
start=$SECONDS
status=0
step() {  # step NAME BUDGET_S COMMAND...
  local name=$1 budget=$(($2 * scale)) left rc=0 t0=$SECONDS
  shift 2
  left=$((TOTAL - 10 - (SECONDS - start)))
  if [ "$budget" -gt "$left" ]; then budget=$left; fi
  if [ "$budget" -lt 5 ]; then
    echo "== $name: skipped, the run's ${TOTAL} s are spent" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\n' "$name" 0 0 skipped >> "$work/steps.tsv"
    status=1
    return 0
  fi
  echo "== $name (budget ${budget} s)" | tee -a "$log"
  timeout -k 5 "$budget" "$@" 2>&1 | tee -a "$log" || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$budget" $((SECONDS - t0)) "$rc" >> "$work/steps.tsv"
  if [ "$rc" != 0 ]; then status=1; fi
  return 0
}

step "kernel checks" 65 "$PY" "$repo/tests/gpu/device_checks.py"
step "engine checks" 50 "$PY" "$repo/tests/gpu/model_checks.py"
step "exactness checks" 75 "$PY" "$repo/tests/gpu/exact_checks.py"
step "bench $shape bf16" 60 "$PY" -m nemodiff.cli bench --shape "$shape" --dtype bf16 "${bench[@]}" "${bf16[@]}" \
  --kernel-dir "$work" --json "$OUT/bench_bf16.json" --plot "$OUT/bench_bf16.png"
step "bench $shape fp8" 30 "$PY" -m nemodiff.cli bench --shape "$shape" --dtype fp8 "${bench[@]}" "${fp8[@]}" \
  --kernel-dir "$work" --json "$OUT/bench_fp8.json" --plot "$OUT/bench_fp8.png"
gpus=0
if [ "$dry" = 0 ]; then gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l) || gpus=0; fi
if [ "$gpus" -ge 2 ]; then  # tensor parallelism: NCCL, kernels and graphs per rank, the ratio to one GPU
  step "tensor-parallel checks" 100 "$PY" "$repo/tests/gpu/tp_checks.py"
  step "bench $shape tp2" 100 "$PY" -m nemodiff.cli bench --shape "$shape" --dtype bf16 --tp 2 "${bench[@]}" \
    --batch-sizes 1,8 --no-hf --kernel-dir "$work" --json "$OUT/bench_tp2.json"
fi

echo
card="CPU dry run"
if [ "$dry" = 0 ]; then card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) || card=GPU; fi
echo "=== summary ($(date -u +%Y-%m-%d), $card, $((SECONDS - start)) s) ===" | tee -a "$log"
timeout 30 "$PY" "$repo/tests/gpu/summary.py" "$OUT" --steps "$work/steps.tsv" 2>&1 | tee -a "$log" || status=1
exit $status
