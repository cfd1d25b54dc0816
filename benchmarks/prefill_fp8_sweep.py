"""Prefill attention over FP8 pages at the serving runs' shapes: Triton launch configs beside the
default, the Gluon kernel over bf16 pages of the same data, and SDPA forced to its
FLASH_ATTENTION backend over contiguous bf16 (GPU, one process, CUDA graphs, medians). That
forced backend is not issue 3's baseline: `bench kernels` lets torch pick, and its pick was
faster on H100 (4 x 4096: ~1010 us against 1749 us forced).

The FP8 throughput runs prefill 64 prompts of 128 tokens a step (in/out 128/128) or ~8 prompts
of 1000 (1000/1000), where the Gluon kernel (bf16 pages only) does not apply. Each config's
output is checked against the default's. Prints a line per row and writes JSON:

    python benchmarks/prefill_fp8_sweep.py --out prefill_fp8.json [--pages 16,32]
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph

from prefill_sweep import prefill_inputs  # benchmarks/, this script's directory
from trtllm_kernels.kernels.gluon_attention import gluon_paged_prefill
from trtllm_kernels.kernels.triton_attention import _paged_copy, triton_paged_prefill

# Triton launch keywords tried beside the default (prefill_config): tile sizes, warps, stages,
# the register cap that lets two programs share an SM, GQA packing. A config without maxnreg
# takes the default's cap (128 since stop 23; the committed call-1 sweep ran uncapped there).
CONFIGS = [
    dict(block_m=128, block_n=64, num_warps=8, num_stages=3, maxnreg=128, pack=1),
    dict(block_m=128, block_n=64, num_warps=8, num_stages=3, maxnreg=128, pack=4),
    dict(block_m=128, block_n=64, num_warps=8, num_stages=2, pack=4),
    dict(block_m=128, block_n=32, num_warps=8, num_stages=3, maxnreg=128, pack=4),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=2, pack=4),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=3, pack=1),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=3, pack=4),
    dict(block_m=64, block_n=32, num_warps=4, num_stages=3, pack=4),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=2, maxnreg=128, pack=2),
]
# (name, sequences, new tokens each, cached tokens each)
SHAPES = [("serve128", 64, 128, 0), ("serve1000", 8, 1000, 0), ("chunk1000", 8, 500, 500),
          ("issue4096", 4, 4096, 0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="prefill_fp8.json")
    ap.add_argument("--pages", default="16,32")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    args = ap.parse_args()
    dev, bf16, fp8 = "cuda", torch.bfloat16, torch.float8_e4m3fn
    hq, hkv, d = 32, 8, 128
    rows = []

    def timed(fn):
        fn()
        return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3  # us

    def record(r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)

    for name, b, new, cached in SHAPES:
        if name not in args.shapes.split(","):
            continue
        q, k, v, qsl, flops = prefill_inputs(b, new, cached, hq, hkv, d, dev)
        shape = dict(shape=name, seqs=b, new=new, cached=cached)
        if cached == 0:  # SDPA's flash backend over the same tokens, contiguous (a reference only)
            qs = q.view(b, new, hq, d).transpose(1, 2).contiguous()
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                t = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, is_causal=True,
                                                                                   enable_gqa=True))
            record(dict(shape, kernel="sdpa_flash", us=t, TFLOPs=flops / t / 1e6))
        for page in (int(p) for p in args.pages.split(",")):
            kc, vc, bt, sl = _paged_copy(k, v, page, bf16)
            t = timed(lambda: gluon_paged_prefill(q, kc, vc, bt, sl, qsl))
            record(dict(shape, page=page, kernel="gluon_bf16_pages", us=t, TFLOPs=flops / t / 1e6))
            kc, vc, bt, sl = _paged_copy(k, v, page, fp8)
            ref = triton_paged_prefill(q, kc, vc, bt, sl, qsl).float()
            base = timed(lambda: triton_paged_prefill(q, kc, vc, bt, sl, qsl))
            record(dict(shape, page=page, kernel="triton_fp8", cfg="default", us=base, TFLOPs=flops / base / 1e6))
            for kw in CONFIGS:
                r = dict(shape, page=page, kernel="triton_fp8", cfg=kw)
                try:
                    fn = lambda: triton_paged_prefill(q, kc, vc, bt, sl, qsl, **kw)
                    err = (fn().float() - ref).abs().max().item()
                    t = timed(fn)
                    r.update(us=t, TFLOPs=flops / t / 1e6, vs_default=base / t, max_err=err, ok=err < 2e-2)
                except Exception as e:  # out of resources, ...
                    r.update(error=repr(e)[:200])
                record(r)
            del kc, vc


if __name__ == "__main__":
    main()
