#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the project (editable) and its test dependencies.
# torch 2.14.1 / torchvision 0.29.1 is the newest pair that installs together (open_clip needs torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, torchvision, diffusion; print('set-up OK: torch', torch.__version__)"
