#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels the GPU host lacks for the proof kit: CPython 3.12,
# manylinux x86-64, no dependencies resolved (the host has the rest). Needs network; ~10 MB.
# The host: Python 3.12 with jax[cuda13], flax, optax, orbax-checkpoint, tiktoken, pyarrow, torch,
# pytest and hypothesis preinstalled, and no network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
WHEELS=(grain==0.2.18 array-record==0.8.6 rustbpe==0.1.0 tensorboardX==2.6.5 portpicker==1.6.0
        fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2 uvicorn==0.54.0)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"
du -sh .whl
