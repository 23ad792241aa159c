#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv and install nanochat-jax into it.
# Idempotent: a second run with nothing changed only checks the install.
# Extras: NANOCHAT_EXTRAS (default "torch,dev"; the torch reference backs the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "nanochat-jax needs Python 3.11 (jax 0.10 + the torch 2.13 CPU wheel); found $("$PY" --version)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.nanochat-installed
extras=${NANOCHAT_EXTRAS:-torch,dev}
want="$(cat pyproject.toml) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned to 2.13.0 in the extra: pip takes the local CPU wheel, never a CUDA build.
  .venv/bin/python -m pip install -q -e ".[$extras]"
  printf '%s' "$want" > "$stamp"
fi
