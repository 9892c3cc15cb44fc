#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Installs the CPU build of
# torch 2.13.0 first (a CUDA build of torch already in the environment is kept by pip's
# version range when you install into your own environment instead).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, orchestrator; print('setup ok: torch', torch.__version__)"
