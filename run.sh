#!/usr/bin/env bash
# Set everything up, then train the default model (LeNet-5) on Fashion-MNIST with DPF to
# 90 % sparsity. Extra arguments go to `compress train-prune`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
out="runs/dpf-lenet5-$(date +%Y%m%d-%H%M%S)"
.venv/bin/compress train-prune --model lenet5 --data fashion-mnist --method dpf \
    --sparsity 0.9 --out "$out" "$@"
.venv/bin/compress inspect "$out"
