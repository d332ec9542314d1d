"""The OpenAI-compatible REST gateway (FastAPI): its routes.

    tandem serve gateway --tokenizer HOST:PORT --router HOST:PORT --model NAME [--port 8000]

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed as SSE or not),
POST /tokenize, POST /detokenize, GET /health, the files and fine-tuning API (fine_tuning.py), the
operator pages (dashboard.py), and FastAPI's /docs and /openapi.json.

A request is tokenized by the tokenizer service (chat template included), then planned by the
Gateway (gateway.py: checked against the model's context length and the limits, sent to the router
as one GenerateRequest per choice); the token chunks that stream back already carry their text (the
worker's engine detokenizes and applies stop strings, so a stop frees the KV cache at once) and are
rendered in OpenAI's shapes (render.py). Errors use OpenAI's JSON shape and status codes; a client
that disconnects cancels its gRPC streams, which aborts the requests on the workers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway import dashboard, structured
from services.gateway.clients import Backends
from services.gateway.fine_tuning import ControllerClient, fine_tuning_router
from services.gateway.gateway import Gateway, error_from_grpc, until_disconnected
from services.gateway.middleware import RequestIdAndAuth
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Limits,
    OpenAIError,
    TokenizeRequest,
)
from services.gateway.render import chat_response, completion_response, stream_chat, stream_completion


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

    async def generate(body, request: Request, response: Response, info, prompts: list[list[int]], structure):
        """The generation path chat and text completions share; only the rendering differs."""
        chat = isinstance(body, ChatCompletionRequest)
        what = "messages" if chat else "prompt"
        headers, streams = await gw.plan(request, body, info, prompts, what, structure.grammar)
        rid = request.state.request_id
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            primed = await gw.primed(streams)
            events = (
                stream_chat(gw, body, primed, base, include_usage, structure)
                if chat
                else stream_completion(gw, body, primed, base, include_usage, len(prompts))
            )
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        response.headers.update(headers)
        choices = await until_disconnected(request, gw.collect(streams))
        strings = await gw.token_strings(body.model, [lp for c in choices for lp in c.logprobs])
        if chat:
            return chat_response(base, body, choices, strings, structure)
        return completion_response(base, body, choices, strings, len(prompts))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
        info = await gw.info(body.model)  # an unknown model is a 404 before any tokenizing
        structure = structured.plan(body)
        messages = [{"role": m.role, "content": m.text(), "name": m.name} for m in body.messages]
        try:
            prompt_ids, _ = await gw.backends.tokenize_chat(
                body.model, messages, body.add_generation_prompt, structure.tools_json
            )
        except grpc.aio.AioRpcError as e:
            raise error_from_grpc(e) from e
        return await generate(body, request, response, info, [prompt_ids], structure)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, response: Response):
        info = await gw.info(body.model)
        if body.suffix:
            raise OpenAIError(400, "suffix is not supported", "suffix")
        if body.echo:
            raise OpenAIError(400, "echo is not supported", "echo")
        structure = structured.plan(body)
        prompts = await completion_prompts(body)
        if not prompts or any(not p for p in prompts):
            raise OpenAIError(400, "prompt must not be empty", "prompt")
        return await generate(body, request, response, info, prompts, structure)

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
