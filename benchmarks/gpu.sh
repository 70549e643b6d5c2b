#!/usr/bin/env bash
# One prepared GPU run (<= 8 minutes on one H200): the 174m preset, batch 16 x 1024, bf16 autocast, eager and
# torch.compile'd steps interleaved, with transformers' twin; MFU against 790 TFLOP/s dense bf16.
# Target (issue 6): >= 275k tokens/s, i.e. phase 1 (5000 steps x 16 x 1024 tokens) in <= 5 minutes.
#   bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
out="${1:-${OUT:-.}}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 480 python -m dsv3 bench --device cuda --sections matmul,train --presets 174m --shape 16x1024 \
    --precisions bf16 --compile --out "$out/bench-cuda.json" | tee "$out/bench-cuda.txt"
