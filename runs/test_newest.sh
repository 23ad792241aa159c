#!/usr/bin/env bash
# The second test leg: CPython 3.12 with the newest JAX/Flax/Optax/Orbax the bounds admit and no
# torch (tests that need the torch reference skip), in .venv312; slow end-to-end tests deselected.
# A machine without CPython 3.12 skips this leg with a message. PYTHON312 names the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
find_py312() {
  for cand in "${PYTHON312:-}" python3.12; do
    if [ -n "$cand" ] && is312 "$cand"; then "$cand" -c 'import sys; print(sys.executable)'; return 0; fi
  done
  if command -v pyenv >/dev/null; then  # pyenv keeps 3.12 out of PATH unless selected
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1 || true)
    if [ -n "$v" ]; then PYENV_VERSION=$v pyenv exec python -c 'import sys; print(sys.executable)'; return 0; fi
  fi
  return 1
}
if ! PY=$(find_py312); then
  echo "no CPython 3.12 on this machine: skipping the 3.12 / newest-JAX test leg" >&2
  exit 0
fi
echo "3.12 / newest-JAX leg with $PY" >&2
PYTHON=$PY NANOCHAT_VENV=.venv312 bash runs/setup.sh
.venv312/bin/python -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)'
exec .venv312/bin/python -m pytest tests -q -m "not slow" $(bash runs/test_workers.sh) "$@"
