"""The runtime on the GPU: CUDA graphs, chunked prefill, preemption and prefix caching all on
give the same greedy tokens as all of them off (float32, random weights at SmolLM2's shape:
the default model's file cannot be carried to the GPU machine)."""
import pytest
import torch

from trtllm_kernels.engine import BuildConfig
from trtllm_kernels.engine.random_weights import random_engine
from trtllm_kernels.runtime import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_graphs_chunking_preemption_prefix_caching_keep_greedy_tokens():
    engine = random_engine("smollm2-135m", BuildConfig(max_seq_len=512, max_batch_size=32),
                           device="cuda", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 49152, (40,), generator=g).tolist()
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (1, 7, 16, 17, 33, 100, 250)]
    prompts += [shared + torch.randint(0, 49152, (n,), generator=g).tolist() for n in (1, 9, 30)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    plain = LLM(engine, cuda_graphs=False, enable_prefix_caching=False, kv_cache_tokens=8192, progress=False)
    expect = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    del plain

    # 40 pages of 16 tokens cannot hold all ten requests: they queue and are preempted.
    fast = LLM(engine, kv_cache_tokens=40 * 16, max_num_tokens=64, progress=False)
    assert fast.executor.runner.graphs, "decode graphs were not captured"
    got = [o.token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    assert got == expect
    assert fast.executor.scheduler.num_preemptions > 0
    assert fast.kv.prefix_hit_tokens > 0
    assert fast.kv.num_free_blocks == fast.kv.num_blocks
    # Graph replays and eager steps agree on a second, all-decode-heavy batch too.
    again = [o.token_ids for o in fast.generate(prompts[:4], params, use_tqdm=False)]
    assert again == expect[:4]
