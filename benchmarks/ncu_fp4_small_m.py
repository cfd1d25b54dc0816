"""One launch each of an FP4 csrc kernel's rule configuration on the 8B gate_up and down shapes,
for Nsight Compute. Default: csrc/fp4_gemm.cu at 1, 8 and 16 tokens:
ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats -k regex:fp4_gemm_small_m \
    python3 benchmarks/ncu_fp4_small_m.py
`... ncu_fp4_small_m.py wgmma 64,128` (with -k regex:fp4_wgmma_kernel): csrc/fp4_wgmma.cu at those M."""
import sys

import torch

import trtllm_kernels as tk
from trtllm_kernels.kernels import csrc

wgmma = len(sys.argv) > 1 and sys.argv[1] == "wgmma"
gemm = csrc.fp4_gemm_wgmma_cuda if wgmma else csrc.fp4_gemm_small_m_cuda
ms = [int(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 8, 16]
for n, k in ((28672, 4096), (4096, 14336)):
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device="cuda") * k ** -0.5, "nvfp4")
    for m in ms:
        gemm(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), p, s, g)
torch.cuda.synchronize()
