"""The OpenAI-compatible REST gateway (FastAPI).

    tandem serve gateway --tokenizer HOST:PORT --router HOST:PORT --model NAME [--port 8000]

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed as SSE or not),
POST /tokenize, POST /detokenize, GET /health, and FastAPI's /docs and /openapi.json.

A request is tokenized by the tokenizer service (chat template included), checked against the
model's context length, and sent to the router as one GenerateRequest per choice (`n`); the token
chunks that stream back already carry their text (the worker's engine detokenizes and applies stop
strings, so a stop frees the KV cache at once). Errors use OpenAI's JSON shape and status codes; a
client that disconnects cancels its gRPC streams, which aborts the requests on the workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway import dashboard
from services.gateway.auth import KeyRing, RateLimits, required_scope, tenant_salt
from services.gateway.clients import Backends
from services.gateway.dashboard import GatewayMetrics
from services.gateway.fine_tuning import ControllerClient, fine_tuning_router
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Limits,
    OpenAIError,
    TokenizeRequest,
    _Sampling,
)
from services.gateway.render import (
    chat_logprobs_json,
    completion_logprobs_json,
    stop_reason,
    stream_chat,
    stream_completion,
    usage_json,
)
from shared.rpc.convert import FINISH_REASON_NAMES, params_to_proto
from shared.telemetry.logs import request_id_var
from tandem.v1 import common_pb2

log = logging.getLogger("tandem.gateway")

MAX_N = 16
ROUTE_HEADER = "x-tandem-route"  # the router's placement of each choice, for debugging
GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
KNOWN_PARAMS = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
    "presence_penalty", "logit_bias", "min_tokens", "stop_token_ids", "logprobs", "seed", "n", "stop",
}  # fmt: skip


def error_from_grpc(e: grpc.aio.AioRpcError) -> OpenAIError:
    status = GRPC_TO_HTTP.get(e.code(), 500)
    message = e.details() or e.code().name
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # gRPC's own words ("Stream removed") say nothing
        message = ("the request did not finish within the gateway's time limit for one request "
                   "(request_timeout_s); ask for fewer tokens with max_tokens")  # fmt: skip
    first = message.split(" ", 1)[0]
    param = first if first in KNOWN_PARAMS else None
    code = "model_not_found" if status == 404 else None
    retry = {"Retry-After": "1"} if status in (429, 503) else None  # a full queue, no worker up: soon again
    return OpenAIError(status, message, param, code, headers=retry)


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # common_pb2.TokenLogprob
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: common_pb2.Usage | None = None


class Gateway:
    def __init__(
        self,
        backends: Backends | None,
        models: list[str],
        api_keys: list[str] = (),
        limits: Limits | None = None,
    ):
        self.backends = backends
        self.models = list(models)
        self.keys = KeyRing(api_keys)
        self.rates = RateLimits()
        self.limits = limits or Limits()
        self.created = int(time.time())
        self._info: dict[str, object] = {}
        self.metrics = GatewayMetrics()
        self.inflight = 0  # HTTP requests being answered (a stream until its last byte)
        self.draining = False  # shutting down: new requests get 503 (services/gateway/server.py)

    async def info(self, model: str):
        """The model's tokenizer info: a served model, or a LoRA fine-tune of one (found in the store
        by the tokenizer service the first time it is named, so a new fine-tune is served at once)."""
        if model not in self._info:
            try:
                info = await self.backends.info(model)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise OpenAIError(
                        404,
                        f"The model '{model}' does not exist (served: {', '.join(self.models)}, and "
                        "their fine-tunes)",
                        "model",
                        "model_not_found",
                    ) from e
                raise error_from_grpc(e) from e
            limit = await self.served_limit(model)
            if limit is not None and limit < info.max_model_len:
                clamped = type(info)()
                clamped.CopyFrom(info)
                clamped.max_model_len = limit
                info = clamped
            if model not in self.models or limit is None:
                return info  # a fine-tune: asked each time, so one deleted from the store is gone at once
            self._info[model] = info
        return self._info[model]

    async def served_limit(self, model: str) -> int | None:
        """The context length the workers serving `model` (or its fine-tunes' base) hold: the engine
        clamps it to its KV cache, so it can be below the model's own. None until a worker reports."""
        try:
            workers = (await self.backends.workers()).workers
        except grpc.aio.AioRpcError:
            return None
        lens = [
            w.load.max_model_len
            for w in workers
            if w.healthy
            and w.load.max_model_len
            and (w.load.model == model or model.startswith(f"ft:{w.load.model}:"))
        ]
        return min(lens, default=None)

    # -- generation ------------------------------------------------------------------------------

    def prepare(self, body: _Sampling, prompt_len: int, max_model_len: int, vocab: int, what: str) -> list:
        if not 1 <= body.n <= MAX_N:
            raise OpenAIError(400, f"n must be between 1 and {MAX_N}, got {body.n}", "n")
        body.check_limits(self.limits)
        requested = body.requested_max_tokens()
        room = max_model_len - prompt_len
        max_tokens = room if requested is None else requested
        if requested is not None and requested < 1:
            raise OpenAIError(400, f"max_tokens must be at least 1, got {requested}", "max_tokens")
        if prompt_len + max_tokens > max_model_len or room < 1:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                "completion). Please reduce the length of the prompt or the completion.",
                what,
                "context_length_exceeded",
            )
        logprobs = body.requested_logprobs()
        params = [body.sampling_params(max_tokens, logprobs, i) for i in range(body.n)]
        try:
            for p in params:  # each: choice i's seed is seed + i
                p.validate(vocab)
        except ValueError as e:
            raise OpenAIError(400, str(e), str(e).split(" ", 1)[0]) from e
        return params

    def admit_tokens(self, request: Request, tokens: int):
        """Charge the prompt tokens to the caller's key (429 with Retry-After when its tokens-per-minute
        bucket cannot pay); the key, whose bucket then pays for the generated tokens as they come."""
        key = getattr(request.state, "api_key", None)
        if key is None:
            return None
        wait = self.rates.admit(key, "tokens", tokens)
        if wait:
            raise OpenAIError(429, f"rate limit of {key.tpm} tokens per minute reached; retry in {wait}s",
                              code="rate_limit_exceeded", headers={"Retry-After": str(wait)})  # fmt: skip
        return key

    async def open_choices(
        self, model: str, specs: list[tuple[str, list[int], object, int]], key=None
    ) -> tuple[dict[str, str], list[AsyncIterator[tuple[int, common_pb2.TokenChunk]]]]:
        """Start one router stream per (request id, prompt ids, params, index); returns the response
        headers (the router's routing decisions as `x-tandem-route`, when that debugging aid is on)
        and the chunk streams. With API keys, each key's requests get their own prefix-cache space
        (`tenant_salt`), so cache hits never reveal one tenant's prompts to another."""
        calls = []
        for request_id, prompt_ids, params, _ in specs:
            if key is not None:
                params = dataclasses.replace(params, cache_salt=tenant_salt(key, params.cache_salt))
            request = common_pb2.GenerateRequest(
                request_id=request_id,
                model=model,
                prompt_token_ids=prompt_ids,
                params=params_to_proto(params),
            )
            calls.append(self.backends.generate(request))
        routes = []
        try:
            for call in calls:
                metadata = await call.initial_metadata()  # empty when the router failed it: see the stream
                routes.append(dict(metadata or ()).get(ROUTE_HEADER, ""))
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        started = time.monotonic()
        headers = {ROUTE_HEADER: ", ".join(routes)} if self.limits.route_header else {}
        return headers, [
            self._chunks(call, spec[3], model, started, key) for call, spec in zip(calls, specs, strict=True)
        ]

    async def _chunks(
        self, call, index: int, model: str, started: float, key=None
    ) -> AsyncIterator[tuple[int, common_pb2.TokenChunk]]:
        last = None  # when the previous token arrived (None: none yet)
        try:
            async for chunk in call:
                now = time.monotonic()
                if chunk.token_ids:
                    if key is not None:
                        self.rates.charge(key, "tokens", len(chunk.token_ids))
                    if last is None:
                        self.metrics.first_token(model, now - started, len(chunk.token_ids))
                    else:
                        self.metrics.next_tokens(model, now - last, len(chunk.token_ids))
                    last = now
                if chunk.finish_reason:
                    self.metrics.done(model, FINISH_REASON_NAMES[chunk.finish_reason], now - started)
                yield index, chunk
        except grpc.aio.AioRpcError as e:
            raise error_from_grpc(e) from e
        finally:
            call.cancel()  # a client gone mid-stream: the router and the worker abort the request

    async def merged(self, streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, common_pb2.TokenChunk]]:
        """Chunks of several choices in arrival order."""
        if len(streams) == 1:
            async for item in streams[0]:
                yield item
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(s):
            try:
                async for item in s:
                    await queue.put(item)
                await queue.put(done)
            except BaseException as e:  # handed to the consumer
                await queue.put(e)

        tasks = [asyncio.create_task(pump(s)) for s in streams]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def primed(self, streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, common_pb2.TokenChunk]]:
        """The merged chunks with the first one already awaited: a request that fails before its first
        token (a full queue, no worker) raises here, and the endpoint answers with that HTTP status
        instead of a 200 stream holding an error event."""
        merged = self.merged(streams)
        try:
            first = await merged.__anext__()
        except StopAsyncIteration:
            first = None

        async def chunks():
            if first is not None:
                yield first
            async for item in merged:
                yield item

        return chunks()

    async def collect(self, streams) -> list[Choice]:
        choices: dict[int, Choice] = {}
        async for index, chunk in self.merged(streams):
            c = choices.setdefault(index, Choice(index))
            c.text += chunk.text
            c.token_ids += list(chunk.token_ids)
            c.logprobs += list(chunk.logprobs)
            if chunk.finish_reason:
                c.finish_reason = FINISH_REASON_NAMES[chunk.finish_reason]
                c.stop_reason = stop_reason(chunk)
                c.usage = chunk.usage
        return [choices[i] for i in sorted(choices)]

    async def token_strings(self, model: str, logprobs) -> dict[int, str]:
        ids = sorted({lp.token_id for lp in logprobs} | {t.token_id for lp in logprobs for t in lp.top})
        return dict(zip(ids, await self.backends.token_strings(model, ids), strict=True)) if ids else {}


