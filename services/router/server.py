"""The router service: picks a worker for each request and forwards its token stream.

    tandem serve router --worker HOST:PORT [--worker HOST:PORT ...] [--policy least_loaded]

Workers come from config. A background loop asks each for its load (GetLoad, with a deadline) every
`health_interval` seconds; a worker that fails is marked unhealthy and skipped until it answers again.
Policies: `round_robin`, and `least_loaded` (fewest running + waiting requests, counting the router's
own in-flight requests since the last report). A worker that fails before the first token (it is
down, or refuses with UNAVAILABLE / RESOURCE_EXHAUSTED) is marked and the request retried on
another; after the first token an error is passed to the caller as is. Every call to a worker has a
deadline: the caller's remaining time, or `request_timeout`. A caller that goes away cancels the
worker call, which aborts the request on the worker; Abort(request_id) does the same explicitly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import grpc

from shared.rpc.server import OPTIONS
from tandem.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger("tandem.router")
SERVICE_NAME = "tandem.v1.Router"
POLICIES = ("round_robin", "least_loaded")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class WorkerHandle:
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    healthy: bool = False
    load: worker_pb2.LoadReport | None = None
    in_flight: int = 0  # requests this router sent since the last load report
    requests: set[str] = field(default_factory=set)

    @property
    def score(self) -> int:
        reported = (self.load.running + self.load.waiting) if self.load is not None else 0
        return reported + self.in_flight


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        workers: list[str],
        policy: str = "least_loaded",
        health_interval: float = 1.0,
        health_timeout: float = 2.0,
        request_timeout: float = 600.0,
        max_attempts: int = 3,
    ):
        if not workers:
            raise ValueError("the router needs at least one worker address (--worker HOST:PORT)")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got '{policy}'")
        self.policy = policy
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.request_timeout = request_timeout
        self.max_attempts = max_attempts
        self.workers = []
        for address in workers:
            channel = grpc.aio.insecure_channel(address, options=OPTIONS)
            self.workers.append(WorkerHandle(address, channel, worker_pb2_grpc.WorkerStub(channel)))
        self._rr = itertools.count()
        self._health_task: asyncio.Task | None = None

    # -- worker health and choice ------------------------------------------------------------------

    async def start(self) -> None:
        await self.check_workers()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for w in self.workers:
            await w.channel.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self.check_workers()

    async def check_workers(self) -> None:
        await asyncio.gather(*(self._check(w) for w in self.workers))

    async def _check(self, w: WorkerHandle) -> None:
        try:
            w.load = await w.stub.GetLoad(worker_pb2.LoadRequest(), timeout=self.health_timeout)
            w.in_flight = 0
            if not w.healthy:
                log.info("worker %s is up (%s)", w.address, w.load.worker_id)
            w.healthy = True
        except grpc.aio.AioRpcError as e:
            if w.healthy:
                log.warning("worker %s is down: %s", w.address, e.code().name)
            w.healthy = False

    def pick(self, exclude: set[str] = frozenset()) -> WorkerHandle | None:
        candidates = [w for w in self.workers if w.healthy and w.address not in exclude]
        if not candidates:
            return None
        if self.policy == "round_robin":
            return candidates[next(self._rr) % len(candidates)]
        return min(candidates, key=lambda w: w.score)

    # -- RPCs ------------------------------------------------------------------------------------

    async def Generate(self, request, context):
        remaining = context.time_remaining()
        timeout = min(remaining, self.request_timeout) if remaining is not None else self.request_timeout
        tried: set[str] = set()
        last_error: grpc.aio.AioRpcError | None = None
        for attempt in range(self.max_attempts):
            worker = self.pick(tried)
            if worker is None:
                if not tried:  # maybe everything just came back: look once more
                    await self.check_workers()
                    worker = self.pick(tried)
                if worker is None:
                    if last_error is not None:  # e.g. every worker's queue is full: say so
                        await context.abort(last_error.code(), last_error.details() or last_error.code().name)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker is available")
            tried.add(worker.address)
            worker.in_flight += 1
            worker.requests.add(request.request_id)
            call = worker.stub.Generate(request, timeout=timeout)
            started = False
            try:
                async for chunk in call:
                    started = True
                    chunk.worker = worker.address
                    yield chunk
                return
            except grpc.aio.AioRpcError as e:
                if not started and e.code() in RETRYABLE and attempt + 1 < self.max_attempts:
                    # another worker may take it (tried ones are skipped)
                    log.warning(
                        "worker %s failed before the first token (%s); retrying",
                        worker.address,
                        e.code().name,
                    )
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        worker.healthy = False
                    last_error = e
                    continue
                await context.abort(e.code(), e.details() or e.code().name)
            finally:
                call.cancel()  # no-op when finished; aborts the request on the worker otherwise
                worker.requests.discard(request.request_id)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "every worker tried failed")

    async def Abort(self, request, context):
        for w in self.workers:
            if request.request_id in w.requests:
                try:
                    return await w.stub.Abort(request, timeout=self.health_timeout)
                except grpc.aio.AioRpcError as e:
                    await context.abort(e.code(), f"worker {w.address}: {e.details()}")
        return common_pb2.AbortResponse(aborted=False)

    async def ListWorkers(self, request, context):
        return router_pb2.ListWorkersResponse(
            workers=[
                router_pb2.WorkerStatus(address=w.address, healthy=w.healthy, load=w.load)
                for w in self.workers
            ]
        )


def register(server, workers: list[str], **kwargs) -> RouterService:
    service = RouterService(workers, **kwargs)
    server.add(router_pb2_grpc.add_RouterServicer_to_server, service, SERVICE_NAME)
    return service


async def start_server(workers: list[str], host: str = "127.0.0.1", port: int = 0, **kwargs):
    """A started router server. Returns (GrpcServer, RouterService); stop with
    `await server.stop(service.close)`."""
    from shared.rpc.server import GrpcServer

    server = GrpcServer("router", host, port)
    service = register(server, workers, **kwargs)
    await server.start()
    await service.start()
    return server, service
