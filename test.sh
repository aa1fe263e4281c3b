#!/usr/bin/env bash
# Set everything up, lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
.venv/bin/ruff check compress export cli tests samples benchmarks
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -q "$@"
