"""Where the runtime's time goes: the offline throughput run split by step kind and phase, then
torch.profiler's kernel table for a few full-batch decode steps (at the run's mean context, 1.5 x
--len) and one prefill step. In/out lengths are both --len (128; 1000 for the 1000/1000 run).

    python benchmarks/profile_step.py --shape llama-3.1-8b [--quantization fp8]
        [--kv-cache-dtype fp8] [--len 1000 --max-batch-size 512] [--tensor-parallel-size 2] --out DIR

Per Executor.step: schedule (host), forward (packing, the model, logits; synchronized after,
so it is the GPU's time plus launch), sample (the sampler's work, synchronized after), and the
rest (token read-back, the executor's bookkeeping); outside_executor_s is what LLM.generate
spends beyond its steps. The run has overlap scheduling off: the phases are the host and GPU
work that overlap would hide; `trtllm-kernels bench throughput` with and without --no-overlap
measures how much it does. Writes
profile_<stem>.json (per-kind medians and totals, and the Triton kernels compiled during the
timed run: each is seconds of a step that the start-up warm-up missed) and profile_<stem>.txt
(kernel tables).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from trtllm_kernels.engine import BuildConfig
from trtllm_kernels.engine.random_weights import random_engine
from trtllm_kernels.runtime.benchmark import random_prompts, throughput
from trtllm_kernels.runtime.llm import LLM
from trtllm_kernels.runtime.sampling_params import SamplingParams


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Wraps the executor's phases with timers; one record per LLM.step."""

    def __init__(self, llm: LLM):
        self.records: list[dict] = []
        self.cur: dict = {}
        ex = llm.executor
        self._wrap(ex.scheduler, "schedule", "schedule_ms")
        self._wrap(ex.runner, "run", "forward_ms", before=self._note_batch, synced=True)
        self._wrap(ex.sampler, "launch", "sample_ms", synced=True)
        step = ex.step

        def timed_step():
            self.cur = defaultdict(float)
            t0 = time.perf_counter()
            out = step()
            self.cur["step_ms"] = (time.perf_counter() - t0) * 1e3
            self.cur["t"] = t0
            self.records.append(dict(self.cur))
            return out

        ex.step = timed_step

    def _note_batch(self, batch):
        self.cur["seqs"] = len(batch)
        self.cur["tokens"] = sum(batch.num_tokens)
        self.cur["decodes"] = batch.num_decodes

    def _wrap(self, obj, name, key, before=None, synced=False):
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            if before:
                before(*args)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if synced:
                sync()
            self.cur[key] += (time.perf_counter() - t0) * 1e3
            return out

        setattr(obj, name, timed)

    def summary(self, graph_sizes) -> dict:
        kinds = defaultdict(list)
        for r in self.records:
            if "seqs" not in r:
                continue
            graph = r["decodes"] == r["seqs"] and r["seqs"] <= max(graph_sizes, default=0)
            kinds["decode_graph" if graph else "eager"].append(r)
        out = {}
        for kind, rs in kinds.items():
            keys = ("step_ms", "schedule_ms", "forward_ms", "sample_ms")
            med = {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys}
            tot = {k.replace("_ms", "_s"): sum(r.get(k, 0.0) for r in rs) / 1e3 for k in keys}
            rest = [r["step_ms"] - r.get("schedule_ms", 0) - r.get("forward_ms", 0) - r.get("sample_ms", 0) for r in rs]
            out[kind] = {"steps": len(rs), "median_seqs": statistics.median(r["seqs"] for r in rs),
                         "median_tokens": statistics.median(r["tokens"] for r in rs),
                         "median_ms": med, "median_rest_ms": statistics.median(rest),
                         "total_s": tot, "total_rest_s": sum(rest) / 1e3}
        return out


def kernel_table(fn, steps: int, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    sync()
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(steps):
            fn()
        sync()
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows)


