# stream-K diagnosis: the same kernel at schedules with no cuts, several whole tiles a block, cuts
import sys, torch
from triton.testing import do_bench_cudagraph
import trtllm_kernels as tk
from trtllm_kernels.bench.timing import l2_cache_bytes, num_rotations
from trtllm_kernels.kernels import csrc
cases = {("gate_up", 28672, 4096, 128): [(128, 2, b) for b in (224, 112, 132, 448, 66)],
         ("gate_up", 28672, 4096, 64): [(64, 4, b) for b in (112, 56, 132, 224)],
         ("down", 4096, 14336, 128): [(128, 2, b) for b in (32, 64, 128, 132, 256)]}
for (name, n, k, m), cfgs in cases.items():
    p, s, g = tk.quantize_fp4(torch.randn(n, k, device="cuda") * k ** -0.5, "nvfp4")
    copies = [(p, s)] + [(p.clone(), s.clone()) for _ in range(num_rotations(p.nbytes + s.nbytes, l2_cache_bytes(torch.device("cuda"))) - 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for cfg in cfgs:
        us = do_bench_cudagraph(lambda: [csrc.fp4_gemm_wgmma_cuda(x, pc, sc, g, cfg) for pc, sc in copies]) * 1e3 / len(copies)
        print(f"{name} M={m} {cfg}: {us:.1f} us", flush=True)
