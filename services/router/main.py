"""The router service's config and build: what `tandem serve router` and the platform's actors start."""

from __future__ import annotations

from dataclasses import dataclass

from services.router.placement import DEFAULT_POLICY
from shared.rpc.server import Running, ServiceConfig


@dataclass(frozen=True)
class Config(ServiceConfig):
    workers: tuple[str, ...] = ()  # worker HOST:PORTs (the platform changes the list while serving)
    policy: str = DEFAULT_POLICY
    kvstore: str | None = None  # KV-cache store HOST:PORT (prefix lookups, lease clean-up)
    disagg_threshold: int = 256  # prefill remotely beyond this many uncached prompt tokens
    balance_threshold: int = 4  # prefix_aware: affinity yields to load beyond this many more requests
    health_interval: float = 1.0
    request_timeout: float = 600.0
    max_inflight: int = 1024  # requests forwarded at once; beyond: RESOURCE_EXHAUSTED (HTTP 429)


async def build(cfg: Config) -> Running:
    from services.router.server import start_server

    if not cfg.workers:
        raise ValueError("the router needs at least one worker (--worker HOST:PORT)")
    server, service = await start_server(
        list(cfg.workers), cfg.host, cfg.port, metrics_port=cfg.metrics_port, policy=cfg.policy,
        health_interval=cfg.health_interval, request_timeout=cfg.request_timeout, kvstore=cfg.kvstore,
        disagg_threshold=cfg.disagg_threshold, balance_threshold=cfg.balance_threshold,
        max_inflight=cfg.max_inflight,
    )  # fmt: skip
    return Running.grpc(server, service, service.close)
