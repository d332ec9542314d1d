"""The gateway's ASGI middleware: request ids, the draining switch, body-size limits and API keys
(scopes and request rate limits), ahead of every endpoint."""

from __future__ import annotations

import time
import uuid

from fastapi.responses import JSONResponse

from services.gateway.auth import required_scope
from services.gateway.gateway import Gateway
from services.gateway.protocol import OpenAIError
from shared.telemetry.logs import request_id_var


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
