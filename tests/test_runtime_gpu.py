"""The runtime on the GPU: CUDA graphs, chunked prefill, preemption and prefix caching all on
give the same greedy tokens as all of them off (float32, random weights at SmolLM2's shape:
the default model's file cannot be carried to the GPU machine)."""
import pytest
import torch

from trtllm_kernels.engine import BuildConfig
from trtllm_kernels.engine.random_weights import random_engine
from trtllm_kernels.runtime import LLM, SamplingParams
from trtllm_kernels.runtime.model_runner import graph_batch_sizes

pytestmark = pytest.mark.gpu


def test_graphs_chunking_preemption_prefix_caching_keep_greedy_tokens():
    engine = random_engine("smollm2-135m", BuildConfig(max_seq_len=512, max_batch_size=32),
                           device="cuda", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 49152, (40,), generator=g).tolist()
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (1, 7, 16, 17, 33, 100, 250)]
    prompts += [shared + torch.randint(0, 49152, (n,), generator=g).tolist() for n in (1, 9, 30)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    plain = LLM(engine, cuda_graphs=False, enable_prefix_caching=False, overlap_scheduling=False,
                kv_cache_tokens=8192, progress=False)
    expect = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    del plain

    # 640 tokens of cache cannot hold all ten requests: they queue and are preempted.
    fast = LLM(engine, kv_cache_tokens=40 * 16, max_num_tokens=64, progress=False)
    assert fast.executor.runner.graphs, "decode graphs were not captured"
    assert fast.executor.overlap  # the default on one GPU
    got = [o.token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    assert got == expect
    assert fast.executor.scheduler.num_preemptions > 0
    assert fast.kv.prefix_hit_tokens > 0
    assert fast.kv.num_free_blocks == fast.kv.num_blocks
    assert fast.executor.num_launched_ahead > 0
    # Graph replays and eager steps agree on a second, all-decode-heavy batch too.
    again = [o.token_ids for o in fast.generate(prompts[:4], params, use_tqdm=False)]
    assert again == expect[:4]


def test_overlap_decode_steps_do_not_synchronize():
    """In steady decoding each step() launches the next graph replay and then waits only for
    the current step's tokens (an event): no stream or device synchronisation, no blocking
    copy; and the tokens equal those of overlap off."""
    engine = random_engine("smollm2-135m", BuildConfig(max_seq_len=256, max_batch_size=8),
                           device="cuda", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (3, 30, 64, 100, 5)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = LLM(engine, kv_cache_tokens=4096, overlap_scheduling=False, progress=False)
    expect = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    del plain
    llm = LLM(engine, kv_cache_tokens=4096, progress=False)
    ids = [llm.add_request(p, params) for p in prompts]
    done = {}

    def step():
        done.update({o.request_id: o.token_ids for o in llm.step() if o.finished})

    for _ in range(3):  # the prefill step, then decodes
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            step()
            assert llm.executor._inflight is not None  # the next step is on the GPU already
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while llm.has_unfinished_requests():
        step()
    assert [done[i] for i in ids] == expect


def test_prefill_graphs_keep_greedy_tokens():
    """Prompts prefilled alone replay the one-sequence prefill graphs (padded to the next token
    count), prefix-cache hits and chunks included, and give the eager path's greedy tokens."""
    engine = random_engine("smollm2-135m", BuildConfig(max_seq_len=1024, max_batch_size=4),
                           device="cuda", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (7, 16, 17, 100, 128, 250, 600, 1000)]
    prompts += [prompts[6] + torch.randint(0, 49152, (n,), generator=g).tolist() for n in (5, 40)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    plain = LLM(engine, cuda_graphs=False, enable_prefix_caching=False, kv_cache_tokens=16384, progress=False)
    expect = [plain.generate(p, params, use_tqdm=False)[0].token_ids for p in prompts]
    del plain
    for max_num_tokens in (None, 96):  # whole prompts; 96-token chunks
        llm = LLM(engine, kv_cache_tokens=16384, max_num_tokens=max_num_tokens, progress=False)
        runner = llm.executor.runner
        assert list(runner.prefill_graphs) == [n for n in (16, 32, 64, 128, 256, 512) if n <= (max_num_tokens or 8192)]
        got = [llm.generate(p, params, use_tqdm=False)[0].token_ids for p in prompts]
        assert got == expect
        assert runner.num_prefill_replays >= 8
        del llm


def test_kv_cache_sized_from_measured_activations_and_graphs():
    """Default sizing on CUDA: the cache gets `fraction` of what the weights, the probed eager
    peak and the graphs leave free; the decode graphs share one logits buffer (kept per graph,
    the ladder to 128 would hold 4.6x the largest); and a full batch sampling with every feature on
    peaks within what the probe set aside."""
    import gc

    engine = random_engine("smollm2-135m", BuildConfig(max_seq_len=512, max_batch_size=128, max_num_tokens=1024),
                           device="cuda", dtype=torch.bfloat16, seed=0)
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(engine, free_gpu_memory_fraction=0.5, progress=False)
    plan = llm.memory_plan
    runner = llm.executor.runner
    kv_bytes = llm.kv.k_cache.nbytes + llm.kv.v_cache.nbytes
    block = kv_bytes // llm.kv.num_blocks
    assert abs(kv_bytes - 0.5 * (plan["free"] - plan["eager"] - plan["graphs"])) < block
    logits_bytes = 128 * engine.model_config.vocab_size * 4
    assert plan["eager"] > logits_bytes  # the sampler's sort alone is larger than the logits
    assert plan["graphs"] >= logits_bytes  # the shared logits buffer is part of what graphs hold
    assert sorted(runner.graphs) == graph_batch_sizes(128)
    assert len({t.data_ptr() for t in runner._logits.values()}) == 1

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in range(1, 129)]
    params = SamplingParams(max_tokens=6, temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                            presence_penalty=0.5, frequency_penalty=0.5, logprobs=20, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [6] * 128
    assert torch.cuda.max_memory_allocated() - before <= plan["eager"] * 1.1
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()


def test_lm_head_writes_float32_logits():
    """A bf16 LM head on CUDA returns float32 logits from cuBLAS's fp32 accumulators (not
    bf16 logits widened), into `out` when given; the CPU path and the shapes agree."""
    engine = random_engine("smollm2-135m", BuildConfig(max_seq_len=64), device="cuda", dtype=torch.bfloat16, seed=0)
    model = engine.model
    hidden = torch.randn(37, engine.model_config.hidden_size, device="cuda", dtype=torch.bfloat16)
    want = hidden.double() @ model.lm_head.double().t()
    got = model.compute_logits(hidden)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-4)  # bf16-rounded logits miss this
    out = torch.empty(64, engine.model_config.vocab_size, device="cuda")
    res = model.compute_logits(hidden, out=out[:37])
    assert res.data_ptr() == out.data_ptr() and torch.equal(res, got)
