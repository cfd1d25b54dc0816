#!/usr/bin/env python
"""Kernel microbenchmarks from a checkout: the same entry as `trtllm-kernels bench kernels`.

    python benchmarks/bench_kernels.py [--filter REGEX] [--out DIR] [--quick] [--graph] ...

Everything lives in the package (trtllm_kernels.bench), so a plain install runs the same
thing; this script only makes the repository importable when the package is not installed.
"""
import sys
from pathlib import Path

try:
    import trtllm_kernels  # noqa: F401
except ImportError:  # not installed: use the checkout this script sits in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtllm_kernels.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["kernels", *sys.argv[1:]]))
