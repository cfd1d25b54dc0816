"""The figure of this folder's README: prefill attention over FP8 pages (call 1: the old and
new default Triton configs beside the Gluon kernel over bf16 pages of the same data, pages of
16) and the FP8 throughput A/B (calls 2 and 3).

    python plot.py   (in this folder)
"""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NEW = dict(block_m=128, block_n=64, num_warps=8, num_stages=3, maxnreg=128, pack=4)
rows = [r for r in json.load(open("call1/prefill_fp8.json")) if r.get("page") == 16]
shapes = list(dict.fromkeys(r["shape"] for r in rows))
pick = {
    "old default (5 stages, 1 program / SM)": lambda r: r["kernel"] == "triton_fp8" and r.get("cfg") == "default",
    "new default (capped registers, PACK 4)": lambda r: r["kernel"] == "triton_fp8" and r.get("cfg") == NEW,
    "Gluon, bf16 pages (reference)": lambda r: r["kernel"] == "gluon_bf16_pages",
}
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
w = 0.27
for i, (label, match) in enumerate(pick.items()):
    us = [next(r["us"] for r in rows if r["shape"] == s and match(r)) for s in shapes]
    a.bar([x + (i - 1) * w for x in range(len(shapes))], us, w, label=label)
a.set_xticks(range(len(shapes)), shapes)
a.set_yscale("log")
a.set(title="Prefill attention, 32/8 heads, D 128, pages of 16 (H100)", ylabel="us (log)")
a.legend(fontsize=8)
runs = [("call2/old_p16_{}.json", "old config, page 16"), ("call2/new_p16_{}.json", "new config, page 16"),
        ("call2/new_p32_{}.json", "new config, page 32")]
for i, (pattern, label) in enumerate(runs):
    tok = [json.load(open(pattern.format(k)))["runs"][0]["output_tok_s"] for k in (1, 2)]
    b.scatter([i, i], tok, label=label)
b.axhline(28312, color="gray", ls="--", label="TensorRT-LLM 1.0 (published)")
b.set_xticks(range(len(runs)), [label for _, label in runs])
b.set(title="FP8 + FP8 KV, 128/128, 1000 requests (call 2, two runs each)", ylabel="output tok/s")
b.legend(fontsize=8)
fig.tight_layout()
fig.savefig("fp8_prefill_page32.png", dpi=110)
