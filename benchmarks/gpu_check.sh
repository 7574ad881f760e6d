#!/usr/bin/env bash
# The GPU checks of the GPU-path issue, for a session that has a CUDA machine (< 8 minutes on
# one H100/H200). Run from anywhere:  bash benchmarks/gpu_check.sh
#   1. tests/test_gpu.py (skipped without CUDA elsewhere) + the CPU-side precision/KV-pos tests
#   2. benchmarks/gpu.py: step rates (bf16 / fp32+TF32 / channels_last), SDPA kernels for KV and
#      KV-pos, loader workers, the train pipeline, determinism
# Writes gpu_tests.log and gpu.json into $OUT when set (the device tool's folder), else into
# benchmarks/results/. Uses python3 (the machine's own torch) and the source tree via PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
status=0
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/training/test_amp.py \
    tests/layers/test_kvpos_inference.py -s 2>&1 | tee "$DEST/gpu_tests.log" || status=1
timeout 280 "$PY" benchmarks/gpu.py --out "$DEST/gpu.json" 2>&1 | tee "$DEST/gpu_bench.log" \
    || status=1
exit $status
