"""How many KV-cache blocks to allocate.

On one GPU the cache gets `free_gpu_memory_fraction` of the memory that is free once the
weights are loaded and the memory a running server needs besides the cache is set aside:
the eager activation peak (the largest prompt step, and the sampler at full batch with every
feature on) and what the CUDA graphs will hold (their input buffers, the shared logits buffer
and the activations of the largest graph). Those are measured, not guessed, by running the
same steps once on a one-block stand-in cache (`activation_bytes`): the graphs bake in the
cache's address, so they can only be captured after the real cache exists. The rest of the
free memory (10% by default) absorbs what the probe does not see: allocator fragmentation,
the penalty tables of penalised requests, library workspaces.

Under tensor parallelism the probe would have to run on every rank in lockstep (its steps
contain all-reduces); there each rank still sets a fixed reserve aside (`fit_blocks`).
"""
from __future__ import annotations

import torch

from trtllm_kernels.engine.config import ModelConfig

CPU_DEFAULT_KV_TOKENS = 16384
FREE_GPU_MEMORY_FRACTION = 0.9  # the cache's default share of the free memory (LLM, CLI)
TP_MEMORY_RESERVE = 4 << 30  # activations and workspaces of a tensor-parallel rank (not measured)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes of one token: keys and values of every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {fraction}")


def fraction_arg(text: str) -> float:
    """The argparse type of --free-gpu-memory-fraction: checked when parsed, so a bad value is
    an error on every device (off CUDA the fraction is not used)."""
    import argparse

    try:
        fraction = float(text)
        check_fraction(fraction)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: a number in (0, 1]") from e
    return fraction


def fit_blocks(config: ModelConfig, dtype: torch.dtype, page: int, free: int, fraction: float, reserve: int) -> int:
    """Blocks in `fraction` of the free memory left after `reserve` bytes are set aside."""
    return max(int(fraction * (free - reserve)) // (bytes_per_token(config, dtype) * page), 0)


def default_cpu_tokens(max_seq_len: int) -> int:
    return max(CPU_DEFAULT_KV_TOKENS, max_seq_len)


def probe_sampling_requests(n: int) -> list:
    """n requests that take the sampler's most memory-hungry path: penalties (their [n, vocab]
    tables), top-k + top-p (a sort of the vocabulary), min-p and top-20 logprobs."""
    from .request import Request
    from .sampling_params import MAX_LOGPROBS, SamplingParams

    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                            presence_penalty=0.5, frequency_penalty=0.5, logprobs=MAX_LOGPROBS)
    return [Request(f"kv-probe-{i}", None, [0], params, i) for i in range(n)]


def stand_in_runner(model, page: int, cache_dtype: torch.dtype):
    """A ModelRunner over a one-block cache, zeroed so the warm-up's steps (which read block 0
    only) compute on finite numbers as real steps do; torch.empty's memory may hold NaNs."""
    from .kv_cache_manager import KVCacheManager
    from .model_runner import ModelRunner

    kv = KVCacheManager(model.config, 1, page, cache_dtype, model.device, enable_prefix_caching=False)
    for cache in (kv.k_cache, kv.v_cache):  # as bytes: zero bits are +0 in every cache dtype
        cache.view(torch.uint8).zero_()
    return ModelRunner(model, kv)


@torch.inference_mode()
def activation_bytes(model, page: int, cache_dtype: torch.dtype, *, max_num_tokens: int, max_batch_size: int,
                     max_seq_len: int, cuda_graphs: bool, prefill_graph_tokens: int) -> tuple[int, int]:
    """(eager, graphs): bytes the eager steps and the sampler need at their peak, and bytes
    the CUDA graphs will hold, measured on a one-block stand-in cache. Also compiles every
    kernel variant those steps use (the runner's warm-up)."""
    from .model_runner import prefill_graph_sizes
    from .sampler import Sampler

    dev = model.device
    runner = stand_in_runner(model, page, cache_dtype)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)

    torch.cuda.reset_peak_memory_stats(dev)
    runner.warmup(max_num_tokens, max_batch_size, max_seq_len)  # every dummy step reads block 0 only
    vocab = getattr(model, "full_config", model.config).vocab_size
    logits = torch.randn(max_batch_size, vocab, device=dev)
    Sampler(seed=0)(logits, probe_sampling_requests(max_batch_size))
    del logits
    torch.cuda.synchronize(dev)
    eager = torch.cuda.max_memory_allocated(dev) - base

    # The graphs' pool: captured largest first, each graph's activations freed at its end, so
    # the pool holds about the largest graph's peak; their inputs and logits stay allocated.
    torch.cuda.reset_peak_memory_stats(dev)
    width = runner.kv.blocks_for(max_seq_len)
    if cuda_graphs:
        runner._alloc_graph_inputs(max_batch_size, width)
        runner._forward_decode(max_batch_size)
    sizes = prefill_graph_sizes(prefill_graph_tokens, max_num_tokens, max_seq_len) if cuda_graphs else []
    if sizes:
        runner._alloc_prefill_inputs(sizes[-1], width)
        runner._forward_prefill(sizes[-1])
    torch.cuda.synchronize(dev)
    graphs = torch.cuda.max_memory_allocated(dev) - base if cuda_graphs else 0
    del runner
    torch.cuda.empty_cache()
    return eager, graphs
