"""Load test for the OpenAI-compatible server: `trtllm-kernels bench serve`.

Many concurrent HTTP clients send a bounded number of greedy requests (completions and chat,
streaming and not), about a tenth of the streaming ones hang up mid-stream, and the run checks
what a server under load must keep true:

- every request that was not abandoned gets its full answer, equal to the answer the same
  prompt gets when it runs alone (asked one at a time, before the load starts): batching,
  chunked prefill, preemption and aborted neighbours must not change a greedy answer;
- a streamed answer's concatenated deltas equal that same text; usage and finish_reason agree;
- no 5xx, and no request lost;
- once the load is gone, the KV cache's free-block count is back where it started (a client
  that hangs up must have its blocks freed).

It reports requests/s and the p50/p90/p99 end-to-end latency (and time to first token for the
streams) of the completed requests. Only httpx is needed on the client side.

The server is either one already running (--url) or one this command starts as a child process
(`trtllm-kernels serve ...` on a free loopback port) and stops with SIGTERM afterwards, which
also exercises graceful shutdown.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trtllm_kernels.runtime.metrics import parse as parse_metrics

TOPICS = ["the sea", "a red bicycle", "winter mornings", "the moon", "bread", "a small town", "rivers",
          "an old library", "coffee", "mountains", "the train station", "cats", "rain", "a lighthouse",
          "music", "gardens", "the desert", "a clock", "snow", "the market", "bees", "a bridge", "paper",
          "the forest", "thunder", "a violin", "islands", "the harbour", "salt", "a kite", "maps", "honey"]
STARTS = ["Here is a short story about", "A few facts about", "My favourite thing about", "Once upon a time,",
          "The history of", "A poem about", "Why people love", "Three words that describe"]


@dataclass
class Job:
    """One request of the load: which pool entry, streamed or not, abandoned after k chunks."""

    entry: int
    stream: bool
    disconnect_after: int | None = None  # chunks to read before hanging up; None = read all


@dataclass
class Result:
    entry: int
    stream: bool
    disconnected: bool = False
    status: int = 0
    error: str | None = None
    text: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    latency: float = 0.0
    ttft: float | None = None
    correct: bool | None = None


@dataclass
class Report:
    url: str
    model: str
    num_requests: int
    concurrency: int
    disconnect_fraction: float
    max_tokens: int
    pool_size: int
    seconds: float = 0.0
    completed: int = 0
    disconnected: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    transport_errors: int = 0
    mismatches: int = 0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p90_s: float = 0.0
    latency_p99_s: float = 0.0
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    free_blocks_start: float | None = None
    free_blocks_end: float | None = None
    total_blocks: float | None = None
    examples: list = field(default_factory=list)  # a few failures, for the report

    @property
    def ok(self) -> bool:
        return (self.errors_5xx == 0 and self.errors_4xx == 0 and self.transport_errors == 0
                and self.mismatches == 0 and self.completed + self.disconnected == self.num_requests
                and self.free_blocks_end == self.free_blocks_start)


def make_pool(size: int, seed: int = 0) -> list[dict]:
    """`size` distinct prompts, alternately completions and chat, each a request body without
    model/stream/max_tokens."""
    rng = random.Random(seed)
    pool, seen = [], set()
    while len(pool) < size:
        text = f"{rng.choice(STARTS)} {rng.choice(TOPICS)}"
        if rng.random() < 0.5:
            text += f" and {rng.choice(TOPICS)}"
        if text in seen:
            continue
        seen.add(text)
        if len(pool) % 2:
            pool.append({"kind": "chat", "messages": [{"role": "user", "content": text}]})
        else:
            pool.append({"kind": "completion", "prompt": text})
    return pool


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


class LoadClient:
    def __init__(self, url: str, api_key: str | None, model: str, max_tokens: int, timeout: float):
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.max_tokens = max_tokens
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout, connect=30.0)

    def body(self, entry: dict, stream: bool) -> tuple[str, dict]:
        body = {k: v for k, v in entry.items() if k != "kind"}
        body.update(model=self.model, max_tokens=self.max_tokens, temperature=0, stream=stream)
        if stream:
            body["stream_options"] = {"include_usage": True}
        path = "/v1/chat/completions" if entry["kind"] == "chat" else "/v1/completions"
        return path, body

    async def one(self, client, entry: dict, job: Job) -> Result:
        """Send one request; read its answer (or hang up after job.disconnect_after chunks)."""
        import httpx

        path, body = self.body(entry, job.stream)
        res = Result(job.entry, job.stream)
        start = time.perf_counter()
        try:
            if not job.stream:
                r = await client.post(self.url + path, json=body, headers=self.headers, timeout=self.timeout)
                res.status = r.status_code
                if r.status_code != 200:
                    res.error = r.text[:300]
                else:
                    data = r.json()
                    c = data["choices"][0]
                    res.text = c["message"]["content"] if entry["kind"] == "chat" else c["text"]
                    res.finish_reason = c["finish_reason"]
                    res.completion_tokens = data["usage"]["completion_tokens"]
            else:
                async with client.stream("POST", self.url + path, json=body, headers=self.headers,
                                         timeout=self.timeout) as r:
                    res.status = r.status_code
                    if r.status_code != 200:
                        res.error = (await r.aread()).decode(errors="replace")[:300]
                    else:
                        await self._read_events(r, entry, job, res, start)
        except httpx.HTTPError as e:
            res.error = f"{type(e).__name__}: {e}"
        res.latency = time.perf_counter() - start
        return res

    @staticmethod
    async def _read_events(r, entry: dict, job: Job, res: Result, start: float) -> None:
        parts, chunks, done = [], 0, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                res.error = f"error event: {event['error']}"
                res.status = 500
                return
            for c in event["choices"]:
                delta = c["delta"].get("content", "") if entry["kind"] == "chat" else c["text"]
                if delta:
                    if res.ttft is None:
                        res.ttft = time.perf_counter() - start
                    parts.append(delta)
                    chunks += 1
                if c.get("finish_reason"):
                    res.finish_reason = c["finish_reason"]
            if event.get("usage"):
                res.completion_tokens = event["usage"]["completion_tokens"]
            if job.disconnect_after is not None and chunks >= job.disconnect_after and res.finish_reason is None:
                res.disconnected = True  # leaving the `async with` closes the connection mid-stream
                return
        res.text = "".join(parts)
        if not done:
            res.error = "the stream ended without [DONE]"


async def _get_metrics(client, url: str, headers: dict) -> dict[str, float]:
    r = await client.get(url + "/metrics", headers=headers)
    r.raise_for_status()
    return parse_metrics(r.text)


async def _wait_idle(client, url: str, headers: dict, want_free: float | None, timeout: float = 30.0) -> dict:
    """Metrics once nothing runs or waits and (if given) the free-block count is back."""
    deadline = time.monotonic() + timeout
    while True:
        m = await _get_metrics(client, url, headers)
        idle = (m.get("trtllm_num_requests_held", 0) == 0 and m.get("trtllm_num_requests_running", 0) == 0
                and m.get("trtllm_num_requests_waiting", 0) == 0)
        if idle and (want_free is None or m.get("trtllm_kv_cache_free_blocks") == want_free):
            return m
        if time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.05)


async def run_load(url: str, *, num_requests: int = 1000, concurrency: int = 64, disconnect_fraction: float = 0.1,
                   max_tokens: int = 16, pool_size: int = 32, stream_fraction: float = 0.5,
                   api_key: str | None = None, timeout: float = 300.0, seed: int = 0,
                   progress: bool = False) -> Report:
    """Run the load against a server at `url` and check it (see the module docstring)."""
    import httpx

    if num_requests < 1 or concurrency < 1 or pool_size < 1 or max_tokens < 2:
        raise ValueError("num_requests, concurrency and pool_size must be >= 1 and max_tokens >= 2")
    if not 0 <= disconnect_fraction <= 1 or not 0 <= stream_fraction <= 1:
        raise ValueError("disconnect_fraction and stream_fraction must be in [0, 1]")
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        r = await client.get(url + "/v1/models", headers=headers)
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
        lc = LoadClient(url, api_key, model, max_tokens, timeout)
        pool = make_pool(pool_size, seed)
        # Each prompt alone first: the answers every loaded request must reproduce.
        refs = []
        for i, entry in enumerate(pool):
            ref = await lc.one(client, entry, Job(i, stream=False))
            if ref.status != 200 or ref.text is None:
                raise RuntimeError(f"reference request {i} failed: {ref.status} {ref.error}")
            refs.append(ref)
        start_metrics = await _wait_idle(client, url, headers, None)
        free_start = start_metrics.get("trtllm_kv_cache_free_blocks")
        rng = random.Random(seed + 1)
        jobs = []
        for _ in range(num_requests):
            stream = rng.random() < stream_fraction
            # Disconnects are drawn over all requests (about disconnect_fraction of them), but
            # only a stream can hang up mid-answer, so they fall on streams.
            leave = stream and rng.random() < min(1.0, disconnect_fraction / max(stream_fraction, 1e-9))
            jobs.append(Job(rng.randrange(pool_size), stream, rng.randint(1, max(1, max_tokens // 2)) if leave else None))
        report = Report(url, model, num_requests, concurrency, disconnect_fraction, max_tokens, pool_size,
                        free_blocks_start=free_start, total_blocks=start_metrics.get("trtllm_kv_cache_total_blocks"))
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        results: list[Result] = []

        async def worker():
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                res = await lc.one(client, pool[job.entry], job)
                results.append(res)
                if progress and len(results) % 100 == 0:
                    print(f"  {len(results)}/{num_requests} requests", flush=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.seconds = time.perf_counter() - t0
        end_metrics = await _wait_idle(client, url, headers, free_start)
        report.free_blocks_end = end_metrics.get("trtllm_kv_cache_free_blocks")

    latencies, ttfts, tokens = [], [], 0
    for res in results:
        if res.status >= 500:
            report.errors_5xx += 1
        elif res.status >= 400:
            report.errors_4xx += 1
        elif res.error is not None and not res.disconnected:
            report.transport_errors += 1
        if res.error is not None:
            if len(report.examples) < 5:
                report.examples.append(asdict(res))
            continue
        if res.disconnected:
            report.disconnected += 1
            continue
        ref = refs[res.entry]
        res.correct = (res.text == ref.text and res.finish_reason == ref.finish_reason
                       and res.completion_tokens == ref.completion_tokens)
        if not res.correct:
            report.mismatches += 1
            if len(report.examples) < 5:
                report.examples.append(dict(asdict(res), expected=ref.text, expected_finish=ref.finish_reason,
                                            expected_tokens=ref.completion_tokens))
            continue
        report.completed += 1
        latencies.append(res.latency)
        tokens += res.completion_tokens or 0
        if res.ttft is not None:
            ttfts.append(res.ttft)
    report.requests_per_s = report.completed / report.seconds if report.seconds else 0.0
    report.output_tokens_per_s = tokens / report.seconds if report.seconds else 0.0
    report.latency_p50_s = _percentile(latencies, 0.5)
    report.latency_p90_s = _percentile(latencies, 0.9)
    report.latency_p99_s = _percentile(latencies, 0.99)
    if ttfts:
        report.ttft_p50_s, report.ttft_p99_s = _percentile(ttfts, 0.5), _percentile(ttfts, 0.99)
    return report


# -- a server in a child process ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`trtllm-kernels serve ARGS` on a free loopback port, as a context manager: ready (GET
    /health answers 200) on entry, stopped with SIGTERM (graceful) on exit."""

    def __init__(self, args: list[str] = (), *, api_key: str | None = None, startup_timeout: float = 600.0,
                 log_path: str | os.PathLike | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        cmd = [sys.executable, "-m", "trtllm_kernels.cli", "serve", *self.args, "--port", str(self.port), "-q",
               "--log-level", "warning"]
        env = dict(os.environ, **(self.env or {}))
        if self.api_key:
            env["TRTLLM_KERNELS_API_KEY"] = self.api_key  # not on the command line
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /health within {self.startup_timeout} s")
            time.sleep(0.2)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode if self.proc is not None else None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None
        return self.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


# -- CLI ---------------------------------------------------------------------------------------------

def add_bench_serve_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="load-test the OpenAI-compatible server (correctness, leaks, requests/s, latency)",
        description=__doc__.split("\n\n")[1])
    p.add_argument("--url", default=None, help="a running server (default: start `trtllm-kernels serve` here)")
    p.add_argument("--api-key", default=os.environ.get("TRTLLM_KERNELS_API_KEY"))
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    p.add_argument("--disconnect-fraction", type=float, default=0.1, help="requests that hang up mid-stream")
    p.add_argument("--stream-fraction", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--pool-size", type=int, default=32, help="distinct prompts (each also run alone first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--out", default=None, help="directory for <stem>.json")
    p.add_argument("--stem", default="serve_load")
    p.add_argument("--server-log", default=None, help="where the started server's output goes")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--serve-args", default="", metavar="'ARGS'",
                   help="arguments for the started `trtllm-kernels serve`, as one string (model, --device, "
                        "--shape, --tokenizer, --max-queue, ...)")
    p.set_defaults(func=main_bench_serve)
    return p


def main_bench_serve(args) -> int:
    serve_args = shlex.split(args.serve_args)
    kwargs = dict(num_requests=args.num_requests, concurrency=args.concurrency,
                  disconnect_fraction=args.disconnect_fraction, max_tokens=args.max_tokens, pool_size=args.pool_size,
                  stream_fraction=args.stream_fraction, api_key=args.api_key, timeout=args.timeout, seed=args.seed,
                  progress=True)
    returncode = None
    if args.url:
        report = asyncio.run(run_load(args.url, **kwargs))
    else:
        with ServerProcess(serve_args, api_key=args.api_key, startup_timeout=args.startup_timeout,
                           log_path=args.server_log) as server:
            print(f"server up at {server.url}: serve {' '.join(serve_args)}", flush=True)
            report = asyncio.run(run_load(server.url, **kwargs))
        returncode = server.returncode
    result = dict(asdict(report), ok=report.ok, server_exit_code=returncode, serve_args=serve_args,
                  command="trtllm-kernels " + " ".join(sys.argv[1:]), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.stem}.json").write_text(text)
    print(f"{report.completed} completed, {report.disconnected} disconnected, {report.mismatches} mismatches, "
          f"{report.errors_5xx} 5xx, {report.errors_4xx} 4xx; {report.requests_per_s:.1f} req/s, "
          f"p50 {report.latency_p50_s * 1e3:.0f} ms, p99 {report.latency_p99_s * 1e3:.0f} ms; free blocks "
          f"{report.free_blocks_start} -> {report.free_blocks_end}: {'OK' if report.ok else 'FAILED'}")
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit too
    return 0 if report.ok and returncode in (None, 0, -signal.SIGTERM) else 1
