"""End-to-end benchmarks of the runtime: offline throughput and batch-1 latency, beside
Hugging Face transformers `generate` on the same model shape in the same process.

`trtllm-kernels bench throughput` / `bench latency` (see `add_parsers`). Models: a real one
(`--model`, as LLM takes) or random weights at a known shape (`--shape llama-3.1-8b`): speed
does not depend on the weights' values. Prompts are random token ids; generation ignores EOS so
every request makes exactly --output-len tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from trtllm_kernels.engine.config import QUANTIZATIONS, BuildConfig

from .kv_sizing import FREE_GPU_MEMORY_FRACTION, fraction_arg
from .llm import LLM
from .sampling_params import SamplingParams


def _sync(llm: LLM) -> None:
    if llm.engine.model.device.type == "cuda":
        torch.cuda.synchronize()


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


@contextlib.contextmanager
def triton_jit_builds():
    """Records the Triton kernel variants the JIT builds inside the block, compiled or loaded
    from its disk cache: up to seconds each, work a timed run should not contain (a warm-up
    misses the shapes it never saw). Yields a list that fills with {"kernel", "t"
    (time.perf_counter()), "key" (the specialization)}. This process only, not the workers of
    a tensor-parallel run."""
    records: list[dict] = []
    try:
        from triton import knobs
    except ImportError:
        yield records
        return
    prev = knobs.runtime.jit_cache_hook

    def hook(*, fn, key, **kw):
        records.append({"kernel": fn.name, "t": time.perf_counter(), "key": str(key)[:1500]})
        return prev(fn=fn, key=key, **kw) if prev is not None else None  # None: build as usual

    knobs.runtime.jit_cache_hook = hook
    try:
        yield records
    finally:
        knobs.runtime.jit_cache_hook = prev


def throughput(llm: LLM, num_requests: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """All requests at once; output tokens per second over the whole run. Another seed gives
    other prompts (a second run of the same ones would find them in the prefix cache; 1 is
    the warm-up's). `triton_jit_in_run` lists the Triton builds inside the timed run (seconds
    from its start): a run with any is not comparable with one without (the suspect in a 13%
    same-machine A/B gap, benchmarks/results/h200-2026-11-28-fused-tails)."""
    vocab = llm.engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(random_prompts(min(num_requests, 8), input_len, vocab, seed=1), params, use_tqdm=False)  # warm-up
    prompts = random_prompts(num_requests, input_len, vocab, seed=seed)
    ex = llm.executor
    counts = (ex.scheduler.num_preemptions, ex.num_launched_ahead)
    _sync(llm)
    with triton_jit_builds() as builds:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        _sync(llm)
        seconds = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outs)
    return {"num_requests": num_requests, "input_len": input_len, "output_len": output_len,
            "max_batch_size": ex.scheduler.max_batch_size, "seconds": seconds,
            "output_tokens": generated, "output_tok_s": generated / seconds,
            "total_tok_s": (generated + num_requests * input_len) / seconds,
            "requests_s": num_requests / seconds,
            # how the run went: requests preempted (recomputed later), steps launched ahead
            "preemptions": ex.scheduler.num_preemptions - counts[0],
            "steps_launched_ahead": ex.num_launched_ahead - counts[1],
            "triton_jit_in_run": [dict(b, t=round(b["t"] - start, 3)) for b in builds]}


def _time_request(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, float]:
    """Run one request alone: (time to first token, mean time per later token), in seconds.
    A step returns once its token is on the host; no synchronisation after it: with overlap
    scheduling the next step is meant to be running on the GPU by then."""
    llm.add_request(prompt, params)
    _sync(llm)
    start = time.perf_counter()
    llm.step()
    first = time.perf_counter()
    steps = 0
    while llm.has_unfinished_requests():
        llm.step()
        steps += 1
    _sync(llm)
    return first - start, (time.perf_counter() - first) / max(steps, 1)


def latency(llm: LLM, input_len: int, output_len: int, repeats: int = 3) -> dict:
    """Batch 1: time to first token (the prefill step) and time per output token after it."""
    vocab = llm.engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    times = [_time_request(llm, random_prompts(1, input_len, vocab, seed=100 + r)[0], params)
             for r in range(repeats + 1)][1:]  # the first run warms up
    return {"input_len": input_len, "output_len": output_len,
            "ttft_ms": statistics.median(t for t, _ in times) * 1e3,
            "tpot_ms": statistics.median(t for _, t in times) * 1e3}


def prefix_ttft(llm: LLM, input_len: int, shared_fraction: float, repeats: int = 3) -> dict:
    """Time to first token of prompts that share their first shared_fraction with earlier ones,
    with the prefix cache off and on (the same LLM: the flag is read per request)."""
    if not 0 <= shared_fraction < 1:
        raise ValueError(f"shared_fraction must be in [0, 1), got {shared_fraction}")
    vocab = llm.engine.model_config.vocab_size
    shared = int(input_len * shared_fraction)
    prefix = random_prompts(1, shared, vocab, seed=7)[0]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    result = {"input_len": input_len, "shared_tokens": shared}
    was = llm.kv.enable_prefix_caching
    for label, caching, seed in (("off", False, 300), ("on", True, 400)):
        llm.kv.enable_prefix_caching = caching
        prompts = [prefix + p for p in random_prompts(repeats + 1, input_len - shared, vocab, seed=seed)]
        # the first request warms up (and, with caching on, fills the cache with the prefix)
        ttfts = [_time_request(llm, p, params)[0] for p in prompts]
        result[f"ttft_ms_caching_{label}"] = statistics.median(ttfts[1:]) * 1e3
    llm.kv.enable_prefix_caching = was
    result["speedup"] = result["ttft_ms_caching_off"] / result["ttft_ms_caching_on"]
    result["prefix_hit_rate"] = llm.kv.prefix_hit_rate
    return result


def hf_generate_throughput(shape: str, batch: int, input_len: int, output_len: int) -> dict:
    """transformers `generate` (eager, dynamic cache) at a random-weight model shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trtllm_kernels.engine.random_weights import SHAPES

    c = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.tensor(random_prompts(batch, input_len, c.vocab_size), device="cuda")
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :8], **dict(kwargs, max_new_tokens=4, min_new_tokens=4))  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    generated = (out.shape[1] - input_len) * batch
    del model, out
    gc.collect()
    torch.cuda.empty_cache()
    return {"batch": batch, "input_len": input_len, "output_len": output_len, "seconds": seconds,
            "output_tok_s": generated / seconds}


