#!/usr/bin/env bash
# Container entry point: build the engine for the visible GPU if it is missing, then serve it.
#   NEMODIFF_CHECKPOINT  Hugging Face NLD checkpoint (mounted; default /models/checkpoint;
#                        falls back to the bundled tiny model when empty)
#   NEMODIFF_ENGINE      engine directory (a volume, so the build happens once)
#   NEMODIFF_DTYPE       bf16 | fp8 | fp16
#   NEMODIFF_DEFAULT_MODE  ar | diffusion | linear-spec | quadratic-spec
#   NEMODIFF_TP          GPUs per engine (tensor parallelism; default 1)
#   NEMODIFF_GPUS        GPUs to serve on, e.g. 0,1,2,3: one engine per NEMODIFF_TP of them
#   NEMODIFF_COMMAND     serve (default) | worker: a worker behind NVIDIA Dynamo's frontend (docs/dynamo.md),
#                        its nemodiff_* metrics on 8002
# Extra arguments are passed to `nemodiff serve` (or `nemodiff worker`).
set -euo pipefail
checkpoint=${NEMODIFF_CHECKPOINT:-/models/checkpoint}
engine=${NEMODIFF_ENGINE:-/models/engine}
if [ ! -f "$checkpoint/config.json" ]; then
  echo "nemodiff: no checkpoint at $checkpoint; serving the bundled tiny model"
  checkpoint=/opt/nemodiff/models/nld-tiny
fi

cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)
case "$cap" in
  8.0) arch=a100 ;;
  8.9) arch=l40s ;;
  9.0) arch=h100 ;;
  10.*) arch=b200 ;;
  *) arch=cpu ;;
esac

if [ ! -f "$engine/manifest.json" ]; then
  echo "nemodiff: building $engine from $checkpoint (dtype ${NEMODIFF_DTYPE:-bf16}, arch $arch)"
  dtype=${NEMODIFF_DTYPE:-bf16}
  if [ "$arch" = "a100" ] && [ "$dtype" = "fp8" ]; then dtype=bf16; fi
  nemodiff-build "$checkpoint" -o "$engine" --dtype "$dtype" --arch "$arch" --tp "${NEMODIFF_TP:-1}" --overwrite
fi

if [ "${NEMODIFF_COMMAND:-serve}" = "worker" ]; then
  exec nemodiff worker "$engine" --metrics-port 8002 --mode "${NEMODIFF_DEFAULT_MODE:-linear-spec}" "$@"
fi

placement=()
if [ -n "${NEMODIFF_GPUS:-}" ]; then placement=(--gpus "$NEMODIFF_GPUS"); fi
exec nemodiff serve "$engine" --http-port 8000 --grpc-port 8001 --metrics-port 8002 \
  --default-mode "${NEMODIFF_DEFAULT_MODE:-linear-spec}" "${placement[@]}" "$@"
