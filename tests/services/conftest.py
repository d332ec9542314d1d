"""A running platform for service tests: tokenizer, worker(s), router and gateway as real servers on
free loopback ports, all on one background asyncio loop in the test process."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from shared.engine import EngineConfig
from shared.store import DEFAULT_MODEL


class Loop:
    """An asyncio loop on a thread; run(coro) waits for its result from test code."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Platform:
    def __init__(self, loop: Loop):
        self.loop = loop
        self.stops = []

    def start_tokenizer(self, store):
        from services.tokenizer.server import start_server

        server = self.loop.run(start_server(store, [DEFAULT_MODEL]))
        self.stops.append(lambda: server.stop())
        return server

    def start_worker(self, model_dir, service_kwargs: dict | None = None, **config):
        from services.worker.server import start_server

        server, service = self.loop.run(
            start_server(model_dir, DEFAULT_MODEL, EngineConfig(**config), **(service_kwargs or {}))
        )
        self.stops.append(lambda: server.stop(service.close))
        return server, service

    def start_router(self, workers, **kwargs):
        from services.router.server import start_server

        kwargs.setdefault("health_interval", 0.5)
        server, service = self.loop.run(start_server(workers, **kwargs))
        self.stops.append(lambda: server.stop(service.close))
        return server, service

    def start_gateway(self, tokenizer: str, router: str, **kwargs) -> str:
        import uvicorn

        from services.gateway.app import create_app

        app = create_app(tokenizer, router, [DEFAULT_MODEL], **kwargs)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))

        async def start():
            task = asyncio.create_task(server.serve())
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
            return task

        task = self.loop.run(start())

        async def stop():
            server.should_exit = True
            await task

        self.stops.append(stop)
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop_all(self):
        for stop in reversed(self.stops):
            try:
                self.loop.run(stop(), timeout=30)
            except Exception:  # best effort at teardown
                pass
        self.stops.clear()


@pytest.fixture(scope="module")
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def platform(loop):
    p = Platform(loop)
    yield p
    p.stop_all()


def wait_idle(service, timeout: float = 10.0) -> bool:
    """True once a worker's engine has no request and a full block pool (aborts land asynchronously)."""
    eng = service.engine.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not eng.requests and eng.pool.num_free == eng.pool.num_blocks:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def idle():
    """idle(worker_service) -> bool: see wait_idle."""
    return wait_idle
