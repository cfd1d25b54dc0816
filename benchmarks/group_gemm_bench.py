"""The fused MLP's down GEMM (fp8, per-1x128-group activation scales, per-channel weight scales)
on the GPU: the Gluon kernel (both variants) beside the Triton kernel (which the op runs below
GLUON_GROUP_GEMM_MIN_M rows) and
beside torch._scaled_mm with per-token activation scales (cuBLASLt; a cheaper scaling, the
speed to reach), under CUDA graphs with rotated inputs, outputs checked against the op's
reference. Llama-3.1-8B's down projection (N 4096, K 14336) unless --n/--k.

    python benchmarks/group_gemm_bench.py --out DIR [--ms 256,1024,4096] [--n 4096 --k 14336]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import trtllm_kernels as tk
from trtllm_kernels.bench.timing import l2_cache_bytes, num_rotations, tensor_bytes, time_fn
from trtllm_kernels.fp8 import _fp8_gemm_ref
from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm
from trtllm_kernels.kernels.triton_fp8 import triton_fp8_gemm


def inputs(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a, sa = tk.quantize_fp8_per_token(x, 128)
    pa, psa = tk.quantize_fp8_per_token(x)
    b, sb = tk.quantize_fp8_per_channel(torch.randn(n, k, device="cuda") * k ** -0.5)
    return dict(a=a, sa=sa, b=b, sb=sb, pa=pa, psa=psa)


FNS = {
    "triton": lambda i: triton_fp8_gemm(i["a"], i["b"], i["sa"], i["sb"], None, torch.bfloat16),
    "gluon": lambda i: gluon_group_scaled_gemm(i["a"], i["b"], i["sa"], i["sb"], pipeline=False),
    "gluon_pipelined": lambda i: gluon_group_scaled_gemm(i["a"], i["b"], i["sa"], i["sb"], pipeline=True),
    "gluon_n64": lambda i: gluon_group_scaled_gemm(i["a"], i["b"], i["sa"], i["sb"], pipeline=True, block_n=64),
    "gluon_n128": lambda i: gluon_group_scaled_gemm(i["a"], i["b"], i["sa"], i["sb"], pipeline=True, block_n=128),
    "scaled_mm_per_token": lambda i: torch._scaled_mm(i["pa"], i["b"].t(), scale_a=i["psa"], scale_b=i["sb"].t(),
                                                      out_dtype=torch.bfloat16),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="64,256,512,1024,2048,4096,8192")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=14336)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    l2 = l2_cache_bytes("cuda")
    rows = []
    for m in map(int, args.ms.split(",")):
        first = inputs(m, args.n, args.k)
        sets = [(first,)] + [(inputs(m, args.n, args.k),) for _ in range(num_rotations(tensor_bytes(first), l2, max_total_bytes=4 << 30) - 1)]
        ref = _fp8_gemm_ref(first["a"], first["b"], first["sa"], first["sb"], None, torch.bfloat16).float()
        row = dict(m=m, n=args.n, k=args.k, device=torch.cuda.get_device_name())
        for name, fn in FNS.items():
            err = float((fn(first).float() - ref).abs().max() / ref.abs().max())
            us = time_fn(fn, sets, graph=True, warmup=5, iters=100, budget_s=0.5)["median_us"]
            row[name] = dict(us=round(us, 2), tflops=round(2 * m * args.n * args.k / us / 1e6, 1), rel_err=round(err, 4))
        for name in FNS:
            if not name.startswith("gluon"):
                continue
            row[name]["vs_triton"] = round(row["triton"]["us"] / row[name]["us"], 3)
            row[name]["vs_scaled_mm"] = round(row["scaled_mm_per_token"]["us"] / row[name]["us"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    json.dump(rows, open(os.path.join(args.out, "group_gemm.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
