#!/usr/bin/env bash
# The GPU proof kit in one command (see bench/gpu_proof.py for the phases and outputs).
#   bash bench/gpu_proof.sh OUT_DIR              # on the GPU host: Python 3.12 + jax[cuda] + torch, no network
#   bash bench/gpu_proof.sh OUT_DIR --cpu-smoke  # the same kit at tiny sizes on CPU
#   --nanochat-src DIR: upstream nanochat beside ours (default $NANOCHAT_SRC, else ./.nanochat-src)
# Packages the host lacks are installed offline from .whl/ (fill it beforehand, with network,
# by `bash bench/gpu_wheels.sh`) into a private folder put on PYTHONPATH; nothing else is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_proof.sh OUT_DIR [--cpu-smoke] [--budget-s S] [--only PHASE...] [--nanochat-src DIR]" >&2; exit 2; }
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null && [ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 12))')" = True ]; then
  site=${NANOCHAT_WHEEL_SITE:-/tmp/nanochat-jax-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
elif compgen -G ".whl/*.whl" >/dev/null; then
  echo "note: .whl/ holds CPython 3.12 wheels; $("$PY" -V) uses its own installed packages" >&2
fi
exec "$PY" -m bench.gpu_proof "$@"
