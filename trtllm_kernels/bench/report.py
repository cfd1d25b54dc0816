"""Benchmark results: one `Case` per measured shape, written as JSON + markdown, plotted.

The JSON is the record (committed under benchmarks/results/<device>-<date>/); the markdown
table and the plot are made from it, and the plot can be made later from the JSON alone on
any machine with matplotlib (the GPU image has none).

JSON layout:
  {"device", "date", "command", "torch", "triton", "copy_bandwidth_GBps",
   "matmul_peak_TFLOPs", ..., "cases": [Case, ...]}
Every case carries the required fields `name`, `ours_us`, `baseline`, `baseline_us`,
`ratio_vs_baseline` (= baseline_us / ours_us, > 1 means ours is faster),
`fraction_of_roofline` (roofline time / ours_us) and `device`, then optional extras.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Sequence

REQUIRED_FIELDS = (
    "name", "ours_us", "baseline", "baseline_us", "ratio_vs_baseline", "fraction_of_roofline", "device",
)


@dataclasses.dataclass
class Case:
    name: str
    ours_us: float
    baseline: str
    baseline_us: float
    ratio_vs_baseline: float
    fraction_of_roofline: float | None
    device: str
    # optional extras
    ours_GBps: float | None = None
    ours_TFLOPs: float | None = None
    baseline_fraction_of_roofline: float | None = None
    max_abs_err_vs_baseline: float | None = None
    bytes: int | None = None
    flops: int | None = None
    shape: dict[str, Any] = dataclasses.field(default_factory=dict)
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: str = ""

    @classmethod
    def from_times(
        cls, name: str, ours_us: float, baseline: str, baseline_us: float, device: str, *,
        nbytes: int | None = None, flops: int | None = None, bandwidth: float | None = None,
        peak: float | None = None, **extras,
    ) -> "Case":
        """Build a case from two measured times, deriving ratio, roofline fraction and rates."""
        from .roofline import fraction_of_roofline

        frac = base_frac = None
        if (nbytes or flops) and (bandwidth or peak):
            frac = fraction_of_roofline(ours_us, nbytes or 0, flops or 0, bandwidth or 0, peak or 0)
            base_frac = fraction_of_roofline(baseline_us, nbytes or 0, flops or 0, bandwidth or 0, peak or 0)
        return cls(
            name=name, ours_us=ours_us, baseline=baseline, baseline_us=baseline_us,
            ratio_vs_baseline=baseline_us / ours_us, fraction_of_roofline=frac, device=device,
            ours_GBps=nbytes / ours_us / 1e3 if nbytes else None,
            ours_TFLOPs=flops / ours_us / 1e6 if flops else None,
            baseline_fraction_of_roofline=base_frac, bytes=nbytes, flops=flops, **extras,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(cases: Sequence[Case | dict], meta: dict | None = None) -> str:
    """A markdown table of cases (objects or JSON dicts), with a header line from meta."""
    rows = [c.to_dict() if isinstance(c, Case) else c for c in cases]
    lines = []
    if meta:
        bw, peak = meta.get("copy_bandwidth_GBps"), meta.get("matmul_peak_TFLOPs")
        lines.append(
            f"Device: {meta.get('device', '?')}, {meta.get('date', '')}; measured copy bandwidth "
            f"{_fmt(bw, '.4g')} GB/s, matmul peak {_fmt(peak, '.4g')} TFLOP/s "
            f"({meta.get('matmul_peak_dtype', 'bf16')}); torch {meta.get('torch', '?')}, "
            f"timing {meta.get('timing_mode', '?')}."
        )
        if meta.get("command"):
            lines.append(f"Command: `{meta['command']}`")
        lines.append("")
    lines.append("| case | ours (us) | baseline | baseline (us) | speed-up vs baseline | "
                 "fraction of roofline | GB/s | TFLOP/s | notes |")
    lines.append("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ours_us']:.2f} | {r['baseline']} | {r['baseline_us']:.2f} | "
            f"{r['ratio_vs_baseline']:.2f}x | {_fmt(r.get('fraction_of_roofline'), '.3g')} | "
            f"{_fmt(r.get('ours_GBps'), '.4g')} | {_fmt(r.get('ours_TFLOPs'), '.3g')} | "
            f"{(r.get('notes') or '').replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def default_meta(device: str, command: str | None = None, **extra) -> dict:
    """Versions, date and command, filled in for write_results."""
    meta: dict[str, Any] = {
        "device": device,
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
    }
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        meta["torch"] = None
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    meta.update(extra)
    return meta


def write_results(
    cases: Sequence[Case], out_dir: str | os.PathLike, stem: str, meta: dict
) -> tuple[Path, Path]:
    """Write <out_dir>/<stem>.json and <stem>.md; returns their paths.

    meta should hold "device", "copy_bandwidth_GBps" and "matmul_peak_TFLOPs"; "date",
    "command", "torch" and "triton" are filled in when missing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = default_meta(meta.get("device", "unknown"))
    full.update({k: v for k, v in meta.items() if v is not None or k not in full})
    for key in ("copy_bandwidth_GBps", "matmul_peak_TFLOPs"):
        full.setdefault(key, None)
    full["cases"] = [c.to_dict() for c in cases]
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(full, indent=2) + "\n")
    md_path.write_text(markdown_table(cases, full))
    return json_path, md_path


def load_results(json_path: str | os.PathLike) -> dict:
    data = json.loads(Path(json_path).read_text())
    for i, c in enumerate(data.get("cases", [])):
        missing = [f for f in REQUIRED_FIELDS if f not in c]
        if missing:
            raise ValueError(f"{json_path}: case {i} lacks {missing}")
    return data


def plot_results(json_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Bar chart of speed-up vs baseline and fraction of roofline per case, from the JSON alone.

    Needs matplotlib (`pip install matplotlib`, or the package's `plot` extra).
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or pip install 'trtllm-kernels[plot]'); "
            "the JSON results are complete without it, plot them later with `trtllm-kernels bench plot`"
        ) from e
    matplotlib.use("Agg")  # no display on the GPU machine or in CI
    import matplotlib.pyplot as plt

    data = load_results(json_path)
    png = Path(png_path) if png_path else Path(json_path).with_suffix(".png")
    cases = data["cases"]
    names = [c["name"] for c in cases]
    ratios = [c["ratio_vs_baseline"] for c in cases]
    fracs = [c.get("fraction_of_roofline") or 0.0 for c in cases]
    height = max(3.0, 0.32 * len(cases) + 1.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    ys = range(len(cases))
    ax1.barh(ys, ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xscale("log")  # 0.1x and 10x are equally far from parity
    ax1.set_xlabel("speed-up vs baseline (baseline time / ours, log scale)")
    for y, r in zip(ys, ratios):
        ax1.annotate(f"{r:.2f}x", (r, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=6)
    ax1.set_yticks(list(ys), names, fontsize=7)
    ax1.invert_yaxis()
    ax2.barh(ys, fracs, color="tab:blue")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_xlim(0, max(1.05, max(fracs, default=0) * 1.05))
    for y, f in zip(ys, fracs):
        ax2.annotate(f"{f:.2f}", (f, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=6)
    ax2.set_xlabel("fraction of roofline (measured copy BW / matmul peak)")
    fig.suptitle(
        f"{data.get('device', '?')}  {data.get('date', '')}  "
        f"(copy {_fmt(data.get('copy_bandwidth_GBps'), '.4g')} GB/s, "
        f"matmul {_fmt(data.get('matmul_peak_TFLOPs'), '.4g')} TFLOP/s)", fontsize=9,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
