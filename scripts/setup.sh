#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with diffcli installed (editable).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus the test dependencies (transformers, the real-data GGUF, triton)
# torch: on a machine without an NVIDIA GPU the CPU wheel (torch==2.13.0) is pinned, so no CUDA
# packages are downloaded; with nvidia-smi present the default (CUDA) wheel is installed.
# The native CPU kernels are built when cmake and a C++ compiler are present (optional).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0
  fi
fi
python -m pip install -q -e ".$extras"
if command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 && [ -f CMakeLists.txt ] \
   && grep -q add_library CMakeLists.txt; then
  python -m diffcli.native build >/dev/null 2>&1 || echo "setup: native CPU kernels not built (optional; the torch path is used)" >&2
fi
echo "setup: done; activate with: . .venv/bin/activate" >&2
