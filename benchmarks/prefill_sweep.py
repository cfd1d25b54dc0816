"""The Gluon paged prefill kernel beside the Triton one at several configs and shapes (GPU, one process).

4 x 4096 causal, 32/8 heads, D 128, bf16, pages of 16 and 64 (the issue-3 prefill shape), the
chunked prefill (512 new over 3584 cached) and serving-sized prefills (pages of 16). Each Gluon
config's output is checked against the Triton kernel's. Prints a line per config and writes JSON:

    python benchmarks/prefill_sweep.py --out prefill_sweep.json [--configs 4,3,2 1,2,2 ...]

A config is pack,k_stages,v_stages: query heads per work item, K and V ring depths.
"""
from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench_cudagraph

from trtllm_kernels.kernels.gluon_attention import gluon_paged_prefill
from trtllm_kernels.kernels.triton_attention import _paged_copy, triton_paged_prefill

DEFAULT_CONFIGS = ["4,3,2"]


def prefill_inputs(batch: int, new: int, cached: int, hq: int = 32, hkv: int = 8, d: int = 128, dev: str = "cuda"):
    """Random bf16 q [batch * new, hq, d] and contiguous k, v [batch, hkv, new + cached, d], the
    query_start_loc of equal-length sequences, and the causal attention's FLOPs."""
    k = torch.randn(batch, hkv, new + cached, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch * new, hq, d, device=dev, dtype=torch.bfloat16)
    qsl = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=dev)
    flops = 4 * batch * hq * d * sum(cached + i + 1 for i in range(new))
    return q, k, v, qsl, flops


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

    # (what, batch, new tokens, cached tokens): the two shapes, then serving-sized ones
    shapes = [("prefill", 4, 4096, 0), ("chunk", 4, 512, 3584), ("short", 1, 16, 0), ("short", 1, 128, 0),
              ("short", 1, 512, 0), ("short", 1, 1024, 0), ("short", 1, 2048, 0), ("batch", 4, 256, 0),
              ("batch", 16, 256, 0), ("chunk", 8, 256, 1024), ("chunk", 1, 512, 8192)]
    for what, b, new, cached in shapes:
        q, k, v, qsl, flops = prefill_inputs(b, new, cached, hq, hkv, d, dev)
        for page in (int(p) for p in args.pages.split(",")):
            if what != "prefill" and page != 16:
                continue
            kc, vc, bt, sl = _paged_copy(k, v, page, bf16)
            ref = triton_paged_prefill(q, kc, vc, bt, sl, qsl).float()
            t = timed(lambda: triton_paged_prefill(q, kc, vc, bt, sl, qsl))
            base = dict(what=what, batch=b, new=new, cached=cached, page=page, kernel="triton", us=t,
                        TFLOPs=flops / t / 1e6)
            rows.append(base)
            print(json.dumps(base), flush=True)
            for cfg in args.configs:
                pack, k_stages, v_stages = (int(x) for x in cfg.split(","))
                kw = dict(pack=pack, k_stages=k_stages, v_stages=v_stages)
                r = dict(what=what, batch=b, new=new, cached=cached, page=page, kernel="gluon", cfg=cfg)
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
