#!/usr/bin/env bash
# Install everything compress needs on a fresh Debian machine: Debian's Fashion-MNIST
# package, a virtual environment in .venv and the project with its pip dependencies.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# tests/test_telemetry.py checks under strace that onnxruntime opens no socket
if ! command -v strace >/dev/null; then
    echo "setup: installing strace"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq strace >/dev/null
fi

# torch comes with its CUDA libraries (the registry's torchvision needs them), so the
# environment takes about 6 GB while it installs; fail early and clearly where it cannot fit.
if [ ! -x .venv/bin/compress ]; then
    free_mb=$(df --output=avail -B1M . | tail -1 | tr -d ' ')
    if [ "$free_mb" -lt 6000 ]; then
        echo "setup: error: .venv needs about 6 GB free on the disk holding $(pwd); only ${free_mb} MB are free" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi

# the stamp lives inside .venv, so a new .venv is always installed into
stamp=.venv/.setup-stamp
stamp_value="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$stamp_value" ] || [ ! -x .venv/bin/compress ]; then
    echo "setup: installing compress and its dependencies into .venv (torch is large: minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev,timm]"
    echo "$stamp_value" > "$stamp"
fi
