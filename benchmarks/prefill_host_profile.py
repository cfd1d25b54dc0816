"""cProfile of one batch-1 prefill step's host side (Llama-3.1-8B shape, random weights):
where its time goes before the GPU's. With --no-cuda-graphs the eager path (what the
one-sequence prefill graphs replaced: results/h100-2026-11-27/prefill_graphs/), else the replay.

    python benchmarks/prefill_host_profile.py [--no-cuda-graphs] [--quantization fp8] [--len 128]   (GPU)
"""
import argparse
import cProfile
import pstats
import time

import torch

from trtllm_kernels.engine import BuildConfig
from trtllm_kernels.engine.random_weights import random_engine
from trtllm_kernels.runtime import LLM, SamplingParams
from trtllm_kernels.runtime.benchmark import random_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--quantization", default=None)
ap.add_argument("--len", type=int, default=128)
ap.add_argument("--no-cuda-graphs", action="store_true")
args = ap.parse_args()
build = BuildConfig(max_seq_len=512, max_batch_size=1, quantization=args.quantization)
llm = LLM(random_engine("llama-3.1-8b", build, device="cuda"), build_config=build, progress=False,
          cuda_graphs=not args.no_cuda_graphs)
params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
for seed in range(3):  # warm-up
    llm.generate(random_prompts(1, args.len, 128256, seed=seed), params, use_tqdm=False)
runner = llm.executor.runner
for seed in range(3, 6):
    llm.add_request(random_prompts(1, args.len, 128256, seed=seed)[0], params)
    batch = llm.executor.scheduler.schedule()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    logits, _ = runner.run(batch)
    prof.disable()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    print(f"prefill {args.len} tokens: host {host * 1e3:.2f} ms, host + GPU {(time.perf_counter() - t0) * 1e3:.2f} ms")
    llm.abort_request(batch.requests[0].request_id)
pstats.Stats(prof).sort_stats("tottime").print_stats(30)
