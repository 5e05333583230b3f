#!/usr/bin/env bash
# Sets up (idempotently) and runs the whole test suite against a real ComfyUI:
#   bash scripts/test.sh            # provisions ComfyUI 0.3.75 into .comfyui/ unless COMFYUI_PATH is set
#   bash scripts/test.sh -k selectors   # extra arguments go to pytest
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# The browser tests need Debian's chromium and chromedriver; install them when we can (CI runs as root).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing chromium + chromium-driver for the browser tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
      || echo "[test] could not install chromium; browser tests will fail" >&2
  fi
fi
env_vars="$(bash scripts/setup.sh --dev)"  # fails the script if setup fails
eval "$env_vars"
export COMFYUI_PATH
echo "[test] ComfyUI: $COMFYUI_PATH" >&2
# console scripts, not `python -m`: that would put the pack root (and its selectors/) on sys.path
"$(dirname "$PYTHON")/ruff" check . >&2
set +e
# --rootdir=tests: pytest 9.2 imports the pack root's __init__.py as a package when its tree starts above tests/,
# which fails in a checkout folder whose name is no Python identifier (comfyui-sparse-context, wt-train)
"$(dirname "$PYTHON")/pytest" --rootdir=tests "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "[test] pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
