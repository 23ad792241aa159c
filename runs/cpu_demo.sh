#!/usr/bin/env bash
# The main job at tiny scale on CPU: set up .venv, then run the pipeline as far as it exists.
# Today: build a d4 model, print its parameter/FLOP summary, run a forward pass and sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
exec .venv/bin/python -m train.demo --depth 4 "$@"
