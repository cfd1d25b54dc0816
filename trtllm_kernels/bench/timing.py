"""Timing one callable the way every kernel benchmark here does.

- CUDA: one pair of `torch.cuda.Event`s around each call, the median over many calls after a
  warm-up. Events time the GPU stream, so a kernel is not charged for the host work of the
  Python loop, except where the host cannot keep the queue full (then the gap is real cost).
- Inputs rotate: the caller passes several input sets whose total size exceeds the L2 cache
  (`num_rotations` says how many), and call i uses set i % n. A kernel timed on the same
  small input again and again reads it from L2 and looks faster than it will be in a model.
- Optional CUDA-graph mode: capture one call per input set into a graph, replay it, divide.
  Launches are slow on the GPU VM (tens of us each; a model step runs under a graph anyway),
  so graph mode shows what a kernel costs once launch overhead is hidden.
- CPU fallback with `time.perf_counter`, so the logic runs in CI.

A time budget caps the number of calls, so a slow reference implementation (the ops run
plain PyTorch until their kernels land) does not eat the whole GPU session.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Callable, Sequence

import torch

DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100 SXM has 50 MB of L2


class GraphCaptureError(RuntimeError):
    """`fn` could not be captured into a CUDA graph (e.g. it synchronizes with the host)."""


def l2_cache_bytes(device: torch.device | str | None = None) -> int:
    """The device's L2 size in bytes; DEFAULT_L2_BYTES where it cannot be read (CPU, old torch)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def num_rotations(
    bytes_per_set: int, l2_bytes: int | None = None, *, factor: float = 2.0, max_sets: int = 512,
    max_total_bytes: int | None = None,
) -> int:
    """How many input sets to rotate through so that together they exceed `factor` x L2.

    With more than L2's worth of other data touched since a set's last use, its next use misses
    the cache. `max_sets` bounds the set-up cost for tiny inputs (thousands of 8 KB sets buy
    nothing: such a kernel is launch-bound), `max_total_bytes` bounds memory. Always >= 1.
    """
    l2 = DEFAULT_L2_BYTES if l2_bytes is None else l2_bytes
    n = math.ceil(factor * l2 / max(int(bytes_per_set), 1))
    if max_total_bytes is not None:
        n = min(n, max_total_bytes // max(int(bytes_per_set), 1))
    return max(1, min(n, max_sets))


def tensor_bytes(obj) -> int:
    """Total bytes of the tensors in a (nested) tuple / list / dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _device_of(obj) -> torch.device | None:
    """The device of the first tensor found in a (nested) tuple / list / dict, else None."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for v in values:
        d = _device_of(v)
        if d is not None:
            return d
    return None


def _summary(times_us: list[float], mode: str, n_sets: int) -> dict:
    ts = sorted(times_us)
    q = (lambda p: ts[min(len(ts) - 1, int(p * (len(ts) - 1) + 0.5))])
    return {
        "median_us": statistics.median(ts),
        "mean_us": statistics.fmean(ts),
        "min_us": ts[0],
        "p10_us": q(0.10),
        "p90_us": q(0.90),
        "n": len(ts),
        "n_sets": n_sets,
        "mode": mode,
    }


def time_fn(
    fn: Callable, input_sets: Sequence[tuple], warmup: int = 10, iters: int = 100, *,
    graph: bool = False, budget_s: float | None = None, min_iters: int = 5,
    device: torch.device | str | None = None,
) -> dict:
    """Time `fn(*input_sets[i % n])`; returns {median_us, mean_us, min_us, p10_us, p90_us, n,
    n_sets, mode} with per-call times in microseconds.

    warmup: calls before timing (compilation, autotuning, allocator, cuBLAS workspaces).
    iters: timed calls (in graph mode: at least this many calls in all, over >= 5 replays).
    budget_s: if set, fewer timed calls when the warm-up shows that `iters` would take longer
      (never fewer than min_iters).
    graph: CUDA only; raises GraphCaptureError if fn cannot be captured (the caller decides
      whether to fall back to eager timing, which it should then do for its baseline too).
    """
    if not input_sets:
        raise ValueError("time_fn needs at least one input set")
    # Where the inputs live decides the clock: timing CUDA work with perf_counter would
    # measure only the asynchronous launches.
    device = torch.device(device) if device is not None else (_device_of(input_sets) or torch.device("cpu"))
    n_sets = len(input_sets)
    if device.type != "cuda":
        return _time_cpu(fn, input_sets, warmup, iters, budget_s, min_iters)
    if graph:
        return _time_cuda_graph(fn, input_sets, warmup, iters, budget_s, device)
    return _time_cuda_events(fn, input_sets, warmup, iters, budget_s, min_iters, device, n_sets)


def _warm(fn, input_sets, warmup, budget_s, sync) -> float:
    """Run up to `warmup` calls (at least one), rotating sets; returns seconds per call.

    Stops early once a quarter of the budget is spent: the warm-up of a 0.3 s reference op
    need not take 3 s.
    """
    n = len(input_sets)
    sync()
    t0 = time.perf_counter()
    done = 0
    for i in range(max(1, warmup)):
        fn(*input_sets[i % n])
        done += 1
        if budget_s is not None and time.perf_counter() - t0 > 0.25 * budget_s:
            break
    sync()
    return (time.perf_counter() - t0) / done


def _iters_within_budget(iters, per_call_s, budget_s, min_iters) -> int:
    if budget_s is None or per_call_s <= 0:
        return iters
    return max(min_iters, min(iters, int(budget_s / per_call_s)))


def _time_cpu(fn, input_sets, warmup, iters, budget_s, min_iters) -> dict:
    per_call = _warm(fn, input_sets, warmup, budget_s, lambda: None)
    iters = _iters_within_budget(iters, per_call, budget_s, min_iters)
    n = len(input_sets)
    times = []
    for i in range(iters):
        args = input_sets[i % n]
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e6)
    return _summary(times, "cpu-perf_counter", n)


