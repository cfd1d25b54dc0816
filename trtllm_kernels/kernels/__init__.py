"""CUDA kernels (Triton and csrc) registered behind the `trtllm_kernels::` ops.

Importing this module registers every kernel whose dependencies are present; ops without a
kernel keep running their reference implementation on CUDA tensors.
"""
