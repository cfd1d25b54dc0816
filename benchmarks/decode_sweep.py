"""Sweep the Triton paged decode kernel's launch knobs at the shapes a serving run meets: large
batches at short contexts (a 128/128 throughput run decodes 1000 sequences at 128-256
tokens), beside the issue's B256 x 512 and B64 x 4096. 32/8 heads, D 128 (or --head-dim 64);
the block table as wide as a 512-token (or the context's) sequence, as in the decode graphs.

    PYTHONPATH=$PWD python3 benchmarks/decode_sweep.py --out DIR [--cache fp8|bf16] [--quick] [--page N] [--deep] [--cuda] [--head-dim 64] [--shapes I,J]

--cuda: the Triton default beside the CUDA C++ tensor-core kernel (csrc/paged_decode.cu,
variant 2) with its own split rule and with one split.

Times each config under CUDA graphs (trtllm_kernels.bench.timing, medians), checks its output
against the default config's, and reports us, GB/s and the fraction of the measured copy
bandwidth per shape. Writes decode_sweep_<cache>.json, .md and, with --cuda, a .png of both
kernels per shape (`--plot JSON` redraws it from a saved JSON, on any machine).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trtllm_kernels.bench.roofline import measure_copy_bandwidth
from trtllm_kernels.bench.timing import time_fn
from trtllm_kernels.kernels import csrc
from trtllm_kernels.kernels.triton_attention import _paged_copy, triton_paged_decode

# (batch, context, page, block-table width in tokens); the last two: the decode batches of the
# FP8 1000/1000 run (max batch 512, mean context 1500) and of the 128/128 run, in its pages
SHAPES = [(1024, 128, 16, 512), (1024, 256, 16, 512), (1024, 128, 64, 512), (1024, 256, 64, 512),
          (512, 1024, 16, 2048), (256, 512, 16, 512), (64, 4096, 16, 4096), (512, 1536, 32, 2048),
          (1024, 192, 32, 512)]


def configs(quick: bool, deep: bool = False, cuda: bool = False) -> list[dict]:
    out = [dict()]  # the default (decode_config)
    if cuda:  # num_splits None: the kernel's own rule (csrc.mma_decode_num_splits)
        return out + [dict(backend="cuda", num_splits=None), dict(backend="cuda", num_splits=1)]
    if deep:
        # Triton 3.6 keeps (num_stages - 2) // 2 K/V tiles in flight ahead of the math (one up
        # to 4 stages, two at 6, three at 8: the block-table load takes stages of its own)
        for bn, warps in ((16, 2), (32, 2), (32, 4), (64, 4)):
            for stages in (4, 6, 8, 10):
                out.append(dict(block_n=bn, num_warps=warps, num_stages=stages, maxnreg=128))
        return out
    for bn in (16, 32, 64, 128):
        for warps in ((2, 4) if bn <= 32 else (4, 8)):
            for stages in ((2, 3, 4) if not quick else (3,)):
                for reg in ((None, 96, 128) if bn <= 64 else (128, 168)):
                    out.append(dict(block_n=bn, num_warps=warps, num_stages=stages, maxnreg=reg))
    return out


def plot(data: dict, png: Path) -> None:
    """Microseconds per shape, one bar per config (the --cuda sweep: Triton beside CUDA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "us" in r]
    shapes = list(dict.fromkeys((r["batch"], r["ctx"], r["page"]) for r in rows))
    cfgs = list(dict.fromkeys(json.dumps(r["cfg"], sort_keys=True) for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(cfgs)
    for i, cfg in enumerate(cfgs):
        us = {(r["batch"], r["ctx"], r["page"]): r["us"] for r in rows if json.dumps(r["cfg"], sort_keys=True) == cfg}
        label = {"{}": "Triton (default)"}.get(cfg, cfg)
        ax.bar([j + i * width for j in range(len(shapes))], [us.get(sh, 0) for sh in shapes], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"B{b} x {c}\np{p}" for b, c, p in shapes], fontsize=8)
    ax.set_ylabel("us (median, CUDA graphs)")
    ax.set_title(f"paged decode, 32/8 heads, D {data.get('head_dim', 128)}, {data['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--cache", default="fp8", choices=["fp8", "bf16"])
    ap.add_argument("--quick", action="store_true", help="num_stages 3 only")
    ap.add_argument("--budget", type=float, default=1e9, help="start no new config after this many seconds")
    ap.add_argument("--page", type=int, help="pages of this many tokens at every shape")
    ap.add_argument("--deep", action="store_true", help="the deep-pipeline grid (stages 4-10)")
    ap.add_argument("--cuda", action="store_true", help="the CUDA C++ kernel beside Triton's default")
    ap.add_argument("--shapes", default=None, help="indices into SHAPES, comma separated (default: all)")
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    ap.add_argument("--plot", default=None, help="only redraw the plot of this saved JSON (next to it)")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    picked = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    shapes = list(dict.fromkeys((b, c, args.page or p, w) for b, c, p, w in picked))
    dev = torch.device("cuda")
    cache_dtype = torch.float8_e4m3fn if args.cache == "fp8" else torch.bfloat16
    bw = measure_copy_bandwidth(dev)
    hq, hkv, d = 32, 8, args.head_dim
    inputs = []
    for batch, ctx, page, width in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(batch, hkv, ctx, d, device=dev, generator=g, dtype=torch.bfloat16)
        v = torch.randn(batch, hkv, ctx, d, device=dev, generator=g, dtype=torch.bfloat16)
        q = torch.randn(batch, hq, d, device=dev, generator=g, dtype=torch.bfloat16)
        kc, vc, bt, sl = _paged_copy(k, v, page, cache_dtype)
        del k, v
        bt = torch.nn.functional.pad(bt, (0, width // page - bt.shape[1]))  # graph-wide tables
        nbytes = 2 * batch * hkv * ctx * d * kc.element_size() + 2 * q.numel() * q.element_size()
        ref = triton_paged_decode(q, kc, vc, bt, sl, num_splits=1).float()
        inputs.append(((batch, ctx, page), (q, kc, vc, bt, sl), nbytes, ref))
    rows = []
    t_end = time.perf_counter() + args.budget
    for cfg in configs(args.quick, args.deep, args.cuda):  # configs outer: a budget cut loses configs, not shapes
        if time.perf_counter() > t_end:
            break
        kw = {key: val for key, val in cfg.items() if val is not None}
        if kw.pop("backend", None) == "cuda":
            fn = lambda *x, num_splits=cfg["num_splits"]: csrc.paged_decode_cuda(*x, num_splits=num_splits)
        else:
            fn = lambda *x, kw=kw: triton_paged_decode(*x, num_splits=1, **kw)
        for (batch, ctx, page), x, nbytes, ref in inputs:
            row = dict(batch=batch, ctx=ctx, page=page, cfg=cfg)
            try:
                err = (fn(*x).float() - ref).abs().max().item()
                t = time_fn(lambda: fn(*x), [()], graph=True, iters=50, device=dev)["median_us"]
            except Exception as e:  # a config that does not compile or run (registers, smem)
                rows.append(dict(row, error=str(e).splitlines()[0][:200]))
                continue
            rows.append(dict(row, us=t, gbs=nbytes / t / 1e3, frac_copy=nbytes / t / 1e3 / (bw / 1e9), max_err=err))
            print(json.dumps(rows[-1]), flush=True)
    path = Path(args.out)
    stem = (f"decode_sweep_{args.cache}" + (f"_p{args.page}" if args.page else "") + ("_deep" if args.deep else "")
            + ("_cuda" if args.cuda else "") + (f"_d{d}" if d != 128 else ""))
    path.mkdir(parents=True, exist_ok=True)
    data = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bw / 1e9, "head_dim": d, "rows": rows}
    (path / f"{stem}.json").write_text(json.dumps(data, indent=1))
    if args.cuda:
        plot(data, path / f"{stem}.png")
    lines = [f"# decode sweep, {args.cache} cache, {torch.cuda.get_device_name()}, copy {bw / 1e9:.0f} GB/s", "",
             "| shape | default us | best us | best / default | best frac of copy | best config |", "|---|---:|---:|---:|---:|---|"]
    for batch, ctx, page, _ in shapes:
        rs = [r for r in rows if (r["batch"], r["ctx"], r["page"]) == (batch, ctx, page) and "us" in r]
        if not rs:
            continue
        base = next(r for r in rs if not r["cfg"])
        best = min(rs, key=lambda r: r["us"])
        lines.append(f"| B{batch} x {ctx}, page {page} | {base['us']:.1f} | {best['us']:.1f} | "
                     f"{best['us'] / base['us']:.2f} | {best['frac_copy']:.2f} | {best['cfg'] or 'default'} |")
    (path / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
