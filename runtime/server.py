"""An OpenAI-compatible HTTP server over `AsyncLLM`: `trtllm-kernels serve [MODEL]`.

Routes: POST /v1/completions, POST /v1/chat/completions (with the model's chat template),
GET /v1/models, GET /health (no API key needed), GET /metrics (Prometheus text).
Both generation routes stream with server-sent events when asked (`"stream": true`).

What keeps it standing under load and bad input:
- it binds 127.0.0.1 unless told otherwise, and with --api-key every route but /health needs
  `Authorization: Bearer <key>`;
- bodies are limited in size (413), parsed strictly (no NaN, no unknown fields, no silent
  type coercion) and every problem is a 4xx in OpenAI's error shape naming the field:
  {"error": {"message", "type", "param", "code"}};
- every OpenAI sampling field maps onto SamplingParams (temperature, top_p, top_k, min_p,
  seed, n, stop, logprobs, logit_bias, presence/frequency/repetition penalties); those the runtime
  cannot honour (echo, suffix, best_of != n, tools, response formats) are refused with a 400
  that names them, never dropped silently;
- the engine holds a bounded number of requests; past it a request gets a 503 at once;
- a client that disconnects, streaming or not, has its request aborted and its KV blocks freed;
- SIGINT/SIGTERM stop accepting connections, let requests in flight finish (up to
  --shutdown-timeout seconds), then stop the engine.

Request bodies are parsed here rather than by FastAPI's body injection so that every error
message is ours (FastAPI's own 422s are still mapped to 400 for routes that use it).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal

# FastAPI and uvicorn come with the `serve` extra; only this module (and `trtllm-kernels serve`)
# needs them, and the runtime package does not import this module.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from .async_llm import AsyncLLM, EngineClosedError, GenerationRequest, QueueFullError, RequestStream, TokenLogprob
from .metrics import CONTENT_TYPE
from .sampling_params import SamplingParams

log = logging.getLogger("trtllm_kernels.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 8k-token context is well under 100 kB of JSON
MAX_N = 16  # choices per request (SamplingParams allows as many)
MAX_STOP = 4  # stop strings per request, as OpenAI's API
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's API (SamplingParams allows as many)
SEED_RANGE = (-(1 << 63), 1 << 63)  # a signed 64-bit integer, as OpenAI's API


# -- errors ------------------------------------------------------------------------------------

class APIError(Exception):
    """An error for the client, rendered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _error_bytes(err: APIError) -> bytes:
    return json.dumps(err.body()).encode()


def _unsupported(param: str, what: str | None = None) -> APIError:
    return APIError(400, f"{what or param} is not supported yet", param, "unsupported_parameter")


