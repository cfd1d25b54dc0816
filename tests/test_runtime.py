"""The runtime on a tiny random Llama: KV blocks, continuous batching, chunked prefill,
preemption and the sampler. Fast; the real model is exercised in test_llm.py."""
import pytest
import torch

from trtllm_kernels.engine.config import ModelConfig
from trtllm_kernels.engine.model import LlamaModel, weight_names
from trtllm_kernels.runtime.executor import Executor
from trtllm_kernels.runtime.kv_cache_manager import KVCacheManager
from trtllm_kernels.runtime.request import Request
from trtllm_kernels.runtime.sampler import sample
from trtllm_kernels.runtime.sampling_params import SamplingParams

TINY = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=256,
                   tie_word_embeddings=True)


def tiny_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    c = TINY
    shapes = {"embed": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,),
              "attn_norm": (c.hidden_size,), "mlp_norm": (c.hidden_size,),
              "qkv": ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, c.hidden_size),
              "o": (c.hidden_size, c.num_attention_heads * c.head_dim),
              "gate_up": (2 * c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size)}
    weights = {n: torch.randn(shapes[n.split(".")[-1]], generator=g) * 0.3 for n in weight_names(c)}
    return LlamaModel(c, weights)


def run(prompts, *, num_blocks=128, page=4, max_num_tokens=512, max_batch=64, max_tokens=10, model=None,
        prefix_caching=False, kv_out=None, overlap=False, eos=(), max_seq_len=256, params=None, ex_out=None,
        prepare=None):
    model = model or tiny_model()
    kv = KVCacheManager(TINY, num_blocks, page, torch.float32, torch.device("cpu"), prefix_caching)
    if kv_out is not None:
        kv_out.append(kv)
    ex = Executor(model, kv, max_batch_size=max_batch, max_num_tokens=max_num_tokens,
                  max_seq_len=max_seq_len, eos_token_ids=set(eos), overlap=overlap)
    params = params or [SamplingParams(max_tokens=max_tokens, temperature=0)] * len(prompts)
    reqs = [Request(str(i), None, p, sp, i) for i, (p, sp) in enumerate(zip(prompts, params))]
    if ex_out is not None:
        ex_out.append(ex)
    if prepare is not None:
        prepare(ex)
    for r in reqs:
        ex.add(r)
    steps = 0
    while ex.has_unfinished():
        ex.step()
        steps += 1
    assert kv.num_free_blocks == num_blocks  # every block came back
    return [r.output_token_ids for r in reqs], ex.scheduler, steps


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [1, 5, 17, 33, 2, 40, 9, 64]


def test_kv_cache_manager_hands_out_and_takes_back_blocks():
    kv = KVCacheManager(TINY, 8, 4, torch.float32, torch.device("cpu"))
    assert kv.layer_caches[0][0].shape == (8, 2, 4, 16)
    kv.grow("a", 9)  # 3 blocks
    assert len(kv.block_table("a")) == 3 and kv.num_free_blocks == 5
    kv.grow("a", 12)  # still 3
    assert len(kv.block_table("a")) == 3
    assert kv.can_grow("b", 20) and not kv.can_grow("b", 21)
    kv.grow("b", 20)
    assert set(kv.block_table("a")).isdisjoint(kv.block_table("b"))
    with pytest.raises(RuntimeError, match="out of blocks"):
        kv.grow("a", 13)
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 8


