"""Where trtllm_kernels keeps what it builds (engines, compiled kernels)."""
import os
from pathlib import Path


def cache_root() -> Path:
    """$TRTLLM_KERNELS_CACHE, or ~/.cache/trtllm-kernels."""
    return Path(os.environ.get("TRTLLM_KERNELS_CACHE", Path.home() / ".cache" / "trtllm-kernels"))
