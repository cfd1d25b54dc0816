"""The Gluon FP8 GEMMs on the GPU beside the Triton kernels (which the ops run where the Gluon
ones do not apply) and torch._scaled_mm (cuBLASLt, per-token x per-channel scales), under CUDA
graphs with rotated inputs, outputs checked against the op's reference. One JSON row per
(shape, M), written to DIR/<mode>_gemm.json.

Modes:
- group: the fused MLP's down GEMM (activations with one scale per 1 x 128 group, from the
  gate_up epilogue); _scaled_mm with per-token scales is the speed to reach (cheaper scaling).
  "gluon" is the default kernel (GROUP_GEMM_KERNEL), beside both kernels at their tile widths.
- token: per-token activations x per-channel weights, the engine's qkv, o and (unfused)
  gate_up / down GEMMs; the Gluon kernel at both tile widths.
- glu: the fused MLP's gate_up GEMM with the SiLU-and-mul + fp8 (1 x 128 groups) epilogue;
  _scaled_mm here is the bare gate_up GEMM (no epilogue, bf16 out: a lower bound on time).

    python benchmarks/group_gemm_bench.py --out DIR [--mode group|token|glu] [--ms 256,1024]
        [--shapes 4096x14336,6144x4096]   (N x K; for glu N is the [gate; up] rows)
    python benchmarks/group_gemm_bench.py --report DIR/token_gemm.json   (cases JSON, table, plot)
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import trtllm_kernels as tk
from trtllm_kernels.bench.timing import l2_cache_bytes, num_rotations, tensor_bytes, time_fn
from trtllm_kernels.fp8 import FP8, _fp8_gemm_ref, _fp8_gemm_silu_mul_ref
from trtllm_kernels.kernels.gluon_fp8_gemm import gluon_group_scaled_gemm, gluon_token_scaled_gemm
from trtllm_kernels.kernels.triton_fp8 import _launch_gemm, triton_fp8_gemm

BF16 = torch.bfloat16


def inputs(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    a, sa = tk.quantize_fp8_per_token(x, 128)
    pa, psa = tk.quantize_fp8_per_token(x)
    b, sb = tk.quantize_fp8_per_channel(torch.randn(n, k, device="cuda") * k ** -0.5)
    return dict(a=a, sa=sa, b=b, sb=sb, pa=pa, psa=psa)


def scaled_mm(i):
    return torch._scaled_mm(i["pa"], i["b"].t(), scale_a=i["psa"], scale_b=i["sb"].t(), out_dtype=BF16)


def triton_glu(i):
    m, inter = i["pa"].shape[0], i["b"].shape[0] // 2
    out = torch.empty(m, inter, dtype=FP8, device="cuda")
    scale = torch.empty(m, -(-inter // 128), dtype=torch.float32, device="cuda")
    _launch_gemm(i["pa"], i["b"], i["psa"], i["sb"], None, out, scale, glu=True)
    return out, scale


MODES = {
    "group": {
        "triton": lambda i: triton_fp8_gemm(i["a"], i["b"], i["sa"], i["sb"], None, BF16),
        "gluon": lambda i: gluon_group_scaled_gemm(i["a"], i["b"], i["sa"], i["sb"]),
        "gluon_chain_n128": lambda i: gluon_group_scaled_gemm(i["a"], i["b"], i["sa"], i["sb"], kernel="chain",
                                                              block_n=128),
        "gluon_chain_n256": lambda i: gluon_group_scaled_gemm(i["a"], i["b"], i["sa"], i["sb"], kernel="chain",
                                                              block_n=256),
        "gluon_promote": lambda i: gluon_group_scaled_gemm(i["a"], i["b"], i["sa"], i["sb"], kernel="promote"),
        "scaled_mm_per_token": scaled_mm,
    },
    "token": {
        "triton": lambda i: triton_fp8_gemm(i["pa"], i["b"], i["psa"], i["sb"], None, BF16),
        "gluon": lambda i: gluon_token_scaled_gemm(i["pa"], i["b"], i["psa"], i["sb"])[0],
        "gluon_n128": lambda i: gluon_token_scaled_gemm(i["pa"], i["b"], i["psa"], i["sb"], block_n=128)[0],
        "gluon_n256": lambda i: gluon_token_scaled_gemm(i["pa"], i["b"], i["psa"], i["sb"], block_n=256)[0],
        "scaled_mm_per_token": scaled_mm,
    },
    "glu": {
        "triton": triton_glu,
        "gluon": lambda i: gluon_token_scaled_gemm(i["pa"], i["b"], i["psa"], i["sb"], glu=True, quant_out=True),
        "scaled_mm_per_token": scaled_mm,
    },
}


def reference(mode, i):
    if mode == "group":
        return _fp8_gemm_ref(i["a"], i["b"], i["sa"], i["sb"], None, BF16).float()
    if mode == "token":
        return _fp8_gemm_ref(i["pa"], i["b"], i["psa"], i["sb"], None, BF16).float()
    return tk.dequantize_fp8(*_fp8_gemm_silu_mul_ref(i["pa"], i["b"], i["psa"], i["sb"], True, BF16)).float()


def rel_err(mode, name, out, ref):
    if mode == "glu" and name != "scaled_mm_per_token":
        out = tk.dequantize_fp8(*out)
    if mode == "glu" and name == "scaled_mm_per_token":
        return None  # a different function (no epilogue)
    return round(float((out.float() - ref).abs().max() / ref.abs().max()), 4)


def report(path: str) -> None:
    """The kernel issues' result format beside a bench JSON: <stem>_cases.json (a list `cases` of
    name, ours_us, baseline, baseline_us, ratio_vs_baseline = baseline time / ours,
    fraction_of_roofline = TFLOP/s over the dense fp8 peak, device), <stem>.md and <stem>.png
    (ours / Triton and ours / _scaled_mm over M, one line per shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak_tflops = 1979.0  # H100 SXM dense fp8 (NVIDIA's figure)
    rows = json.load(open(path))
    stem = os.path.splitext(path)[0]
    cases = []
    for r in rows:
        for base in ("triton", "scaled_mm_per_token"):
            ours = r["gluon"]
            cases.append(dict(name=f"{r['mode']}/M{r['m']}_N{r['n']}_K{r['k']}_vs_{base}", ours_us=ours["us"],
                              baseline=base, baseline_us=r[base]["us"],
                              ratio_vs_baseline=round(r[base]["us"] / ours["us"], 3),
                              fraction_of_roofline=round(ours["tflops"] / peak_tflops, 3), device=r["device"]))
    json.dump({"cases": cases}, open(f"{stem}_cases.json", "w"), indent=1)
    lines = ["| mode | M | N | K | Gluon us | Triton us | _scaled_mm us | Gluon / Triton | Gluon / _scaled_mm | TFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r["gluon"]
        lines.append(f"| {r['mode']} | {r['m']} | {r['n']} | {r['k']} | {g['us']} | {r['triton']['us']} | "
                     f"{r['scaled_mm_per_token']['us']} | {g['vs_triton']}x | {g['vs_scaled_mm']}x | {g['tflops']} |")
    open(f"{stem}.md", "w").write(f"Device: {rows[0]['device']}. Speed-ups are time ratios (>1: Gluon faster).\n\n"
                                  + "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (n, k) in sorted({(r["n"], r["k"]) for r in rows}):
        sel = [r for r in rows if (r["n"], r["k"]) == (n, k)]
        for ax, key in zip(axes, ("vs_triton", "vs_scaled_mm")):
            ax.plot([r["m"] for r in sel], [r["gluon"][key] for r in sel], marker="o", label=f"N{n} K{k}")
    for ax, title in zip(axes, ("Gluon / Triton (time ratio)", "Gluon / torch._scaled_mm")):
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("M (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{rows[0]['mode']} FP8 GEMM, {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", default=None, help="a bench JSON to write the cases / table / plot of")
    ap.add_argument("--out")
    ap.add_argument("--mode", choices=list(MODES), default="group")
    ap.add_argument("--ms", default="64,256,512,1024,2048,4096,8192")
    ap.add_argument("--shapes", default=None, help="N x K list (default: 4096x14336; glu: 28672x4096)")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    if not args.out:
        ap.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    shapes = args.shapes or ("28672x4096" if args.mode == "glu" else "4096x14336")
    fns = MODES[args.mode]
    l2 = l2_cache_bytes("cuda")
    rows = []
    for shape in shapes.split(","):
        n, k = map(int, shape.split("x"))
        for m in map(int, args.ms.split(",")):
            first = inputs(m, n, k)
            count = num_rotations(tensor_bytes(first), l2, max_total_bytes=4 << 30)
            sets = [(first,)] + [(inputs(m, n, k),) for _ in range(count - 1)]
            ref = reference(args.mode, first)
            row = dict(mode=args.mode, m=m, n=n, k=k, device=torch.cuda.get_device_name())
            for name, fn in fns.items():
                us = time_fn(fn, sets, graph=True, warmup=5, iters=100, budget_s=0.5)["median_us"]
                row[name] = dict(us=round(us, 2), tflops=round(2 * m * n * k / us / 1e6, 1),
                                 rel_err=rel_err(args.mode, name, fn(first), ref))
            for name in fns:
                if name.startswith("gluon"):
                    row[name]["vs_triton"] = round(row["triton"]["us"] / row[name]["us"], 3)
                    row[name]["vs_scaled_mm"] = round(row["scaled_mm_per_token"]["us"] / row[name]["us"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del sets, first
    json.dump(rows, open(os.path.join(args.out, f"{args.mode}_gemm.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