def test_block_table_array_mirrors_the_block_tables():
    """The packed tables (model_runner's input) stay equal to the zero-padded lists through
    growth past the array's first rows and width, prefix hits, frees and row reuse."""
    import random

    rng = random.Random(0)
    kv = KVCacheManager(TINY, 400, 4, torch.float32, torch.device("cpu"))
    live, tokens = {}, {}
    for step in range(600):
        rid = rng.choice([f"r{i}" for i in range(20)])
        if rid in live and rng.random() < 0.3:
            kv.free(rid)
            del live[rid]
        elif rid not in live:
            toks = tokens.setdefault(rid, [rng.randrange(3) for _ in range(rng.randrange(1, 40))])
            cached = kv.match_prefix(toks)
            kv.acquire(rid, cached, toks)
            live[rid] = len(cached) * 4
            kv.grow(rid, live[rid] + 1)
            live[rid] += 1
            kv.register_computed(rid, toks, len(cached) * 4)
        elif kv.can_grow(rid, live[rid] + 9):
            live[rid] += rng.randrange(1, 10)
            kv.grow(rid, live[rid])
        if live:
            ids = rng.sample(sorted(live), rng.randrange(1, len(live) + 1))
            width = max(len(kv.block_table(r)) for r in ids)
            assert kv.block_table_array(ids).tolist() == [kv.block_table(r) + [0] * (width - len(kv.block_table(r)))
                                                          for r in ids]
    assert kv._row_tables.shape[0] >= 16 and kv._row_tables.shape[1] > 8  # both grew


def test_batched_equals_one_at_a_time():
    prompts = prompts_of(LENGTHS)
    alone = [run([p])[0][0] for p in prompts]
    together, sched, steps = run(prompts)
    assert together == alone
    assert steps == 10  # one prefill step and 9 decode steps for the whole batch: they ran together


def test_chunked_prefill_and_preemption_keep_outputs():
    prompts = prompts_of(LENGTHS)
    expect, _, _ = run(prompts)
    chunked, _, steps = run(prompts, max_num_tokens=16)
    assert chunked == expect and steps > 12
    # 20 blocks of 4 tokens cannot hold all eight sequences at once: requests wait and get preempted.
    tight, sched, _ = run(prompts, num_blocks=20, max_num_tokens=16)
    assert sched.num_preemptions > 0
    assert tight == expect


OVERLAP_CASES = {  # run() settings: batched; chunked prefill; preemption; prefix cache evictions
    "batched": dict(), "chunked": dict(max_num_tokens=16), "preempt": dict(num_blocks=20, max_num_tokens=16),
    "prefix": dict(num_blocks=30, max_num_tokens=16, prefix_caching=True), "max_batch": dict(max_batch=3),
}


@pytest.mark.parametrize("case", OVERLAP_CASES)
def test_overlap_scheduling_keeps_outputs(case):
    """Launching step N+1 before reading step N's tokens changes no output, with requests that
    end early (end-of-sequence, a short max_tokens, max_seq_len) beside ones that run long."""
    prompts = prompts_of(LENGTHS) * (2 if case == "prefix" else 1)
    plain, _, _ = run(prompts, max_tokens=12)
    eos = {plain[0][9]}  # a token the model emits late in some outputs: those stop early
    kw = dict(OVERLAP_CASES[case], max_tokens=12, eos=eos, max_seq_len=70)
    params = [SamplingParams(max_tokens=[12, 3, 12, 7][i % 4], temperature=0) for i in range(len(prompts))]
    expect, _, steps = run(prompts, params=params, **kw)
    ex_out = []
    got, sched, overlapped_steps = run(prompts, params=params, overlap=True, ex_out=ex_out, **kw)
    assert got == expect
    assert any(len(e) < p.max_tokens for e, p in zip(expect, params))  # eos or max_seq_len ended some
    assert ex_out[0].num_launched_ahead > 0
    assert overlapped_steps <= steps
    if case == "preempt":
        assert sched.num_preemptions > 0


