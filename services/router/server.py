"""The router service: places each request on workers and forwards its token stream.

    tandem serve router --worker HOST:PORT [--worker ...] [--policy prefix_aware]
                        [--kvstore HOST:PORT] [--disagg-threshold 256] [--balance-threshold 4]

Three parts: worker_pool.py knows the workers (health, load, the prefix index fed by their KV
events), placement.py decides where a request runs (policy, remote prefill or not), and this thin
server forwards the calls.

The decision (policy, prefill worker, decode worker, cached tokens it expects) is logged and sent as
the `x-tandem-route` initial metadata, which the gateway returns as a response header when asked to.
A remote prefill's first token goes to the caller at once, and the decode worker continues from the
KV handle. A worker that fails before the first token (down, UNAVAILABLE, RESOURCE_EXHAUSTED) is
retried elsewhere (a failed prefill, or a handoff too large to send, falls back to a local prefill).
A decode that cannot take the handoff after the first token went out is continued as a new request
whose prompt ends with that token (on the same worker, or another when it is down). After that an
error passes to the caller. Every call has a deadline; a caller that goes away cancels the worker
calls (aborting the request there) and the router releases a handoff's store lease that no decode
collected. At most `max_inflight` calls are served at once; more are refused (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter

from services.router.placement import DEFAULT_POLICY, Placement, Route
from services.router.worker_pool import WorkerHandle, WorkerPool
from shared.kvstore.client import KVStoreClient
from shared.rpc.interceptors import REQUEST_ID_KEY
from shared.telemetry.logs import request_id_var
from shared.telemetry.metrics import Snapshot, family, metric_name
from tandem.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger("tandem.router")
SERVICE_NAME = "tandem.v1.Router"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
#: a decode that fails these before its first chunk is continued without the handoff (see _continue)
HANDOFF_RETRYABLE = {*RETRYABLE, grpc.StatusCode.FAILED_PRECONDITION}
ROUTE_HEADER = "x-tandem-route"


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        workers: list[str],
        policy: str = DEFAULT_POLICY,
        health_interval: float = 1.0,
        health_timeout: float = 2.0,
        request_timeout: float = 600.0,
        max_attempts: int = 3,
        kvstore: str | None = None,
        disagg_threshold: int = 256,
        balance_threshold: int = 4,
        max_inflight: int = 1024,
        registry: CollectorRegistry | None = None,
    ):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.placement = Placement(policy, disagg_threshold, balance_threshold)
        self.pool = WorkerPool(workers, health_interval, health_timeout)
        self.max_inflight = max_inflight
        self.inflight = 0  # Generate calls being served (admission: at most max_inflight)
        self.health_timeout = health_timeout
        self.request_timeout = request_timeout
        self.max_attempts = max_attempts
        self.store = KVStoreClient(kvstore, timeout=health_timeout) if kvstore else None
        self.metrics = RouterMetrics(registry if registry is not None else CollectorRegistry(), self)

    @property
    def workers(self) -> list[WorkerHandle]:
        return self.pool.workers

    @property
    def retired(self) -> list[WorkerHandle]:
        return self.pool.retired

    def set_workers(self, addresses: list[str]) -> None:
        self.pool.set_workers(addresses)

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()
        if self.store is not None:
            await self.store.close()

    async def place(self, request, exclude: set[str]) -> Route | None:
        prompt = request.prompt_token_ids
        keys = self.pool.block_keys(prompt, request.params.cache_salt, request.model)

        async def in_store() -> int:
            if self.store is None:
                return 0
            try:
                return (await self.store.lookup(keys))[1]
            except grpc.aio.AioRpcError as e:
                log.warning("KV store lookup failed: %s", e.code().name)
                return 0

        return await self.placement.place(
            self.pool.workers, keys, len(prompt), self.pool.block_size(), exclude, in_store
        )

    # -- RPCs ------------------------------------------------------------------------------------

    async def Generate(self, request, context):
        if self.inflight >= self.max_inflight:
            self.metrics.rejected.inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the router is at capacity ({self.inflight} requests in flight); retry later",
            )
        self.inflight += 1
        try:
            async for chunk in self._generate(request, context):
                yield chunk
        finally:
            self.inflight -= 1

    async def _generate(self, request, context):
        remaining = context.time_remaining()
        timeout = min(remaining, self.request_timeout) if remaining is not None else self.request_timeout
        tried: set[str] = set()
        last_error: grpc.aio.AioRpcError | None = None
        announced = False
        for attempt in range(self.max_attempts):
            route = await self.place(request, tried)
            if route is None and not tried:  # maybe everything just came back: look once more
                await self.pool.check()
                route = await self.place(request, tried)
            if route is None:
                if last_error is not None:  # e.g. every worker's queue is full: say so
                    await context.abort(last_error.code(), last_error.details() or last_error.code().name)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker is available")
            if not announced:
                await context.send_initial_metadata(((ROUTE_HEADER, route.header()),))
                announced = True
            log.info("route %s: %s", request.request_id, route.header())
            self.metrics.routed(route, len(request.prompt_token_ids), retry=attempt > 0)
            tried.add(route.decode.address)
            started = 0  # tokens the caller has
            try:
                async for chunk in self._run(route, request, timeout):
                    started += len(chunk.token_ids)
                    yield chunk
                return
            except grpc.aio.AioRpcError as e:
                if not started and e.code() in RETRYABLE and attempt + 1 < self.max_attempts:
                    # another worker may take it (tried ones are skipped)
                    log.warning(
                        "worker %s failed before the first token (%s); retrying",
                        route.decode.address,
                        e.code().name,
                    )
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        route.decode.healthy = False
                    self.metrics.retries.labels(e.code().name).inc()
                    last_error = e
                    continue
                if started and e.code() in RETRYABLE:  # mid-stream: gRPC's words ("Socket closed") say little
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        route.decode.healthy = False
                    await context.abort(e.code(), f"the worker serving this request failed after {started} "
                                        f"tokens ({e.details() or e.code().name}); retry the request")  # fmt: skip
                await context.abort(e.code(), e.details() or e.code().name)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "every worker tried failed")

    async def _run(self, route: Route, request, timeout: float) -> AsyncIterator[common_pb2.TokenChunk]:
        """The request's chunks: a remote prefill first when the route has one, then the decode."""
        if route.prefill is None:
            async for chunk in self._stream(route.decode, request, timeout):
                yield chunk
            return
        prefill_request = common_pb2.GenerateRequest()
        prefill_request.CopyFrom(request)
        prefill_request.prefill_only = True
        handle = None
        try:
            first = None
            try:
                async for chunk in self._stream(route.prefill, prefill_request, timeout):
                    first = chunk
            except grpc.aio.AioRpcError as e:
                if first is not None or e.code() not in RETRYABLE:
                    raise
                log.warning(
                    "prefill on %s failed (%s); prefilling on the decode worker",
                    route.prefill.address,
                    e.code().name,
                )
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    route.prefill.healthy = False
                self.metrics.prefill_fallbacks.inc()
                async for chunk in self._stream(route.decode, request, timeout):
                    yield chunk
                return
            if first is None or first.finish_reason != common_pb2.FINISH_REASON_HANDOFF:
                if first is not None:  # it finished at its first token (EOS, max_tokens 1)
                    yield first
                return
            handle = first.kv_handle
            first_ids = list(first.token_ids)
            first.ClearField("kv_handle")
            first.ClearField("usage")
            first.finish_reason = common_pb2.FINISH_REASON_UNSPECIFIED
            yield first  # the first token reaches the caller now, while the decode imports the KV
            decode_request = common_pb2.GenerateRequest()
            decode_request.CopyFrom(request)
            decode_request.kv_handle.CopyFrom(handle)
            decoded = False
            try:
                async for chunk in self._stream(route.decode, decode_request, timeout):
                    decoded = True
                    yield chunk
            except grpc.aio.AioRpcError as e:
                if decoded or e.code() not in HANDOFF_RETRYABLE:
                    raise
                async for chunk in self._continue(route, request, first_ids, e, timeout):
                    yield chunk
        finally:
            if handle is not None and handle.lease_id and self.store is not None:
                try:  # normally the decode released it already; this covers a decode that never came
                    await self.store.release(handle.lease_id)
                except grpc.aio.AioRpcError:
                    pass  # its TTL ends it

    async def _continue(
        self, route: Route, request, first_ids: list[int], error: grpc.aio.AioRpcError, timeout: float
    ) -> AsyncIterator[common_pb2.TokenChunk]:
        """The decode could not take the handoff after the first token went out (its worker died,
        its queue is full, or the handle's blocks are gone): generate the rest as a new request whose
        prompt ends with that token — on the same decode worker when it is alive, else another — and
        count the first token back into the usage it reports."""
        if request.params.HasField("grammar"):  # a fresh request would restart the grammar after
            raise error  # the token already sent: an error, never output outside the grammar
        worker = route.decode
        if error.code() in RETRYABLE:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                worker.healthy = False
            other = await self.place(request, {route.decode.address})
            if other is None:
                raise error
            worker = other.decode
        log.warning("decode on %s failed after the first token (%s); continuing on %s",
                    route.decode.address, error.code().name, worker.address)  # fmt: skip
        self.metrics.handoff_fallbacks.inc()
        rest = common_pb2.GenerateRequest()
        rest.CopyFrom(request)
        rest.prompt_token_ids.extend(first_ids)
        if rest.params.HasField("max_tokens"):
            rest.params.max_tokens -= len(first_ids)
        rest.params.min_tokens = max(0, rest.params.min_tokens - len(first_ids))
        async for chunk in self._stream(worker, rest, timeout):
            if chunk.HasField("usage"):
                chunk.usage.prompt_tokens -= len(first_ids)
                chunk.usage.completion_tokens += len(first_ids)
            yield chunk

    async def _stream(
        self, worker: WorkerHandle, request, timeout: float
    ) -> AsyncIterator[common_pb2.TokenChunk]:
        worker.requests.add(request.request_id)
        traced = request_id_var.get() or request.request_id  # the id the caller's logs know it by
        call = worker.stub.Generate(request, timeout=timeout, metadata=((REQUEST_ID_KEY, traced),))
        try:
            async for chunk in call:
                chunk.worker = worker.address
                yield chunk
        finally:
            call.cancel()  # no-op when finished; aborts the request on the worker otherwise
            worker.requests.discard(request.request_id)

    async def Abort(self, request, context):
        aborted = False
        for w in self.pool.everyone():
            if request.request_id in w.requests:
                try:
                    aborted |= (await w.stub.Abort(request, timeout=self.health_timeout)).aborted
                except grpc.aio.AioRpcError as e:
                    await context.abort(e.code(), f"worker {w.address}: {e.details()}")
        return common_pb2.AbortResponse(aborted=aborted)

    async def ListWorkers(self, request, context):
        return router_pb2.ListWorkersResponse(
            workers=[
                router_pb2.WorkerStatus(address=w.address, healthy=w.healthy, load=w.load)
                for w in self.workers
            ]
        )


