"""The user-facing API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
import os
import random
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from trtllm_kernels.engine import BuildConfig, Engine, cached_engine, default_checkpoint, load_engine
from trtllm_kernels.engine.builder import ENGINE_CONFIG
from trtllm_kernels.engine.checkpoint import CheckpointError

from .executor import Executor
from .kv_cache_manager import KVCacheManager
from .request import CompletionOutput, Request, RequestOutput, RequestStatus
from .sampling_params import SamplingParams

CPU_DEFAULT_KV_TOKENS = 16384
GPU_MEMORY_RESERVE = 4 << 30  # activations and workspaces, kept out of the KV cache


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
    (default: 16384 on CPU; on CUDA, free_gpu_memory_fraction of free memory after the
    weights, less a reserve for activations). enable_prefix_caching: reuse the KV blocks of
    prompt prefixes computed before (on by default; `llm.kv.prefix_hit_rate` counts hits).
    cuda_graphs: on CUDA, replay captured graphs for decode steps (on by default).
    """

    def __init__(
        self, model: str | os.PathLike | None = None, *, dtype: str = "auto",
        device: str | None = None, build_config: BuildConfig | None = None,
        kv_cache_tokens: int | None = None, free_gpu_memory_fraction: float = 0.9,
        max_batch_size: int | None = None, max_num_tokens: int | None = None,
        enable_prefix_caching: bool = True, cuda_graphs: bool = True, seed: int = 0,
        progress: bool = True,
    ):
        if isinstance(model, Engine):
            self.engine = model
        else:
            engine_dir = resolve_engine_dir(model, build_config, progress)
            self.engine = load_engine(engine_dir, device=device, dtype=dtype, progress=progress)
        self.tokenizer = self.engine.tokenizer
        config, build = self.engine.model_config, self.engine.build_config
        self.max_seq_len = build.max_seq_len
        model_ = self.engine.model
        cache_dtype = torch.float8_e4m3fn if build.kv_cache_dtype == "fp8" else model_.dtype
        num_blocks = self._num_blocks(kv_cache_tokens, free_gpu_memory_fraction, build.page_size, cache_dtype)
        self.kv = KVCacheManager(config, num_blocks, build.page_size, cache_dtype, model_.device,
                                 enable_prefix_caching)
        eos = set(config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.executor = Executor(
            model_, self.kv, max_batch_size=max_batch_size or build.max_batch_size,
            max_num_tokens=max_num_tokens or build.max_num_tokens, max_seq_len=self.max_seq_len,
            eos_token_ids=eos,
        )
        if cuda_graphs and model_.device.type == "cuda":
            self.executor.runner.capture_decode_graphs(self.executor.scheduler.max_batch_size, self.max_seq_len)
        if progress:
            print(f"KV cache: {self.kv.capacity_tokens} tokens ({num_blocks} blocks of {build.page_size}, "
                  f"{cache_dtype}); decode CUDA graphs: {sorted(self.executor.runner.graphs) or 'off'}")
        self._rng = random.Random(seed)
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}

    def _num_blocks(self, kv_tokens, fraction, page, cache_dtype) -> int:
        c = self.engine.model_config
        if kv_tokens is None:
            device = self.engine.model.device
            if device.type == "cuda":
                if not 0 < fraction <= 1:
                    raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {fraction}")
                per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * cache_dtype.itemsize
                free, _ = torch.cuda.mem_get_info(device)
                kv_tokens = int((free * fraction - GPU_MEMORY_RESERVE) // per_token)
            else:
                kv_tokens = max(CPU_DEFAULT_KV_TOKENS, self.max_seq_len)
        if kv_tokens < page:
            raise ValueError(f"KV cache of {kv_tokens} tokens is smaller than one page ({page} tokens)")
        return kv_tokens // page

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

    def _make_request(self, prompt, params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt)
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
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(str(next(self._ids)), prompt if isinstance(prompt, str) else None, ids, params,
                      arrival=len(self._requests), generator=torch.Generator().manual_seed(seed))
        return req

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> str:
        req = self._make_request(prompt, params or SamplingParams())
        self._requests[req.request_id] = req
        self.executor.add(req)
        return req.request_id

    def has_unfinished_requests(self) -> bool:
        return self.executor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns an output for every request that got a new token
        in it (`finished` tells which are done: those are forgotten after this)."""
        outputs = []
        for req in self.executor.step():
            if req.status is RequestStatus.FINISHED:
                self._requests.pop(req.request_id, None)
            outputs.append(self._output(req))
        return outputs

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already done."""
        if self._requests.pop(request_id, None) is None:
            return False
        return self.executor.abort(request_id)

    def _output(self, req: Request) -> RequestOutput:
        ids = req.output_token_ids
        text = "" if self.tokenizer is None else self.tokenizer.decode(
            ids, skip_special_tokens=req.params.skip_special_tokens)
        done = req.status is RequestStatus.FINISHED
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             [CompletionOutput(0, text, ids, req.finish_reason)], done)

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
        for req in requests:
            self._requests[req.request_id] = req
            self.executor.add(req)
        order = {r.request_id: i for i, r in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while any(r is None for r in results):
                for out in self.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
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
