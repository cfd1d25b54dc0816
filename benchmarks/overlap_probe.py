"""Where batch-1 time to first token goes, with overlap scheduling on and off: 4 LLMs over one
random Llama-3.1-8B-shaped bf16 engine, alternating on / off in one process, each timing
`bench latency`'s 128/128 requests; per request the TTFT, the TPOT and the first step's phases
(name, start ms, duration ms): schedule, runner run, sampler launch, launch-ahead, token read.

    python benchmarks/overlap_probe.py      (GPU)
"""
import time

import torch

from trtllm_kernels.engine import BuildConfig
from trtllm_kernels.engine.random_weights import random_engine
from trtllm_kernels.runtime import LLM, SamplingParams
from trtllm_kernels.runtime import sampler as s_mod
from trtllm_kernels.runtime.benchmark import random_prompts

build = BuildConfig(max_seq_len=512, max_batch_size=1, max_num_tokens=8192)
engine = random_engine("llama-3.1-8b", build, device="cuda")
log = []
T0 = [0.0]


def wrap(obj, name, label):
    fn = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        log.append((label, round((t - T0[0]) * 1e3, 2), round((time.perf_counter() - t) * 1e3, 2)))
        return out
    setattr(obj, name, timed)


orig = s_mod.PendingSample.result


def res(self):
    t = time.perf_counter()
    out = orig(self)
    log.append(("result", round((t - T0[0]) * 1e3, 2), round((time.perf_counter() - t) * 1e3, 2)))
    return out


s_mod.PendingSample.result = res
for overlap in (True, False, True, False):
    llm = LLM(engine, build_config=build, max_batch_size=1, overlap_scheduling=overlap, progress=False)
    ex = llm.executor
    for obj, name in ((ex, "_launch"), (ex, "_launch_next"), (ex, "_complete"), (ex.runner, "run"),
                      (ex.sampler, "launch"), (ex.scheduler, "schedule")):
        wrap(obj, name, name)
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    for r in range(4):
        llm.add_request(random_prompts(1, 128, 128256, seed=100 + r)[0], params)
        torch.cuda.synchronize()
        log.clear()
        T0[0] = time.perf_counter()
        llm.step()
        first = (time.perf_counter() - T0[0]) * 1e3
        n = len(log)
        while llm.has_unfinished_requests():
            llm.step()
        tpot = ((time.perf_counter() - T0[0]) * 1e3 - first) / 127
        print(f"overlap={overlap} req {r}: ttft {first:.2f} ms tpot {tpot:.3f}; first step: {log[:n]}", flush=True)
    del llm
