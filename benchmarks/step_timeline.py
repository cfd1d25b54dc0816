"""The GPU's timeline over a real offline throughput run (overlap scheduling as configured):
for every step, when the GPU started and finished its work (CUDA events recorded around the
step's launch) and how long it sat idle before it, waiting on the host.

    python benchmarks/step_timeline.py --shape llama-3.1-8b --quantization fp8 --kv-cache-dtype fp8 \
        --max-batch-size 1024 --out DIR [--no-overlap] [--runs current,legacy,...] [--kernels]
        [--set module.NAME=value]

Per step kind (eager, decode graph, one-sequence prefill graph): steps, the GPU's busy span
(first to last operation of the step, gaps inside included), the idle time before the step,
and the host's time in launch and in completion (reading tokens, stop checks). With
--kernels, a second run profiles a few decode-graph steps and one eager step (torch.profiler,
CUDA activity only) and reports the summed kernel time against the span: what the gaps
between kernels inside a step cost. Python's garbage-collector pauses during the run are
counted too. Writes timeline_<stem>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from ab_run import apply_overrides  # benchmarks/, this script's directory
from profile_step import add_run_args
from trtllm_kernels.engine import BuildConfig
from trtllm_kernels.engine.random_weights import random_engine
from trtllm_kernels.runtime.benchmark import throughput
from trtllm_kernels.runtime.llm import LLM


def step_kind(runner, batch) -> str:
    """'decode_graph', 'prefill_graph' or 'eager': how ModelRunner.run will run the batch."""
    if runner.graphs and batch.num_decodes == len(batch) <= max(runner.graphs):
        return "decode_graph"
    if len(batch) == 1 and batch.num_tokens[0] > 1 and any(n >= batch.num_tokens[0] for n in runner.prefill_graphs):
        return "prefill_graph"
    return "eager"


class Timeline:
    """Wraps Executor._launch and _complete: a CUDA event before and after each step's device
    work, host timestamps around both, and the garbage collector's pauses."""

    def __init__(self, llm: LLM):
        self.steps: list[dict] = []
        self.gc_pauses: list[tuple[float, float]] = []  # (start, ms)
        ex = llm.executor
        launch, complete = ex._launch, ex._complete
        ahead_count = [ex.num_launched_ahead]

        def timed_launch(batch):
            kind = step_kind(ex.runner, batch)
            # _launch_next counts a step launched ahead before launching it
            ahead, ahead_count[0] = ex.num_launched_ahead != ahead_count[0], ex.num_launched_ahead
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            step = launch(batch)
            end.record()
            rec = {"kind": kind, "seqs": len(batch), "tokens": sum(batch.num_tokens), "decodes": batch.num_decodes,
                   "ahead": ahead, "start": start, "end": end,
                   "launch_ms": (time.perf_counter() - t0) * 1e3, "t": t0}
            self.steps.append(rec)
            step.timeline = rec
            return step

        def timed_complete(step):
            t0 = time.perf_counter()
            out = complete(step)
            step.timeline["complete_ms"] = (time.perf_counter() - t0) * 1e3
            return out

        ex._launch, ex._complete = timed_launch, timed_complete
        self._gc_t0 = 0.0

        def on_gc(phase, info):
            if phase == "start":
                self._gc_t0 = time.perf_counter()
            else:
                self.gc_pauses.append((self._gc_t0, (time.perf_counter() - self._gc_t0) * 1e3))

        gc.callbacks.append(on_gc)

    def report(self, since: float) -> dict:
        torch.cuda.synchronize()
        steps = [s for s in self.steps if s["t"] >= since]
        pauses = [ms for t, ms in self.gc_pauses if t >= since]  # the timed run's, not its warm-up's
        ref = steps[0]["start"]
        rows, prev_end = [], None
        for s in steps:
            start, end = ref.elapsed_time(s["start"]), ref.elapsed_time(s["end"])
            rows.append({k: v for k, v in s.items() if k not in ("start", "end", "t")} | {
                "gpu_start_ms": start, "gpu_ms": end - start,
                "idle_before_ms": 0.0 if prev_end is None else max(0.0, start - prev_end)})
            prev_end = end
        kinds = defaultdict(list)
        for r in rows:
            kinds[r["kind"]].append(r)
        summary = {}
        for kind, rs in kinds.items():
            summary[kind] = {"steps": len(rs), "launched_ahead": sum(r["ahead"] for r in rs),
                             "gpu_s": sum(r["gpu_ms"] for r in rs) / 1e3,
                             "idle_before_s": sum(r["idle_before_ms"] for r in rs) / 1e3,
                             "median_gpu_ms": statistics.median(r["gpu_ms"] for r in rs),
                             "median_idle_before_ms": statistics.median(r["idle_before_ms"] for r in rs),
                             "median_launch_ms": statistics.median(r["launch_ms"] for r in rs),
                             "median_complete_ms": statistics.median(r.get("complete_ms", 0.0) for r in rs)}
        return {"by_kind": summary, "gpu_span_s": (rows[-1]["gpu_start_ms"] + rows[-1]["gpu_ms"]) / 1e3,
                "gc_pauses": len(pauses), "gc_ms": sum(pauses), "gc_max_ms": max(pauses, default=0.0),
                "steps": rows}


