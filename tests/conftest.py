"""Test setup shared by every test file.

Without a GPU, Triton kernels run under the Triton interpreter: TRITON_INTERPRET must be set
before any kernel module is imported, so it is set here, first. Tests marked `gpu` need CUDA
and are skipped cleanly elsewhere; run them with `pytest -m gpu` on the GPU machine.
"""
import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
