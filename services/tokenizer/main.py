"""The tokenizer service's config and build: what `tandem serve tokenizer` and the platform's
actors start."""

from __future__ import annotations

from dataclasses import dataclass

from shared.rpc.server import Running, ServiceConfig
from shared.store import DEFAULT_MODEL, ModelStore


@dataclass(frozen=True)
class Config(ServiceConfig):
    models: tuple[str, ...] = (DEFAULT_MODEL,)  # served models (their fine-tunes are found in the store)
    store: str | None = None  # the model store (default $TANDEM_MODELS)


async def build(cfg: Config) -> Running:
    from services.tokenizer.server import start_server

    server = await start_server(
        ModelStore.at(cfg.store), list(cfg.models), cfg.host, cfg.port, cfg.metrics_port
    )
    return Running.grpc(server)