def _validation_message(e: ValidationError) -> APIError:
    """The first problem pydantic found, as one sentence naming the field."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    param = ".".join(loc) if loc else None
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'", param, "unknown_field")
    if kind == "missing":
        return APIError(400, f"'{param}' is required", param, "missing_field")
    msg = msg.removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param, "invalid_value")


# -- request bodies ------------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: "16" is not an int and 1 is not a bool; forbid: a misspelt field is an error,
    # not a parameter silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extension (as vLLM): 0 or -1 keeps every token
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: Any = Field(None, validate_default=True)
    stop_token_ids: list[int] | None = None  # an extension
    ignore_eos: bool = False  # an extension
    min_tokens: int = Field(0, ge=0)  # an extension (as vLLM): no stop before this many tokens
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's own tracking; does not change output

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not SEED_RANGE[0] <= v < SEED_RANGE[1]:
            raise ValueError(f"must be a 64-bit signed integer, got {v}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top alternatives per token
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        """One or more prompts, each text or token ids: always returned as a list."""
        def one(p):
            return isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p))
        if isinstance(v, str) or (isinstance(v, list) and v and all(type(t) is int for t in v)):
            prompts = [v]
        elif isinstance(v, list) and all(one(p) for p in v):
            prompts = v
        else:
            raise ValueError("must be a string, a list of strings, a list of token ids, or a list of lists "
                             "of token ids")
        if not prompts:
            raise ValueError("must not be empty")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("must not be empty" if len(prompts) == 1 else "must not contain an empty prompt")
        return prompts


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for system instructions; tools are not supported, so
    # neither is the "tool" role.
    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(p, dict) for p in v):
            if any(p.get("type") != "text" for p in v):
                raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
            return "\n".join(TextPart.model_validate(p).text for p in v)
        raise ValueError("must be a string or a non-empty list of text parts")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)  # None: the rest of the context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("must contain at least one message")
        return v


def _sampling_params(req: _SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """Map the OpenAI fields to ours; refuse, by name, what we cannot honour."""
    try:
        bias = {int(t): b for t, b in (req.logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    try:
        return SamplingParams(
            max_tokens=max_tokens or max(1, req.min_tokens), min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0, seed=req.seed, stop=list(req.stop), n=req.n,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
            logit_bias=bias,
        )
    except ValueError as e:
        raise APIError(400, str(e), _guess_param(str(e))) from e


# -- the app -------------------------------------------------------------------------------------

class _Guard:
    """Raw ASGI middleware, in front of everything: refuses requests while draining, checks the
    API key, bounds the body and counts responses. (BaseHTTPMiddleware is not used: it would
    hide client disconnects from streaming responses.)"""

    ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in self.ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = [0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            err = self._refusal(scope)
            if err is None:
                receive, err = await self._bounded_body(scope, receive)
            if err is not None:
                await _send_error(counting_send, err)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.state.m_http.inc(path=label, status=str(status[0] or 499))

    def _refusal(self, scope) -> APIError | None:
        if scope["path"] == "/health":
            return None
        if self.state.draining:
            return APIError(503, "the server is shutting down", code="shutting_down")
        key = self.state.api_key
        if key is None:
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if not auth:
            return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                            code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return APIError(401, "invalid API key", code="invalid_api_key")
        return None

    async def _bounded_body(self, scope, receive):
        """Read the whole body up front (they are small), refusing it past the limit whether or
        not Content-Length was sent, then replay it to the app."""
        limit = self.state.max_body_bytes
        too_big = APIError(413, f"request body is larger than the limit of {limit} bytes", code="body_too_large")
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return receive, APIError(400, "invalid Content-Length header")
            if n > limit:
                return receive, APIError(
                    413, f"request body is {n} bytes, more than the limit of {limit} bytes", code="body_too_large")
        if scope["method"] in ("GET", "HEAD"):
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay([message], receive), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive), None


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


async def _send_error(send, err: APIError) -> None:
    body = _error_bytes(err)
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ServerState:
    def __init__(self, engine: AsyncLLM, model_name: str, api_key: str | None, max_body_bytes: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.created = int(time.time())
        self.m_http = engine.registry.counter("trtllm_http_requests_total", "HTTP responses, by route and status.",
                                              ("path", "status"))


def build_app(engine: AsyncLLM, *, model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_engine: bool = True):
    """The ASGI app. Its lifespan shuts the engine down at exit unless shutdown_engine is False."""
    state = ServerState(engine, model_name, api_key, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.draining = True
        if shutdown_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="trtllm-kernels", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    def error(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def _fastapi_validation(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return error(APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error(APIError(exc.status_code, message))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, exc: ClientDisconnect):
        # The client hung up while sending its body: nobody reads this; 499 keeps it out of
        # the 5xx counts (nothing went wrong on our side).
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error")
        return JSONResponse({"error": {"message": f"internal error: {exc!r}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.registry.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "trtllm-kernels",
                "max_model_len": engine.llm.max_seq_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{state.model_name}'",
                           "model", "model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await request.body())
        check_model(req.model)
        if req.echo:
            raise _unsupported("echo")
        if req.suffix is not None:
            raise _unsupported("suffix")
        if req.best_of not in (None, req.n):
            raise APIError(400, "best_of other than n is not supported yet", "best_of", "unsupported_parameter")
        params = _sampling_params(req, req.max_tokens, req.logprobs)
        specs = [GenerationRequest(p, params, fill_max_tokens=req.max_tokens is None, index=i)
                 for i, p in enumerate(req.prompt)]
        return await generate(request, req, specs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(ChatCompletionRequest, await request.body())
        check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        if req.tools or req.tool_choice not in (None, "none"):
            raise _unsupported("tools", "tool calling")
        if req.response_format not in (None, {"type": "text"}):
            raise _unsupported("response_format", "response_format other than {\"type\": \"text\"}")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = _sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    | ({"name": m.name} if m.name else {}) for m in req.messages]
        specs = [GenerationRequest(messages, params, chat=True, fill_max_tokens=max_tokens is None)]
        return await generate(request, req, specs, chat=True)

    async def generate(request, req: _SamplingFields, specs: list[GenerationRequest], chat: bool):
        # n choices per prompt come from the LLM (SamplingParams.n; with a seed, choice i gets
        # its own seed derived from it, so that they differ yet reproduce).
        if len(specs) * req.n > engine.max_queue:
            raise APIError(400, f"this request needs {len(specs) * req.n} sequences, more than the server holds at "
                                f"once ({engine.max_queue})", "n")
        try:
            streams = await engine.add_requests(specs)
        except QueueFullError as e:
            raise APIError(503, str(e), code="queue_full") from e
        except EngineClosedError as e:
            raise APIError(503, str(e), code="engine_closed") from e
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), _guess_param(str(e))) from e
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _sse_events(streams, rid, created, state.model_name, chat, include_usage, req.n)
            return EventStreamResponse(events, streams)
        finals = await _until_disconnect(request, _collect(streams))
        if finals is None:  # the client went away; its requests are aborted
            for s in streams:
                s.close()
            return Response(status_code=499)
        return _completion_body(finals, streams, rid, created, state.model_name, chat, req.n)

    class EventStreamResponse(StreamingResponse):
        """Server-sent events that stop, and abort their requests, when the client disconnects.

        Starlette's StreamingResponse notices a disconnect only when a write fails (ASGI 2.4)
        or by its own listener; here both the writer and a listener run, the first to end wins,
        and the event generator is closed right away so the requests are aborted at once."""

        def __init__(self, events: AsyncIterator[str], streams: list[RequestStream]):
            super().__init__(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.streams = streams

        async def __call__(self, scope, receive, send):
            writer = asyncio.ensure_future(self.stream_response(send))
            listener = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (writer, listener):
                    task.cancel()
                await asyncio.gather(writer, listener, return_exceptions=True)
                await self.body_iterator.aclose()
                for s in self.streams:
                    s.close()
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                log.warning("stream ended by %r", writer.exception())

    app.add_middleware(_Guard, state=state)
    return app


def _parse(model: type[BaseModel], body: bytes):
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constants)
    except RecursionError:
        raise APIError(400, "invalid JSON: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"invalid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_message(e) from None


def _guess_param(message: str) -> str | None:
    """The field an engine-side ValueError is about, for the error's `param`."""
    for param in ("max_tokens", "prompt", "messages", "seed", "stop"):
        if param in message:
            return param
    return "messages" if "chat template" in message else None


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request, coro):
    """Run coro, or stop it and return None if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    listener = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        for t in (task, listener):
            t.cancel()


async def _collect(streams: list[RequestStream]):
    async def last(stream):
        out = None
        async for out in stream:
            pass
        return out
    return await asyncio.gather(*(last(s) for s in streams))


def _usage(streams: list[RequestStream], finals) -> dict:
    # A prompt is counted once however many choices (n) it has, as OpenAI does.
    prompt_tokens = sum(len(s.prompt_token_ids) for s in streams)
    completion_tokens = sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprobs_body(lps: list[TokenLogprob] | None, chat: bool, offset: int = 0):
    """OpenAI's logprobs object: chat's {"content": [...]} or completions' parallel lists."""
    if lps is None:
        return None
    if chat:
        def entry(token, logprob):
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        return {"content": [dict(entry(t.token, t.logprob), top_logprobs=[entry(s, lp) for _, s, lp in t.top])
                            for t in lps]}
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{s: lp for _, s, lp in t.top} for t in lps], "text_offset": offsets}


