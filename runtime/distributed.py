"""Tensor-parallel processes: one per rank, rank 0 being the caller's own process.

`LLM(model, tensor_parallel_size=N)` calls `start()`, which
1. starts ranks 1..N-1 as `python -m trtllm_kernels.runtime.distributed '<json>'` (plain
   subprocesses, not multiprocessing: nothing is pickled, and the caller's script is not
   re-imported as spawn would do). The JSON holds the model spec and the settings;
2. joins them in a torch.distributed process group (NCCL on GPUs, one GPU per rank, rank r on
   cuda:r; gloo on CPU), meeting through a TCPStore that rank 0 serves. The store also carries
   each worker's start-up status, so a worker that fails to load makes `start()` raise with its
   message instead of hanging in a collective;
3. loads rank 0's shard (engine/parallel.py) while the workers load theirs, and agrees with
   them on the KV cache's size (the smallest any rank can hold).

Then every step, rank 0 (scheduler, sampler, the LLM API) packs the step's inputs into int64
tensors (runtime/model_runner.py) and broadcasts them; the workers run the same forward and the
collectives inside it line the ranks up. Commands travel in the same header: a step (eager or
CUDA-graph replay), a graph capture, or stop. Workers keep no request state: block tables come
with each step, and each rank's KV cache holds its own heads at the same block ids.

Environment: NVLink multicast (NVLS) must stay off on the shared GPU hosts, so NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set in rank 0's environment
before NCCL starts and passed to every worker.

Limits: a worker that dies after start-up leaves rank 0 waiting in its next collective (the
group's timeout is long, since an idle LLM keeps its workers waiting in a broadcast); a worker
whose rank 0 dies exits on its own (it watches its parent). One tensor-parallel LLM per process
at a time (torch.distributed has one default group); `LLM.shutdown()` ends it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import trtllm_kernels as tk
from trtllm_kernels.engine.builder import WEIGHTS_FILE, Engine, read_engine_config, resolve_dtype
from trtllm_kernels.engine.config import BuildConfig, ModelConfig
from trtllm_kernels.engine.parallel import (TensorParallelFp4LlamaModel, TensorParallelFp4W4A8LlamaModel,
                                            TensorParallelFp8LlamaModel, TensorParallelLlamaModel, check_fp4_split,
                                            shard_plan, shard_weight)
from trtllm_kernels.engine.quantize import (FP4_FORMATS, GLOBAL_SUFFIX, LINEAR_WEIGHTS, SCALE_SUFFIX, extra_names,
                                            load_dtype_any)

from .kv_sizing import FREE_GPU_MEMORY_FRACTION

TP_MODELS = {None: TensorParallelLlamaModel, "fp8": TensorParallelFp8LlamaModel,
             "nvfp4": TensorParallelFp4LlamaModel, "mxfp4": TensorParallelFp4LlamaModel,
             "mxfp4_w4a8": TensorParallelFp4W4A8LlamaModel}

# NVLink multicast off: on shared hosts a program using it can take every GPU down.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GROUP_TIMEOUT = datetime.timedelta(days=7)  # workers idle inside a broadcast while rank 0 waits for requests
START_TIMEOUT_S = 600.0
HEADER_LEN = 8


@dataclass(frozen=True)
class RandomWeights:
    """Random weights at a known model shape (engine/random_weights.py SHAPES, or a
    ModelConfig), as a model spec each tensor-parallel rank can rebuild on its own: every rank
    draws the full tensors with the same generator, in the same order and on the same device
    type as `random_engine`, one tensor at a time, and keeps its shard. So the values equal
    `random_engine(shape, seed=seed, dtype=..., device=...)`'s, and the full model never has
    to fit one device."""

    shape: str | ModelConfig
    seed: int = 0

    def model_config(self) -> ModelConfig:
        from trtllm_kernels.engine.random_weights import SHAPES

        if isinstance(self.shape, ModelConfig):
            return self.shape
        if self.shape not in SHAPES:
            raise ValueError(f"unknown model shape {self.shape!r}; known: {sorted(SHAPES)}")
        return SHAPES[self.shape]


# -- collectives -----------------------------------------------------------------------------

class RankComm:
    """This rank's collectives: the model's all-reduce / all-gather (engine/parallel.py's
    Communicator) and the runner's step broadcast from rank 0."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        self.nccl = device.type == "cuda"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((self.size, *x.shape))
        if self.nccl:
            dist.all_gather_into_tensor(out, x.contiguous())
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(out.unbind(0)), x.contiguous())
        return out

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def send_step(self, header: list[int], payload: torch.Tensor | None) -> torch.Tensor | None:
        """Rank 0: broadcast a command header and its int64 payload; returns the payload on
        this rank's device."""
        h = torch.tensor(header + [0] * (HEADER_LEN - len(header)), dtype=torch.int64)
        dist.broadcast(h.to(self.device), 0)
        if payload is None or payload.numel() == 0:
            return None
        p = payload.to(self.device, non_blocking=True)
        dist.broadcast(p, 0)
        return p

    def recv_step(self, payload_size) -> tuple[list[int], torch.Tensor | None]:
        """Workers: the next header and payload from rank 0 (payload_size(header) -> int64 count)."""
        h = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.broadcast(h, 0)
        header = h.tolist()
        n = payload_size(header)
        if n == 0:
            return header, None
        p = torch.empty(n, dtype=torch.int64, device=self.device)
        dist.broadcast(p, 0)
        return header, p


