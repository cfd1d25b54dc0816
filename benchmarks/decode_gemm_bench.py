"""The FP8 engine's four GEMMs at decode sizes (1-16 tokens), the Gluon decode kernel
(kernels/gluon_decode_gemm.py) beside the Triton TMA kernel, timed as the engine runs them:
CUDA graphs of `--layers` calls, each on its own weight (together past L2), PDL as in the engine.

- alone: the GEMMs back to back (each waits for the one before: nothing lets it start early);
- chain: each GEMM after the kernel that feeds it in the model (RMSNorm+quant before qkv and
  gate_up, which lets a PDL launch start early; the GLU gate_up GEMM before down), the pair's
  time.

    python benchmarks/decode_gemm_bench.py --out DIR [--ms 1,16] [--layers 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import trtllm_kernels as tk
from trtllm_kernels.kernels import gluon_decode_gemm as gdg

H, I = 4096, 14336
SHAPES = {"qkv": (6144, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}


def _graph_us(fn, reps: int = 20, trials: int = 7) -> float:
    """Median over trials of a CUDA graph of fn's launches, per replay, in us."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def case(shape: str, m: int, layers: int) -> dict:
    n, k = SHAPES[shape]
    weights = [tk.quantize_fp8_per_channel(torch.randn(n, k, device="cuda") * k ** -0.5) for _ in range(layers)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    norm = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    if shape == "down":  # fed by the GLU gate_up GEMM: per-1x128-group scales
        feed_w = [tk.quantize_fp8_per_channel(torch.randn(2 * I, H, device="cuda") * H ** -0.5) for _ in range(2)]
        xh, xhs = tk.quantize_fp8_per_token(torch.randn(m, H, device="cuda", dtype=torch.bfloat16))
        a, sa = tk.quantize_fp8_per_token(x, 128)
    else:
        a, sa, _ = tk.rms_norm_quant_fp8(x, norm, 1e-5)

    def gemm(i, a, sa):
        w, ws = weights[i]
        if shape == "gate_up":
            return tk.fp8_gemm_silu_mul(a, w, sa, ws, True)[0]
        return tk.fp8_gemm(a, w, sa, ws)

    def alone():
        for i in range(layers):
            gemm(i, a, sa)

    def chain():
        for i in range(layers):
            if shape == "down":
                h, hs = tk.fp8_gemm_silu_mul(xh, feed_w[i % 2][0], xhs, feed_w[i % 2][1], True)
            else:
                h, hs, _ = tk.rms_norm_quant_fp8(x, norm, 1e-5)
            gemm(i, h, hs)

    def feed():
        for i in range(layers):
            if shape == "down":
                tk.fp8_gemm_silu_mul(xh, feed_w[i % 2][0], xhs, feed_w[i % 2][1], True)
            else:
                tk.rms_norm_quant_fp8(x, norm, 1e-5)

    row = dict(shape=shape, m=m, layers=layers, weight_mb=round(n * k / 1e6, 1))
    for backend in ("triton", "gluon"):
        gdg.DECODE_GEMM = backend
        row[f"{backend}_alone_us"] = round(_graph_us(alone) / layers, 2)
        row[f"{backend}_chain_us"] = round(_graph_us(chain) / layers, 2)
    gdg.DECODE_GEMM = "triton"
    row["feed_us"] = round(_graph_us(feed) / layers, 2)  # the feeding kernel alone (no Gluon GEMM in it)
    gdg.DECODE_GEMM = "gluon"
    for kind in ("alone", "chain"):
        row[f"{kind}_ratio"] = round(row[f"triton_{kind}_us"] / row[f"gluon_{kind}_us"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    for m in (int(v) for v in args.ms.split(",")):
        for shape in SHAPES:
            rows.append(case(shape, m, args.layers))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name()
    json.dump(dict(device=dev, rows=rows), open(os.path.join(args.out, "decode_gemm.json"), "w"), indent=1)
    lines = [f"# Decode GEMMs, Gluon against Triton ({dev})", "",
             "| shape | M | MB | Triton alone us | Gluon alone us | ratio | Triton chain us | Gluon chain us | ratio "
             "| feed us |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['m']} | {r['weight_mb']} | {r['triton_alone_us']} | {r['gluon_alone_us']} "
                     f"| {r['alone_ratio']} | {r['triton_chain_us']} | {r['gluon_chain_us']} | {r['chain_ratio']} "
                     f"| {r['feed_us']} |")
    open(os.path.join(args.out, "decode_gemm.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