class RouterMetrics:
    """What the router decides: routes by policy and where the prompt was prefilled, prefix-cache
    tokens it expects to reuse, retries and prefill fallbacks; workers by role and health and requests
    in flight (read at scrape time)."""

    def __init__(self, registry: CollectorRegistry, router: RouterService):
        self.router = router
        self.decisions = Counter(
            metric_name("router_decisions"), "Routes chosen, by policy and prefill placement (remote: a prefill "
            "worker; local: the decode worker).", ["policy", "prefill"], registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            metric_name("router_prompt_tokens"), "Prompt tokens routed.", registry=registry
        )
        self.prefix_hit_tokens = Counter(
            metric_name("router_prefix_hit_tokens"), "Prompt tokens the chosen workers or the KV store already "
            "hold (the route's expected prefix-cache reuse).", registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            metric_name("router_retries"),
            "Requests retried on another worker, by the error.",
            ["code"],
            registry=registry,
        )
        self.prefill_fallbacks = Counter(
            metric_name("router_prefill_fallbacks"), "Remote prefills that failed and ran on the decode worker.",
            registry=registry,
        )  # fmt: skip
        self.handoff_fallbacks = Counter(
            metric_name("router_handoff_fallbacks"),
            "Handoffs the decode could not take after the first token; the rest generated without them.",
            registry=registry,
        )  # fmt: skip
        self.rejected = Counter(
            metric_name("router_rejected"), "Requests refused because max_inflight were in flight.",
            registry=registry,
        )  # fmt: skip
        registry.register(Snapshot(self._gauges))

    def routed(self, route: Route, prompt_tokens: int, retry: bool) -> None:
        self.decisions.labels(route.policy, "remote" if route.prefill else "local").inc()
        if not retry:
            self.prompt_tokens.inc(prompt_tokens)
            self.prefix_hit_tokens.inc(route.cached_tokens)

    def _gauges(self):
        workers = family("gauge", "router_workers", "Workers the router serves, by role and health.",
                         ["role", "healthy"])  # fmt: skip
        counts: dict[tuple[str, str], int] = {}
        for w in self.router.workers:
            key = (w.role, str(w.healthy).lower())
            counts[key] = counts.get(key, 0) + 1
        for (role, healthy), n in sorted(counts.items()):
            workers.add_metric([role, healthy], n)
        in_flight = family("gauge", "router_requests_in_flight", "Requests the router is forwarding, by worker.",
                           ["worker", "role"])  # fmt: skip
        for w in self.router.pool.everyone():
            in_flight.add_metric([w.address, w.role], len(w.requests))
        return [workers, in_flight]


def register(server, workers: list[str], **kwargs) -> RouterService:
    service = RouterService(workers, registry=server.registry, **kwargs)
    server.add(router_pb2_grpc.add_RouterServicer_to_server, service, SERVICE_NAME)
    return service


async def start_server(
    workers: list[str], host: str = "127.0.0.1", port: int = 0, metrics_port: int | None = 0, **kwargs
):
    """A started router server. Returns (GrpcServer, RouterService); stop with
    `await server.stop(service.close)`."""
    from shared.rpc.server import GrpcServer

    server = GrpcServer("router", host, port, metrics_port=metrics_port)
    service = register(server, workers, **kwargs)
    await server.start()
    await service.start()
    return server, service