def test_overlap_launches_the_next_step_before_reading_tokens(monkeypatch):
    """Each step is launched before the previous one's tokens are read: its decodes take those
    tokens on the device (num_ahead rows), and a waiting request joins in the row of one that
    ends by length with the token being read."""
    from trtllm_kernels.runtime import sampler as sampler_mod

    events = []
    kv = KVCacheManager(TINY, 64, 4, torch.float32, torch.device("cpu"))
    ex = Executor(tiny_model(), kv, max_batch_size=2, max_num_tokens=64, max_seq_len=256, eos_token_ids=set(),
                  overlap=True)
    run_model, result = ex.runner.run, sampler_mod.PendingSample.result

    def run_step(batch):
        events.append(("run", [r.request_id for r in batch.requests], batch.num_tokens, batch.num_ahead))
        return run_model(batch)

    monkeypatch.setattr(ex.runner, "run", run_step)
    monkeypatch.setattr(sampler_mod.PendingSample, "result", lambda self: events.append(("read",)) or result(self))
    for i, p in enumerate(prompts_of([5, 6, 7])):  # the third waits for a free row
        ex.add(Request(str(i), None, p, SamplingParams(max_tokens=[3, 4, 2][i], temperature=0), i))
    while ex.has_unfinished():
        ex.step()
    assert events == [
        ("run", ["0", "1"], [5, 6], 0),  # the two prompts
        ("run", ["0", "1"], [1, 1], 2), ("read",),  # their first decode, launched before reading
        ("run", ["0", "1"], [1, 1], 2), ("read",),
        # 0 ends with the token being read (max_tokens 3): prompt 2 takes its row, ahead
        ("run", ["1", "2"], [1, 7], 1), ("read",),
        ("run", ["2"], [1], 1), ("read",),  # 1 ended the same way; 2's last decode
        ("read",),  # nothing follows 2's last token
    ]
    assert ex.num_launched_ahead == 4


def _eager_prefill_graphs(ex, sizes=(16, 32)):
    """The one-sequence prefill graph path on CPU: its inputs and padding as on the GPU, each
    "graph" replaced by an eager call of the function a graph would capture."""
    runner = ex.runner
    runner._alloc_prefill_inputs(max(sizes), ex.kv.blocks_for(ex.max_seq_len))
    for n in sizes:
        runner._prefill_logits[n] = torch.empty(1, TINY.vocab_size)

        class Eager:
            replay = staticmethod(lambda n=n: runner._prefill_logits[n].copy_(runner._forward_prefill(n)))
        runner.prefill_graphs[n] = Eager()


def test_prefill_graph_sizes_fit_the_budgets():
    from trtllm_kernels.runtime.model_runner import prefill_graph_sizes

    assert prefill_graph_sizes(2048, 8192, 4096) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert prefill_graph_sizes(2048, 96, 4096) == [16, 32, 64]
    assert prefill_graph_sizes(2048, 8192, 257) == [16, 32, 64, 128, 256]  # prompts < max_seq_len
    assert prefill_graph_sizes(300, 8192, 4096) == [16, 32, 64, 128, 256]
    assert prefill_graph_sizes(0, 8192, 4096) == []


@pytest.mark.parametrize("case", ["alone", "chunked", "prefix"])
def test_prefill_graph_path_pads_and_keeps_outputs(case):
    """Prompts prefilled alone through the prefill graphs' padded inputs (CPU stand-in) give the
    eager path's tokens: prompts shorter than, equal to and longer than a graph's token count,
    chunks of a long prompt (a middle chunk samples nothing), prefix-cache hits (the chunk
    starts past position 0), and prompts too long for any graph (eager)."""
    prompts = prompts_of([1, 5, 16, 17, 33, 40, 9, 70])
    kw = {"alone": dict(max_batch=1), "chunked": dict(max_batch=1, max_num_tokens=12),
          "prefix": dict(max_batch=1, prefix_caching=True)}[case]
    if case == "prefix":
        prompts = [prompts[5] + p for p in prompts]
    expect, _, _ = run(prompts, **kw)
    ex_out = []
    got, _, _ = run(prompts, ex_out=ex_out, prepare=_eager_prefill_graphs, **kw)
    assert got == expect
    assert ex_out[0].runner.num_prefill_replays >= 3  # the graphs served most prefill steps


def test_mixed_step_runs_decodes_and_prefills_together():
    prompts = prompts_of([3, 30])
    kv = KVCacheManager(TINY, 32, 4, torch.float32, torch.device("cpu"))
    ex = Executor(tiny_model(), kv, max_batch_size=8, max_num_tokens=8, max_seq_len=256, eos_token_ids=set())
    for i, p in enumerate(prompts):
        ex.add(Request(str(i), None, p, SamplingParams(max_tokens=5, temperature=0), i))
    ex.step()  # 3 tokens of prompt 0 + 5 of prompt 1
    batch = ex.scheduler.schedule()
    assert batch.num_tokens == [1, 7] and batch.num_decodes == 1


