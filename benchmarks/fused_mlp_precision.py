"""The FP8 fused MLP's error against its float32 reference (the same quantized math) with each
group-scaled down GEMM kernel, Llama-3.1-8B MLP shape, on the GPU: what chaining the down GEMM's
K in the tensor cores (GROUP_GEMM_KERNEL "chain") costs beside adding each 128-step in fp32
("promote"). Metric: tests/accuracy.py's similarity_gap (1 - 2<y, r> / (|y|^2 + |r|^2)).

    PYTHONPATH=$PWD python3 benchmarks/fused_mlp_precision.py
"""
import sys
import torch
import trtllm_kernels as tk
from trtllm_kernels import fp8 as f8
from trtllm_kernels.kernels import gluon_fp8_gemm as g
sys.path.insert(0, "tests")
from accuracy import similarity_gap
torch.manual_seed(0)
h, inter = 4096, 14336
for m in (1024, 4096):
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    xq, xs = tk.quantize_fp8_per_token(x)
    gq, gs = tk.quantize_fp8_per_channel(torch.randn(2 * inter, h, device="cuda") / 64)
    dq, ds = tk.quantize_fp8_per_channel(torch.randn(h, inter, device="cuda") / 120)
    for quant in (True, False):
        ref = f8._fused_mlp_fp8_ref(xq, xs, gq, gs, dq, ds, quant, torch.float32)
        for k in ("chain", "promote"):
            g.GROUP_GEMM_KERNEL = k
            y = tk.fused_mlp_fp8(xq, xs, gq, gs, dq, ds, quant)
            print(f"M {m} quant_intermediate {quant} {k}: similarity_gap {similarity_gap(y, ref):.3e}", flush=True)