async def until_disconnected(request: Request, coro):
    """Await coro, cancelling it if the HTTP client goes away first (non-streaming requests)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise OpenAIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


class RequestIdAndAuth:
    """Pure ASGI middleware (it leaves the receive channel alone, so endpoints still see a client
    disconnect): takes or makes the X-Request-Id, echoes it on the response, checks API keys."""

    def __init__(self, app, gateway: Gateway):
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        # the platform's own id keys the request everywhere (two clients may send the same id); the
        # client's id, when it sends one, is what the logs carry and the response echoes
        request_id = uuid.uuid4().hex
        # (printable ASCII only: it travels on as gRPC metadata and into log lines)
        traced = "".join(c for c in headers.get("x-request-id", "")[:128] if " " < c < "\x7f") or request_id
        scope.setdefault("state", {})["request_id"] = request_id
        request_id_var.set(traced)  # this request's task: its logs and gRPC calls carry it
        echo = (b"x-request-id", traced.encode("latin-1"))
        started, status = time.perf_counter(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), echo]
                status[0] = message["status"]
            await send(message)

        self.gateway.inflight += 1
        try:
            await self._serve(scope, receive, send_with_id, headers)
        finally:
            self.gateway.inflight -= 1
            route = scope.get("route")
            path = getattr(route, "path", "other")  # the route's template: bounded label values
            m = self.gateway.metrics
            m.http.labels(scope["method"], path, str(status[0])).inc()
            m.http_seconds.labels(scope["method"], path).observe(time.perf_counter() - started)

    async def _serve(self, scope, receive, send_with_id, headers) -> None:
        gw = self.gateway
        path = scope["path"]
        limit = gw.limits.max_upload_bytes if path == "/v1/files" else gw.limits.max_body_bytes
        try:
            size = int(headers.get("content-length") or 0)
        except ValueError:
            size = 0
        need = required_scope(scope["method"], path)
        try:
            if gw.draining:  # /health too: a load balancer stops sending here
                raise OpenAIError(503, "the gateway is shutting down; retry", code="shutting_down",
                                  headers={"Retry-After": "1"})  # fmt: skip
            if size > limit:
                raise OpenAIError(
                    413, f"request body of {size} bytes is over the limit of {limit}", code="body_too_large"
                )
            if gw.keys and need is not None:
                auth = headers.get("authorization", "")
                key = gw.keys.find(auth[7:]) if auth.startswith("Bearer ") else None
                if key is None:
                    raise OpenAIError(401, "Invalid or missing API key", code="invalid_api_key")
                if need not in key.scopes:
                    raise OpenAIError(
                        403, f"this API key lacks the '{need}' scope", code="insufficient_scope"
                    )
                wait = gw.rates.admit(key, "requests")
                if wait:
                    raise OpenAIError(429, f"rate limit of {key.rpm} requests per minute reached; retry in {wait}s",
                                      code="rate_limit_exceeded", headers={"Retry-After": str(wait)})  # fmt: skip
                scope["state"]["api_key"] = key
        except OpenAIError as e:
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            return await response(scope, receive, send_with_id)
        if size == 0 and scope["method"] in ("POST", "PUT", "PATCH"):
            receive = await _bounded_body(receive, limit, scope, send_with_id)
            if receive is None:
                return
        await self.app(scope, receive, send_with_id)


async def _bounded_body(receive, limit: int, scope, send):
    """A body sent without Content-Length (chunked): read it up to `limit` (413 beyond), then replay
    it; later receive() calls go to the client again (so a disconnect is still seen)."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        total += len(chunks[-1])
        if total > limit:
            err = OpenAIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
            await JSONResponse(err.body(), status_code=413)(scope, receive, send)
            return None
        if not message.get("more_body"):
            break
    replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replaying():
        return replay.pop() if replay else await receive()

    return replaying


