"""GrpcServer: how every Tandem service runs its asyncio gRPC server.

    server = GrpcServer("tokenizer", host, port)         # port 0: the OS picks a free one
    server.add(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, servicer, "tandem.v1.Tokenizer")
    await server.start()                                  # server.port is the bound port
    await server.stop(on_drain=...)                       # drain, then stop

Each service's `main.build(cfg)` returns its started server as a `Running` (address, servicer, stop,
serve_until_signal), so the platform layer starts every service the same way.

Every server carries the standard gRPC health service (SERVING while up, NOT_SERVING while draining);
server reflection (so `grpcurl` can list and call it) only with TANDEM_GRPC_REFLECTION=1. The
platform's internal token and TLS (shared.rpc.security) apply to every server built here. It also owns the service's Prometheus
registry (`server.registry`: per-method call counts and latencies from an interceptor, plus what
the service registers) and serves it on its own HTTP port (`metrics_port`, 0: a free one; None:
none), announced as `server.metrics_address`. Shutdown is graceful: health flips to
NOT_SERVING, new RPCs are refused, in-flight ones get `grace` seconds to finish, then the owner's
`on_drain` hook (e.g. stop the engine) runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from shared import envs
from shared.rpc.interceptors import MetricsInterceptor
from shared.rpc.security import OPTIONS, add_port, server_interceptors
from shared.telemetry.metrics import MetricsServer, RpcMetrics

log = logging.getLogger("tandem.rpc")


class GrpcServer:
    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        grace: float = 10.0,
        metrics_port: int | None = 0,
    ):
        self.name = name
        self.host = host
        self.requested_port = port
        self.grace = grace
        self.port: int | None = None
        self.registry = CollectorRegistry()
        self.metrics_port = metrics_port
        self.metrics: MetricsServer | None = None
        self.server = grpc.aio.server(
            options=OPTIONS,
            interceptors=[MetricsInterceptor(RpcMetrics(self.registry)), *server_interceptors()],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self._stopped = asyncio.Event()
        # run when draining starts: services end their endless streams (e.g. KV events) here so
        # the grace period only waits for real work
        self.on_drain_start: list[Callable[[], None]] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str | None:
        return self.metrics.address if self.metrics is not None else None

    def add(self, add_fn: Callable, servicer, service_name: str) -> None:
        add_fn(servicer, self.server)
        self.service_names.append(service_name)

    async def start(self) -> int:
        if envs.grpc_reflection():
            reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME], self.server)
        self.port = add_port(self.server, f"{self.host}:{self.requested_port}")
        if not self.port:
            raise OSError(f"{self.name}: cannot listen on {self.host}:{self.requested_port}")
        await self.server.start()
        for service in ["", *self.service_names]:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port is not None:
            self.metrics = MetricsServer(self.registry, self.host, self.metrics_port)
        log.info(
            "%s listening on %s (metrics: %s)", self.name, self.address,
            f"http://{self.metrics_address}/metrics" if self.metrics else "off",
        )  # fmt: skip
        return self.port

    async def stop(self, on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("%s draining (grace %.0fs)", self.name, self.grace)
        await self.health.enter_graceful_shutdown()
        for hook in self.on_drain_start:
            hook()
        await self.server.stop(self.grace)
        if on_drain is not None:
            await on_drain()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        log.info("%s stopped", self.name)


@dataclass(frozen=True)
class ServiceConfig:
    """Where a service listens; each service's `main.Config` extends it with its own options."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free one
    metrics_port: int | None = 0  # its Prometheus /metrics (0: a free one; None: none)


class Running:
    """A started service, as each service's `main.build(cfg)` returns it: where it listens, its
    servicer (for the platform's control calls, e.g. the router's worker list), and how it stops."""

    def __init__(
        self,
        name: str,
        address: str,
        metrics_address: str | None,
        stop: Callable[[], Awaitable[None]],
        service=None,
        wait: Callable[[], Awaitable[None]] | None = None,
    ):
        self.name = name
        self.address = address
        self.metrics_address = metrics_address
        self.service = service
        self._stop = stop
        self._wait = wait

    @classmethod
    def grpc(cls, server: GrpcServer, service=None, on_drain: Callable[[], Awaitable[None]] | None = None):
        return cls(
            server.name, server.address, server.metrics_address, lambda: server.stop(on_drain), service
        )

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    async def stop(self) -> None:
        """Drain (in-flight work finishes, new work is refused) and stop."""
        await self._stop()

    async def serve_until_signal(self) -> None:
        """Serve in the foreground until SIGTERM / SIGINT, then drain and stop."""
        if self._wait is not None:  # a server that takes the signals itself (uvicorn)
            await self._wait()
            return
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()
