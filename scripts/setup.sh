#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with diffcli installed (editable).
#   scripts/setup.sh          runtime (with the server's dependencies, for `diffcli serve`)
#   scripts/setup.sh --test   plus the test dependencies (transformers, the real-data GGUF, triton,
#                             the openai client and Selenium for the server tests)
# torch: on a machine without an NVIDIA GPU the CPU wheel (torch==2.13.0) is pinned, so no CUDA
# packages are downloaded; with nvidia-smi present the default (CUDA) wheel is installed.
# The native CPU kernels are built when cmake and a C++ compiler are present (optional).
# pip's own output goes to .venv/setup.log (shown when a step fails), so a good run prints a few lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="[serve]"; what="installing diffcli"
case "${1:-}" in
  "") ;;
  --test) extras="[serve,test]"; what="installing diffcli with the test dependencies" ;;
  *) echo "setup: unknown argument '$1'; use: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

say() { echo "setup: $*" >&2; }
fail() { say "$*"; exit 1; }

command -v "$PY" >/dev/null 2>&1 || fail "$PY not found; install Python >= 3.10 (or set PYTHON=/path/to/python3)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "$("$PY" -V 2>&1) is too old; diffcli needs Python >= 3.10 (set PYTHON=/path/to/python3.x)"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" -V 2>&1)"
  "$PY" -m venv .venv >/dev/null 2>&1 \
    || { rm -rf .venv; fail "'$PY -m venv' failed; install the venv module (Debian/Ubuntu: apt install python3-venv)"; }
fi
. .venv/bin/activate
LOG=.venv/setup.log
: > "$LOG"

# pip_step WHAT ARGS...: run pip quietly into the log; on failure show the log's tail and stop.
pip_step() {
  local what=$1; shift
  say "$what"
  if ! python -m pip install "$@" >>"$LOG" 2>&1; then
    grep -v "^WARNING: Location" "$LOG" | tail -n 25 >&2
    fail "pip failed while $what (full log: $LOG)"
  fi
}

python -m pip install -q --upgrade pip >>"$LOG" 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip_step "installing torch (CUDA build; several GB)" torch
  elif [ "$(uname -s)" = Darwin ]; then
    pip_step "installing torch 2.13.0" torch==2.13.0          # macOS wheels are CPU/MPS only
  else
    # PyPI's Linux torch wheel pulls ~3 GB of CUDA libraries; the +cpu build comes from an index
    # that has it (one configured for pip, or PyTorch's CPU index), PyPI's build only as a last resort.
    say "installing torch 2.13.0 (CPU build)"
    if ! python -m pip install torch==2.13.0+cpu >>"$LOG" 2>&1 \
       && ! python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu >>"$LOG" 2>&1; then
      pip_step "installing torch 2.13.0 from PyPI (no CPU-only build found; this one brings CUDA libraries)" \
        torch==2.13.0
    fi
  fi
fi
pip_step "$what" -e ".$extras"
if command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 && [ -f CMakeLists.txt ] \
   && grep -q add_library CMakeLists.txt; then
  say "building the native CPU kernels"
  python -m diffcli.compute.native build >>"$LOG" 2>&1 || say "native CPU kernels not built (optional; the torch path is used; see $LOG)"
else
  say "no cmake/c++: native CPU kernels skipped (optional; the torch path is used)"
fi
say "done; activate with: . .venv/bin/activate"