# -- loading a shard ---------------------------------------------------------------------------

def _rank_device(device: str | None, rank: int) -> torch.device:
    d = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if d.type == "cuda":
        return torch.device("cuda", (d.index or 0) + rank)
    return d


def load_shard(spec: dict, rank: int, size: int, device: torch.device, dtype: str, comm: RankComm,
               with_tokenizer: bool) -> Engine:
    """This rank's Engine: the full model's config, a TensorParallelLlamaModel over its shard."""
    if spec["kind"] == "random":
        from trtllm_kernels.engine.random_weights import weight_shapes

        config = ModelConfig(**spec["config"])
        build = BuildConfig.from_dict(spec["build"])
        torch_dtype = resolve_dtype(dtype, device)
        plan = shard_plan(config, rank, size)
        gen = torch.Generator(device=device).manual_seed(spec["seed"])
        quant = build.quantization
        weights = {}
        for name, shape in weight_shapes(config).items():  # random_engine's order and draws
            if len(shape) == 1:
                full = torch.ones(shape, dtype=torch_dtype, device=device)
            else:
                full = torch.empty(shape, dtype=torch_dtype, device=device).normal_(0.0, 0.02, generator=gen)
            parts = {name: full}
            if quant and name.rsplit(".", 1)[-1] in LINEAR_WEIGHTS:
                # the whole tensor, as random_engine quantizes it, then this rank's shard
                if quant == "fp8":
                    qw, scale = tk.quantize_fp8_per_channel(full)
                    parts = {name: qw, name + SCALE_SUFFIX: scale}
                else:
                    qw, scale, global_scale = tk.quantize_fp4(full, quant)
                    parts = {name: qw, name + SCALE_SUFFIX: scale}
                    if global_scale is not None:
                        parts[name + GLOBAL_SUFFIX] = global_scale
            for n, t in parts.items():
                weights[n] = shard_weight(config, plan, n, _narrow_getter(t), quant)
            del full, parts
        tokenizer, path = None, None
    else:
        from safetensors import safe_open

        path = Path(spec["path"])
        config, build = read_engine_config(path)
        torch_dtype = resolve_dtype(dtype, device, build.dtype)
        plan = shard_plan(config, rank, size)
        weights = {}
        with safe_open(path / WEIGHTS_FILE, framework="pt", device="cpu") as f:
            def get(name, dim, a, b):
                s = f.get_slice(name)
                t = s[:] if dim < 0 else s[a:b] if dim == 0 else s[:, a:b]
                return t.to(device=device, dtype=load_dtype_any(name, t, torch_dtype))

            from trtllm_kernels.engine.model import weight_names

            for name in weight_names(config) + extra_names(config, build.quantization):
                weights[name] = shard_weight(config, plan, name, get, build.quantization)
        tokenizer = None
        if with_tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
    if device.type == "cuda":  # the full tensors drawn above stay cached by torch otherwise, and
        torch.cuda.empty_cache()  # the KV cache is sized from the memory the driver reports free
    return Engine(TP_MODELS[build.quantization](config, weights, plan, comm), config, build, tokenizer, path)



def _narrow_getter(full: torch.Tensor):
    def get(name, dim, a, b):
        return full if dim < 0 else full.narrow(dim, a, b - a)
    return get


def model_spec(model, build_config: BuildConfig | None, progress: bool) -> dict:
    """A JSON-able description of the model that every rank loads the same way."""
    if isinstance(model, Engine):
        raise ValueError("tensor_parallel_size > 1 needs a model path (engine dir, checkpoint) or "
                         "RandomWeights, not an Engine already in memory: each rank loads its own shard")
    if isinstance(model, RandomWeights):
        config = model.model_config()
        build = build_config or BuildConfig(max_seq_len=min(config.max_position_embeddings, 8192))
        if build.max_seq_len is None:
            build = dataclasses.replace(build, max_seq_len=min(config.max_position_embeddings, 8192))
        return {"kind": "random", "config": dataclasses.asdict(config), "build": build.to_dict(), "seed": model.seed}
    from .llm import resolve_engine_dir  # builds the engine once, on rank 0, before workers start

    return {"kind": "engine", "path": str(resolve_engine_dir(model, build_config, progress))}