@pytest.mark.parametrize("budgets", [(512, 64, 256), (8192, 256, 4096), (16, 4, 32), (8, 1, 256)])
def test_warmup_steps_fit_the_budgets_and_write_nothing(budgets):
    """The warm-up's dummy steps stay inside the step budgets, run through the eager path and
    leave the KV cache as it was (slot -1 writes nowhere)."""
    from trtllm_kernels.runtime.model_runner import ModelRunner, warmup_steps

    max_num_tokens, max_batch, max_seq_len = budgets
    steps = warmup_steps(max_num_tokens, max_batch, max_seq_len)
    assert steps and (0, [min(max_num_tokens, max_seq_len - 1)]) in steps
    for decodes, prompts in steps:
        assert decodes + len(prompts) <= max_batch and decodes + sum(prompts) <= max_num_tokens
        assert all(1 <= n < max_seq_len for n in prompts)
    # every binary-search variant of the Triton prefill kernel that fits the budgets is built
    from trtllm_kernels.kernels.triton_attention import GLUON_PREFILL_MIN_TOKENS, prefill_search_iters
    searches = {prefill_search_iters(len(p)) for _, p in steps if p and sum(p) < GLUON_PREFILL_MIN_TOKENS}
    expected = {0, 4, 8} if max_batch >= 17 and max_num_tokens >= 17 * 7 else {0}
    assert expected <= searches
    if max_seq_len > TINY.max_position_embeddings:
        return
    kv = KVCacheManager(TINY, 128, 4, torch.float32, torch.device("cpu"))
    for cache in kv.layer_caches:
        for c in cache:
            c.normal_()
    before = [c.clone() for cache in kv.layer_caches for c in cache]
    runner = ModelRunner(tiny_model(), kv)
    for decodes, prompts in steps:
        logits = runner.execute(*runner._dummy_step(decodes, prompts, context=min(256, max_seq_len - 1) // 2))
        assert logits.shape == (decodes + len(prompts), TINY.vocab_size) and logits.isfinite().all()
    assert all(torch.equal(a, c) for a, c in zip(before, (c for cache in kv.layer_caches for c in cache)))


def test_kv_sizing_arithmetic_and_the_probe_inputs():
    """The pieces of runtime/kv_sizing.py that run anywhere: the block count, the fraction
    check, the stand-in cache of one block being enough for the warm-up's steps (their
    tables point at block 0 only), and the probe's requests taking every sampler path."""
    from trtllm_kernels.runtime import kv_sizing
    from trtllm_kernels.runtime.model_runner import warmup_steps
    from trtllm_kernels.runtime.sampler import Sampler

    per_token = kv_sizing.bytes_per_token(TINY, torch.bfloat16)
    assert per_token == 2 * 2 * 2 * 16 * 2
    assert kv_sizing.fit_blocks(TINY, torch.bfloat16, 4, 10_000 * per_token, 0.5, 2_000 * per_token) == 1000
    assert kv_sizing.fit_blocks(TINY, torch.bfloat16, 4, 100, 0.9, 200) == 0
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="free_gpu_memory_fraction"):
            kv_sizing.check_fraction(bad)

    runner = kv_sizing.stand_in_runner(tiny_model(), 4, torch.float32)
    assert runner.kv.num_blocks == 1 and not runner.kv.k_cache.any() and not runner.kv.v_cache.any()
    for decodes, prompts in warmup_steps(64, 16, 200):
        header, payload = runner._dummy_step(decodes, prompts, context=150)
        s, w = header[2], header[3]
        assert not payload[-s * w:].any()  # block tables: block 0 everywhere
        assert runner.execute(header, payload).isfinite().all()

    reqs = kv_sizing.probe_sampling_requests(3)
    out = Sampler(seed=0)(torch.randn(3, TINY.vocab_size), reqs)
    assert len(out.tokens) == 3 and all(len(lp) >= 20 for lp in out.logprobs)
    p = reqs[0].params
    assert p.has_penalties and p.top_k and p.top_p < 1 and p.min_p > 0 and p.temperature > 0


def _req(params, i=0):
    return Request(str(i), None, [1], params, i, generator=torch.Generator().manual_seed(params.seed or 0))


def test_sampler_greedy_topk_topp():
    logits = torch.randn(4, 50)
    reqs = [_req(SamplingParams(temperature=0)), _req(SamplingParams(temperature=1.0, top_k=1)),
            _req(SamplingParams(temperature=2.0, top_p=1e-6)), _req(SamplingParams(temperature=0.5, top_k=-1, top_p=0.01))]
    assert sample(logits, reqs) == logits.argmax(-1).tolist()


def test_sampler_seed_is_reproducible_and_independent_of_batch():
    logits = torch.randn(3, 1000)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(logits[1:2], [_req(p)])[0] for _ in range(3)]
    r = _req(p)
    batched = [sample(logits, [_req(SamplingParams(temperature=1.0, seed=i)), r, _req(SamplingParams(temperature=0))])[1]
               for i in range(3)]
    first = _req(p)
    assert batched == [sample(logits[1:2], [first])[0] for _ in range(3)]
    assert len(set(alone)) == 1  # a fresh generator with the same seed draws the same token


