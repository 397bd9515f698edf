#!/usr/bin/env bash
# The prepared GPU benchmark (#20): decode tokens/s and bandwidth of stock vs every mode, training-step ratios.
# Usage (on one GPU, from the repository root): bash benchmarks/gpu.sh [OUT_DIR]   (default docs/gpu; ~5-8 min on an H200)
# Extra arguments after OUT_DIR go to benchmarks/gpu.py (e.g. --backend inductor, --batches 64 --contexts 8192).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/gpu}"
shift || true
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu.py --device cuda --dtype bfloat16 --out "$out" "$@" 2>&1 | tee "$out.log"
