#!/usr/bin/env bash
# Create .venv with torch and the pack's requirements. TORCH_SPEC overrides the torch pin
# (e.g. a CUDA build); torch is installed first so no dependency pulls a different build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
.venv/bin/python -c "import torch, diffusers, yunchang; print(f'torch {torch.__version__}, diffusers {diffusers.__version__}: ready')"
