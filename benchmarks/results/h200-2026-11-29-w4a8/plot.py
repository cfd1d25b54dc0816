"""Redraw w4a8.png and summary.json from call6_final/fp4_mxfp4_kernels.json (the final code's
kernel table): MXFP4 GEMM time against tokens, W4A16 and W4A8 beside bf16 cuBLAS, same run.
Usage: python plot.py (any machine with matplotlib)."""
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def main():
    cases = json.loads((HERE / "call6_final" / "fp4_mxfp4_kernels.json").read_text())["cases"]
    rows = {}
    for c in cases:
        m = re.match(r"fp4_gemm/(mxfp4(?:_w4a8)?)_(gate_up|down)_M(\d+)_", c["name"])
        kind, shape, tokens = m.group(1), m.group(2), int(m.group(3))
        r = rows.setdefault(shape, {}).setdefault(tokens, {})
        r["w4a8" if kind.endswith("w4a8") else "w4a16"] = c["ours_us"]
        r.setdefault("bf16", []).append(c["baseline_us"])
    summary = {shape: {t: {"w4a16_us": r["w4a16"], "w4a8_us": r["w4a8"], "bf16_us": min(r["bf16"]),
                           "w4a8_vs_w4a16": r["w4a16"] / r["w4a8"], "w4a8_vs_bf16": min(r["bf16"]) / r["w4a8"]}
                       for t, r in sorted(by.items())} for shape, by in rows.items()}
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (shape, by) in zip(axes, summary.items()):
        ms = list(by)
        for key, label in [("bf16_us", "bf16 torch.matmul"), ("w4a16_us", "MXFP4 W4A16 (fp4_gemm)"),
                           ("w4a8_us", "MXFP4 W4A8 (fp4_gemm_w4a8)")]:
            ax.plot(ms, [by[m][key] / m for m in ms], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("us per token")
        ax.set_title(f"{shape} ({'28672x4096' if shape == 'gate_up' else '4096x14336'})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("H200, CUDA graphs, medians (call 6)")
    fig.tight_layout()
    fig.savefig(HERE / "w4a8.png", dpi=110)


if __name__ == "__main__":
    main()
