"""The gateway's config and build: what `tandem serve gateway` and the platform's actors start
(the FastAPI app under a uvicorn that drains before it stops)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.gateway.protocol import Limits
from shared.rpc.server import Running, ServiceConfig
from shared.store import DEFAULT_MODEL


@dataclass(frozen=True)
class Config(ServiceConfig):
    port: int = 8000
    tokenizer: str = ""  # tokenizer service HOST:PORT
    router: str = ""  # router service HOST:PORT
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    controller: str | None = None  # controller HOST:PORT (files and fine-tuning endpoints)
    api_keys: tuple[str, ...] = ()  # plain keys or sha256 specs, with $TANDEM_API_KEYS (docs/security.md)
    limits: Limits = field(default_factory=Limits)
    drain_grace: float = 30.0  # at SIGTERM, seconds in-flight requests get to finish
    log_level: str = "info"


async def build(cfg: Config, platform_status: Callable[[], Awaitable[dict]] | None = None) -> Running:
    """`platform_status`: under `tandem up`, the platform controller's status (the dashboard's)."""
    import uvicorn

    from services.gateway.app import create_app
    from services.gateway.auth import KeyRing, KeySpecError
    from services.gateway.server import DrainingServer
    from shared import envs

    if not cfg.tokenizer or not cfg.router:
        raise ValueError("the gateway needs --tokenizer HOST:PORT and --router HOST:PORT")
    keys = [*cfg.api_keys, *envs.api_keys()]
    try:
        KeyRing(keys)
    except KeySpecError as e:
        raise ValueError(str(e)) from e
    app = create_app(cfg.tokenizer, cfg.router, list(cfg.models), keys, platform_status,
                     controller=cfg.controller, limits=cfg.limits)  # fmt: skip
    # log_config=None: uvicorn's loggers go through the root handler (JSON lines with request ids)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, log_config=None)
    server = DrainingServer(config, grace=cfg.drain_grace)  # SIGTERM / Ctrl-C: 503 to new, in-flight finish
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise OSError(f"the gateway could not listen on {cfg.host}:{cfg.port}")
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    address = f"{cfg.host}:{port}"
    # its /metrics is on its own port; uvicorn takes the signals itself (on the main thread only: off
    # it, e.g. in a Ray actor, stop() drains it)
    return Running(
        "gateway", address, address, lambda: server.stop(task), app.state.gateway, wait=lambda: task
    )
