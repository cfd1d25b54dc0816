"""trtllm-kernels: fused LLM-serving kernels for Hopper, with a thin engine and runtime.

`engine/` and `runtime/` live at the top level of the repository but install under the one
namespace, as `trtllm_kernels.engine` and `trtllm_kernels.runtime` (see package_dir).
Torch is deliberately not pinned here: the machine's own build is used (2.13 CPU on the
CPU machines, 2.11+cu130 on the GPU image); a bare requirement would pull a multi-GB CUDA
build onto a CPU machine.
"""
from setuptools import setup

setup(
    name="trtllm-kernels",
    version="0.1.0",
    description="Fused paged attention, FP8/FP4 GEMM and an LLM serving core for NVIDIA Hopper",
    python_requires=">=3.10",
    packages=[
        "trtllm_kernels",
        "trtllm_kernels.kernels",
        "trtllm_kernels.bench",
        "trtllm_kernels.engine",
        "trtllm_kernels.runtime",
        "trtllm_kernels.csrc",
        "trtllm_kernels.plugins",
    ],
    package_dir={
        "trtllm_kernels.engine": "engine",
        "trtllm_kernels.runtime": "runtime",
        "trtllm_kernels.csrc": "csrc",
    },
    package_data={"trtllm_kernels.csrc": ["*.cu", "*.cuh"]},
    install_requires=[
        "numpy",
        "safetensors",
        "tokenizers",
        "transformers>=4.45",
        "jinja2",
        "tqdm",
    ],
    extras_require={
        "gguf": ["gguf>=0.10"],
        "triton": ["triton==3.6.0"],
        "plot": ["matplotlib"],
        # the OpenAI-compatible server (`trtllm-kernels serve`) and its load test (`bench serve`)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        "test": ["pytest", "gguf>=0.10", "accelerate", "triton==3.6.0", "matplotlib",
                 "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "openai>=1.40",
                 "onnx>=1.16"],  # the TensorRT plugins' ONNX export is checked with onnx.checker
    },
    entry_points={"console_scripts": ["trtllm-kernels=trtllm_kernels.cli:main"]},
)
