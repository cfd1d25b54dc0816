"""CUDA C++ sources of trtllm_kernels, shipped as package data and compiled on first use by
trtllm_kernels.kernels.csrc (nvcc) into one shared library of extern "C" launchers."""
