"""Lowering checks shared by the Gluon kernels' CPU tests (CI has no GPU): compile a kernel for
sm_90a in a subprocess (outside the Triton interpreter that CI turns on) and run ptxas over its
PTX, which catches what would cost speed on the GPU without one."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def compile_ptx(script: str, *args) -> str:
    """Run `script` (python -c) with args and a last argument: the path it writes the PTX to.
    Returns the PTX with whitespace runs collapsed to one space."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        res = subprocess.run([sys.executable, "-c", script, *map(str, args), str(path)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and path.exists(), res.stderr[-3000:]
        return path.read_text()


def ptxas_spill_bytes(ptx: str) -> int:
    """ptxas -v for sm_90a over the PTX; fails on an error and on warning C7514 (ptxas keeps
    wgmmas asynchronous only while nothing touches an in-flight one's registers, otherwise it
    serializes every wgmma of the kernel). Returns the largest spill-store byte count."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.ptx").write_text(ptx)
        res = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "C7514" not in log, log
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills, log
    return max(spills)


def squeeze(ptx: str) -> str:
    """Whitespace runs as one space, for substring checks on instructions."""
    return re.sub(r"\s+", " ", ptx)
