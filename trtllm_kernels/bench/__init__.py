"""The benchmark harness every kernel benchmark shares.

- `timing`: CUDA-event timing (median after warm-up, inputs rotated past L2, optional CUDA
  graphs), perf_counter on CPU;
- `roofline`: the device's copy bandwidth and matmul peak measured in the same run, and the
  fraction of the roofline a measured time reaches;
- `report`: the `Case` record, JSON + markdown output, plots from the JSON;
- `kernels`: the registry of kernel cases (our op beside its plain-PyTorch baseline) and
  `run_kernel_benchmarks`, behind `trtllm-kernels bench kernels`;
- `cli`: the `bench` sub-commands.
"""
from .report import REQUIRED_FIELDS, Case, load_results, markdown_table, plot_results, write_results
from .roofline import fraction_of_roofline, measure_copy_bandwidth, measure_matmul_peak, roofline_us
from .timing import l2_cache_bytes, num_rotations, time_fn


def run_kernel_benchmarks(*args, **kwargs):
    """See `trtllm_kernels.bench.kernels.run_kernel_benchmarks` (imported on first use)."""
    from .kernels import run_kernel_benchmarks as run

    return run(*args, **kwargs)


__all__ = [
    "REQUIRED_FIELDS", "Case", "fraction_of_roofline", "l2_cache_bytes", "load_results",
    "markdown_table", "measure_copy_bandwidth", "measure_matmul_peak", "num_rotations",
    "plot_results", "roofline_us", "run_kernel_benchmarks", "time_fn", "write_results",
]
