"""One launch each of csrc/fp4_gemm.cu's rule configuration at 1, 8 and 16 tokens on the 8B
gate_up and down shapes, for Nsight Compute:
ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats -k regex:fp4_gemm_small_m \
    python3 benchmarks/ncu_fp4_small_m.py"""
import torch

import trtllm_kernels as tk
from trtllm_kernels.kernels import csrc

for n, k in ((28672, 4096), (4096, 14336)):
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device="cuda") * k ** -0.5, "nvfp4")
    for m in (1, 8, 16):
        csrc.fp4_gemm_small_m_cuda(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), p, s, g)
torch.cuda.synchronize()
