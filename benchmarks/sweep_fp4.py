"""Sweep the FP4 W4A16 GEMM's launch configurations on the GPU (issue 5): for gate_up
28672x4096 and down 4096x14336 at M in {1, 16, 64, 128, 4096}, time a few configurations of
the fused kernel, the dequantize + torch.matmul path and bf16 torch.matmul under CUDA graphs,
and print / save the best. csrc/fp4_gemm.cu's and (on Hopper, below 256 tokens) csrc/fp4_wgmma.cu's configurations too.
Each timed call reads its weights from memory, as in a model: the calls rotate over copies of
the packed weight that together exceed twice the L2 cache (the down weight alone fits in L2).
MXFP4 also runs the W4A8 kernel (fp8 activations: its rel_err includes their quantization).
Usage: [SWEEP_MS=1,16 SWEEP_FORMATS=nvfp4,mxfp4 SWEEP_TRITON=rule SWEEP_CSRC=rule SWEEP_KERNELS=triton,csrc,wgmma,w4a8]
       python benchmarks/sweep_fp4.py [out.json]
       python benchmarks/sweep_fp4.py --compare BEFORE.json AFTER.json out.png  (any machine: the
       csrc kernels' rule times of two sweeps side by side, e.g. a kernel change's A/B)"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

import trtllm_kernels as tk
from trtllm_kernels.bench import measure_copy_bandwidth
from trtllm_kernels.bench.timing import l2_cache_bytes, num_rotations
from trtllm_kernels.kernels import csrc
from trtllm_kernels.kernels import triton_fp4 as tf
from trtllm_kernels.kernels.triton_tiles import num_sms

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336)}
MS = tuple(int(v) for v in os.environ.get("SWEEP_MS", "1,16,64,128,4096").split(","))
FORMATS = os.environ.get("SWEEP_FORMATS", "nvfp4").split(",")
KERNELS = os.environ.get("SWEEP_KERNELS", "triton,csrc,wgmma,w4a8").split(",")


def configs(m, n, half):
    """The Triton kernel's own rule (PTX conversion on and off) and alternatives around it."""
    c = lambda bm, bn, kb, w, s: dict(BLOCK_M=bm, BLOCK_N=bn, KB=kb, SPLIT_K=0, GROUP_N=8, num_warps=w, num_stages=s)
    rule = tf.gemm_config(m, n, half)
    out = [dict(rule), dict(rule, ASM=False)]
    if m <= 16:
        out += [c(16, bn, kb, w, st) for bn, kb, w, st in
                [(128, 64, 4, 4), (128, 64, 8, 6), (128, 128, 8, 4), (128, 128, 4, 3), (64, 128, 4, 4),
                 (64, 64, 4, 6), (256, 64, 8, 4)]]
    elif m <= 64:
        out += [c(64, bn, kb, w, st) for bn, kb, w, st in
                [(128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)]]
    else:
        out += [c(128, bn, kb, w, st) for bn, kb, w, st in
                [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 2)]]
    return out