def test_sampler_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -10.0]])
    probs = logits.softmax(-1)[0]
    r = _req(SamplingParams(temperature=1.0, seed=7))
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(logits, [r])[0]] += 1
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)
    # top_k=2 keeps the two most likely tokens, renormalised.
    r = _req(SamplingParams(temperature=1.0, top_k=2, seed=3))
    picks = [sample(logits, [r])[0] for _ in range(500)]
    assert set(picks) == {1, 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(max_tokens=2.5), "max_tokens"),
])
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_abort_frees_blocks_and_step_reports_progress():
    kv = KVCacheManager(TINY, 32, 4, torch.float32, torch.device("cpu"))
    ex = Executor(tiny_model(), kv, max_batch_size=8, max_num_tokens=64, max_seq_len=256, eos_token_ids=set())
    a, b, c = (Request(str(i), None, p, SamplingParams(max_tokens=50, temperature=0), i)
               for i, p in enumerate(prompts_of([9, 5, 7])))
    for r in (a, b, c):
        ex.add(r)
    advanced = ex.step()
    assert {r.request_id for r in advanced} == {"0", "1", "2"} and len(a.output_token_ids) == 1
    assert ex.abort("1") and not ex.abort("1") and b.finish_reason == "abort"
    assert ex.abort("2")
    assert kv.num_free_blocks == 32 - len(kv.block_table("0"))
    assert [r.request_id for r in ex.step()] == ["0"]
    ex.abort("0")
    assert kv.num_free_blocks == 32 and not ex.has_unfinished()


def test_prefix_caching_reuses_blocks_and_keeps_outputs():
    shared = prompts_of([37], seed=5)[0]
    tails = prompts_of([1, 6, 13, 4], seed=6)
    prompts = [shared + t for t in tails] + [shared[:20]]
    expect = [run([p])[0][0] for p in prompts]
    # The first request runs alone, then the rest arrive and find its prefix cached.
    kv = KVCacheManager(TINY, 128, 4, torch.float32, torch.device("cpu"), enable_prefix_caching=True)
    ex = Executor(tiny_model(), kv, max_batch_size=64, max_num_tokens=512, max_seq_len=256, eos_token_ids=set())
    reqs = [Request(str(i), None, p, SamplingParams(max_tokens=10, temperature=0), i) for i, p in enumerate(prompts)]
    ex.add(reqs[0])
    while ex.has_unfinished():
        ex.step()
    for r in reqs[1:]:
        ex.add(r)
    while ex.has_unfinished():
        ex.step()
    assert [r.output_token_ids for r in reqs] == expect
    # 9 full blocks of the shared 37 tokens for each of the 3 longer prompts, 4 for the last.
    assert kv.prefix_hit_tokens == (3 * 9 + 4) * 4
    assert kv.num_free_blocks == 128
    # A tight cache with everything at once: cached blocks are evicted and reused, and
    # preemption recomputes; outputs are unchanged.
    tight, sched, _ = run(prompts * 2, num_blocks=30, max_num_tokens=16, prefix_caching=True)
    assert tight == expect * 2


