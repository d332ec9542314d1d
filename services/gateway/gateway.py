"""The gateway's core: the state behind the REST endpoints (served models, keys and rate limits, the
backends) and the path of a generation request, shared by chat and text completions:

    plan()         check each prompt and the sampling parameters against the model (context length,
                   vocabulary, limits), charge the caller's token budget, and open one router stream
                   per choice (`n` per prompt), returning the response headers and the streams
    primed()       the streams merged, the first chunk awaited (a failure before any token keeps its
                   HTTP status instead of becoming an error event in a 200 stream)
    collect()      the streams gathered into whole choices (non-streaming responses)

gRPC errors become OpenAI errors with the matching HTTP status (error_from_grpc).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from fastapi import Request

from services.gateway.auth import KeyRing, RateLimits, tenant_salt
from services.gateway.clients import Backends
from services.gateway.dashboard import GatewayMetrics
from services.gateway.protocol import Limits, OpenAIError, _Sampling
from services.gateway.render import stop_reason
from shared.rpc.convert import FINISH_REASON_NAMES, params_to_proto
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
    "speculative", "speculative_tokens",
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

    async def plan(
        self,
        request: Request,
        body: _Sampling,
        info,
        prompts: list[list[int]],
        what: str,
        grammar: str | None = None,
    ) -> tuple[dict[str, str], list[AsyncIterator[tuple[int, common_pb2.TokenChunk]]]]:
        """Check, charge and start a generation: `prompts` (token ids, one per prompt; `what` names
        them in errors: "messages" or "prompt") for the model whose tokenizer `info` is given. Choice
        `pi * n + i` is prompt pi's i-th sample; `grammar` (structured output) constrains every choice.
        Returns the response headers and the choices' streams."""
        rid = request.state.request_id
        specs = []
        for pi, ids in enumerate(prompts):
            if any(t < 0 or t >= info.vocab_size for t in ids):
                raise OpenAIError(400, f"{what} contains token ids outside the vocabulary of {info.vocab_size}",
                                  what)  # fmt: skip
            params = self.prepare(body, len(ids), info.max_model_len, info.vocab_size, what, grammar)
            for i, p in enumerate(params):
                index = pi * body.n + i
                specs.append((f"{rid}-{index}", ids, p, index))
        log.info("%s: model %s, %d prompt(s) of %s tokens, n=%d, stream=%s", what, body.model, len(prompts),
                 "/".join(str(len(p)) for p in prompts), body.n, body.stream)  # fmt: skip
        key = self.admit_tokens(request, sum(len(ids) for ids in prompts) * body.n)
        return await self.open_choices(body.model, specs, key)

    def prepare(
        self,
        body: _Sampling,
        prompt_len: int,
        max_model_len: int,
        vocab: int,
        what: str,
        grammar: str | None = None,
    ) -> list:
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
        params = [body.sampling_params(max_tokens, logprobs, i, grammar) for i in range(body.n)]
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
