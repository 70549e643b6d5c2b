#!/usr/bin/env bash
# One prepared GPU run (about 5 minutes on one H200), each stage under its own time limit, so one failing stage
# leaves the others' figures:
#   1. benchmarks/gpu_check.py: dsv3's numbers on the device (fp32 vs CPU, bf16 dispatch, cached decoding,
#      compiled vs eager, a learning step);
#   2. the benchmark: matmul peak and copy bandwidth; the 174m step, batch 16 x 1024, bf16 autocast, eager and
#      torch.compile'd (per block), with transformers' twin; MFU against 790 TFLOP/s dense bf16;
#   3. the trainer itself (`python -m dsv3 train --preset 174m --compile`, the phase-1 shape) for 2 minutes
#      on Tiny Shakespeare: tokens/s of real steps, and phase 1 (5000 steps x 16 x 1024 tokens) extrapolated;
#   4. where the compiled step's time goes (benchmarks/profile_step.py) and the output head's GEMMs
#      (benchmarks/head_gemm.py).
# Target (issue 6): >= 275k tokens/s, i.e. phase 1 in <= 5 minutes.
#   DSV3_CORPUS=... TIKTOKEN_CACHE_DIR=... [PYTHON=python3] bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
py="${PYTHON:-python}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== 1. correctness on the device"
timeout 120 "$py" benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.txt"
echo "== 2. benchmark"
timeout 270 "$py" -m dsv3 bench --device cuda --sections matmul,train --presets 174m --shape 16x1024 \
    --precisions bf16 --compile --out "$out/bench-cuda.json" 2>&1 | tee "$out/bench-cuda.txt"
echo "== 3. trainer, phase-1 shape"
run=$(mktemp -d)
timeout 180 "$py" -m dsv3 train --preset 174m --device cuda --compile --steps 1000 --time-limit 120 \
    --eval-interval 250 --save-interval 0 --no-progress --out "$run" 2>&1 | tail -5 | tee "$out/train-cuda.txt"
cp "$run/metrics.jsonl" "$out/train-cuda-metrics.jsonl" 2>/dev/null
"$py" - "$run/metrics.jsonl" <<'PY' 2>&1 | tee -a "$out/train-cuda.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if r["kind"] == "train"]
tps = statistics.median(r["tokens_per_s"] for r in train[10:])  # after compile and warm-up
print(f"trainer: {len(train)} steps, median {tps:,.0f} tokens/s after step 10; first step {train[0]['elapsed']:.1f} s "
      f"(compile); phase 1 (5000 x 16 x 1024 tokens) at this rate: {5000 * 16 * 1024 / tps / 60:.1f} min; "
      f"val {[round(r['val_loss'], 3) for r in rows if r['kind'] == 'val']}")
PY
echo "== 4. profile of the compiled step; the head's GEMMs"
timeout 100 "$py" benchmarks/profile_step.py --device cuda --preset 174m --batch 16 --seq 1024 --bf16 --compile \
    --rows 20 2>&1 | grep -v "Warning\|warn" | tee "$out/profile-cuda.txt"
timeout 60 "$py" benchmarks/head_gemm.py 2>&1 | tee "$out/head-gemm.txt"