# -- CLI -----------------------------------------------------------------------------------

def _make_llm(args, max_batch_size: int | None = None) -> LLM:
    from trtllm_kernels.engine.random_weights import random_engine

    tp, build, dtype = getattr(args, "tensor_parallel_size", 1), None, "auto"
    if args.shape:
        build = BuildConfig(max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                            max_batch_size=max_batch_size or args.max_batch_size,
                            quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                            page_size=args.page_size)
        if tp > 1:  # each rank draws random_engine's values itself and keeps its shard
            from .distributed import RandomWeights

            model, dtype = RandomWeights(args.shape), "bfloat16"
        else:
            model = random_engine(args.shape, build, device=args.device)
    else:
        model = args.model
    return LLM(model, device=args.device, max_batch_size=max_batch_size or args.max_batch_size,
               max_num_tokens=args.max_num_tokens, cuda_graphs=not args.no_cuda_graphs,
               overlap_scheduling=False if args.no_overlap else None, prefill_graph_tokens=args.prefill_graph_tokens,
               progress=False, tensor_parallel_size=tp, dtype=dtype, build_config=build,
               free_gpu_memory_fraction=args.free_gpu_memory_fraction)


def _write(out_dir: str | None, stem: str, result: dict, echo: bool = True) -> None:
    text = json.dumps(result, indent=2)
    if echo:
        print(text)
    if out_dir:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{stem}.json").write_text(text)


