"""Redraws decode_gemm.png and summary.json from the JSONs here (python3 plot.py)."""
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = os.path.dirname(os.path.abspath(__file__))


def tpot(pattern):
    return [round(json.load(open(f))["tpot_ms"], 3) for f in sorted(glob.glob(os.path.join(d, pattern)))]


def tok_s(pattern):
    return [round(json.load(open(f))["runs"][0]["output_tok_s"]) for f in sorted(glob.glob(os.path.join(d, pattern)))]


calls = [  # (call, [(bar, pattern)]); call 1's "Gluon" runs took Triton at batch 1 (see README)
    ("call 2: a product\nin flight", [("Triton", "call2_*/lat_triton_*.json"), ("Gluon", "call2_*/lat_gluon_*.json")]),
    ("call 3: 256-wide\nslots", [("Triton", "call3_*/lat_triton_*.json"), ("Gluon", "call3_*/lat_gluon_*.json")]),
    ("call 4: GLU on two\nwarpgroups", [("Triton", "call4_*/lat_triton_*.json"), ("Gluon qkv, o", "call4_*/lat_plain_*.json"),
                                       ("Gluon", "call4_*/lat_all_*.json")]),
    ("call 5: all four", [("Triton", "call5_*/lat_triton_*.json"), ("Gluon qkv, o", "call5_*/lat_plain_*.json"),
                          ("Gluon", "call5_*/lat_all_[12].json")]),
    ("call 7: GLU lets\ndown start", [("Gluon", "call7_*/lat_trig0_*.json"),
                                      ("Gluon + GLU trigger", "call7_*/lat_trig1_*.json")]),
]
colors = {"Triton": "#888888", "Gluon qkv, o": "#dd8452", "Gluon": "#4c72b0", "Gluon + GLU trigger": "#55a868"}
summary = {"tpot_ms": {}, "throughput_128_128_tok_s (call 6, run 0 warm-up)": {
    "Gluon": tok_s("call6_*/tp_gluon_*.json"), "Triton": tok_s("call6_*/tp_triton_*.json")}}
bench = json.load(open(os.path.join(d, "call4_glu_two_warpgroups/decode_gemm.json")))["rows"]
summary["gemm_us_call4"] = bench
fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
x, ticks, labels, seen = 0, [], [], set()
for call, bars in calls:
    for name, pattern in bars:
        vals = tpot(pattern)
        summary["tpot_ms"][f"{call.replace(chr(10), ' ')}: {name}"] = vals
        ax.bar(x, sum(vals) / len(vals), color=colors[name], label=None if name in seen else name)
        seen.add(name)
        ax.plot([x] * len(vals), vals, "k.", ms=4)
        ticks.append(x)
        labels.append(call if name == bars[0][0] else "")
        x += 1
    x += 0.6
ax.set_xticks(ticks)
ax.set_xticklabels(labels, fontsize=7)
ax.set_ylim(2.8, 3.3)
ax.set_ylabel("FP8 TPOT, ms (batch 1, 128/128)")
ax.set_title("Batch-1 TPOT, Llama-3.1-8B shape, FP8 (dots: runs)", fontsize=9)
ax.legend(fontsize=7)
rows = [r for r in bench if r["m"] == 1]
for i, r in enumerate(rows):
    bx.bar(i - 0.2, r["triton_chain_us"], 0.4, color=colors["Triton"], label="Triton" if i == 0 else None)
    bx.bar(i + 0.2, r["gluon_chain_us"], 0.4, color=colors["Gluon"], label="Gluon" if i == 0 else None)
bx.set_xticks(range(len(rows)))
bx.set_xticklabels([f"{r['shape']}\n(after {'GLU' if r['shape'] == 'down' else 'norm'})" for r in rows],
                   fontsize=7)
bx.set_ylabel("us per pair (feeding kernel + GEMM), 1 token")
bx.set_title("Each GEMM after the kernel feeding it (call 4)", fontsize=9)
bx.legend(fontsize=7)
fig.suptitle("H200: FP8 decode GEMMs in Gluon, the weight requested before the PDL wait", fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(d, "decode_gemm.png"), dpi=110)
json.dump(summary, open(os.path.join(d, "summary.json"), "w"), indent=1)
print(json.dumps(summary["tpot_ms"], indent=1), summary["throughput_128_128_tok_s (call 6, run 0 warm-up)"])
