#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite on CPU, one pytest worker per core (runs/test_workers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
# tests/test_serve_ui.py drives Debian's chromium; install it where we can (root + apt-get), else that test skips.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium + chromium-driver (apt-get) for the chat page test..." >&2
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }
  { apt_install || { apt-get update -qq && apt_install; }; } >/tmp/nanochat-chromium-apt.log 2>&1 \
    || echo "chromium install failed (/tmp/nanochat-chromium-apt.log); tests/test_serve_ui.py will skip" >&2
fi
# the code sandbox (nanochat_jax/evals/execution.py) is bubblewrap; without it its escape tests skip.
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing bubblewrap (apt-get) for the code sandbox..." >&2
  bwrap_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap; }
  { bwrap_install || { apt-get update -qq && bwrap_install; }; } >/tmp/nanochat-bwrap-apt.log 2>&1 \
    || echo "bubblewrap install failed (/tmp/nanochat-bwrap-apt.log); the sandbox tests will skip" >&2
fi
exec .venv/bin/python -m pytest tests -q $(bash runs/test_workers.sh) "$@"
