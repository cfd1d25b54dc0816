"""Tile sweep of the Gluon paged prefill kernel beside the Triton one (GPU, one process).

4 x 4096 causal, 32/8 heads, D 128, bf16, pages of 16 and 64 (the issue-3 prefill shape), and
the chunked prefill (512 new over 3584 cached). Each Gluon config's output is checked against
the Triton kernel's. Prints a line per config and writes JSON:

    python benchmarks/prefill_sweep.py --out prefill_sweep.json [--configs 128,64,3,8,168 ...]

A config is grid,pack: persistent programs (0: one per SM), query heads per work item.
"""
from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench_cudagraph

from trtllm_kernels.kernels.gluon_attention import gluon_paged_prefill
from trtllm_kernels.kernels.triton_attention import _paged_copy, triton_paged_prefill

DEFAULT_CONFIGS = ["0,4", "0,2", "0,1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="prefill_sweep.json")
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS)
    ap.add_argument("--pages", default="16,64")
    args = ap.parse_args()
    dev, bf16 = "cuda", torch.bfloat16
    hq, hkv, d = 32, 8, 128
    rows = []

    def timed(fn):
        fn()
        return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3  # us

    shapes = [("prefill", 4, 4096, 0), ("chunk", 4, 512, 3584)]
    for what, b, new, cached in shapes:
        total = new + cached
        flops = 4 * b * hq * d * sum(cached + i + 1 for i in range(new))
        k = torch.randn(b, hkv, total, d, device=dev, dtype=bf16)
        v = torch.randn_like(k)
        q = torch.randn(b * new, hq, d, device=dev, dtype=bf16)
        qsl = torch.arange(0, b * new + 1, new, dtype=torch.int32, device=dev)
        for page in (int(p) for p in args.pages.split(",")):
            if what == "chunk" and page != 16:
                continue
            kc, vc, bt, sl = _paged_copy(k, v, page, bf16)
            ref = triton_paged_prefill(q, kc, vc, bt, sl, qsl).float()
            t = timed(lambda: triton_paged_prefill(q, kc, vc, bt, sl, qsl))
            base = dict(what=what, page=page, kernel="triton", us=t, TFLOPs=flops / t / 1e6)
            rows.append(base)
            print(json.dumps(base), flush=True)
            for cfg in args.configs:
                grid, pack = (int(x) for x in cfg.split(","))
                kw = dict(grid=grid or None, pack=pack)
                r = dict(what=what, page=page, kernel="gluon", cfg=cfg)
                try:
                    fn = lambda: gluon_paged_prefill(q, kc, vc, bt, sl, qsl, **kw)
                    out = fn().float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    t = timed(fn)
                    r.update(us=t, TFLOPs=flops / t / 1e6, vs_triton=base["us"] / t, rel_err_vs_triton=err,
                             ok=err < 1e-2 and not out.isnan().any().item())
                except Exception as e:  # out of resources, ...
                    r.update(error=repr(e)[:200])
                rows.append(r)
                print(json.dumps(r), flush=True)
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
            del kc, vc


if __name__ == "__main__":
    main()
