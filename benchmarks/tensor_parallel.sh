#!/usr/bin/env bash
# Tensor parallelism on a 2-GPU machine, in one call: NCCL's all-reduce bandwidth, the 2-GPU
# greedy-equality test, then throughput at Llama-3.1-8B shape with TP=2 and at Llama-3.1-70B
# shape with TP=2, then TP=1 (bf16, random weights, in/out 128/128), a step profile of 8B
# TP=2, then FP8 TP=2 and batch-1 latency TP=1 / TP=2 if time is left.
#   OUT=dir bash benchmarks/tensor_parallel.sh [seconds for all phases, default 290]
# Each phase is cut at its own limit and at the shared deadline; run.log says what ran.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BUDGET=${1:-290}
end=$((SECONDS + BUDGET))
# NVLink multicast stays off on these shared hosts (the device README); the runtime sets these
# too, for every rank it starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRTLLM_KERNELS_CACHE=${TRTLLM_KERNELS_CACHE:-/tmp/tkc} PYTHONUNBUFFERED=1
log="$OUT/run.log"
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh --system >/dev/null 2>&1 || echo "setup failed" >> "$log"

phase() {  # phase NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2; shift 2
  local left=$((end - SECONDS))
  if [ "$left" -lt 25 ]; then echo "== $name: not run (no time left)" | tee -a "$log"; return; fi
  [ "$max" -gt "$left" ] && max=$left
  echo "== $name (limit ${max}s) $(date +%T)" | tee -a "$log"
  local t0=$SECONDS
  timeout -k 5 "$max" "$@" >> "$log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0))s" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m
  python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version())"
  env | grep -E 'NCCL|NVSHMEM|SYMM' ; } >> "$log" 2>&1

T="trtllm-kernels bench throughput --input-len 128 --output-len 128 --max-seq-len 512 --out $OUT"
L="trtllm-kernels bench latency --input-len 128 --output-len 128 --max-seq-len 512 --shape llama-3.1-8b --out $OUT"
# NCCL's transport and bandwidth at TP's message sizes (P2P over NVLink, or SHM through host memory?)
phase allreduce 60 bash -c "NCCL_DEBUG=INFO python3 benchmarks/allreduce_bw.py 2>&1 | grep -E ' via |bus |rror' | sort -u | head -30"
phase equality 180 env TP_REPORT="$OUT/equality.json" python3 -m pytest -q -s -x -m gpu -p no:cacheprovider \
  tests/test_tensor_parallel.py
phase tp2_8b 90 $T --shape llama-3.1-8b --num-requests 1000 --tensor-parallel-size 2 --stem tp2_8b
phase tp2_70b 130 $T --shape llama-3.1-70b --num-requests 1000 --tensor-parallel-size 2 --stem tp2_70b
# TP=1 last: `gpu_run.sh all` has already run the same command on one GPU of this machine.
phase tp1_8b 75 $T --shape llama-3.1-8b --num-requests 1000 --stem tp1_8b
# Where TP=2 spends its steps (8B TP=2 ran only 1.04x TP=1 on 2 H200s): rank 0 per phase.
phase profile_tp2 120 python3 benchmarks/profile_step.py --shape llama-3.1-8b --tensor-parallel-size 2 --out "$OUT"
phase tp2_8b_fp8 90 $T --shape llama-3.1-8b --num-requests 1000 --tensor-parallel-size 2 --quantization fp8 --stem tp2_8b_fp8
phase lat_tp1_8b 60 $L --stem lat_tp1_8b
phase lat_tp2_8b 60 $L --tensor-parallel-size 2 --stem lat_tp2_8b
ls -la "$OUT" >> "$log"