def _time_cuda_events(fn, input_sets, warmup, iters, budget_s, min_iters, device, n_sets) -> dict:
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    with torch.cuda.device(device):
        per_call = _warm(fn, input_sets, warmup, budget_s, sync)
        iters = _iters_within_budget(iters, per_call, budget_s, min_iters)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        sync()
        for i in range(iters):
            args = input_sets[i % n_sets]
            starts[i].record()
            fn(*args)
            ends[i].record()
        sync()
        times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]  # ms -> us
    return _summary(times, "cuda-events", n_sets)


def _check_no_host_sync(fn, args) -> None:
    """Raise GraphCaptureError if one eager call synchronizes with the host (.item(),
    .tolist(), boolean-mask indexing...): such a call cannot be captured, and finding out by a
    failed capture is costly (see `_recover_from_failed_capture`)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # "a prototype feature": we know, and recover below if so
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn(*args)
    except RuntimeError as e:
        raise GraphCaptureError(f"synchronizes with the host: {str(e).splitlines()[0]}") from e
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _recover_from_failed_capture(device) -> None:
    """A capture that fails ends before torch's CUDA RNG leaves its capture state, and every
    later random op then fails ("Offset increment outside graph capture"); one capture that
    succeeds puts it right."""
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:
        pass
    x = torch.zeros(1, device=device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x.add_(1)
    torch.cuda.synchronize(device)


def _time_cuda_graph(fn, input_sets, warmup, iters, budget_s, device) -> dict:
    n = len(input_sets)
    # One graph holds one call per set (at least 10 calls, so a replay is long enough to time
    # well); replays are timed with events and divided by the calls in the graph.
    calls = max(n, 10)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    with torch.cuda.device(device):
        # Warm up on a side stream, as capture requires (lazy init, cuBLAS workspaces).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _warm(fn, input_sets, min(warmup, 3), budget_s, lambda: None)
        torch.cuda.current_stream().wait_stream(side)
        sync()
        _check_no_host_sync(fn, input_sets[0])
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                for i in range(calls):
                    fn(*input_sets[i % n])
        except Exception as e:  # capture-time failures come in many types
            del g
            _recover_from_failed_capture(device)
            raise GraphCaptureError(f"{type(e).__name__}: {e}") from e
        t0 = time.perf_counter()
        g.replay()
        sync()
        per_replay = time.perf_counter() - t0
        replays = max(5, math.ceil(iters / calls))
        if budget_s is not None and per_replay > 0:
            replays = max(5, min(replays, int(budget_s / per_replay)))
        for _ in range(min(warmup, 3)):
            g.replay()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        sync()
        for s, e in zip(starts, ends):
            s.record()
            g.replay()
            e.record()
        sync()
        times = [s.elapsed_time(e) * 1e3 / calls for s, e in zip(starts, ends)]
        del g
    result = _summary(times, "cuda-graph", n)
    result["calls_per_replay"] = calls  # n counts replays here
    return result