def kv_blocks_fit(model, build: BuildConfig, kv_cache_tokens: int | None, fraction: float,
                  max_seq_len: int, cache_dtype: torch.dtype) -> int:
    """Blocks this rank's KV cache can hold, over this rank's own head count and free memory:
    kv_cache_tokens if given; else on CUDA `fraction` of the free memory less a fixed reserve
    (one rank measures its activations instead: runtime/kv_sizing.py says why not here)."""
    from . import kv_sizing

    if kv_cache_tokens is None and model.device.type == "cuda":
        kv_sizing.check_fraction(fraction)
        free, _ = torch.cuda.mem_get_info(model.device)
        return kv_sizing.fit_blocks(model.config, cache_dtype, build.page_size, free, fraction,
                                    kv_sizing.TP_MEMORY_RESERVE)
    if kv_cache_tokens is None:
        kv_cache_tokens = kv_sizing.default_cpu_tokens(max_seq_len)
    return max(kv_cache_tokens // build.page_size, 0)


# -- rank 0 ------------------------------------------------------------------------------------

class TensorParallelGroup:
    """Rank 0's handle on the worker processes; `close()` stops them and ends the group."""

    def __init__(self, size: int, comm: RankComm, engine: Engine, num_blocks: int,
                 procs: list[subprocess.Popen], store):
        self.size, self.comm, self.engine, self.procs, self._store = size, comm, engine, procs, store
        self.num_blocks = num_blocks  # KV-cache blocks every rank holds (the least any can)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if all(p.poll() is None for p in self.procs):
                from .model_runner import CMD_STOP

                self.comm.send_step([CMD_STOP], None)
        finally:
            # Gloo workers end the group with rank 0 (its teardown waits for peers); NCCL
            # workers just exit, and rank 0 then aborts its communicator.
            if not self.comm.nccl:
                _destroy_group()
            for p in self.procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            _destroy_group()


def _destroy_group(timeout_s: float = 30.0) -> None:
    """End this process's group; give up after timeout_s (a peer that died never answers).
    NCCL groups are aborted (ncclCommAbort, immediate): the graceful destroy hung in NCCL's
    teardown on 2 H200s, each rank waiting in it after the decode graphs' all-reduces, and
    neither torch nor NCCL says what it waits for. Abort also clears torch's group state, so
    a later LLM can start a new group in the same process."""
    if not dist.is_initialized():
        return
    end = dist.destroy_process_group
    if dist.get_backend() == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
        end = dist.distributed_c10d._abort_process_group
    t = threading.Thread(target=end, daemon=True)
    t.start()
    t.join(timeout_s)


def start(model, size: int, *, dtype: str = "auto", device: str | None = None,
          build_config: BuildConfig | None = None, kv_cache_tokens: int | None = None,
          free_gpu_memory_fraction: float = FREE_GPU_MEMORY_FRACTION, progress: bool = True) -> TensorParallelGroup:
    """Start ranks 1..size-1, join them as rank 0, load rank 0's shard. See the module docstring."""
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"start() needs tensor_parallel_size >= 2, got {size!r}")
    dev0 = _rank_device(device, 0)
    if dev0.type == "cuda":
        if (dev0.index or 0) + size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {size} from {dev0} needs {size} GPUs; "
                             f"{torch.cuda.device_count()} visible")
        backend = "nccl"
    elif dev0.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"tensor parallelism runs on cuda or cpu, not {dev0.type}")
    if kv_cache_tokens is None and dev0.type == "cuda" and not 0 < free_gpu_memory_fraction <= 1:
        raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {free_gpu_memory_fraction}")
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process; "
                           "shut the other tensor-parallel LLM down first (LLM.shutdown())")
    spec = model_spec(model, build_config, progress)
    # Shape and format errors surface here, before any process starts.
    if spec["kind"] == "random":
        config, build = ModelConfig(**spec["config"]), BuildConfig.from_dict(spec["build"])
    else:
        config, build = read_engine_config(spec["path"])
    shard_plan(config, 0, size)
    if build.quantization in FP4_FORMATS:
        check_fp4_split(config, size, build.quantization)
    os.environ.update(NCCL_SAFE_ENV)
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    settings = {"spec": spec, "size": size, "port": store.port, "backend": backend, "device": str(dev0),
                "dtype": dtype, "kv_cache_tokens": kv_cache_tokens, "fraction": free_gpu_memory_fraction,
                "parent": os.getpid()}
    env = dict(os.environ, **NCCL_SAFE_ENV)
    procs = []
    try:
        for rank in range(1, size):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "trtllm_kernels.runtime.distributed", json.dumps(dict(settings, rank=rank))],
                env=env))
        _wait_for(store, procs, "joined")
        if dev0.type == "cuda":
            torch.cuda.set_device(dev0)
        dist.init_process_group(backend, store=store, rank=0, world_size=size, timeout=GROUP_TIMEOUT,
                                **({"device_id": dev0} if backend == "nccl" else {}))
        comm = RankComm(0, size, dev0)
        engine = load_shard(spec, 0, size, dev0, dtype, comm, with_tokenizer=True)
        _wait_for(store, procs, "loaded")
        num_blocks = comm.min_int(_kv_blocks(engine, kv_cache_tokens, free_gpu_memory_fraction))
        if num_blocks < 1:
            raise ValueError(f"the KV cache does not fit: a rank has room for {num_blocks} blocks of "
                             f"{engine.build_config.page_size} tokens")
    except BaseException:
        for p in procs:
            p.kill()
        _destroy_group()
        raise
    return TensorParallelGroup(size, comm, engine, num_blocks, procs, store)


