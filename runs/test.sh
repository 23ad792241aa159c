#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
exec .venv/bin/python -m pytest tests -q "$@"
