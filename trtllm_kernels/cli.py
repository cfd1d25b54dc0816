"""`trtllm-kernels`: generate text, build engines, benchmark kernels.

Sub-commands import what they need lazily, so `trtllm-kernels --help` is instant and the ops
library keeps no import-time dependency on the engine or the runtime.
"""
from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="engine dir, HF checkpoint dir or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])


def _add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per step (prefill chunk)")
    p.add_argument("--page-size", type=int, default=None,
                   help="tokens per KV-cache block (default: BuildConfig.page_size, 32)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--build-dtype", dest="build_dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16"], help="weight dtype stored in the engine")


def _build_config(args):
    from trtllm_kernels.engine import BuildConfig

    page = {} if args.page_size is None else {"page_size": args.page_size}  # None: BuildConfig's default
    return BuildConfig(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                       max_num_tokens=args.max_num_tokens, kv_cache_dtype=args.kv_cache_dtype,
                       dtype=args.build_dtype, **page)


def cmd_generate(args) -> int:
    from trtllm_kernels.runtime import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, build_config=_build_config(args),
              progress=not args.quiet, tensor_parallel_size=args.tensor_parallel_size)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    use_chat = not args.raw and getattr(llm.tokenizer, "chat_template", None) is not None
    prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) if use_chat else p
               for p in args.prompts]
    outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    for prompt, out in zip(args.prompts, outputs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.text)
    return 0


def cmd_build(args) -> int:
    from trtllm_kernels.engine import build_engine

    path = build_engine(args.checkpoint, args.output, _build_config(args), progress=not args.quiet)
    print(f"engine written to {path}")
    return 0


def cmd_serve(args) -> int:
    import os

    try:
        import fastapi  # noqa: F401 - the server's optional dependencies
        import uvicorn  # noqa: F401

        from trtllm_kernels.runtime.server import serve
    except ImportError as e:
        print(f"error: {e}; install the server's packages with: pip install 'trtllm-kernels[serve]'", file=sys.stderr)
        return 2
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("TRTLLM_KERNELS_API_KEY"),
          served_model_name=args.served_model_name, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
          shutdown_timeout=args.shutdown_timeout, log_level=args.log_level, dtype=args.dtype, device=args.device,
          build_config=_build_config(args), kv_cache_tokens=args.kv_cache_tokens,
          free_gpu_memory_fraction=args.free_gpu_memory_fraction, progress=not args.quiet,
          shape=args.shape, tokenizer=args.tokenizer,
          **({"tensor_parallel_size": args.tensor_parallel_size} if args.tensor_parallel_size != 1 else {}))
    return 0


def main(argv: list[str] | None = None) -> int:
    from trtllm_kernels.runtime.kv_sizing import FREE_GPU_MEMORY_FRACTION, fraction_arg

    parser = argparse.ArgumentParser(prog="trtllm-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text(s); each becomes a user chat turn unless --raw")
    _add_model_args(gen)
    _add_build_args(gen)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    gen.add_argument("--tensor-parallel-size", type=int, default=1,
                     help="split the model over N GPUs (or N CPU processes with --device cpu)")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gen.set_defaults(func=cmd_generate)

    build = sub.add_parser("build", help="build an engine directory from a checkpoint")
    build.add_argument("checkpoint", help="HF checkpoint directory or GGUF file")
    build.add_argument("output", help="engine directory to write")
    _add_build_args(build)
    build.add_argument("-q", "--quiet", action="store_true")
    build.set_defaults(func=cmd_build)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    srv.add_argument("model", nargs="?", default=None,
                     help="engine dir, HF checkpoint dir or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    srv.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    _add_build_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every route but /health "
                          "(or set TRTLLM_KERNELS_API_KEY, which keeps it out of the process list)")
    srv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: its file name)")
    srv.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache capacity in tokens")
    srv.add_argument("--free-gpu-memory-fraction", type=fraction_arg, default=FREE_GPU_MEMORY_FRACTION,
                     help="without --kv-cache-tokens, on CUDA: the KV cache's share of the GPU memory free "
                          f"after the weights and activations (default {FREE_GPU_MEMORY_FRACTION})")
    srv.add_argument("--shape", default=None,
                     help="serve random weights at a known shape instead of MODEL (e.g. smollm2-135m), for load tests")
    srv.add_argument("--tensor-parallel-size", type=int, default=1, help="split the model over N GPUs")
    srv.add_argument("--tokenizer", default=None,
                     help="with --shape: a directory with tokenizer.json (+ tokenizer_config.json); "
                          "default: the default model's, from its cached engine")
    srv.add_argument("--max-queue", type=int, default=256,
                     help="sequences held at once, running or waiting (each of a request's n counts); "
                          "more get 503")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds to let requests in flight finish after SIGINT/SIGTERM")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("-q", "--quiet", action="store_true", help="no progress bars while loading")
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from trtllm_kernels.bench.cli import add_bench_parsers

    add_bench_parsers(bench_sub)
    from trtllm_kernels.runtime.benchmark import add_parsers as add_e2e_bench_parsers

    add_e2e_bench_parsers(bench_sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
