"""Server interceptors every GrpcServer installs.

MetricsInterceptor times each call (a stream until its last message) and counts it by the status
code it ended with: OK, the code a handler aborted with, CANCELLED when the caller went away, UNKNOWN
for an unexpected exception. It also puts the request id the caller sent (`x-request-id` metadata)
into the log context, so every line the handler logs carries it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from contextlib import contextmanager

import grpc

from shared.telemetry.logs import request_id_var
from shared.telemetry.metrics import RpcMetrics

REQUEST_ID_KEY = "x-request-id"


def _code(context, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    return "OK" if error is None else "UNKNOWN"


def _request_id(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return value
    return None


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: RpcMetrics):
        self.metrics = metrics

    @contextmanager
    def _observed(self, method: str, context):
        """One call: its request id in the log context, then its time and final status code counted."""
        request_id_var.set(_request_id(context))  # this call's own task: no reset needed
        t0, error = time.perf_counter(), None
        try:
            yield
        except BaseException as e:
            error = e
            raise
        finally:
            self.metrics.observe(method, _code(context, error), time.perf_counter() - t0)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        observed = self._observed

        def unary(behavior):
            async def call(request_or_iterator, context):
                with observed(details.method, context):
                    return await behavior(request_or_iterator, context)

            return call

        def streaming(behavior):
            async def call(request_or_iterator, context):
                with observed(details.method, context):
                    async for response in behavior(request_or_iterator, context):
                        yield response

            return call

        io = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}  # fmt: skip
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **io)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **io)
        # a streaming handler is an async generator, or a coroutine that writes with context.write
        wrap = (
            streaming if inspect.isasyncgenfunction(handler.unary_stream or handler.stream_stream) else unary
        )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **io)
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **io)
