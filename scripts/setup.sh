#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (an open range would pull a multi-GB CUDA build), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test,models]'
