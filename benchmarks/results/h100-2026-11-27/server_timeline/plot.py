"""The figures of this folder's README: per-step GPU time of the 128/128 run (call 3, FP8
decode with the small-tile rule on and off) and the GPU's idle time before each prefill step
of the 1000/1000 run (call 4, scheduling ahead of mixed steps against stop 18's rule).

    python plot.py   (in this folder)
"""
import gzip
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
for name, label in (("call3/timeline_small_on.json", "2-warp tiles (rule on)"),
                    ("call3/timeline_small_off.json", "4-warp tiles (rule off)")):
    run = json.load(open(name))["runs"][1]
    dec = [s for s in run["steps"] if s["kind"] == "decode_graph"]
    a.plot([s["gpu_ms"] for s in dec], label=label, lw=1)
a.set(title="128/128, batch 1000, FP8 + FP8 KV: decode step GPU time", xlabel="decode step", ylabel="ms")
a.legend()
for run in json.load(gzip.open("call4/timeline_long_ab.json.gz"))["runs"]:
    eager = [s for s in run["steps"] if s["kind"] == "eager"]
    b.plot([s["idle_before_ms"] for s in eager], label=f"{run['mode']}: {run['run']['output_tok_s']:,.0f} tok/s", lw=1)
b.set(title="1000/1000, max batch 512: GPU idle before each mixed step", xlabel="mixed (eager) step", ylabel="ms")
b.legend()
fig.tight_layout()
fig.savefig("server_timeline.png", dpi=110)
