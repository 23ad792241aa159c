#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install nanochat-jax into it.
# Idempotent: a second run with nothing changed only checks the install.
#   PYTHON       interpreter, CPython 3.11-3.13 (default python3.11, else python3)
#   NANOCHAT_VENV  the venv folder (default .venv)
#   NANOCHAT_EXTRAS  extras (default "torch,dev" on 3.11, where the CPU torch wheel pinned in the
#                    torch extra exists; "dev" elsewhere: tests that need torch then skip)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
minor=$("$PY" -c 'import sys; print(sys.version_info[0] * 100 + sys.version_info[1])')
if [ "$minor" -lt 311 ] || [ "$minor" -gt 313 ]; then
  echo "nanochat-jax needs CPython 3.11, 3.12 or 3.13; found $("$PY" --version 2>&1) ($PY). Set PYTHON=..." >&2
  exit 1
fi
VENV=${NANOCHAT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp=$VENV/.nanochat-installed
if [ "$minor" = 311 ]; then extras=${NANOCHAT_EXTRAS:-torch,dev}; else extras=${NANOCHAT_EXTRAS:-dev}; fi
want="$(cat pyproject.toml) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch is pinned to 2.13.0 in the extra: pip takes the local CPU wheel, never a CUDA build.
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
  printf '%s' "$want" > "$stamp"
fi
