"""How the gateway app is served: uvicorn that drains before it stops.

At SIGTERM (or Ctrl-C, or `stop()` from the platform) the gateway first refuses new requests with
503 and Retry-After — `/health` included, so a load balancer takes the replica out — while the
requests in flight, streams included, run to their end (at most `grace` seconds); then uvicorn
stops. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

log = logging.getLogger("tandem.gateway")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace: float = 30.0):
        super().__init__(config)
        self.gateway = config.app.state.gateway
        self.grace = grace
        self.draining: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:  # uvicorn's signal handler (main thread)
        if self.draining is not None:
            self.force_exit = self.should_exit = True
            return
        asyncio.get_event_loop().call_soon_threadsafe(self.start_drain)

    def start_drain(self) -> asyncio.Task:
        if self.draining is None:
            self.draining = asyncio.get_running_loop().create_task(self._drain())
        return self.draining

    async def _drain(self) -> None:
        gw = self.gateway
        gw.draining = True
        log.info("draining: %d request(s) in flight, new ones get 503", gw.inflight)
        deadline = time.monotonic() + self.grace
        while gw.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if gw.inflight:
            log.warning("stopping with %d request(s) still in flight after %.0f s", gw.inflight, self.grace)
        self.should_exit = True

    async def stop(self, task: asyncio.Task) -> None:
        """Drain, then wait for uvicorn's `serve()` task to end."""
        await self.start_drain()
        await task
