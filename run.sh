#!/usr/bin/env bash
# Set everything up, then train the default model (LeNet-5) on Fashion-MNIST with DPF to
# 90 % sparsity. Extra arguments go to `compress train-prune`; COMPRESS_THREADS sets torch's
# threads (default: every core).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
out="runs/dpf-lenet5-$(date +%Y%m%d-%H%M%S)"
previous=""
json=""
for arg in "$@"; do  # an --out among the arguments wins; inspect that directory then
    if [ "$previous" = "--out" ]; then out="$arg"; fi
    case "$arg" in --out=*) out="${arg#--out=}" ;; --json) json=1 ;; esac
    previous="$arg"
done
.venv/bin/compress train-prune --model lenet5 --data fashion-mnist --method dpf \
    --sparsity 0.9 --threads "${COMPRESS_THREADS:-$(nproc)}" --out "$out" "$@"
if [ -z "$json" ]; then  # with --json, stdout stays one JSON document
    .venv/bin/compress inspect "$out"
fi
