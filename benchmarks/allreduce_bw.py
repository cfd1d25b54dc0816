"""All-reduce time and bus bandwidth between N local ranks, at the sizes tensor parallelism
sends: a decode step's [256, 4096] bf16 (2 MiB) and a prefill step's [8192, 4096] (64 MiB).

    python benchmarks/allreduce_bw.py [--ranks 2] [--backend nccl|gloo]

With NCCL_DEBUG=INFO set, NCCL's log says which transport it chose (P2P over NVLink, or SHM
through host memory, which is an order of magnitude slower). Bus bandwidth follows nccl-tests:
bytes * 2 (N - 1) / N / time.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES_MIB = (2, 64)


def rank_main(rank: int, size: int, backend: str, port: int, repeats: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=size)
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    for mib in SIZES_MIB:
        x = torch.ones(mib << 19, dtype=torch.bfloat16 if backend == "nccl" else torch.float32, device=device)
        for _ in range(3):
            dist.all_reduce(x)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        sync()
        seconds = (time.perf_counter() - t0) / repeats
        if rank == 0:
            nbytes = x.numel() * x.element_size()
            busbw = nbytes * 2 * (size - 1) / size / seconds / 1e9
            print(f"{backend} {size} ranks, {nbytes / 2**20:.0f} MiB: {seconds * 1e6:.1f} us, bus {busbw:.1f} GB/s",
                  flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args()
    mp.spawn(rank_main, args=(args.ranks, args.backend, args.port, args.repeats), nprocs=args.ranks)


if __name__ == "__main__":
    main()