def add_run_args(ap: argparse.ArgumentParser, max_batch_size: int) -> None:
    """The throughput run's arguments (this script's and step_timeline.py's)."""
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--max-batch-size", type=int, default=max_batch_size)
    ap.add_argument("--len", type=int, default=128, help="input and output length")
    ap.add_argument("--page-size", type=int, default=BuildConfig.page_size, help="tokens per KV-cache block")


def main() -> None:
    ap = argparse.ArgumentParser()
    add_run_args(ap, max_batch_size=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--out", default=".")
    ap.add_argument("--stem", default=None)
    args = ap.parse_args()
    tp = args.tensor_parallel_size
    stem = args.stem or f"{args.shape}_{args.quantization or 'bf16'}" + (f"_tp{tp}" if tp > 1 else "") + \
        ("_fp8kv" if args.kv_cache_dtype == "fp8" else "")
    build = BuildConfig(max_seq_len=max(512, 2 * args.len + 16), max_batch_size=args.max_batch_size,
                        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, page_size=args.page_size)
    if tp > 1:  # rank 0's view: its phases include waiting for the other ranks in the collectives
        from trtllm_kernels.runtime.distributed import RandomWeights

        model = RandomWeights(args.shape)
    else:
        model = random_engine(args.shape, build, device=args.device)
    llm = LLM(model, build_config=build, dtype="bfloat16", device=args.device, max_batch_size=args.max_batch_size,
              overlap_scheduling=False, progress=False, tensor_parallel_size=tp)
    graphs = sorted(llm.executor.runner.graphs)

    timer = StepTimer(llm)
    run = throughput(llm, args.num_requests, args.len, args.len)
    start = time.perf_counter() - run["seconds"]
    timer.records = [r for r in timer.records if r["t"] >= start]  # not the warm-up's
    result = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu", "shape": args.shape,
              "quantization": args.quantization, "run": run, "steps": timer.summary(graphs),
              "steps_total": len(timer.records),
              "compiled_during_run": run["triton_jit_in_run"],
              "eager_steps": [{k: round(v, 3) for k, v in r.items() if k != "t"} for r in timer.records
                              if r.get("decodes") != r.get("seqs") or r.get("seqs", 0) > max(graphs, default=0)],
              # what LLM.generate spends outside Executor.step: outputs, detokenizer, bookkeeping
              "outside_executor_s": run["seconds"] - sum(r["step_ms"] for r in timer.records) / 1e3}
    print(json.dumps(result, indent=1), flush=True)

    # Kernel tables: full-batch decode (graph replay) at the run's mean context (prompt plus half
    # the output: 1.5 x len), and one max_num_tokens prefill step.
    vocab = llm.engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.len, temperature=0, ignore_eos=True)
    for p in random_prompts(args.max_batch_size, args.len, vocab, seed=5):
        llm.add_request(p, params)
    while any(r.num_pending > 1 for r in llm.executor.scheduler.running) or llm.executor.scheduler.waiting:
        llm.step()
    for _ in range(args.len // 2 - 1):
        llm.step()
    running = llm.executor.scheduler.running
    context = sum(len(r.tokens) for r in running) // max(len(running), 1)
    text = [f"== decode, batch {len(running)}, mean context {context}, 5 steps (whole LLM.step)\n",
            kernel_table(llm.step, 5)]
    for rid in list(llm._requests):
        llm.abort_request(rid)
    n = min(build.max_num_tokens // args.len, args.max_batch_size)  # prompts that fit one step
    seeds = iter(range(6, 100))

    def prefill():  # new prompts each time: the prefix cache must not serve them
        for p in random_prompts(n, args.len, vocab, seed=next(seeds)):
            llm.add_request(p, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while llm.has_unfinished_requests():
            llm.step()

    text += [f"\n== prefill, {n} x {args.len} tokens in one step\n", kernel_table(prefill, 1)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"profile_{stem}.txt").write_text("".join(text))
    print("".join(text))
    llm.shutdown()


if __name__ == "__main__":
    main()
