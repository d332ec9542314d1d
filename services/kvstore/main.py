"""The KV-cache store service's config and build: what `tandem serve kvstore` and the platform's
actors start."""

from __future__ import annotations

from dataclasses import dataclass

from shared.rpc.server import Running, ServiceConfig


@dataclass(frozen=True)
class Config(ServiceConfig):
    memory_mb: int = 1024  # the memory tier's budget
    redis_url: str | None = (
        None  # redis://… of the optional Redis tier (its password: $TANDEM_REDIS_PASSWORD)
    )


async def build(cfg: Config) -> Running:
    from services.kvstore.server import start_server
    from shared import envs
    from shared.kvstore import KVStore, StoreError

    try:
        store = KVStore(cfg.memory_mb * 2**20, cfg.redis_url, redis_password=envs.redis_password())
    except StoreError as e:
        raise ValueError(str(e)) from e
    server = await start_server(store, cfg.host, cfg.port, cfg.metrics_port)
    return Running.grpc(server)
