"""Redraws tpot.png and summary.json from the JSONs here (python3 plot.py)."""
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = os.path.dirname(os.path.abspath(__file__))


def tpot(pattern):
    return [json.load(open(f))["tpot_ms"] for f in sorted(glob.glob(os.path.join(d, pattern)))]


def tok_s(pattern):
    return [json.load(open(f))["runs"][0]["output_tok_s"] for f in sorted(glob.glob(os.path.join(d, pattern)))]


groups = [
    ("call 2: every kernel PDL", [("off", "call2_pdl_all_kernels/lat_pdl0_*.json"),
                                  ("on", "call2_pdl_all_kernels/lat_nopf_*.json"),
                                  ("on + L2 prefetch", "call2_pdl_all_kernels/lat_pdl1_*.json")]),
    ("call 3: GEMMs only", [("off", "call3_pdl_gemms/lat_pdl0_*.json"), ("on", "call3_pdl_gemms/lat_nopf_*.json"),
                            ("on + L2 prefetch", "call3_pdl_gemms/lat_pdl1_*.json")]),
    ("call 4: landed", [("off", "call4_final_ab/lat_pdl0_*.json"), ("on", "call4_final_ab/lat_pdl1_*.json")]),
]
summary = {"tpot_ms": {}, "throughput_128_128_tok_s": {
    "call 1 (no PDL): new tree run 1, run 2; 09e04ba run 2": [*tok_s("call1_throughput_order/tp_new*.json"),
                                                              *tok_s("call1_throughput_order/tp_old2.json")],
    "call 2 every kernel PDL: off, on": tok_s("call2_pdl_all_kernels/tp_pdl0.json") + tok_s("call2_pdl_all_kernels/tp_pdl1.json"),
    "call 3 GEMMs only: off, on": tok_s("call3_pdl_gemms/tp_pdl0.json") + tok_s("call3_pdl_gemms/tp_pdl1.json"),
    "call 4 GEMMs only: off": tok_s("call4_final_ab/tp_pdl0_*.json"),
    "call 4 GEMMs only: on": tok_s("call4_final_ab/tp_pdl1_*.json"),
}}
colors = {"off": "#888888", "on": "#4c72b0", "on + L2 prefetch": "#c44e52"}
fig, ax = plt.subplots(figsize=(9, 4.2))
x, ticks, labels = 0, [], []
for group, bars in groups:
    for name, pattern in bars:
        vals = tpot(pattern)
        summary["tpot_ms"][f"{group}: {name}"] = vals
        ax.bar(x, sum(vals) / len(vals), color=colors[name])
        ax.plot([x] * len(vals), vals, "k.", ms=4)
        ticks.append(x)
        labels.append(f"{group}\n{name}")
        x += 1
    x += 0.6
ax.set_xticks(ticks)
ax.set_xticklabels(labels, fontsize=7, rotation=20, ha="right")
ax.set_ylim(2.9, 3.7)
ax.set_ylabel("FP8 TPOT, ms (batch 1, 128/128)")
ax.set_title("Llama-3.1-8B shape, FP8, H200: programmatic dependent launch (dots: runs)")
fig.tight_layout()
fig.savefig(os.path.join(d, "tpot.png"), dpi=110)
json.dump(summary, open(os.path.join(d, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