def _kv_blocks(engine: Engine, kv_cache_tokens, fraction) -> int:
    build = engine.build_config
    cache_dtype = torch.float8_e4m3fn if build.kv_cache_dtype == "fp8" else engine.model.dtype
    return kv_blocks_fit(engine.model, build, kv_cache_tokens, fraction, build.max_seq_len, cache_dtype)


def _wait_for(store, procs, stage: str) -> None:
    """Wait until every worker has set `<stage>/<rank>`; raise with a worker's error or exit."""
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = set(range(1, len(procs) + 1))
    while pending:
        for rank in sorted(pending):
            if store.check([f"error/{rank}"]):
                raise RuntimeError(f"tensor-parallel rank {rank} failed: {store.get(f'error/{rank}').decode()}")
            if store.check([f"{stage}/{rank}"]):
                pending.discard(rank)
            elif procs[rank - 1].poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited with code {procs[rank - 1].returncode} "
                                   f"before it {stage}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel ranks {sorted(pending)} did not finish '{stage}' in {START_TIMEOUT_S:.0f} s")
        if pending:
            time.sleep(0.02)


# -- workers -----------------------------------------------------------------------------------

def _watch_parent(parent: int) -> None:
    """Exit when rank 0 is gone: an NCCL broadcast would otherwise wait forever."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def worker_main(settings: dict) -> None:
    from .kv_cache_manager import KVCacheManager
    from .model_runner import CMD_CAPTURE, CMD_STOP, ModelRunner, payload_size

    rank, size = settings["rank"], settings["size"]
    os.environ.update(NCCL_SAFE_ENV)
    threading.Thread(target=_watch_parent, args=(settings["parent"],), daemon=True).start()
    store = dist.TCPStore("127.0.0.1", settings["port"], size, is_master=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    try:
        device = torch.device(settings["device"])
        if device.type == "cuda":
            device = torch.device("cuda", (device.index or 0) + rank)
            torch.cuda.set_device(device)
        else:  # CPU ranks share the cores rather than each taking all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        store.set(f"joined/{rank}", "1")
        dist.init_process_group(settings["backend"], store=store, rank=rank, world_size=size, timeout=GROUP_TIMEOUT,
                                **({"device_id": device} if settings["backend"] == "nccl" else {}))
        comm = RankComm(rank, size, device)
        engine = load_shard(settings["spec"], rank, size, device, settings["dtype"], comm, with_tokenizer=False)
    except BaseException as e:
        store.set(f"error/{rank}", f"{type(e).__name__}: {e}")
        raise
    store.set(f"loaded/{rank}", "1")
    model, build = engine.model, engine.build_config
    cache_dtype = torch.float8_e4m3fn if build.kv_cache_dtype == "fp8" else model.dtype
    # Every rank offers the blocks it can hold and all take the least (rank 0 does the same in start()).
    num_blocks = comm.min_int(_kv_blocks(engine, settings["kv_cache_tokens"], settings["fraction"]))
    if num_blocks < 1:
        return  # rank 0 raises and kills this process
    kv = KVCacheManager(model.config, num_blocks, build.page_size, cache_dtype, device, enable_prefix_caching=False)
    runner = ModelRunner(model, kv)
    with torch.inference_mode():
        while True:
            header, payload = comm.recv_step(payload_size)
            if header[0] == CMD_STOP:
                break
            if header[0] == CMD_CAPTURE:
                runner.capture_decode_graphs(header[1], header[2])
            else:
                runner.execute(header, payload)
    if settings["backend"] == "nccl":
        os._exit(0)  # no NCCL teardown to hang in (see _destroy_group); rank 0 aborts its end
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(json.loads(sys.argv[1]))