def create_app(
    tokenizer: str,
    router: str,
    models: list[str],
    api_keys: list[str] = (),
    platform_status: Callable[[], Awaitable[dict]] | None = None,
    controller: str | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The gateway app for the tokenizer and router services at the given HOST:PORT addresses.
    Its gRPC channels are opened on the serving event loop (they are bound to it).
    `platform_status` (under `tandem up`: the controller's status) feeds /dashboard and /metrics;
    without it they show what the router reports. `controller` (HOST:PORT) enables the files and
    fine-tuning endpoints."""
    gw = Gateway(None, models, api_keys, limits)
    clients: dict[str, ControllerClient] = {}

    @asynccontextmanager
    async def lifespan(app):
        gw.backends = Backends(tokenizer, router, request_timeout=gw.limits.request_timeout_s)
        if controller:
            clients["controller"] = ControllerClient(controller)
        yield
        await gw.backends.close()
        if controller:
            await clients["controller"].close()

    app = FastAPI(
        title="Tandem", description="OpenAI-compatible API of the Tandem platform", lifespan=lifespan
    )
    app.state.gateway = gw

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        message = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        return JSONResponse(OpenAIError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    app.add_middleware(RequestIdAndAuth, gateway=gw)
    app.include_router(fine_tuning_router(lambda: clients.get("controller")))

    @app.get("/health")
    async def health():
        try:
            workers = await gw.backends.workers()
            await gw.backends.info(gw.models[0])  # asked each time (not the cache): the tokenizer answers
        except (grpc.aio.AioRpcError, OpenAIError) as e:
            return JSONResponse({"status": "unavailable", "reason": str(e)}, status_code=503)
        healthy = sum(w.healthy for w in workers.workers)
        status = 200 if healthy else 503
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", "healthy_workers": healthy}, status_code=status
        )

    app.include_router(dashboard.operator_router(gw, platform_status, lambda: clients.get("controller")))

    @app.get("/v1/models")
    async def list_models():
        try:
            entries = [(m.name, m.base_model, m.created_at) for m in (await gw.backends.list_models()).models]
        except grpc.aio.AioRpcError:
            entries = [(m, "", 0) for m in gw.models]
        data = []
        for name, base, created in entries:
            entry = {"id": name, "object": "model", "created": created or gw.created, "owned_by": "tandem"}
            if base:
                entry["parent"] = entry["root"] = base
            try:
                entry["max_model_len"] = (await gw.info(name)).max_model_len
            except OpenAIError:
                pass
            data.append(entry)
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
        info = await gw.info(body.model)
        messages = [{"role": m.role, "content": m.text(), "name": m.name} for m in body.messages]
        try:
            prompt_ids, _ = await gw.backends.tokenize_chat(body.model, messages, body.add_generation_prompt)
        except grpc.aio.AioRpcError as e:
            raise error_from_grpc(e) from e
        params = gw.prepare(body, len(prompt_ids), info.max_model_len, info.vocab_size, "messages")
        rid = request.state.request_id
        log.info("chat completion: model %s, %d prompt tokens, n=%d, stream=%s", body.model, len(prompt_ids),
                 body.n, body.stream)  # fmt: skip
        key = gw.admit_tokens(request, len(prompt_ids) * body.n)
        specs = [(f"{rid}-{i}", prompt_ids, p, i) for i, p in enumerate(params)]
        headers, streams = await gw.open_choices(body.model, specs, key)
        base = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_chat(gw, body, await gw.primed(streams), base, include_usage),
                media_type="text/event-stream",
                headers=headers,
            )
        response.headers.update(headers)
        choices = await until_disconnected(request, gw.collect(streams))
        strings = await gw.token_strings(body.model, [lp for c in choices for lp in c.logprobs])
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs_json(c.logprobs, strings) if body.logprobs else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for c in choices
            ],
            "usage": usage_json([choices[0].usage], sum(len(c.token_ids) for c in choices)),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, response: Response):
        info = await gw.info(body.model)
        if body.suffix:
            raise OpenAIError(400, "suffix is not supported", "suffix")
        if body.echo:
            raise OpenAIError(400, "echo is not supported", "echo")
        prompts = await completion_prompts(body)
        if not prompts or any(not p for p in prompts):
            raise OpenAIError(400, "prompt must not be empty", "prompt")
        rid = request.state.request_id
        specs, all_params = [], []
        for pi, ids in enumerate(prompts):
            if any(t < 0 or t >= info.vocab_size for t in ids):
                raise OpenAIError(
                    400, f"prompt contains token ids outside the vocabulary of {info.vocab_size}", "prompt"
                )
            params = gw.prepare(body, len(ids), info.max_model_len, info.vocab_size, "prompt")
            all_params.append(params)
            for i, p in enumerate(params):
                index = pi * body.n + i
                specs.append((f"{rid}-{index}", ids, p, index))
        log.info("completion: model %s, %d prompt(s), n=%d, stream=%s", body.model, len(prompts), body.n,
                 body.stream)  # fmt: skip
        key = gw.admit_tokens(request, sum(len(ids) for ids in prompts) * body.n)
        headers, streams = await gw.open_choices(body.model, specs, key)
        base = {"id": f"cmpl-{rid}", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_completion(gw, body, await gw.primed(streams), base, include_usage, len(prompts)),
                media_type="text/event-stream",
                headers=headers,
            )
        response.headers.update(headers)
        choices = await until_disconnected(request, gw.collect(streams))
        strings = await gw.token_strings(body.model, [lp for c in choices for lp in c.logprobs])
        return {
            **base,
            "object": "text_completion",
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": completion_logprobs_json(c.logprobs, strings, 0)
                    if body.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for c in choices
            ],
            "usage": usage_json(
                [choices[pi * body.n].usage for pi in range(len(prompts))],
                sum(len(c.token_ids) for c in choices),
            ),
        }

    async def completion_prompts(body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        count = 1 if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else len(p)
        if count * body.n > gw.limits.max_choices:
            raise OpenAIError(
                400,
                f"prompt: {count} prompts x n={body.n} is over the limit of {gw.limits.max_choices} choices",
                "prompt",
            )
        try:
            if isinstance(p, str):
                return [await gw.backends.tokenize_text(body.model, p)]
            if p and all(isinstance(x, int) for x in p):
                return [list(p)]
            if p and all(isinstance(x, str) for x in p):
                return [await gw.backends.tokenize_text(body.model, x) for x in p]
            return [list(x) for x in p]
        except grpc.aio.AioRpcError as e:
            raise error_from_grpc(e) from e

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        model = body.model or gw.models[0]
        info = await gw.info(model)
        try:
            if body.messages is not None:
                messages = [{"role": m.role, "content": m.text(), "name": m.name} for m in body.messages]
                ids, _ = await gw.backends.tokenize_chat(model, messages, body.add_generation_prompt)
            elif body.prompt is not None:
                ids = await gw.backends.tokenize_text(model, body.prompt, body.add_special_tokens)
            else:
                raise OpenAIError(400, "give either prompt or messages", "prompt")
        except grpc.aio.AioRpcError as e:
            raise error_from_grpc(e) from e
        return {"tokens": ids, "count": len(ids), "max_model_len": info.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        model = body.model or gw.models[0]
        await gw.info(model)
        try:
            return {"prompt": await gw.backends.detokenize(model, body.tokens)}
        except grpc.aio.AioRpcError as e:
            raise error_from_grpc(e) from e

    return app