def _choice_index(stream: RequestStream, c, n: int) -> int:
    return stream.spec.index * n + c.index


def _completion_body(finals, streams, rid, created, model, chat, n) -> dict:
    choices = []
    for stream, out in zip(streams, finals):
        for c in out.outputs:
            lp = _logprobs_body(c.logprobs, chat)
            if chat:
                choices.append({"index": _choice_index(stream, c, n),
                                "message": {"role": "assistant", "content": c.text},
                                "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": _choice_index(stream, c, n), "text": c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": _usage(streams, finals)}


async def _merged(streams: list[RequestStream]):
    """(stream position, output) from every stream as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        await queue.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _sse_events(streams, rid, created, model, chat, include_usage, n) -> AsyncIterator[str]:
    """The chunks of a streamed answer: per choice, its new text (and the logprobs of its new
    tokens) as it comes, then its finish_reason; the usage last when asked; then [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    sent: dict[int, tuple[int, int]] = {}  # choice index -> (characters, logprob entries) sent
    finished: set[int] = set()
    finals = [None] * len(streams)

    def chunk(choices, usage=None):
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return _sse(body)

    try:
        if chat:  # the role first, as OpenAI streams it
            yield chunk([{"index": s.spec.index * n + i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for s in streams for i in range(n)])
        async for i, out in _merged(streams):
            if out.finished:
                finals[i] = out
            choices = []
            for c in out.outputs:
                index = _choice_index(streams[i], c, n)
                if index in finished:
                    continue
                chars, nlp = sent.get(index, (0, 0))
                delta = c.text[chars:]
                new_lps = c.logprobs[nlp:] if c.logprobs is not None else None
                done = c.finish_reason is not None
                if not delta and not new_lps and not done:
                    continue
                sent[index] = (len(c.text), nlp + len(new_lps or ()))
                if done:
                    finished.add(index)
                lp = _logprobs_body(new_lps, chat, chars) if c.logprobs is not None else None
                if chat:
                    choices.append({"index": index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                                    "finish_reason": c.finish_reason})
                else:
                    choices.append({"index": index, "text": delta, "logprobs": lp, "finish_reason": c.finish_reason})
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], _usage(streams, finals))
    except (QueueFullError, EngineClosedError, RuntimeError) as e:
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        for s in streams:
            s.close()
    yield _sse("[DONE]")


# -- running it ----------------------------------------------------------------------------------

def default_model_name(model: str | None) -> str:
    """What /v1/models calls the model: the checkpoint's or engine directory's name."""
    if model is None:
        from trtllm_kernels.engine import default_checkpoint

        path = Path(default_checkpoint())
    else:
        path = Path(model)
    name = path.name
    for suffix in (".gguf",):
        name = name.removesuffix(suffix)
    return name


def random_weight_engine(shape: str, tokenizer: str | None, build_config=None, device: str | None = None,
                         progress: bool = True, dtype: str = "auto"):
    """An Engine with random weights at `shape` and a real tokenizer (so text goes in and out).
    dtype "auto" is bfloat16 on CUDA and float32 on CPU."""
    from dataclasses import replace as _replace

    import torch
    from transformers import AutoTokenizer

    from trtllm_kernels.engine import BuildConfig
    from trtllm_kernels.engine.random_weights import SHAPES, random_engine

    from .llm import resolve_engine_dir

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {sorted(SHAPES)}")
    build = build_config or BuildConfig()
    if build.max_seq_len is None:
        build = _replace(build, max_seq_len=min(SHAPES[shape].max_position_embeddings, 8192))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    engine = random_engine(shape, build, device=dev, dtype=getattr(torch, dtype))
    tok_dir = tokenizer or resolve_engine_dir(None, None, progress)
    if not (Path(tok_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir}")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if len(tok) > engine.model_config.vocab_size:
        raise ValueError(f"the tokenizer in {tok_dir} has {len(tok)} tokens, more than shape {shape!r}'s vocabulary "
                         f"of {engine.model_config.vocab_size}")
    return _replace(engine, tokenizer=tok)


def serve(model: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_queue: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          shutdown_timeout: float = 30.0, log_level: str = "info", shape: str | None = None,
          tokenizer: str | None = None, **llm_kwargs) -> None:
    """Load the model and serve it until SIGINT/SIGTERM (then drain for up to shutdown_timeout).

    shape: serve random weights at that known shape (engine.random_weights.SHAPES) instead of
    `model`, with the tokenizer in directory `tokenizer` (default: the default model's): what a
    load test on a machine without the checkpoint needs."""
    import uvicorn

    from .llm import LLM

    if shape is not None:
        if model is not None:
            raise ValueError("give a model or --shape (random weights), not both")
        if llm_kwargs.get("tensor_parallel_size", 1) != 1:
            raise ValueError("--shape serves one rank only; give a model path for tensor parallelism")
        model = random_weight_engine(shape, tokenizer, llm_kwargs.pop("build_config", None), llm_kwargs.get("device"),
                                     llm_kwargs.get("progress", True), llm_kwargs.get("dtype", "auto"))
        name = served_model_name or f"random-{shape}"
    elif tokenizer is not None:
        raise ValueError("--tokenizer goes with --shape")
    else:
        name = served_model_name or default_model_name(model)
    llm = LLM(model, **llm_kwargs)
    engine = AsyncLLM(llm, max_queue=max_queue)
    app = build_app(engine, model_name=name, api_key=api_key, max_body_bytes=max_body_bytes)
    state: ServerState = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # requests that still arrive on open connections get a 503
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    print(f"serving {name} on http://{host}:{port} (max_seq_len {llm.max_seq_len}, queue {max_queue})", flush=True)
    try:
        Server(config).run()
    finally:
        engine.shutdown()  # no-op when the lifespan already stopped it
        if hasattr(llm, "shutdown"):  # tensor-parallel worker processes, if any
            llm.shutdown()
