#!/usr/bin/env bash
# Export the package as of a git revision into a new folder, laid out as a wheel installs it
# (engine/, runtime/ and csrc/ inside trtllm_kernels/), for same-machine A/B runs of two
# revisions' code:
#   bash benchmarks/tree_at.sh HEAD _old        (here, then carry _old to the GPU machine)
#   (cd _old && PYTHONPATH=$PWD python3 ../benchmarks/sweep_fp4.py before.json)
# The layout matters: with the repository installed editable, setuptools' import finder maps
# trtllm_kernels.engine, .runtime and .csrc to the repository's own folders, so a copy that keeps
# them beside the package silently runs the working tree's engine, runtime and kernels.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bash benchmarks/tree_at.sh REVISION NEW_FOLDER" >&2; exit 2; }
rev=$1
dir=$(realpath -m "$2")
cd "$(dirname "$0")/.."
git rev-parse --verify -q "$rev^{commit}" >/dev/null || { echo "tree_at.sh: no revision $rev" >&2; exit 1; }
[ ! -e "$dir" ] || { echo "tree_at.sh: $dir exists" >&2; exit 1; }
mkdir -p "$dir"
git archive "$rev" trtllm_kernels | tar -x -C "$dir"
git archive --prefix=trtllm_kernels/ "$rev" engine runtime csrc | tar -x -C "$dir"
echo "$dir: trtllm_kernels at $(git rev-parse --short "$rev")"
