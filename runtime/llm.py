"""The user-facing API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import gc
import itertools
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from trtllm_kernels.engine import BuildConfig, Engine, cached_engine, default_checkpoint, load_engine
from trtllm_kernels.engine.builder import ENGINE_CONFIG
from trtllm_kernels.engine.checkpoint import CheckpointError

from . import kv_sizing
from .detokenizer import IncrementalDetokenizer
from .executor import Executor
from .kv_cache_manager import KVCacheManager
from .request import CompletionOutput, Request, RequestOutput, RequestStatus
from .sampler import seeded_child
from .sampling_params import SamplingParams


def resolve_engine_dir(model: str | os.PathLike | None, build_config: BuildConfig | None, progress: bool) -> Path:
    """An engine directory for `model`: the default model, an engine dir, or a checkpoint
    (HF directory or GGUF file), built once into the cache."""
    if model is None:
        return cached_engine(default_checkpoint(), build_config, progress)
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"model path {model} does not exist")
    if (path / ENGINE_CONFIG).is_file():
        return path
    return cached_engine(path, build_config, progress)


class LLM:
    """A batching LLM over an engine.

    model: None (the embedded SmolLM2-135M-Instruct), an engine directory, a Hugging Face
    checkpoint directory, a GGUF file, or an `Engine` already in memory. kv_cache_tokens: KV-cache capacity in tokens
    (default: 16384 on CPU; on CUDA, free_gpu_memory_fraction of the memory left free by the
    weights, the activations and the CUDA graphs, measured at start-up: runtime/kv_sizing.py).
    enable_prefix_caching: reuse the KV blocks of prompt prefixes computed before (on by
    default; `llm.kv.prefix_hit_rate` counts hits).
    cuda_graphs: on CUDA, replay captured graphs for decode steps and for steps that prefill
    one sequence of up to prefill_graph_tokens tokens (on by default; prefill_graph_tokens=0
    keeps prefill eager: graphs cut batch-1 time to first token ~5x and, captured, cost ~3% of
    batch-1 decode speed on an H100).
    overlap_scheduling: launch the next step before reading the current one's tokens, so the
    host's per-step work runs while the GPU computes (runtime/executor.py); default: on for one
    GPU, off on CPU (nothing to overlap there) and under tensor parallelism (not supported).
    seed: seeds the sampler's generator for requests without their own SamplingParams.seed.

    Requests: `generate` (blocking, a batch), or `add_request` then `step()` (each step returns
    cumulative outputs of the requests that advanced) and `abort_request`. Streaming as an
    async generator: `AsyncLLM(llm).generate(prompt, params)` (runtime/async_llm.py) yields
    incremental RequestOutputs, and closing it aborts the request. Stop strings
    (SamplingParams.stop) are matched here, on incrementally detokenized text
    (runtime/detokenizer.py), for every caller alike.
    tensor_parallel_size: split the model over N ranks (N GPUs, cuda:0..N-1, or N CPU processes
    with device="cpu"); model must then be a path or `distributed.RandomWeights`, not an Engine.
    """

    def __init__(
        self, model: str | os.PathLike | None = None, *, dtype: str = "auto",
        device: str | None = None, build_config: BuildConfig | None = None,
        kv_cache_tokens: int | None = None, free_gpu_memory_fraction: float = kv_sizing.FREE_GPU_MEMORY_FRACTION,
        max_batch_size: int | None = None, max_num_tokens: int | None = None,
        enable_prefix_caching: bool = True, cuda_graphs: bool = True, prefill_graph_tokens: int = 2048,
        overlap_scheduling: bool | None = None, seed: int = 0, progress: bool = True, tensor_parallel_size: int = 1,
    ):
        if isinstance(prefill_graph_tokens, bool) or not isinstance(prefill_graph_tokens, int) \
                or prefill_graph_tokens < 0:
            raise ValueError(f"prefill_graph_tokens must be an integer >= 0, got {prefill_graph_tokens!r}")
        self._tp = None
        if tensor_parallel_size != 1:  # ranks 1..N-1 in their own processes (runtime/distributed.py)
            from .distributed import start as start_tensor_parallel

            self._tp = start_tensor_parallel(
                model, tensor_parallel_size, dtype=dtype, device=device, build_config=build_config,
                kv_cache_tokens=kv_cache_tokens, free_gpu_memory_fraction=free_gpu_memory_fraction, progress=progress)
            weakref.finalize(self, self._tp.close)
            self.engine = self._tp.engine
        elif isinstance(model, Engine):
            self.engine = model
        else:
            engine_dir = resolve_engine_dir(model, build_config, progress)
            self.engine = load_engine(engine_dir, device=device, dtype=dtype, progress=progress)
        self.tokenizer = self.engine.tokenizer
        config, build = self.engine.model_config, self.engine.build_config
        self.max_seq_len = build.max_seq_len
        model_ = self.engine.model
        cache_dtype = torch.float8_e4m3fn if build.kv_cache_dtype == "fp8" else model_.dtype
        max_batch_size, max_num_tokens = max_batch_size or build.max_batch_size, max_num_tokens or build.max_num_tokens
        # On CUDA without kv_cache_tokens: the bytes the cache was sized from (free, eager, graphs).
        self.memory_plan: dict[str, int] | None = None
        if self._tp:
            num_blocks = self._tp.num_blocks
        else:
            num_blocks = self._num_blocks(kv_cache_tokens, free_gpu_memory_fraction, build.page_size, cache_dtype,
                                          max_batch_size, max_num_tokens, cuda_graphs, prefill_graph_tokens)
        # model_.config: under tensor parallelism, this rank's share of the KV heads.
        self.kv = KVCacheManager(model_.config, num_blocks, build.page_size, cache_dtype, model_.device,
                                 enable_prefix_caching)
        eos = set(config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.executor = Executor(
            model_, self.kv, max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens, max_seq_len=self.max_seq_len,
            eos_token_ids=eos, seed=seed,
            overlap=(model_.device.type == "cuda" and self._tp is None) if overlap_scheduling is None
            else overlap_scheduling,
        )
        if model_.device.type == "cuda":
            sched = self.executor.scheduler
            self.executor.runner.warmup(sched.max_num_tokens, sched.max_batch_size, self.max_seq_len)
            if cuda_graphs:
                self.executor.runner.capture_decode_graphs(sched.max_batch_size, self.max_seq_len)
                self.executor.runner.capture_prefill_graphs(sched.max_num_tokens, self.max_seq_len,
                                                            prefill_graph_tokens)
        if progress:
            runner = self.executor.runner
            sized = f", sized {self._memory_text(free_gpu_memory_fraction)}" if self.memory_plan else ""
            print(f"KV cache: {self.kv.capacity_tokens} tokens ({num_blocks} blocks of {build.page_size}, "
                  f"{cache_dtype}{sized}); CUDA graphs: decode {sorted(runner.graphs) or 'off'}, one-sequence "
                  f"prefill {list(runner.prefill_graphs) or 'off'}; overlap scheduling: "
                  f"{'on' if self.executor.overlap else 'off'}")
        # One full garbage collection now, over everything start-up made (modules, the engine,
        # compiled kernels, graphs): CPython runs one once the objects promoted since the last
        # outnumber a quarter of those that survived it, and at start-up that point comes soon.
        # Left to itself, one came during a timed run in every process measured: a 75-135 ms
        # pause of the host, 0.1-0.15 s of a 4.8 s throughput run on an H100
        # (benchmarks/step_timeline.py).
        gc.collect()
        self._ids = itertools.count()
        self._requests: dict[str, _Group] = {}
        self._seq_group: dict[str, _Group] = {}  # sequence id -> its request
        self._arrivals = itertools.count()
        self._pieces: dict[bool, dict[int, str]] = {}  # skip_special_tokens -> the detokenizers' token texts

    def _num_blocks(self, kv_tokens, fraction, page, cache_dtype, max_batch_size, max_num_tokens,
                    cuda_graphs, prefill_graph_tokens) -> int:
        """Blocks of the cache: kv_cache_tokens if given, else on CUDA sized from free memory
        after the weights and the measured activation and graph memory (runtime/kv_sizing.py)."""
        model = self.engine.model
        if kv_tokens is None and model.device.type == "cuda":
            kv_sizing.check_fraction(fraction)
            eager, graphs = kv_sizing.activation_bytes(
                model, page, cache_dtype, max_num_tokens=max_num_tokens, max_batch_size=max_batch_size,
                max_seq_len=self.max_seq_len, cuda_graphs=cuda_graphs, prefill_graph_tokens=prefill_graph_tokens)
            free, _ = torch.cuda.mem_get_info(model.device)
            self.memory_plan = {"free": free, "eager": eager, "graphs": graphs}
            blocks = kv_sizing.fit_blocks(model.config, cache_dtype, page, free, fraction, eager + graphs)
            if blocks < 1:
                raise ValueError(f"no GPU memory left for the KV cache ({self._memory_text(fraction)}); lower "
                                 f"max_batch_size or max_num_tokens, or raise free_gpu_memory_fraction")
            return blocks
        if kv_tokens is None:
            kv_tokens = kv_sizing.default_cpu_tokens(self.max_seq_len)
        if kv_tokens < page:
            raise ValueError(f"KV cache of {kv_tokens} tokens is smaller than one page ({page} tokens)")
        return kv_tokens // page

    def _memory_text(self, fraction: float) -> str:
        m = {k: v / 2**30 for k, v in self.memory_plan.items()}
        return (f"{fraction:g} x ({m['free']:.1f} GiB free after the weights - {m['eager']:.2f} GiB eager "
                f"activations - {m['graphs']:.2f} GiB CUDA graphs)")

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do on one rank); the LLM
        cannot run after. Also happens when the LLM is garbage-collected or at exit."""
        if self._tp is not None:
            self._tp.close()

    @property
    def kv_cache_capacity_tokens(self) -> int:
        return self.kv.capacity_tokens

    # -- requests ------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        return ids

    def _make_request(self, prompt, params: SamplingParams) -> "_Group":
        """Validate one prompt and its params; returns its group of params.n sequences (not
        yet added)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt)
        vocab = self.engine.model_config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias names token ids outside the vocabulary of {vocab}: "
                             f"{sorted(t for t in params.logit_bias if t >= vocab)[:5]}")
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_seq_len is {self.max_seq_len}, which leaves no room to generate"
            )
        longest = min(len(ids) + params.max_tokens, self.max_seq_len)
        if self.kv.blocks_for(longest) > self.kv.num_blocks:
            raise ValueError(
                f"request needs up to {longest} tokens of KV cache, more than its capacity of "
                f"{self.kv.capacity_tokens}; lower max_tokens or enlarge the cache"
            )
        rid = str(next(self._ids))
        text_prompt = prompt if isinstance(prompt, str) else None
        pieces = self._pieces.setdefault(params.skip_special_tokens, {})
        seqs = []
        for i in range(params.n):
            seq = Request(rid if params.n == 1 else f"{rid}-{i}", text_prompt, ids, params, arrival=next(self._arrivals),
                          seed=None if params.seed is None else seeded_child(params.seed, i), parent_id=rid, index=i)
            seq.detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop,
                                               params.min_tokens, pieces)
            seqs.append(seq)
        return _Group(rid, text_prompt, ids, params, seqs)

    def _submit(self, group: "_Group") -> None:
        self._requests[group.request_id] = group
        for seq in group.seqs:
            self._seq_group[seq.request_id] = group
        # n > 1: the other sequences wait until the first has computed the prompt, so that they
        # find its full blocks in the prefix cache instead of computing the prompt n times.
        share = len(group.seqs) > 1 and self.kv.enable_prefix_caching and \
            len(group.prompt_token_ids) > self.kv.page_size
        first = group.seqs[:1] if share else group.seqs
        group.pending = group.seqs[len(first):]
        for seq in first:
            self.executor.add(seq)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> str:
        """Queue one prompt; its outputs come from `step()` under the returned id."""
        group = self._make_request(prompt, params or SamplingParams())
        self._submit(group)
        return group.request_id

    def has_unfinished_requests(self) -> bool:
        return self.executor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns an output for every request that got a new token
        in it (`finished` tells which are done: those are forgotten after this). Outputs are
        cumulative: each holds the whole text and tokens so far; a running request's text
        holds back what may still change (a partial character, the start of a stop string)."""
        return self._step(unfinished=True)

    def _step(self, unfinished: bool) -> list[RequestOutput]:
        """step(); unfinished=False leaves out the outputs of requests still running, which
        generate() never reads: building one copies the request's tokens and logprobs and
        scans its text for the start of a stop string, every step."""
        touched: dict[str, _Group] = {}
        for seq in self.executor.step():
            group = self._seq_group.get(seq.request_id)
            if group is None:  # aborted meanwhile
                continue
            done = seq.status is RequestStatus.FINISHED
            if seq.detok.add([seq.tokens[-1]], final=done):
                if not done:
                    self.executor.finish(seq, "stop")
                seq.finish_reason = "stop"
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            leader = group.seqs[0]
            if group.pending and (leader.status is RequestStatus.FINISHED or leader.output_token_ids):
                for seq in reversed(group.pending):  # they arrived before anything still waiting
                    self.executor.scheduler.add(seq, front=True)
                group.pending = []
            finished = not group.pending and all(seq.status is RequestStatus.FINISHED for seq in group.seqs)
            if finished:
                self._forget(group)
            if finished or unfinished:
                outputs.append(self._output(group, finished))
        return outputs

    def _forget(self, group: "_Group") -> None:
        self._requests.pop(group.request_id, None)
        for seq in group.seqs:
            self._seq_group.pop(seq.request_id, None)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request (all of its n sequences) now and free its KV blocks; False if it is
        unknown or already done."""
        group = self._requests.get(request_id)
        if group is None:
            return False
        self._forget(group)
        pending = {id(seq) for seq in group.pending}
        for seq in group.seqs:
            if id(seq) in pending:  # never queued: nothing to free
                seq.status, seq.finish_reason = RequestStatus.FINISHED, "abort"
            else:
                self.executor.abort(seq.request_id)
        group.pending = []
        return True

    def _output(self, group: "_Group", finished: bool) -> RequestOutput:
        outs = []
        for seq in group.seqs:
            done = seq.status is RequestStatus.FINISHED
            outs.append(CompletionOutput(
                seq.index, seq.detok.text if done else seq.detok.stable_text(), seq.output_token_ids,
                seq.finish_reason if done else None,
                None if seq.logprobs is None else list(seq.logprobs),
                None if seq.logprobs is None else seq.cumulative_logprob))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, finished)

    # -- batch API -----------------------------------------------------------------------

    def generate(
        self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) together; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        requests = [self._make_request(p, sp) for p, sp in zip(prompts, params)]  # validate all first
        for group in requests:
            self._submit(group)
        order = {r.request_id: i for i, r in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        remaining = len(requests)
        with tqdm(total=len(requests), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while remaining:
                for out in self._step(unfinished=False):
                    if out.request_id in order:
                        results[order[out.request_id]] = out
                        remaining -= 1
                        bar.update(1)
        return results

    def chat(
        self, messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation ([{"role", "content"}, ...]) or a list of them,
        formatted by the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise ValueError("messages is empty")
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)


@dataclass
class _Group:
    """One request: its n sequences (completions), of which `pending` are not yet queued."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Request]
    pending: list[Request] = field(default_factory=list)
