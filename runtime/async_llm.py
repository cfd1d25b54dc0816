"""`AsyncLLM`: one `LLM` behind an asyncio front end, for servers and streaming.

The LLM is single-threaded (its scheduler, KV-cache bookkeeping and tokenizer are not guarded),
so exactly one thread, the step loop started here, ever touches it. Everything else talks to
that thread through messages:

- callers post commands (add a batch of requests, abort one) to an inbox guarded by a
  condition; the loop drains the inbox between steps and sleeps on the condition when it has
  nothing to run, so an idle server costs no CPU;
- after each step the loop hands every request's new output to the event loop that asked
  for it, with one `call_soon_threadsafe` per event loop per step, into the request's own
  asyncio queue.

Tokenizing (prompts, chat templates) also happens on the loop thread: a Hugging Face fast
tokenizer mutates its own state when called, so two threads may not share it, and the loop
thread already decodes outputs with it.

Beyond the LLM, this layer adds what a server needs and the runtime does not do itself:
- a bound on sequences held (running or waiting, each of a request's n completions counted),
  failing fast with QueueFullError;
- `max_tokens` checked against the context length, or filled to the rest of it;
- token strings for logprobs, decoded here on the loop thread (the tokenizer's thread);
- latency metrics (TTFT, TPOT, end-to-end) and state gauges in Prometheus form.

Stop strings, n completions, logprobs and the hold-back of text that may still change (a
partial multi-byte character, the start of a stop string) are the LLM's own (SamplingParams);
this layer only guarantees that a running request's text never shrinks, so a client that
concatenates streamed deltas gets exactly the final text.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import AsyncIterator, Sequence

from .llm import LLM
from .metrics import Registry
from .request import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine holds as many requests as it may; retry later (HTTP 503)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down or its step loop has died (HTTP 503)."""


@dataclass
class GenerationRequest:
    """What to generate: `prompt` is text, token ids, or chat messages (with chat=True, turned
    into tokens by the model's chat template). With fill_max_tokens, params.max_tokens is
    replaced by the room left in the context (and the KV cache) after the prompt; otherwise
    prompt + max_tokens must fit the context. params.n completions are generated."""

    prompt: str | Sequence[int] | Sequence[dict]
    params: SamplingParams
    chat: bool = False
    fill_max_tokens: bool = False
    index: int = 0  # the prompt's position in its HTTP request (choice index = index * n + i)


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives, with text."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (id, text, logprob), most likely first