def auto_split(cfg, m, n, half):
    if cfg["SPLIT_K"]:
        return cfg
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"])
    steps = triton.cdiv(half, cfg["KB"])
    split = 1
    while tiles * split < 2 * num_sms() and steps // (split * 2) >= 4 and split < 16:
        split *= 2
    return dict(cfg, SPLIT_K=split)


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else None
    if csrc.available():  # which tree's kernels this is (an A/B copy: benchmarks/tree_at.sh)
        print("csrc sources:", csrc.source_dir(), flush=True)
    if any(m >= 1024 for m in MS):  # the dequantization's yardstick
        print(f"copy bandwidth {measure_copy_bandwidth(torch.device('cuda')) / 1e9:.0f} GB/s", flush=True)
    rows = []
    t0 = time.time()
    for (name, (n, k)), fmt in ((sh, f) for sh in SHAPES.items() for f in FORMATS):
        w = torch.randn(n, k, device="cuda") * k ** -0.5
        p, s, g = tk.quantize_fp4(w, fmt)
        wb = w.to(torch.bfloat16)
        del w
        copies = [(p, s)] + [(p.clone(), s.clone()) for _ in range(
            num_rotations(p.nbytes + s.nbytes, l2_cache_bytes(torch.device("cuda"))) - 1)]

        def rotated(f):  # us per call of f(p, s), each call on the next copy
            return do_bench_cudagraph(lambda: [f(pc, sc) for pc, sc in copies]) * 1e3 / len(copies)

        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ tk.dequantize_fp4(p, s, g).t()
            bf16 = do_bench_cudagraph(lambda: torch.matmul(x, wb.t()))  # 117-235 MB: past L2
            row = dict(shape=name, format=fmt, M=m, bf16_us=bf16 * 1e3, results=[])
            try:  # int4 tinygemm at the same shape, group size 128 (values do not matter for time)
                q = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
                wq = torch._convert_weight_to_int4pack(q, 8)
                sz = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
                row["tinygemm_us"] = do_bench_cudagraph(lambda: torch._weight_int4pack_mm(x, wq, 128, sz)) * 1e3
            except Exception as e:
                print("tinygemm failed", str(e)[:200], flush=True)
            tf.CONFIG_OVERRIDE = None
            if m >= 1024:  # the dequantize + matmul path, and its dequantization alone
                saved = tf.DEQUANT_MATMUL_MIN_M
                tf.DEQUANT_MATMUL_MIN_M = 1
                row["dequant_matmul_us"] = rotated(lambda pc, sc: tf.fp4_gemm_cuda(x, pc, sc, g))
                us = row["dequant_us"] = rotated(lambda pc, sc: tf.fp4_dequantize_cuda(pc, sc, g, x.dtype))
                moved = p.nbytes + s.nbytes + 2 * n * k  # packed weights and scales in, bf16 out
                print(f"    dequantize: {us:.1f} us, {moved / us / 1e3:.0f} GB/s", flush=True)
                tf.DEQUANT_MATMUL_MIN_M = saved
            triton = configs(m, n, k // 2) if m < 1024 and "triton" in KERNELS else []
            for cfg in triton[:1] if os.environ.get("SWEEP_TRITON") == "rule" else triton:
                cfg = auto_split(cfg, m, n, k // 2)
                tf.CONFIG_OVERRIDE = cfg  # (the csrc kernel is taken only without an override)
                try:
                    o = tf.fp4_gemm_cuda(x, p, s, g)
                    err = float((o.float() - ref).abs().max() / ref.abs().max())
                    t = rotated(lambda pc, sc: tf.fp4_gemm_cuda(x, pc, sc, g))
                except Exception as e:  # a config that does not fit (shared memory) is skipped
                    print(name, m, cfg, "FAILED", str(e)[:120], flush=True)
                    continue
                finally:
                    tf.CONFIG_OVERRIDE = None
                row["results"].append(dict(cfg=cfg, us=t, rel_err=err))
            def sweep_csrc(key, gemm, grid, rule):  # a csrc kernel's grid and its rule's choice
                grid = [] if os.environ.get("SWEEP_CSRC") == "rule" else grid
                for cfg in grid + ([rule] if rule not in grid else []):
                    try:
                        err = float((gemm(x, p, s, g, cfg).float() - ref).abs().max() / ref.abs().max())
                    except RuntimeError as e:  # e.g. more shared memory than an SM has
                        print(name, m, key, cfg, "FAILED", str(e)[:120], flush=True)
                        continue
                    us = rotated(lambda pc, sc: gemm(x, pc, sc, g, cfg))
                    row["results"].append(dict(cfg={key: cfg}, us=us, rel_err=err))
                timed = [r["us"] for r in row["results"] if r["cfg"].get(key) == rule]
                if timed:
                    row[f"{key}_rule"] = dict(cfg=rule, us=timed[0])

            if m <= csrc.FP4_SMALL_M_MAX and csrc.available() and "csrc" in KERNELS:  # csrc/fp4_gemm.cu
                sweep_csrc("csrc", csrc.fp4_gemm_small_m_cuda,
                           [(t, wp, sp) for t in ((1, 2, 4) if m <= 16 else (1, 2)) for wp in (2, 4, 8) for sp in (1, 2, 4)],
                           csrc.fp4_small_m_config(m, n, k // 2, num_sms()))
            tokens = [t for t in csrc.FP4_WGMMA_TOKENS if t >= m][:2] or [128]  # csrc/fp4_wgmma.cu's grid
            grid = [(t, wg, sp) for t in tokens for wg in (1, 2, 4) for sp in (1, 2, 4, 8) if (t, wg) != (128, 4)]
            rule = csrc.fp4_wgmma_config(m, n, k // 2, num_sms())
            if (m < tf.DEQUANT_MATMUL_MIN_M and csrc.available() and csrc.fp4_wgmma_supported(x, p, s)
                    and "wgmma" in KERNELS):
                sweep_csrc("wgmma", csrc.fp4_gemm_wgmma_cuda, grid, rule)
            if fmt == "mxfp4" and csrc.available() and csrc.fp4_w4a8_supported(x, p, s) and "w4a8" in KERNELS:
                sweep_csrc("w4a8", lambda x, p, s, g, cfg: csrc.fp4_gemm_w4a8_cuda(x, p, s, cfg), grid, rule)
            row["results"].sort(key=lambda r: r["us"])
            best = row["results"][0] if row["results"] else None
            for key in ("csrc_rule", "wgmma_rule", "w4a8_rule"):
                if key in row:
                    print(f"    {key}: {row[key]['us']:.1f} us {row[key]['cfg']}", flush=True)
            print(f"{name} {fmt} M={m}: bf16 {bf16 * 1e3:.1f} us, tinygemm {row.get('tinygemm_us', float('nan')):.1f}, dequant+mm {row.get('dequant_matmul_us', float('nan')):.1f}, "
                  f"best {best['us'] if best else float('nan'):.1f} us {best['cfg'] if best else ''} "
                  f"(err {best['rel_err'] if best else 0:.1e}); {time.time() - t0:.0f}s", flush=True)
            for r in row["results"][1:]:
                print(f"    {r['us']:.1f} {r['cfg']}", flush=True)
            rows.append(row)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


def compare(before: str, after: str, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(Path(path).read_text()) for path in (before, after)]
    key = lambda r: (r["shape"], r["format"], r["M"])
    rules = [{key(r): r[k]["us"] for r in rs for k in ("wgmma_rule", "csrc_rule") if k in r} for rs in rows]
    cases = [c for c in rules[0] if c in rules[1]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases)), 4.5))
    for i, (rule, label) in enumerate(zip(rules, (before, after))):
        ax.bar([j + 0.4 * i for j in range(len(cases))], [rule[c] for c in cases], 0.4, label=Path(label).stem)
    for j, c in enumerate(cases):
        ax.annotate(f"{rules[1][c] / rules[0][c]:.2f}", (j + 0.4, rules[1][c]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + 0.2 for j in range(len(cases))], [f"{s}\n{f}\nM={m}" for s, f, m in cases], fontsize=7)
    ax.set_ylabel("us (launch rule's configuration)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        compare(*sys.argv[2:5])
    else:
        main()