def _meta(args, kind: str) -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    return {"kind": kind, "device": device, "date": datetime.date.today().isoformat(),
            "command": "trtllm-kernels " + " ".join(sys.argv[1:]), "model": args.shape or args.model or "default",
            "torch": torch.__version__, "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype}


def cmd_throughput(args) -> int:
    result = _meta(args, "throughput")
    if args.baseline_hf:
        if not args.shape:
            raise ValueError("--baseline-hf needs --shape (random weights at a known shape)")
        result["baseline_hf"] = hf_generate_throughput(args.shape, args.baseline_batch, args.input_len, args.output_len)
    runs = []
    for bs in args.batch_sizes or [args.max_batch_size]:
        llm = _make_llm(args, bs)
        runs.append(throughput(llm, args.num_requests, args.input_len, args.output_len))
        runs[-1]["tensor_parallel_size"] = args.tensor_parallel_size
        runs[-1]["kv_cache_tokens"] = llm.kv_cache_capacity_tokens
        runs[-1]["free_gpu_memory_fraction"] = args.free_gpu_memory_fraction
        runs[-1]["memory_plan_bytes"] = llm.memory_plan  # what the cache was sized from (None: given or CPU)
        runs[-1]["overlap_scheduling"] = llm.executor.overlap
        print(f"max_batch_size {bs}: {runs[-1]['output_tok_s']:.0f} output tok/s", flush=True)
        if runs[-1]["triton_jit_in_run"]:
            names = sorted({b["kernel"] for b in runs[-1]["triton_jit_in_run"]})
            print(f"  warning: {len(runs[-1]['triton_jit_in_run'])} Triton kernel builds inside the timed run "
                  f"({', '.join(names)}): its time includes JIT work; compare runs without", flush=True)
        if args.out:  # written before shutdown, so a run's numbers survive a stuck teardown
            _write(args.out, args.stem or "throughput", dict(result, runs=runs), echo=False)
        llm.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["runs"] = runs
    if "baseline_hf" in result:
        for r in runs:
            r["ratio_vs_hf"] = r["output_tok_s"] / result["baseline_hf"]["output_tok_s"]
    _write(args.out, args.stem or "throughput", result)
    if args.out and len(runs) > 1:
        _plot(runs, Path(args.out) / f"{args.stem or 'throughput'}.png", result)
    return 0


def cmd_latency(args) -> int:
    llm = _make_llm(args, 1 if args.shape else None)
    result = dict(_meta(args, "latency"), **latency(llm, args.input_len, args.output_len),
                  tensor_parallel_size=args.tensor_parallel_size, overlap_scheduling=llm.executor.overlap)
    llm.shutdown()
    _write(args.out, args.stem or "latency", result)
    return 0


def cmd_prefix(args) -> int:
    llm = _make_llm(args, 1 if args.shape else None)
    result = dict(_meta(args, "prefix_caching"), **prefix_ttft(llm, args.input_len, args.shared_fraction))
    llm.shutdown()
    print(f"TTFT caching off {result['ttft_ms_caching_off']:.1f} ms, on {result['ttft_ms_caching_on']:.1f} ms: "
          f"{result['speedup']:.2f}x", flush=True)
    _write(args.out, args.stem or "prefix_caching", result)
    return 0


def _plot(runs: list[dict], path: Path, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["max_batch_size"] for r in runs], [r["output_tok_s"] for r in runs], "o-", label="trtllm-kernels")
    if "baseline_hf" in meta:
        ax.axhline(meta["baseline_hf"]["output_tok_s"], color="gray", ls="--",
                   label=f"HF generate, batch {meta['baseline_hf']['batch']}")
    ax.set_xlabel("max batch size")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{meta['model']} on {meta['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_parsers(sub) -> None:
    def common(p):
        p.add_argument("--model", default=None, help="as LLM takes (default: the embedded model)")
        p.add_argument("--shape", default=None, help="random weights at a known shape, e.g. llama-3.1-8b")
        p.add_argument("--device", default=None)
        p.add_argument("--input-len", type=int, default=128)
        p.add_argument("--output-len", type=int, default=128)
        p.add_argument("--max-batch-size", type=int, default=256)
        p.add_argument("--max-num-tokens", type=int, default=8192)
        p.add_argument("--max-seq-len", type=int, default=4096)
        p.add_argument("--free-gpu-memory-fraction", type=fraction_arg, default=FREE_GPU_MEMORY_FRACTION,
                       help="of the GPU memory free after the weights and activations, the KV cache's share")
        p.add_argument("--no-cuda-graphs", action="store_true")
        p.add_argument("--prefill-graph-tokens", type=int, default=2048,
                       help="one-sequence prefill steps up to this many tokens replay CUDA graphs (0: eager)")
        p.add_argument("--no-overlap", action="store_true",
                       help="read each step's tokens before launching the next (overlap scheduling off)")
        p.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="split the model over N GPUs (N processes; rank r on cuda:r)")
        p.add_argument("--quantization", default=None, choices=[q for q in QUANTIZATIONS if q],
                       help="with --shape: quantize the random weights (as BuildConfig.quantization)")
        p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="with --shape")
        p.add_argument("--page-size", type=int, default=BuildConfig.page_size,
                       help="with --shape: tokens per KV-cache block (as BuildConfig.page_size)")
        p.add_argument("--out", default=None, help="directory for <stem>.json (and a plot)")
        p.add_argument("--stem", default=None)

    tp = sub.add_parser("throughput", help="offline throughput: N requests at once")
    common(tp)
    tp.add_argument("--num-requests", type=int, default=1000)
    tp.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="comma list of max batch sizes to sweep (a plot over batch size)")
    tp.add_argument("--baseline-hf", action="store_true", help="also time transformers generate (GPU)")
    tp.add_argument("--baseline-batch", type=int, default=32)
    tp.set_defaults(func=cmd_throughput)

    lat = sub.add_parser("latency", help="batch 1: time to first token and per output token")
    common(lat)
    lat.set_defaults(func=cmd_latency)

    pre = sub.add_parser("prefix", help="time to first token with a shared prompt prefix, prefix caching off / on")
    common(pre)
    pre.add_argument("--shared-fraction", type=float, default=0.9, help="the part of each prompt that is shared")
    pre.set_defaults(func=cmd_prefix, input_len=2048)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trtllm-kernels bench")
    add_parsers(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