class RequestStream:
    """One admitted request's outputs, as an async iterator of cumulative `RequestOutput`s.

    Each output holds, for each of the n completions, the whole text and token ids so far
    (and with logprobs, `CompletionOutput.logprobs` as a list of TokenLogprob); the last one
    has finished=True.
    When the consumer falls behind, outputs queued meanwhile are merged into the newest.
    `close()` (or `aclose()`) aborts the request if it has not finished: its KV blocks are freed
    at the loop's next turn.
    """

    def __init__(self, engine: "AsyncLLM", spec: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.spec = spec
        self.request_id: str | None = None
        self.prompt_token_ids: list[int] = []
        self.finished = False  # the consumer has seen the last output (or an error)
        self._closed = False  # the consumer gave up: abort
        # Owned by the loop thread:
        self._retired = False
        self._arrival = time.monotonic()
        self._first_token: float | None = None
        self._num_tokens = 0
        self._sent: dict[int, str] = {}  # per completion, text handed out so far: later texts extend it
        self._logprobs: dict[int, list[TokenLogprob]] = {}  # per completion, rendered so far

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()  # skip to the newest: outputs are cumulative
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished and not self._closed:
            self._closed = True
            self._engine._post(("abort", self))
        self.finished = True

    async def aclose(self) -> None:
        self.close()


class AsyncLLM:
    """Serve one `LLM` to many asyncio callers.

    max_queue: the most requests held at once, running or waiting (each of a request's n
    choices counts); past it, add_requests raises QueueFullError at once instead of letting
    latency grow without bound.
    """

    def __init__(self, llm: LLM, *, max_queue: int = 256, registry: Registry | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.llm = llm
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []
        self._stopping = False
        self._dead = False
        self._held = 0  # requests admitted and not yet retired; guarded by _cv
        self._live: dict[str, RequestStream] = {}  # loop thread only
        self._token_text: dict[int, str] = {}  # loop thread only: token id -> its text, for logprobs
        self.error: BaseException | None = None  # why the loop died, if it did
        self.stats = self._snapshot()
        self._init_metrics(registry or Registry())
        self._thread = threading.Thread(target=self._run, name="llm-step-loop", daemon=True)
        self._thread.start()

    # -- metrics ----------------------------------------------------------------------------

    def _init_metrics(self, reg: Registry) -> None:
        self.registry = reg
        s = lambda key: (lambda: self.stats[key])  # noqa: E731 - gauges read the loop's snapshot
        reg.gauge("trtllm_num_requests_running", "Requests in the running batch.", fn=s("running"))
        reg.gauge("trtllm_num_requests_waiting", "Requests queued for the batch (queue depth).", fn=s("waiting"))
        reg.gauge("trtllm_num_requests_held", "Requests admitted and not finished.", fn=lambda: self._held)
        reg.gauge("trtllm_max_requests_held", "Admission bound; more get 503.", fn=lambda: self.max_queue)
        reg.gauge("trtllm_kv_cache_total_blocks", "KV-cache blocks in all.", fn=lambda: self.llm.kv.num_blocks)
        reg.gauge("trtllm_kv_cache_free_blocks", "KV-cache blocks free or evictable.", fn=s("free_blocks"))
        reg.gauge("trtllm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", fn=s("kv_usage"))
        reg.gauge("trtllm_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache.", fn=s("prefix_hit_rate"))
        reg.gauge("trtllm_num_preemptions", "Requests preempted so far.", fn=s("preemptions"))
        self.m_prompt_tokens = reg.counter("trtllm_prompt_tokens_total", "Prompt tokens admitted.")
        self.m_generation_tokens = reg.counter("trtllm_generation_tokens_total", "Tokens generated.")
        self.m_finished = reg.counter("trtllm_requests_finished_total", "Requests retired, by finish reason.",
                                      ("finish_reason",))
        self.m_rejected = reg.counter("trtllm_requests_rejected_total", "Requests refused, by reason.", ("reason",))
        self.m_ttft = reg.histogram("trtllm_time_to_first_token_seconds", "Arrival to first token.")
        self.m_tpot = reg.histogram("trtllm_time_per_output_token_seconds", "Mean time between later tokens.")
        self.m_e2e = reg.histogram("trtllm_e2e_request_latency_seconds", "Arrival to last token.")

    def _snapshot(self) -> dict:
        sched, kv = self.llm.executor.scheduler, self.llm.kv
        return {
            "running": len(sched.running), "waiting": len(sched.waiting),
            "free_blocks": kv.num_free_blocks, "kv_usage": 1 - kv.num_free_blocks / kv.num_blocks,
            "prefix_hit_rate": kv.prefix_hit_rate, "preemptions": sched.num_preemptions,
        }

    @property
    def alive(self) -> bool:
        return not self._dead and not self._stopping

    @property
    def num_held(self) -> int:
        return self._held

    # -- caller side (any event loop) ----------------------------------------------------------

    async def add_requests(self, specs: Sequence[GenerationRequest]) -> list[RequestStream]:
        """Admit all of specs or none. Raises QueueFullError, EngineClosedError, or ValueError /
        TypeError naming what is wrong with a request (bad prompt, too long, bad params)."""
        if not specs:
            raise ValueError("no requests given")
        for spec in specs:
            if not isinstance(spec.params, SamplingParams):
                raise TypeError(f"sampling params must be SamplingParams, got {type(spec.params).__name__}")
        seqs = sum(spec.params.n for spec in specs)
        loop = asyncio.get_running_loop()
        streams = [RequestStream(self, spec, loop) for spec in specs]
        done = loop.create_future()
        with self._cv:  # the check and the post under one lock: a dying loop answers every add
            if not self.alive:
                raise EngineClosedError("the engine is shutting down" if self._stopping else
                                        f"the engine's step loop has stopped: {self.error!r}")
            if self._held + seqs > self.max_queue:
                self.m_rejected.inc(reason="queue_full")
                raise QueueFullError(
                    f"the server's request queue is full ({self._held} of {self.max_queue} sequences held); "
                    "retry later")
            self._held += seqs
            self._inbox.append(("add", streams, done))
            self._cv.notify()
        try:
            await done
        except asyncio.CancelledError:  # the caller went away while the loop validated
            for s in streams:
                s.close()
            raise
        return streams

    async def add_request(self, spec: GenerationRequest) -> RequestStream:
        return (await self.add_requests([spec]))[0]

    async def generate(self, prompt, params: SamplingParams | None = None, *,
                       chat: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream one request's cumulative outputs; closing the generator (a client that goes
        away, a task that is cancelled) aborts the request."""
        stream = await self.add_request(GenerationRequest(prompt, params or SamplingParams(), chat))
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: requests still held are aborted and their callers get EngineClosedError."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def _post(self, cmd: tuple) -> None:
        with self._cv:
            self._inbox.append(cmd)
            self._cv.notify()

    # -- the loop thread -----------------------------------------------------------------------

    def _run(self) -> None:
        llm = self.llm
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self._stopping and not llm.has_unfinished_requests():
                        self._cv.wait()
                    cmds, self._inbox = self._inbox, []
                    stopping = self._stopping
                for cmd in cmds:
                    if cmd[0] == "add":
                        self._add(*cmd[1:])
                    else:
                        self._abort(cmd[1])
                if stopping:
                    self._fail_all(EngineClosedError("the engine is shutting down"))
                    with self._cv:
                        self._dead = True
                    return
                if llm.has_unfinished_requests():
                    try:
                        outputs = llm.step()
                    except Exception as e:  # a bug in a step: fail its requests, keep serving
                        log.exception("engine step failed; aborting every request in flight")
                        self._fail_all(RuntimeError(f"engine step failed: {e!r}"))
                        outputs = []
                    self._deliver(outputs)
                self.stats = self._snapshot()
        except BaseException as e:  # never leave callers waiting on a dead thread
            self.error = e
            log.exception("the step loop died")
            self._fail_all(EngineClosedError(f"the engine's step loop died: {e!r}"))
            with self._cv:
                self._dead = True
                cmds, self._inbox = self._inbox, []
            for cmd in cmds:
                if cmd[0] == "add":
                    for s in cmd[1]:
                        self._retire(s, None)
                    self._reply(cmd[2], EngineClosedError("the engine's step loop died"))
            raise

    def _add(self, streams: list[RequestStream], done: asyncio.Future) -> None:
        llm = self.llm
        added = []
        try:
            for s in streams:
                if s._closed:  # cancelled before it got here
                    self._retire(s, None)
                    continue
                ids, params = self._prepare(s.spec)
                s.request_id = llm.add_request(ids, params)
                s.prompt_token_ids = ids
                self._live[s.request_id] = s
                added.append(s)
        except Exception as e:
            for s in added:
                llm.abort_request(s.request_id)
            for s in streams:
                self._retire(s, None)
            self.m_rejected.inc(reason="invalid")
            self._reply(done, e)
            return
        for s in added:
            self.m_prompt_tokens.inc(len(s.prompt_token_ids))
        self._reply(done, None)

    def _prepare(self, spec: GenerationRequest) -> tuple[list[int], SamplingParams]:
        llm = self.llm
        if spec.chat:
            try:
                ids = llm.apply_chat_template(list(spec.prompt))
            except ValueError:
                raise
            except Exception as e:  # a template that rejects the conversation (jinja2 errors)
                raise ValueError(f"the chat template could not format these messages: {e}") from e
        else:
            ids = llm.encode(spec.prompt)
        context = llm.max_seq_len
        if len(ids) >= context:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context length is {context} "
                             "tokens, which leaves no room to generate")
        params = spec.params
        if spec.fill_max_tokens:
            room = min(context, llm.kv_cache_capacity_tokens) - len(ids)
            params = replace(params, max_tokens=max(1, room))
        elif len(ids) + params.max_tokens > context:
            raise ValueError(f"max_tokens is {params.max_tokens} and the prompt has {len(ids)} tokens: together "
                             f"more than this model's context length of {context} tokens")
        return ids, params

    def _abort(self, s: RequestStream) -> None:
        if s.request_id is not None and self._live.get(s.request_id) is s:
            self.llm.abort_request(s.request_id)
            self._retire(s, "abort")

    def _retire(self, s: RequestStream, reason: str | None) -> None:
        """The request leaves the engine (finished, aborted, failed or never admitted)."""
        if s._retired:
            return
        s._retired = True
        if s.request_id is not None:
            self._live.pop(s.request_id, None)
        with self._cv:
            self._held -= s.spec.params.n
        if reason is not None:
            self.m_finished.inc(s.spec.params.n, finish_reason=reason)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for out in outputs:
            s = self._live.get(out.request_id)
            if s is None:
                continue
            item = self._advance(s, out, now)
            by_loop[s._loop].append((s, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                for s, _ in items:
                    self._abort(s)

    def _advance(self, s: RequestStream, out: RequestOutput, now: float) -> RequestOutput:
        """Turn the LLM's output into the stream's: text that never shrinks, logprobs with
        token text, metrics."""
        outputs = []
        for c in out.outputs:
            text = c.text
            done = out.finished or c.finish_reason is not None
            sent = s._sent.get(c.index, "")
            # The LLM holds back what may change; should a decode ever rewrite earlier text
            # anyway, a running stream keeps what it sent rather than contradict it.
            if not done and not text.startswith(sent):
                text = sent
            s._sent[c.index] = text
            lps = None
            if c.logprobs is not None:
                lps = s._logprobs.setdefault(c.index, [])
                for j in range(len(lps), len(c.logprobs)):
                    lps.append(self._render_logprob(c.token_ids[j], c.logprobs[j], s.spec.params.logprobs or 0))
                lps = list(lps)
            outputs.append(replace(c, text=text, token_ids=list(c.token_ids), logprobs=lps))
        # metrics
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens and s._first_token is None:
            s._first_token = now
            self.m_ttft.observe(now - s._arrival)
        self.m_generation_tokens.inc(num_tokens - s._num_tokens)
        s._num_tokens = num_tokens
        if out.finished:
            self.m_e2e.observe(now - s._arrival)
            for c in out.outputs:
                if len(c.token_ids) > 1:
                    self.m_tpot.observe((now - s._first_token) / (len(c.token_ids) - 1))
            self._retire(s, None)
            for c in out.outputs:
                self.m_finished.inc(finish_reason=c.finish_reason or "unknown")
        return RequestOutput(s.request_id, out.prompt, s.prompt_token_ids, outputs, out.finished)

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.llm.tokenizer
            text = "" if tok is None else tok.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _render_logprob(self, token_id: int, lps: dict[int, float], k: int) -> TokenLogprob:
        top = sorted(lps.items(), key=lambda kv: -kv[1])[:k]
        return TokenLogprob(token_id, self._token(token_id), float(lps[token_id]),
                            [(t, self._token(t), float(lp)) for t, lp in top])

    def _fail_all(self, error: BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for s in list(self._live.values()):
            self.llm.abort_request(s.request_id)
            self._retire(s, "abort")
            by_loop[s._loop].append((s, error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, items)
            except RuntimeError:
                pass

    @staticmethod
    def _reply(done: asyncio.Future, error: BaseException | None) -> None:
        def settle():
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(None)
        try:
            done.get_loop().call_soon_threadsafe(settle)
        except RuntimeError:
            pass


def _push_all(items) -> None:
    for stream, item in items:
        stream._queue.put_nowait(item)
