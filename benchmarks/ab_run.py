"""Run the trtllm-kernels CLI with one module constant overridden, for same-machine A/B runs of
a dispatch rule (the CLI runs the engine in this process):

    python benchmarks/ab_run.py kernels.triton_fp8.GLUON_TOKEN_GEMM_MIN_M=1073741824 -- bench throughput ...
"""
import importlib
import sys

from trtllm_kernels.cli import main


def apply_overrides(assignments: list[str]) -> None:
    """Set module constants from 'module.NAME=value' (module relative to trtllm_kernels), the
    value converted to the constant's type."""
    for assignment in assignments:
        path, value = assignment.split("=", 1)
        module, name = path.rsplit(".", 1)
        mod = importlib.import_module(f"trtllm_kernels.{module}")
        if not hasattr(mod, name):
            raise SystemExit(f"{module} has no {name}")
        setattr(mod, name, type(getattr(mod, name))(value))


if __name__ == "__main__":
    split = sys.argv.index("--")
    apply_overrides(sys.argv[1:split])
    sys.exit(main(sys.argv[split + 1:]))
