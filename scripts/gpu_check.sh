#!/usr/bin/env bash
# One call on a GPU machine (issue 17): tests, kernels, sweep, model, profile -> $OUT.
#   OUT=dir scripts/gpu_check.sh [gpu_check.py options, e.g. --budget 450 --only env,sweep]
# Uses the machine's own python3, torch and Triton and installs nothing. diffcli is imported from
# this checkout (a package view in /tmp maps diffcli.kernels to kernels/, as pyproject.toml does);
# wheels in .whl/ (gguf, and transformers==5.23.0 for the model tests' oracle) are unpacked into
# /tmp first when the machine lacks them. See scripts/bench_notes.md ("GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import gguf" 2>/dev/null; then
  echo "gpu_check: python package gguf missing; put its wheel in .whl/ (bench_notes.md, GPU check)" >&2
  exit 2
fi
if ! (cd / && $PY -c "import diffcli.kernels.mmq" 2>/dev/null); then
  view=/tmp/gpu_check_pkg
  rm -rf "$view" && mkdir -p "$view/diffcli"
  for f in diffcli/*; do ln -s "$PWD/$f" "$view/diffcli/"; done
  ln -s "$PWD/kernels" "$view/diffcli/kernels"
  export PYTHONPATH=$view${PYTHONPATH:+:$PYTHONPATH}
fi
$PY scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
