"""Opcode counts of the csrc kernels' SASS (cuobjdump on the built library), to see where a
kernel's instructions go. Usage: python benchmarks/sass_stats.py NAME_SUBSTRING [...]
(SASS_DUMP=DIR also writes each matching kernel's SASS to DIR/<n>.sass)"""
import os
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

from trtllm_kernels.kernels import csrc


def main():
    lib = Path(csrc.library()._name)
    tool = shutil.which("cuobjdump") or next(iter(Path("/usr/local").glob("cuda*/bin/cuobjdump")), None)
    sass = subprocess.run([str(tool), "-sass", str(lib)], capture_output=True, text=True).stdout
    dump = os.environ.get("SASS_DUMP")
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if not any(s in name for s in sys.argv[1:]):
            continue
        ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", chunk))
        print(name, sum(ops.values()), "instructions")
        print("  ", ", ".join(f"{op} {n}" for op, n in ops.most_common(40)))
        if dump:
            Path(dump, f"{sum(1 for _ in Path(dump).glob('*.sass'))}.sass").write_text(name + "\n" + chunk)


if __name__ == "__main__":
    main()