def test_prefix_cache_eviction_is_lru_and_never_touches_used_blocks():
    kv = KVCacheManager(TINY, 4, 4, torch.float32, torch.device("cpu"))
    a, b = list(range(9)), list(range(100, 109))
    for rid, toks in (("a", a), ("b", b)):
        kv.acquire(rid, kv.match_prefix(toks), toks)
        kv.grow(rid, 8)
        kv.register_computed(rid, toks, 8)
    assert kv.block_table("a") == [0, 1] and kv.block_table("b") == [2, 3] and kv.num_free_blocks == 0
    kv.free("a")
    assert kv.num_free_blocks == 2  # a's two blocks are cached but evictable
    hit = kv.match_prefix(a)
    assert hit == [0, 1] and not kv.can_admit(hit, 9) and kv.can_admit(hit, 8)
    kv.acquire("a2", hit, a)
    assert kv.num_free_blocks == 0
    kv.free("b")
    kv.grow("c", 4)  # evicts b's tail block (released first, so least recent)
    assert kv.block_table("c") == [3] and kv.match_prefix(b) == [2]


def test_triton_jit_builds_records_inside_the_block_and_restores_the_hook():
    """The timed run's JIT record (bench throughput's `triton_jit_in_run`): the Triton hook it
    installs records each build, passes it on to a hook set before it, and is removed after."""
    from types import SimpleNamespace

    from triton import knobs

    from trtllm_kernels.runtime.benchmark import triton_jit_builds

    outer = []
    knobs.runtime.jit_cache_hook = lambda *, fn, key, **kw: outer.append(key)
    try:
        with triton_jit_builds() as builds:
            assert knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_k"), key=("sig", 16)) is None
        assert [b["kernel"] for b in builds] == ["_k"] and "16" in builds[0]["key"] and outer == [("sig", 16)]
        knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_later"), key="x")
        assert len(builds) == 1 and outer[-1] == "x"
    finally:
        knobs.runtime.jit_cache_hook = None


def test_random_engine_llm_and_e2e_benchmarks_run_on_cpu():
    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.engine.random_weights import random_engine, weight_shapes
    from trtllm_kernels.runtime import LLM
    from trtllm_kernels.runtime.benchmark import latency, prefix_ttft, throughput

    engine = random_engine(TINY, BuildConfig(max_seq_len=128), device="cpu", dtype=torch.float32)
    assert {n: tuple(w.shape) for n, w in engine.model.weights.items()} == weight_shapes(TINY)
    with pytest.raises(ValueError, match="prefill_graph_tokens"):
        LLM(engine, kv_cache_tokens=1024, prefill_graph_tokens=-1, progress=False)
    llm = LLM(engine, kv_cache_tokens=1024, progress=False)
    out = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in out] == [5, 5] and out[0].text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text", use_tqdm=False)
    t = throughput(llm, num_requests=6, input_len=7, output_len=4)
    assert t["output_tokens"] == 24 and t["output_tok_s"] > 0 and t["preemptions"] == 0
    assert t["steps_launched_ahead"] == 0  # CPU: overlap off by default
    assert t["triton_jit_in_run"] == []  # the interpreter builds nothing
    lat = latency(llm, input_len=5, output_len=4, repeats=1)
    assert lat["ttft_ms"] > 0 and lat["tpot_ms"] > 0
    pre = prefix_ttft(llm, input_len=100, shared_fraction=0.9, repeats=1)
    assert pre["shared_tokens"] == 90 and pre["speedup"] > 0
    page = llm.kv.page_size  # the cached run reused every whole block of the 90 shared tokens
    assert llm.kv.enable_prefix_caching and llm.kv.prefix_hit_tokens >= 90 // page * page > 0
    assert llm.kv.num_free_blocks == llm.kv.num_blocks
