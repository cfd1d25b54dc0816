"""`trtllm-kernels bench ...` sub-commands: `kernels` (time ops against baselines) and `plot`.

`trtllm_kernels.cli` hands its `bench` sub-parsers to `add_bench_parsers`. Nothing heavy is
imported at module level (the top-level CLI builds every parser on each start); torch and the
benchmark registry load only when a bench command runs. `python -m trtllm_kernels.bench.cli`
runs the same commands without the top-level CLI.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
from pathlib import Path


def add_bench_kernels_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "kernels", help="time each op against its plain-PyTorch baseline, with roofline fractions",
        description="Measure the device's copy bandwidth and matmul peak, then time every kernel "
                    "case matching --filter against its baseline (CUDA events, median after "
                    "warm-up, inputs rotated past L2). Writes <out>/<stem>.json, .md and .png.",
    )
    p.add_argument("--filter", "-k", default=None, metavar="REGEX",
                   help="run cases whose name matches (re.search), e.g. 'decode|rms_norm'")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results directory (default: benchmarks/results/<device>-<date> if ./benchmarks "
                        "exists, else bench-results/<device>-<date>)")
    p.add_argument("--stem", default="kernels", help="file name stem of the results (default: kernels)")
    p.add_argument("--quick", action="store_true", help="few calls per timing: a smoke run, not numbers to commit")
    p.add_argument("--graph", action="store_true",
                   help="time under CUDA graphs (hides launch overhead; eager where capture fails)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--sizes", default="auto", choices=["auto", "full", "tiny"],
                   help="full = Llama-3.1-8B shapes, tiny = CPU-sized (default: full on CUDA, tiny on CPU)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--no-plot", action="store_true", help="write JSON and markdown but no PNG")
    p.add_argument("--list", action="store_true", help="list the case names and exit")
    p.set_defaults(func=main_bench_kernels)
    return p


def add_bench_plot_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="plot a results JSON as PNG (needs matplotlib)")
    p.add_argument("json", help="results JSON written by `bench kernels`")
    p.add_argument("--out", "-o", default=None, help="PNG path (default: the JSON's path with .png)")
    p.set_defaults(func=main_bench_plot)
    return p


def add_bench_parsers(subparsers) -> None:
    """Add every `bench` sub-command to the sub-parsers of `trtllm-kernels bench`."""
    add_bench_kernels_parser(subparsers)
    add_bench_plot_parser(subparsers)
    from .serve_load import add_bench_serve_parser  # stdlib-only at import; httpx loads when it runs

    add_bench_serve_parser(subparsers)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out_dir(device_name: str) -> Path:
    """benchmarks/results/<device>-<date> from a checkout, bench-results/... elsewhere."""
    base = Path("benchmarks/results") if Path("benchmarks").is_dir() else Path("bench-results")
    name = _slug(device_name.split("(")[0])  # "cpu (x86_64, 2 threads)" -> "cpu"
    return base / f"{name}-{_dt.date.today().isoformat()}"


def main_bench_kernels(args) -> int:
    import torch

    from .kernels import build_cases, device_name, run_kernel_benchmarks, select_cases

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = args.sizes if args.sizes != "auto" else ("full" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.list:
        for c in select_cases(args.filter, sizes, dtype) if args.filter else build_cases(sizes, dtype):
            print(c.name)
        return 0
    out = None if args.no_write else (args.out or str(default_out_dir(device_name(device))))
    cases = run_kernel_benchmarks(
        args.filter, device, out, args.stem, args.quick, graph=args.graph, sizes=sizes,
        command=getattr(args, "_command", None) or "trtllm-kernels " + " ".join(sys.argv[1:]),
        plot=not args.no_plot,
    )
    return 0 if cases else 1


def main_bench_plot(args) -> int:
    from .report import plot_results

    try:
        print(f"wrote {plot_results(args.json, args.out)}")
    except ImportError as e:  # the top-level CLI reports ValueError / FileNotFoundError itself
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m trtllm_kernels.bench.cli kernels|plot ...` (same as `trtllm-kernels bench ...`)."""
    parser = argparse.ArgumentParser(prog="trtllm-kernels bench", description=__doc__.splitlines()[0])
    add_bench_parsers(parser.add_subparsers(dest="bench_command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._command = "trtllm-kernels bench " + " ".join(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