def kernel_busy(llm: LLM, run, first: int, count: int, kind: str, min_tokens: int) -> dict:
    """Profile `count` steps from the `first`-th step of run() of one kind and at least
    min_tokens tokens (not the warm-up's): summed kernel (and copy) time, as the union of their
    intervals, against the GPU span of those steps."""
    from torch.profiler import ProfilerActivity, profile

    ex = llm.executor
    launch = ex._launch
    state = {"n": 0, "seen": 0, "prof": None, "done": None}  # n: steps of that kind

    def watched(batch):
        if step_kind(ex.runner, batch) == kind and sum(batch.num_tokens) >= min_tokens:
            state["n"] += 1
            if state["n"] == first:
                torch.cuda.synchronize()
                state["prof"] = profile(activities=[ProfilerActivity.CUDA])
                state["prof"].__enter__()
        step = launch(batch)
        if state["prof"] is not None:
            state["seen"] += 1
            if state["seen"] == count:
                torch.cuda.synchronize()
                state["prof"].__exit__(None, None, None)
                state["done"], state["prof"] = state["prof"], None
        return step

    ex._launch = watched
    try:
        run()
    finally:
        ex._launch = launch
    if state["done"] is None:
        return {}
    spans = sorted((e.time_range.start, e.time_range.end) for e in state["done"].events()
                   if e.device_type.name == "CUDA")
    busy, lo, hi = 0.0, None, None
    for s, e in spans:
        if hi is None or s > hi:
            busy += 0 if hi is None else hi - lo
            lo, hi = s, e
        else:
            hi = max(hi, e)
    busy += hi - lo
    span = spans[-1][1] - spans[0][0]
    return {"kind": kind, "steps": count, "device_ops": len(spans), "span_ms": span / 1e3,
            "busy_ms": busy / 1e3, "busy_fraction": busy / span}


def legacy_ahead_rule(llm: LLM):
    """Stop 18's rule, for A/B runs: no step is scheduled ahead while a request waits and a
    row is free (the next step was then scheduled after reading the tokens)."""
    sched = llm.executor.scheduler
    schedule = sched.schedule

    def legacy(ahead=None):
        if ahead is not None and sched.waiting and len(sched.running) < sched.max_batch_size:
            return None
        return schedule(ahead)

    sched.schedule = legacy
    return lambda: setattr(sched, "schedule", schedule)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_run_args(ap, max_batch_size=1024)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--runs", default="current",
                    help="comma-separated runs in order, each 'current' or 'legacy' (stop 18's rule for "
                         "scheduling ahead), e.g. current,legacy,current,legacy")
    ap.add_argument("--kernels", action="store_true", help="also profile kernel gaps inside steps")
    ap.add_argument("--set", action="append", default=[], metavar="module.NAME=value",
                    help="override a trtllm_kernels module constant before start-up (as benchmarks/ab_run.py)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--stem", default=None)
    args = ap.parse_args()
    apply_overrides(args.set)
    stem = args.stem or f"{args.shape}_{args.quantization or 'bf16'}" + \
        ("_fp8kv" if args.kv_cache_dtype == "fp8" else "") + ("_nooverlap" if args.no_overlap else "")
    build = BuildConfig(max_seq_len=max(512, 2 * args.len + 16), max_batch_size=args.max_batch_size,
                        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, page_size=args.page_size)
    llm = LLM(random_engine(args.shape, build, device="cuda"), build_config=build, dtype="bfloat16",
              max_batch_size=args.max_batch_size, overlap_scheduling=not args.no_overlap, progress=False)

    seeds = iter(range(10, 1000))  # not 1: the warm-up's prompts

    def run():  # fresh prompts each run: the prefix cache must not serve them
        return throughput(llm, args.num_requests, args.len, args.len, seed=next(seeds))

    timeline = Timeline(llm)
    runs = []
    for mode in args.runs.split(","):
        restore = legacy_ahead_rule(llm) if mode == "legacy" else (lambda: None)
        timeline.steps.clear()
        timeline.gc_pauses.clear()
        result = run()
        restore()
        rep = timeline.report(time.perf_counter() - result["seconds"] - 1e-3)
        runs.append({"mode": mode, "run": result, **rep})
        print(mode, f"{result['output_tok_s']:.0f} tok/s", json.dumps(rep["by_kind"]), f"gc {rep['gc_ms']:.1f} ms",
              flush=True)
    out = {"device": torch.cuda.get_device_name(), "args": vars(args), "runs": runs}
    if args.kernels:
        out["kernels_decode"] = kernel_busy(llm, run, 40, 5, "decode_graph", args.num_requests // 2)
        out["kernels_eager"] = kernel_busy(llm, run, 3, 1, "eager", build.max_num_tokens // 2)
        print(json.dumps({k: out[k] for k in ("kernels_decode", "kernels_eager")}), flush=True)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"timeline_{stem}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
