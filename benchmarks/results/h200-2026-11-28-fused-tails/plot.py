import json, glob, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = os.path.dirname(os.path.abspath(__file__))
def t(p): return json.load(open(os.path.join(d, p)))["tpot_ms"]
groups = [
 ("call 2", [("09e04ba", ["call2_ab/lat_old_1.json"]), ("fused merge + split-K sum", ["call2_ab/lat_nofuse_1.json"]),
             ("+ o quantized by attention", ["call2_ab/lat_new_1.json", "call2_ab/lat_new_2.json"])]),
 ("call 6", [("09e04ba", ["call6_split_k_o/fp8_old.json"]), ("fused tails", ["call6_split_k_o/base_1.json", "call6_split_k_o/base_2.json"]),
             ("+ split-K o", ["call6_split_k_o/o_1.json", "call6_split_k_o/o_2.json"]),
             ("+ split-K o, qkv", ["call6_split_k_o/oqkv_1.json", "call6_split_k_o/oqkv_2.json"])]),
 ("call 5", [("fused tails", ["call5_l2_prefetch_dropped/lat_pf0_%d.json" % i for i in (1, 2, 3)]),
             ("+ L2 prefetch of o", ["call5_l2_prefetch_dropped/lat_pf16_%d.json" % i for i in (1, 2, 3)])]),
]
fig, ax = plt.subplots(figsize=(10, 4.5))
x = 0; ticks = []; labels = []; summary = {}
colors = ["#888888", "#4c72b0", "#55a868", "#c44e52"]
for g, bars in groups:
    for i, (name, files) in enumerate(bars):
        vals = [t(f) for f in files]
        summary[f"{g}: {name}"] = vals
        ax.bar(x, sum(vals) / len(vals), color=colors[0] if name == "09e04ba" else colors[1 + (i - (bars[0][0] == "09e04ba")) % 3])
        ax.plot([x] * len(vals), vals, "k.", ms=4)
        ticks.append(x); labels.append(f"{g}\n{name}")
        x += 1
    x += 0.6
ax.set_xticks(ticks); ax.set_xticklabels(labels, fontsize=7, rotation=20, ha="right")
ax.set_ylim(3.0, 3.2); ax.set_ylabel("FP8 TPOT, ms (batch 1, 128/128)")
ax.set_title("Llama-3.1-8B shape, FP8, H200: each bar one machine's runs (dots)")
fig.tight_layout(); fig.savefig(os.path.join(d, "tpot.png"), dpi=110)
json.dump(summary, open(os.path.join(d, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
