#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Installs the CPU build of
# torch 2.13.0 first (a CUDA build of torch already in the environment is kept by pip's
# version range when you install into your own environment instead).
#   bash scripts/setup.sh             # .venv + the project (editable) + test extras
#   bash scripts/setup.sh --browser   # also Debian's chromium (apt-get, as root) for the MLflow UI check
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "setup: --browser needs root and apt-get to install chromium; install it yourself or set QAT_CHROMIUM" >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's own failure fails the setup; only grep's "nothing left to print" is forgiven
quiet_pip() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
quiet_pip --upgrade pip
quiet_pip torch==2.13.0
# (PYTHONWARNINGS: setuptools warns that an editable install of a namespace package, hydra_plugins,
# can be shadowed by a same-named folder in the working directory; it is this very folder)
PYTHONWARNINGS=ignore quiet_pip -e ".[dev]"
.venv/bin/python -c "import torch, orchestrator; print('setup ok: torch', torch.__version__)"
